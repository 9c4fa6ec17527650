"""cli: the `lowres-reft` command, one module per subcommand.

  main.py        the parser of every subcommand and the one place a `UserError` becomes one line + exit code 2
  run.py         `run`: train a recipe          export.py   `export`: adapter / merged model
  check.py       `check`: validate a recipe     eval.py     `eval`: greedy pass@1 or sampled pass@k of a target
  bench.py       `bench rollout|step|trl`       compare.py  `compare`: nested vs on-policy variants
  build_base.py  `build-base`: build and ship a pretrained tiny base
  layers.py      `layers`: block influence, KL and ESS per skipped layer
  plan.py        `plan`: the memory plan of a recipe against a GPU

A command module parses arguments and calls the library; heavy imports stay inside `run(args)` so `--help` is fast.
May import every other package; nothing imports `cli` (`lowres_reft/__main__.py` and the `lowres-reft` script call
`main`).
"""

from lowres_reft.cli.main import main

__all__ = ["main"]
