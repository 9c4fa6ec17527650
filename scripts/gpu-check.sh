#!/usr/bin/env bash
# GPU kit: the `gpu` tests, then bench step, bench memory and bench rollout for the 1.5B shape, within a time budget
# (default 420 s, GPU_CHECK_BUDGET; the first four stages took ~5 minutes together on an H100, 2026-12-06) on one GPU.
# Writes each stage's JSON as it goes and every stage's output into one log (gpu-check.log), then one JSON
# (gpu-check.json) combining them, into $1, or $OUT, or ./ (a stage cut off by the budget leaves the earlier ones).
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# (0) versions and the GPU, (1) installs the wheels carried in .whl/ (scripts/fetch-gpu-wheels.sh) when the image
# lacks them, (2) pytest -m gpu (~30 s), (3) bench step: the 1.5B recipe as shipped (64 x 512-token rollouts; time
# and torch.cuda.max_memory_allocated per phase), with the loop engine (~75 s) and the static one (~50 s), (4) bench
# memory: the memory plan beside torch.cuda.max_memory_allocated per phase (rollout, update, optimizer, eval) for the
# 1.5B recipe at 128 prompt tokens, (5) bench rollout: 1.5B shape, random weights, batch 64, prompts of 64-128
# tokens, 64 new tokens, r = 0 / 0.25 / 0.5, engines loop and static x both weights modes, vs model.generate
# (~2 min), (6) the JSON. The sizes are the ones that fit: the first run of this kit (256 new tokens, 2 repeats,
# --plain-forward-too) ran past its 8-minute budget on an H100 with neither bench finished.
set -uo pipefail
out_dir=${1:-${OUT:-.}}
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${GPU_CHECK_BUDGET:-420}))
models=$(mktemp -d)
mkdir -p "$out_dir"
log="$out_dir/gpu-check.log"
: >"$log"

# A stage's time limit: its own cap, or what is left before the deadline (less 15 s for the JSON), whichever is less.
limit() { local left=$((deadline - SECONDS - 15)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
# Run a stage with its time limit, its output appended to the log under a header, its tail shown.
stage() { local name=$1 cap=$2; shift 2; echo "== $name" >>"$log"; timeout "$(limit "$cap")" "$@" >>"$log.part" 2>&1
          local rc=$?; cat "$log.part" >>"$log"; tail -4 "$log.part"; rm -f "$log.part"; return $rc; }

# (0)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2 | tee -a "$log"

# (1) only what is missing: never replace the image's torch/transformers.
if compgen -G ".whl/*.whl" >/dev/null; then
    for module in bitsandbytes math_verify; do
        if ! "$py" -c "import $module" 2>/dev/null; then missing=1; fi
    done
    if [ -n "${missing:-}" ]; then
        "$py" -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/gpu-site .whl/*.whl 2>&1 | tail -3
        export PYTHONPATH=$PWD:/tmp/gpu-site
    fi
fi
"$py" -c "import torch, transformers, peft, accelerate, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| bitsandbytes', bitsandbytes.__version__)" | tee -a "$log"

# (2) the gpu tests (~30 s)
stage "pytest -m gpu" 100 "$py" -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu.py
tests_rc=$?

# (3) bench step, the recipe as shipped (merged16 rollouts, gradient checkpointing, micro-batch 8), loop then static
step_rc=0
for engine in loop static; do
    stage "bench step ($engine)" 110 "$py" -m lowres_reft bench step --recipe recipes/qwen-1.5b-gsm8k.toml \
        --random-weights --cache-dir "$models" --steps 1 --warmup 1 --set rollout.engine=$engine \
        --json "$out_dir/step-$engine.json" || step_rc=$?
done

# (4) bench memory: the plan beside the measured peaks
stage "bench memory" 90 "$py" -m lowres_reft bench memory --recipe recipes/qwen-1.5b-gsm8k.toml \
    --model-config qwen2.5-1.5b --random-weights --cache-dir "$models" --prompt-len 128 --json "$out_dir/memory.json"
memory_rc=$?

# (5) bench rollout, sharing the random-weights 1.5B model
stage "bench rollout" 150 "$py" -m lowres_reft bench rollout --model-config qwen2.5-1.5b --random-weights \
    --cache-dir "$models" --batch 64 --prompt-len 128 --prompt-len-spread 64 --new-tokens 64 \
    --skip-ratios 0,0.25,0.5 --repeats 1 --warmup 1 --engines loop,static --weights shared4bit,merged16 \
    --json "$out_dir/rollout.json"
rollout_rc=$?

# (6) one JSON
"$py" - "$out_dir" "$tests_rc" "$step_rc" "$memory_rc" "$rollout_rc" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rcs = dict(zip(("gpu_tests", "bench_step", "bench_memory", "bench_rollout"), map(int, sys.argv[2:6])))

def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None

report = {"exit_codes": rcs, "bench_step": {engine: load(f"step-{engine}.json") for engine in ("loop", "static")},
          "bench_memory": load("memory.json"), "bench_rollout": load("rollout.json"),
          "log_tail": (out / "gpu-check.log").read_text(errors="replace").splitlines()[-200:]}
(out / "gpu-check.json").write_text(json.dumps(report, indent=1) + "\n")
print(f"wrote {out / 'gpu-check.json'}; exit codes {rcs}")
PY
rm -rf "$models"
[ "$tests_rc" = 0 ] && [ "$step_rc" = 0 ] && [ "$memory_rc" = 0 ] && [ "$rollout_rc" = 0 ]
