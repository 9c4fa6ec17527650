#!/usr/bin/env bash
# Download the wheels the GPU image lacks (it has Python 3.12, torch, transformers, peft, accelerate) into .whl/,
# for scripts/gpu-check.sh to install offline. Pinned to the versions this project is tested with.
#
#   scripts/fetch-gpu-wheels.sh                  # bitsandbytes + math-verify and its deps
#   scripts/fetch-gpu-wheels.sh --with-datasets  # also datasets and its deps (pyarrow alone is ~40 MB)
#
# The GPU checks (tests/test_gpu.py, bench rollout/step with random weights) need only bitsandbytes; the carried
# folder must stay under the transfer limit (64 MiB), which bitsandbytes + pyarrow would exceed.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
wheels=(bitsandbytes==0.50.2 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2)
if [ "${1:-}" = "--with-datasets" ]; then
    wheels+=(datasets==5.2.0 pyarrow==26.0.1 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0)
fi
mkdir -p .whl
for wheel in "${wheels[@]}"; do
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$wheel"
done
ls -l .whl
du -sh .whl
