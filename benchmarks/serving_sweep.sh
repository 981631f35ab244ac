#!/usr/bin/env bash
# A serving sweep: start our OpenAI server on MODEL, run benchmark_serving once per concurrency
# (random dataset, ISL/OSL 1024/1024 by default, range ratio 0.8, ignore_eos, request rate inf),
# save each result JSON in RESULT_DIR for the dashboard, stop the server.
#   bash benchmarks/serving_sweep.sh MODEL RESULT_DIR "1 4 16 64 256" [server flags...]
# MODEL is a benchmark model name (atom/benchmarks/configs: dummy weights) or a model path.
# SERVER=vllm serves it with vLLM's OpenAI server instead (the peer bundle unpacked in VLLM_SITE,
# default ~/site-vllm, on that process's PYTHONPATH alone), measured by the same client.
# Prompts per run: 4 x concurrency below 16, 2 x below 64, else one wave (concurrency) — a
# sitting's budget, not ATOM CI's 10 x; PROMPTS=N overrides. ISL, OSL, PORT override the rest.
set -uo pipefail
model=$1 dir=$2 concs=$3
shift 3
mkdir -p "$dir"
port=${PORT:-8011} isl=${ISL:-1024} osl=${OSL:-1024}
name=$(basename "$model")  # the served name and the results' model_id
path=$model
if [ ! -e "$model" ]; then  # a benchmark model name: its folder (config + stand-in tokenizer)
    path=$(python3 -c "import sys; from atom.benchmarks.model_dirs import benchmark_model_dir as d
print(d(sys.argv[1]))" "$model") || exit 1
    set -- --load-format dummy "$@"
fi
commit=${ATOM_TAG:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
gpu=$(python3 -c "import torch
print(torch.cuda.get_device_name(0).split()[-1] if torch.cuda.is_available() else 'cpu')")

engine=${SERVER:-atom}
log="$dir/server-$engine-$name.log"
if [ "$engine" = vllm ]; then
    PYTHONPATH=${VLLM_SITE:-$HOME/site-vllm} VLLM_USE_FLASHINFER_SAMPLER=0 \
        python3 -m vllm.entrypoints.openai.api_server --model "$path" --served-model-name "$name" \
        --port "$port" "$@" >"$log" 2>&1 &
else
    python3 -m atom.entrypoints.openai_server --model "$path" --served-model-name "$name" \
        --server-port "$port" "$@" >"$log" 2>&1 &
fi
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null' EXIT
python3 - "$port" "$server" <<'EOF' || { tail -n 30 "$log"; exit 1; }
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        break
    except OSError:
        os.kill(pid, 0)  # raises once the server has died
        time.sleep(1)
EOF
grep -h -e "ready in" -e "captured" "$log"

for c in $concs; do
    n=${PROMPTS:-$((c < 16 ? 4 * c : (c < 64 ? 2 * c : c)))}
    python3 -m atom.benchmarks.benchmark_serving --backend vllm --model "$model" --port "$port" \
        --served-model-name "$name" \
        --dataset-name random --random-input-len "$isl" --random-output-len "$osl" \
        --random-range-ratio 0.8 --num-prompts "$n" --max-concurrency "$c" --request-rate inf \
        --ignore-eos --num-warmups 1 --seed 0 --percentile-metrics ttft,tpot,itl,e2el \
        --save-result --result-dir "$dir" --disable-tqdm \
        --metadata "engine=$engine" "gpu=$gpu" num_gpus=1 "commit=$commit" >"$dir/run-$engine-c$c.log" 2>&1
    echo "concurrency $c, $n prompts: rc=$?"
    grep -h -e "Successful" -e "Failed" -e "Output token throughput" -e "Mean TTFT" \
        -e "Mean TPOT" "$dir/run-$engine-c$c.log"
done
