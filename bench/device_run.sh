#!/usr/bin/env bash
# The one prepared device check for a session with a lent GPU (H200): about 8 minutes.
#   1. the CUDA tests on the device (conftest picks the GPU when libcuda.so.1 loads):
#      the agreement suite's cuda cases and tests/test_cuda.py (its PTX test is skipped here:
#      the device compiles the same kernels anyway);
#   2. the benchmark, with what is left of the budget.
# Results go to $OUT when set (the device tool copies $OUT back), else bench/results/.
# Nothing is installed: the device machine has numba, numba-cuda, torch, CuPy and JAX already.
set -u
cd "$(dirname "$0")/.."
RES="${OUT:-bench/results}"
mkdir -p "$RES"
BUDGET="${BUDGET:-470}"           # seconds for the whole script
TEST_LIMIT="${TEST_LIMIT:-200}"   # seconds for the tests
start=$(date +%s)

{ nvidia-smi || true; } > "$RES/gpu_nvidia_smi.txt" 2>&1
python - > "$RES/gpu_env.txt" 2>&1 <<'PY'
import importlib
for name in ("numpy", "numba", "numba_cuda", "torch", "cupy", "jax"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(name, "missing:", exc)
from numba import cuda
print("cuda.is_available:", cuda.is_available())
cuda.detect()
PY

tests=(tests/test_cuda.py)
[ -f tests/test_agreement.py ] && tests=(tests/test_agreement.py "${tests[@]}")
timeout "$TEST_LIMIT" python -m pytest -q -p no:cacheprovider -k "cuda and not ptx" "${tests[@]}" \
    > "$RES/gpu_tests.txt" 2>&1
echo "pytest exit status: $?" >> "$RES/gpu_tests.txt"
tail -3 "$RES/gpu_tests.txt"

left=$(( BUDGET - ($(date +%s) - start) ))
echo "benchmark budget: ${left} s"
if [ "$left" -gt 60 ]; then
    timeout "$left" python bench/bench_gpu.py --budget $(( left - 40 )) --out "$RES/gpu.json" \
        > "$RES/gpu_bench_log.txt" 2>&1
    echo "bench exit status: $?" >> "$RES/gpu_bench_log.txt"
    tail -2 "$RES/gpu_bench_log.txt"
fi
echo "device_run.sh done in $(( $(date +%s) - start )) s"
