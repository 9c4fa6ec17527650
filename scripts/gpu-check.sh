#!/usr/bin/env bash
# GPU kit: the `gpu` tests, then bench rollout and bench step for the 1.5B shape, within ~8 minutes on one GPU.
# Writes one JSON (gpu-check.json) combining the test outcome and both bench reports into $1, or $OUT, or ./.
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# (1) installs the wheels carried in .whl/ (scripts/fetch-gpu-wheels.sh) when the image lacks them,
# (2) pytest -m gpu, (3) bench rollout: 1.5B shape, random weights, batch 64, variable prompts, EOS-ended
# completions, every registered engine x both weights modes; bench step: the 1.5B recipe (shared vs per-row prompt
# forward in the update, side by side), (4) the JSON.
set -uo pipefail
out_dir=${1:-${OUT:-.}}
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
work=$(mktemp -d)
mkdir -p "$out_dir"

# (1) only what is missing: never replace the image's torch/transformers.
if compgen -G ".whl/*.whl" >/dev/null; then
    for module in bitsandbytes datasets math_verify; do
        if ! "$py" -c "import $module" 2>/dev/null; then missing=1; fi
    done
    if [ -n "${missing:-}" ]; then
        "$py" -m pip install --quiet --no-index --find-links .whl .whl/*.whl 2>&1 | tail -3
    fi
fi

# (2) the gpu tests (~1 minute)
timeout 150 "$py" -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu.py --junitxml="$work/gpu-tests.xml" \
    >"$work/gpu-tests.txt" 2>&1
tests_rc=$?
tail -5 "$work/gpu-tests.txt"

# (3) the benches, sharing one random-weights 1.5B model (~5 minutes)
engines=$("$py" -c "from lowres_reft.rollout import ENGINES; print(','.join(ENGINES))")
timeout 270 "$py" -m lowres_reft bench rollout --model-config qwen2.5-1.5b --random-weights --cache-dir "$work/models" \
    --batch 64 --prompt-len 128 --prompt-len-spread 64 --new-tokens 256 --eos-mean 128 --skip-ratios 0,0.25 \
    --repeats 2 --warmup 1 --engines "$engines" --weights shared4bit,merged16 --json "$work/rollout.json" \
    >"$work/rollout.txt" 2>&1
rollout_rc=$?
tail -20 "$work/rollout.txt"
timeout 150 "$py" -m lowres_reft bench step --recipe recipes/qwen-1.5b-gsm8k.toml --random-weights \
    --cache-dir "$work/models" --steps 2 --warmup 1 --plain-forward-too --json "$work/step.json" >"$work/step.txt" 2>&1
step_rc=$?
tail -8 "$work/step.txt"

# (4) one JSON
"$py" - "$work" "$out_dir/gpu-check.json" "$tests_rc" "$rollout_rc" "$step_rc" <<'PY'
import json, sys
from pathlib import Path

work, target = Path(sys.argv[1]), Path(sys.argv[2])
rcs = dict(zip(("gpu_tests", "bench_rollout", "bench_step"), map(int, sys.argv[3:6])))

def load(name):
    path = work / name
    return json.loads(path.read_text()) if path.exists() else None

def tail(name, lines=40):
    path = work / name
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []

report = {"exit_codes": rcs, "gpu_tests_output": tail("gpu-tests.txt"), "bench_rollout": load("rollout.json"),
          "bench_step": load("step.json"), "bench_rollout_output": tail("rollout.txt"), "bench_step_output": tail("step.txt")}
target.write_text(json.dumps(report, indent=1) + "\n")
print(f"wrote {target}; exit codes {rcs}")
PY
rm -rf "$work"
[ "$tests_rc" = 0 ] && [ "$rollout_rc" = 0 ] && [ "$step_rc" = 0 ]
