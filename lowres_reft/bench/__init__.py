"""bench: `lowres-reft bench rollout|step|trl` (the command's face is `cli/bench.py`).

  common.py    model shapes and random-weight models, timing, peak memory, environment, the JSON report
  roofline.py  pure math: layer-time split, ideal speedup, GPU peak bandwidth, bytes read per decode step
  rollout.py   `bench rollout`: tokens/s of our sampling engines per skip ratio vs `model.generate`
  step.py      `bench step`: time and peak memory of full training steps, by phase
  trl_side.py  `bench trl`: ours vs TRL's GRPOTrainer on identical settings (seeds, alternating, subprocesses)
  trl_runs.py  its runs: the shared start, one training run per tool (child process), the shared evaluation
No module imports torch or transformers at import time, so `lowres-reft --help` stays fast. JSON: see BENCHMARKS.md.

May import: `run`, `config`, `rl`, `rollout`, `model`, `tiny`, `data`, `utils` (it measures all of them). Imported by
`cli` and `research` (`compare --trl` runs TRL's side through `trl_runs`).
"""
