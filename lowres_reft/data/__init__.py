"""data: math problems in, rewards out. Data sets, the builtin tasks, prompts, answer checking and reward functions.

  datasets.py      `load_problems(cfg, split)`: `[data] name` -> `Problem` lists (builtin, hub, local files, reasoning-gym)
  files.py         hub and local table data sets (gsm8k, svamp, math12k, math500, jsonl/parquet/csv)
  prompts.py       prompt and completion texts (plain or chat template), tokenized prompts
  problems.py      `Problem` and the builtin arithmetic word problems
  reasoning.py     the builtin reasoning task (multi-step word problems with reference chains)
  reasoning_gym.py reasoning-gym tasks as data, and their verifiers
  trl_rows.py      TRL-style prompt/messages rows
  answers.py       final-answer extraction and equivalence; verify_worker.py: math-verify in time-bounded workers
  rewards.py       the reward registry and timed batch scoring

May import: `utils`. Independent of `model` (neither imports the other); config's `DataConfig` for type checking only.
"""
