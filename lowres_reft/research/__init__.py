"""research: `lowres-reft compare` and its analysis. Nested vs on-policy variants side by side, same seeds.

  compare.py     runs the variants (in subprocesses with --jobs), then the table, JSON and plots
  curves.py      accuracy vs RL seconds / rollout tokens and the equal-time table (pure functions)
  trl_curves.py  TRL's GRPOTrainer as a `compare --trl` variant, from the same shared start

May import: `bench` (TRL's runs), `run`, `config`, and everything below. Imported by `cli` only.
"""
