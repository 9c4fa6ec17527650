"""research: `lowres-reft compare` and `layers`: nested vs on-policy variants side by side, which layers matter.

  compare.py     runs the variants (in subprocesses with --jobs), then the table, JSON and plots
  curves.py      accuracy vs RL seconds / rollout tokens and the equal-time table (pure functions)
  trl_curves.py  TRL's GRPOTrainer as a `compare --trl` variant, from the same shared start
  layers.py      `lowres-reft layers`: block influence, KL and ESS per skipped layer

May import: `bench` (TRL's runs), `run`, `config`, and everything below. Imported by `cli` only.
"""
