"""run: a training run and its directory. The loop, evaluation, checkpoints, metrics, trackers, export.

  loop.py        the run on one screen (`train`): warm-up, then the RL steps: rollout -> reward -> advantages ->
                 loss -> update, evals, checkpoints
  session.py     opening a run: every check and load before the first write, then the run directory's lock
  plan.py        the memory plan of a recipe (per phase, itemized), "auto" micro-batches, the start-of-run check
  stop.py        Ctrl-C / SIGTERM: finish the step, save, stop; records.py: a step's metrics line and the summary
  evaluation.py  greedy accuracy during training (`Evaluator`), sampled pass@k, Wilson intervals
  checkpoint.py  atomic checkpoints, verification, resume compatibility rules
  rundir.py      one run per directory (lock, leftovers, checks before writing)
  metrics.py / report.py / tracking.py  metrics JSONL and progress, report.png, experiment trackers
  export.py / modelcard.py  adapter and merged-model export, and their README model cards
  targets.py     what `lowres-reft eval TARGET` names (checkpoint, run dir, model dir, hub name)

May import: `config`, `rl`, `rollout`, `tiny`, `model`, `data`, `utils`. Imported by `bench`, `research`, `cli`.
"""
