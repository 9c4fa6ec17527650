import sys

from lowres_reft.cli import main

sys.exit(main())
