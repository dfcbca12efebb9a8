#!/usr/bin/env bash
# The llama.cpp peer for `sparsekern bench --suite generate --peer llama.cpp`: a throwaway venv with
# llama-cpp-python compiled from its sdist for this CPU (never a `make test` dependency, never in
# .venv: sparsekern's own process never imports llama_cpp, it runs this venv's python).
#
#   bash bench/llamacpp_env.sh          # prints the venv's python; builds it first if missing
#
# Where: $SPARSEKERN_LLAMACPP_VENV, default .venv-llamacpp at the repository root (git-ignored).
# The build compiles llama.cpp with 1 job under nice 19 (~15-30 min on 2 cores) so a benchmark
# running beside it is disturbed as little as possible; JOBS=2 halves the time.
set -euo pipefail

VERSION=0.3.36  # llama-cpp-python; vendors llama.cpp at the commit this release pins
# numpy etc.: the versions this was built and run with, so a teammate gets the same environment.
DEPS=(numpy==2.4.6 diskcache==5.6.3 jinja2==3.1.6 typing-extensions==4.16.0 MarkupSafe==3.0.4)
# GGML_NATIVE: -march=native, i.e. every SIMD extension of this CPU (AVX-512 where present), as a
# user building llama.cpp for their own machine gets. No BLAS: decode is GEMV, BLAS only helps
# prefill. LLAVA (multimodal), tools, examples, tests and the server are not needed here.
CMAKE_FLAGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SPARSEKERN_LLAMACPP_VENV:-$ROOT/.venv-llamacpp}
PY=$VENV/bin/python

check() {
    "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null
}

if [ -x "$PY" ] && check; then
    echo "$PY"
    exit 0
fi
echo "building llama-cpp-python==$VERSION from source into $VENV (CMAKE_ARGS=$CMAKE_FLAGS)" >&2
python3 -m venv "$VENV"
"$PY" -m pip install -q "${DEPS[@]}"
CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-1} FORCE_CMAKE=1 \
    nice -n 19 "$PY" -m pip install -q --no-binary llama-cpp-python --no-cache-dir \
    "llama-cpp-python==$VERSION" "${DEPS[@]}"
check || { echo "llama-cpp-python $VERSION did not import from $VENV" >&2; exit 1; }
echo "$PY"
