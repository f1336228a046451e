#!/usr/bin/env bash
# The GPU checks and benchmarks, sized for one call of a lent device (a call may run 10 minutes; a lease is 15
# minutes of device time in all, machine start included):
#
#     bash benchmarks/gpu_session.sh          # all, within DYLLM_GPU_BUDGET seconds (default 560)
#     bash benchmarks/gpu_session.sh checks   # facts, the GPU and kernel tests, host time, the attention benchmark
#     bash benchmarks/gpu_session.sh decode   # whole decode at LLaDA-8B's layer shapes, batch 8 and 1
#
# `all` runs the decodes first (the targets), then the tests, then the attention benchmark (diagnostics) in what
# is left. Each stage has a time limit, the smaller of its own and what is left of the budget less what the later
# stages keep (DYLLM_GPU_LATER_DECODE seconds for each later decode, DYLLM_GPU_TEST_RESERVE for the tests), and
# leaves what it finished under $OUT: the decode writes its rows after every round of timed decodes and prints
# each stage's progress with the seconds since it started, so a stage cut short shows where its time went and
# does not cost the others (cut by SIGINT: pytest's summary and Python's traceback still print). Measured on an H200 (2026-12-04, second lease): the tests did not finish in 120 s in
# 12 workers (the kernels autotune); the batch-8 decode, cold compiles, did not finish its first round in 255 s
# (no progress lines then): the decode now shares compiled kernels between its modes (--warm-compile-cache;
# compile times in its rows are warm, and say so).
#
# From the repository root, on the device; results in $OUT (the device tool's), else benchmarks/results/gpu. The
# decode runs the first DYLLM_GPU_LAYERS (default 4) of LLaDA-8B's 32 layers (DYLLM_GPU_MODEL=dream: Dream-7B's
# 28, GQA), random weights, bf16, 1150 tokens (bench_decode's full-size default: the paper's length) (named so in
# the rows). Random weights barely move the contexts, so the salient rows are a fixed fraction per layer instead
# of the cosine test (DYLLM_GPU_FORCE_FRACTION, default 0.05, which each layer adds to the rows coming in;
# labelled "fixed" in the rows, next to the fractions this makes per layer). Then copy the CSVs into
# benchmarks/results/ and name the device in the README (the rows carry it). The device tool returns at most 8
# files: logs and plots go into one archive, session.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
LAYERS=${DYLLM_GPU_LAYERS:-4}
MODEL=${DYLLM_GPU_MODEL:-llada}  # llada (LLaDA-8B's shapes) or dream (Dream-7B's)
FRACTION=${DYLLM_GPU_FORCE_FRACTION:-0.05}
DECODE_BATCHES=${DYLLM_GPU_DECODE_BATCHES:-8 1}  # batch 8 first: two targets (7x Inductor, 10x eager) to b1's one
BUDGET=${DYLLM_GPU_BUDGET:-560}
# each stage's own limit in seconds, and the test workers
TEST_LIMIT=${DYLLM_GPU_TEST_LIMIT:-150}
TEST_RESERVE=${DYLLM_GPU_TEST_RESERVE:-90}
ATTENTION_LIMIT=${DYLLM_GPU_ATTENTION_LIMIT:-120}
HOST_LIMIT=${DYLLM_GPU_HOST_LIMIT:-150}
DECODE_LIMIT=${DYLLM_GPU_DECODE_LIMIT:-400}
LATER_DECODE=${DYLLM_GPU_LATER_DECODE:-150}
WORKERS=${DYLLM_GPU_TEST_WORKERS:-12}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
case "$PART" in checks|decode|all) ;; *) echo "usage: $0 [checks|decode|all]" >&2; exit 2 ;; esac
case "$MODEL" in llada|dream) ;; *) echo "DYLLM_GPU_MODEL: llada or dream, not '$MODEL'" >&2; exit 2 ;; esac

limit() {  # limit WANTED [RESERVE]: WANTED seconds, or the budget left less RESERVE (and a stage's grace)
    local left=$(( BUDGET - SECONDS - GRACE - 5 - ${2:-0} ))
    echo $(( $1 < left ? $1 : (left > 1 ? left : 1) ))
}

