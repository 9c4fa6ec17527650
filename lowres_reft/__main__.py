import sys

from lowres_reft.cli.main import main

sys.exit(main())
