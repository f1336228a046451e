#!/usr/bin/env bash
# The GPU checks in one call of a lent device (a lease is 15 minutes of device time in all, machine start
# included; one call may run 10): machine facts, the GPU tests, then the decode benchmark at LLaDA-8B's layer
# shapes in bf16, sized to fit (the first DYLLM_GPU_LAYERS of 32 layers, random weights, named so in the rows).
# Each stage has a time limit and leaves what it finished under $OUT, so a stage cut short does not cost the
# others. From the repository root, on the device:
#
#     bash benchmarks/gpu_session.sh          # results in $OUT (the device tool's), else benchmarks/results/gpu
#
# Then copy the CSVs into benchmarks/results/ and name the device in the README (the CSV rows carry it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
LAYERS=${DYLLM_GPU_LAYERS:-4}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

stage() {  # stage LIMIT_S LOG COMMAND...: runs COMMAND for at most LIMIT_S seconds, output to the screen and LOG
    local limit=$1 log=$2
    shift 2
    echo "== $(date +%T) $* (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
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

# The device's transformers may be newer than the pin (<5): a test module that fails to import there must not
# stop the GPU tests from running.
stage 150 "$OUT/gpu_tests.log" "$PY" -m pytest -q -ra -m gpu tests -p no:cacheprovider --continue-on-collection-errors
stage 210 "$OUT/gpu_bench.log" "$PY" benchmarks/bench_decode.py --model llada --layers "$LAYERS" --batch 1 \
    --modes eager,inductor,dyllm-exact --repeats 2 --out "$OUT/decode_gpu_b1.csv"
stage 180 "$OUT/gpu_bench.log" "$PY" benchmarks/bench_decode.py --model llada --layers "$LAYERS" --batch 8 \
    --modes eager,inductor,dyllm-exact-qp --repeats 2 --out "$OUT/decode_gpu_b8.csv"
ls -la "$OUT"