# A stage past its limit gets SIGINT, then GRACE seconds before SIGKILL: pytest then still prints its summary (what
# passed, the slowest tests) and Python the traceback of where the benchmark was, which a SIGTERM lost.
GRACE=15

stage() {  # stage LIMIT_S LOG COMMAND...: runs COMMAND for at most LIMIT_S seconds, output to the screen and LOG
    local limit=$1 log=$2
    shift 2
    echo "== $(date +%T) $* (limit ${limit}s)" | tee -a "$log"
    timeout -s INT -k "$GRACE" "$limit" "$@" 2>&1 | tee -a "$log"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, 'device', torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu_facts.txt"
# backend="dyllm" resolves through the package's entry point, so it must be installed; the device reaches no
# package registry, and its image has the dependencies: no dependencies, no build isolation.
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$OUT/gpu_facts.txt"

if [ "$PART" != checks ]; then
    set -- $DECODE_BATCHES
    for batch in "$@"; do
        shift
        # what the later stages keep: each later decode's share, and the tests' in `all`
        keep=$(( $# * LATER_DECODE + ($([ "$PART" = all ] && echo "$TEST_RESERVE" || echo 0)) ))
        # batch 8 is the query-pruning target (>= 7x dense Inductor, >= 10x eager). --profile after the rows are
        # written: 8 steps of each mode under torch.profiler (is a sparse step bound by launches or by the GPU?)
        modes=$([ "$batch" = 1 ] && echo eager,inductor,dyllm-exact || echo eager,inductor,dyllm-exact-qp)
        stage "$(limit "$DECODE_LIMIT" "$keep")" "$OUT/gpu_bench.log" "$PY" benchmarks/bench_decode.py \
            --model "$MODEL" --layers "$LAYERS" --batch "$batch" --modes "$modes" --force-fraction "$FRACTION" \
            --repeats 2 --profile --warm-compile-cache --log-compiles --out "$OUT/decode_gpu_${MODEL}_b$batch.csv"
    done
fi
if [ "$PART" != decode ]; then
    # GPU-marked tests (Inductor on CUDA, the compiled model on the kernels against the oracle) and the kernel tests
    # natively, the slowest named. The device's transformers may be older or newer than the ones tested (4.57,
    # 5.25): a test module that fails to import there must not stop the others.
    stage "$(limit "$TEST_LIMIT")" "$OUT/gpu_tests.log" "$PY" -m pytest -q -ra -n "$WORKERS" -m "gpu or kernels" \
        tests -p no:cacheprovider --continue-on-collection-errors --durations=15
    # A step's host time per layer on this machine (32 layers at width 32: launches, not arithmetic), dense against
    # sparse; at 1024 tokens both modes call the attention op at every layer, as at LLaDA-8B's sizes
    # (docs/benchmarks.md, "Host-bound steps"); -cw: the variants' kernels launched from Inductor's C++ wrapper
    stage "$(limit "$HOST_LIMIT")" "$OUT/gpu_host.log" "$PY" benchmarks/bench_decode.py --model host \
        --prompt-length 992 --modes inductor,dyllm-exact,dyllm-exact-cw,dyllm-paper --repeats 2 --warm-compile-cache \
        --out "$OUT/decode_gpu_host_bound.csv"
    # --profile: where each call's time goes (torch.profiler), the tiles the autotuners chose, and the compiled
    # kernels' registers and spills
    stage "$(limit "$ATTENTION_LIMIT")" "$OUT/gpu_attention.log" "$PY" benchmarks/bench_attention.py --batch 1,8 \
        --profile --out "$OUT/attention_gpu.csv"
fi
# at most 8 files come back from the device: the logs and plots in one archive
(cd "$OUT" && shopt -s nullglob && kept=(*.log *.png) && [ ${#kept[@]} -gt 0 ] && tar czf session.tgz -- "${kept[@]}" \
    && rm -f -- "${kept[@]}")
ls -la "$OUT"
