"""rl: the learning. Scored rollout batches, the corrected GRPO loss, the update, and the supervised warm-up and skip
distillation before RL.

  batch.py          a step's prompts (a pure function of the step), their G completions from the nested model,
                    rewards and group advantages (`ScoredBatch`)
  loss.py           pure tensor math: group advantages, the corrections (none, tis, seq_is, retrace), the policy
                    objective, aggregation, KL; formulas in the docstrings
  update.py         the update: micro-batched log-probs + loss + backward, then the optimizer (`apply_updates`)
  shared_prompt.py  the update's log-probs with each distinct prompt forwarded once; microbatch.py: its micro-batches
  warmup.py         supervised warm-up on reference solutions, then skip distillation
  builders.py       what a recipe builds for training: engine, optimizer, LR schedule, skip-set schedule
  distributed.py    data-parallel helpers (reductions, gathers, gradient sums)

May import: `rollout`, `model`, `data`, `utils`; config's sections for type checking only. Never `run` (the loop
calls rl, not the other way round).
"""
