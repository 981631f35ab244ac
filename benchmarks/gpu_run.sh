#!/usr/bin/env bash
# Everything GPU-related in one call on the GPU machine (the device tool's `run`):
#   bash benchmarks/gpu_run.sh
# Installs carried wheels (.whl/), runs the CUDA tests and, when the SmolLM2 GGUF was carried in
# two parts (~/smol/part-aa from a first call, .gpu/smol.part-ab in this one), the example on it.
# Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/atom-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" >>"$OUT/gpu.txt"

gguf="$HOME/smol/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$HOME/smol/part-aa" ] && [ -f .gpu/smol.part-ab ]; then
    cat "$HOME/smol/part-aa" .gpu/smol.part-ab >"$gguf"
fi
[ -f "$gguf" ] && export ATOM_SMOLLM2_GGUF="$gguf"

python3 -m pytest tests/gpu -q -s -rs 2>&1 | tee "$OUT/gpu_tests.log"
if [ -f "$gguf" ]; then
    python3 -m atom.examples.simple_inference --model "$gguf" 2>&1 \
        | grep -v -e "de-quantizing" | tee "$OUT/simple_inference.log"
fi
