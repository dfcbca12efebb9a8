#!/usr/bin/env bash
# A lent-GPU session in one call (issue 19): build with CUDA, run tests/gpu, then the GPU
# benchmarks, each stage capped so the whole run ends inside BUDGET seconds. Results go to
# $OUT (at most 8 files come back): summary.txt, build.log, tests.log, bench.log and one JSON
# per benchmark. STAGES picks the stages (default: the first session's set).
#
#   device run: bash bench/gpu_session.sh 500
#   device run: STAGES=dense-tests,sweep,attention,layer bash bench/gpu_session.sh 430
#   device run: STAGES=quant-tests,quant-linear bash bench/gpu_session.sh 420
set -u
BUDGET=${1:-500}
STAGES=",${STAGES:-build,tests,cuda-tests,linear,nm24,attention},"
OUT=${OUT:-/tmp/sparsekern-gpu-out}
mkdir -p "$OUT"
START=$(date +%s)
S="$OUT/summary.txt"
left() { echo $((BUDGET - ($(date +%s) - START))); }
log() { echo "[$(($(date +%s) - START)) s] $*" | tee -a "$S"; }
want() { [[ $STAGES == *",$1,"* ]]; }
# stage NAME SECONDS LOGFILE CMD...: runs CMD under timeout min(SECONDS, time left - 5)
stage() {
    local name=$1 want=$2 file=$3
    shift 3
    want "$name" || return 0
    local cap
    cap=$(left)
    cap=$((cap - 5 < want ? cap - 5 : want))
    if [ "$cap" -lt 20 ]; then
        log "$name: skipped (${cap}s left)"
        return 0
    fi
    log "$name: start (cap ${cap}s)"
    echo "=== $name" >>"$file"
    # SIGINT first: pytest then prints its summary so far, the benchmarks keep their partial JSON
    timeout -s INT -k 20 "$cap" "$@" >>"$file" 2>&1
    log "$name: rc=$?"
}

export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=14
export SPARSEKERN_CACHE_DIR=/tmp/sparsekern-dispatch-cache TRITON_CACHE_DIR=/tmp/triton-cache
unset TRITON_INTERPRET
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
    python3 -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
    nvcc --version | tail -2
    git rev-parse HEAD 2>/dev/null
    echo "stages: $STAGES"
} >>"$S" 2>&1
ln -sfn ../kernels sparsekern/kernels

# 1. the extension with CUDA, in the background; the Triton tests need none of it
BUILD=""
if want build; then
    (timeout 300 python3 bench/gpu_build.py >"$OUT/build.log" 2>&1; echo "build rc=$?" >>"$OUT/build.log") &
    BUILD=$!
fi

XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 8"
PYTEST=(python3 -m pytest -v -p no:cacheprovider -rfE --tb=short --durations=10 -o addopts= $XDIST)
stage tests 190 "$OUT/tests.log" "${PYTEST[@]}" tests/gpu/test_triton_linear_gpu.py \
    tests/gpu/test_attention_gpu.py tests/gpu/test_grouped_triton_gpu.py
stage dense-tests 60 "$OUT/tests.log" "${PYTEST[@]}" tests/gpu/test_attention_gpu.py -k dense
stage quant-tests 210 "$OUT/tests.log" "${PYTEST[@]}" tests/gpu/test_quant_triton_gpu.py

if [ -n "$BUILD" ]; then
    wait $BUILD
    log "build: $(tail -1 "$OUT/build.log")"
fi
stage cuda-tests 90 "$OUT/tests.log" "${PYTEST[@]}" tests/gpu/test_cuda_nm24.py

# 2. benchmarks (alone on the GPU)
stage linear 150 "$OUT/bench.log" python3 bench/bench_linear_gpu.py "$OUT/linear.json"
stage sweep 170 "$OUT/bench.log" python3 bench/gpu_sweep.py "$OUT/sweep.json"
QPATTERNS=2:4,2:4+int8,2:4+int4g128,block64x64:0.9,block64x64:0.9+int8,block64x64:0.9+int4g64
stage quant-linear 170 "$OUT/bench.log" python3 bench/bench_linear_gpu.py "$OUT/quant-linear.json" \
    --patterns "$QPATTERNS" --rows 1,16,4096
stage nm24 90 "$OUT/bench.log" python3 bench/bench_nm24_gpu.py --reps 20 --out "$OUT/nm24.json"
SK=(python3 -c "import sys; from sparsekern.cli import main; sys.exit(main(sys.argv[1:]))" bench --device cuda --no-progress)
stage attention 90 "$OUT/bench.log" "${SK[@]}" --suite attention --out /tmp/sk-attn
cp /tmp/sk-attn/*.json "$OUT/attention.json" 2>/dev/null
stage layer 100 "$OUT/bench.log" "${SK[@]}" --suite layer --out /tmp/sk-layer --patterns dense,block64x64:0.9 \
    --shapes llama7b.attn,llama7b.up,llama7b.down --rows 1,16,4096
cp /tmp/sk-layer/*.json "$OUT/layer.json" 2>/dev/null
log "done; $(left)s of the budget left"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -5 | tee -a "$S"
