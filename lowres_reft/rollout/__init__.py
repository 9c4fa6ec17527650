"""rollout: sampling. One seam, `Engine.generate(prompts, skip) -> RolloutBatch`, used by training, eval and bench.

  engine.py    `RolloutBatch`, the engine registry (`ENGINES`, `make_engine`) and the reference decode loop, which
               records the behavior log-prob of every sampled token; batch helpers (padding, merging, decoding)
  static.py    the static engine: preallocated KV cache and buffers, one CUDA graph replayed per token on CUDA
  sampling.py  per-token sampling shared by the engines (inverse CDF from one uniform per row, nucleus log-probs)

May import: `model`, `utils`. Independent of `tiny`.
"""
