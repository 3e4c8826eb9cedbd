#!/usr/bin/env bash
# The one prepared GPU check (an H200 machine with CUDA, PyTorch, numba, numba-cuda and CuPy
# installed for its `python3`; nothing is installed from the network): 247 s on an H200.
#   1. versions and nvidia-smi, first in the output;
#   2. the CUDA tests on the device (conftest picks the GPU when libcuda.so.1 loads): the
#      agreement suite's cuda cases and tests/test_cuda.py (its PTX test is left out: the
#      device compiles the same kernels anyway), the torch / CuPy zero-copy cases included;
#   3. the benchmark (bench/bench_gpu.py) with what is left of the budget, with
#      `nvidia-smi dmon` (clocks, power, utilisation) sampled beside it;
#   4. with 70 s or more left, Nsight Compute on one forward and one dq launch (N = M = 4096,
#      D = 64, float32: throughput, occupancy, launch statistics), if ncu is there.
# The project is imported from this working tree (PYTHONPATH), not installed.  If numba-cuda
# there lacks numba.cuda.core, the wheel in .whl/ (when carried) is installed to /tmp/site.
# Results go to $OUT when set, else bench/results/ (at most 6 files):
#   gpu_env.txt (versions, nvidia-smi, numba's device list), gpu_tests.txt (pytest),
#   gpu.json and gpu_bench_log.txt (benchmark), gpu_dmon.txt, gpu_ncu.txt.
# BUDGET (s, default 400) bounds the whole script; TEST_LIMIT (s, default 170) the tests;
# BENCH_ARGS is passed to bench_gpu.py (`BENCH_ARGS=--simulate` checks this script without a GPU).
set -u
cd "$(dirname "$0")/.."
RES="${OUT:-bench/results}"
mkdir -p "$RES"
BUDGET="${BUDGET:-400}"
TEST_LIMIT="${TEST_LIMIT:-170}"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=python3

if ! $PY -c "import numba.cuda.core" 2>/dev/null && ls .whl/numba_cuda-*.whl >/dev/null 2>&1; then
    echo "numba.cuda.core missing: installing the carried numba-cuda wheel to /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/numba_cuda-*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

{
    echo "== versions"
    command -v $PY
    $PY - <<'PY'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
for name in ("numpy", "numba", "numba_cuda", "torch", "cupy", "jax", "pytest"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(name, "missing:", exc)
try:
    import torch
    print("torch.version.cuda", torch.version.cuda, "| device", torch.cuda.get_device_name(0))
except Exception as exc:
    print("torch cuda:", exc)
import numba.cuda.core  # noqa: F401  (iem_ref.accel.cuda needs it)
from numba import cuda
print("numba cuda.is_available:", cuda.is_available())
from numba.cuda.cudadrv import driver
print("CUDA driver API version:", driver.driver.get_version(), "| runtime:", cuda.runtime.get_version())
PY
    echo "== nvidia-smi"
    nvidia-smi || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,persistence_mode --format=csv || true
    echo "== numba cuda.detect()"
    $PY -c "from numba import cuda; cuda.detect()" || true
} > "$RES/gpu_env.txt" 2>&1
head -n 12 "$RES/gpu_env.txt"
grep -E "Driver Version|NVIDIA H|^name," -A1 "$RES/gpu_env.txt" | head -n 6

echo "== tests ($(elapsed) s)"
tests=(tests/test_cuda.py)
[ -f tests/test_agreement.py ] && tests=(tests/test_agreement.py "${tests[@]}")
per_test=()  # one hung test must not take the whole test budget (pytest-timeout, where installed)
$PY -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 100)
timeout "$TEST_LIMIT" $PY -m pytest -v -rfEs -p no:cacheprovider --durations=15 "${per_test[@]}" -k "cuda and not ptx" "${tests[@]}" \
    > "$RES/gpu_tests.txt" 2>&1
echo "pytest exit status: $?" >> "$RES/gpu_tests.txt"
grep -E "^(FAILED|ERROR)" "$RES/gpu_tests.txt" | head -n 20
tail -n 2 "$RES/gpu_tests.txt"

left=$(( BUDGET - $(elapsed) ))
echo "== benchmark ($(elapsed) s; ${left} s left)"
if [ "$left" -gt 60 ]; then
    nvidia-smi dmon -s pucm -d 2 > "$RES/gpu_dmon.txt" 2>&1 &
    dmon=$!
    # leave 80 s for ncu at the end
    timeout "$(( left - 5 ))" $PY bench/bench_gpu.py ${BENCH_ARGS:-} --budget $(( left - 80 )) --out "$RES/gpu.json" \
        > "$RES/gpu_bench_log.txt" 2>&1
    echo "bench exit status: $?" >> "$RES/gpu_bench_log.txt"
    kill "$dmon" 2>/dev/null
    wait "$dmon" 2>/dev/null
    $PY - "$RES/gpu.json" <<'PY' || tail -n 5 "$RES/gpu_bench_log.txt"
import json, sys
r = json.load(open(sys.argv[1]))
ms = lambda c, k: f"{1e3 * c[k]:.2f}" if k in c else "-"
print("N D dtype | fwd ours torch roof | bwd ours torch roof | peak fwd/bwd MB | err")
for c in r["configs"]:
    mb = lambda k: f"{c[k] / 2**20:.1f}" if k in c else "-"
    print(c["n"], c["d"], c["dtype"], "|", ms(c, "ours_fwd_s"), ms(c, "torch_fwd_s"), ms(c, "roof_fwd_s"), "|",
          ms(c, "ours_bwd_s"), ms(c, "torch_bwd_s"), ms(c, "roof_bwd_s"), "|",
          mb("ours_fwd_peak_alloc_bytes"), mb("ours_bwd_peak_alloc_bytes"), "|", c.get("error", c.get("torch_error", "")))
print("skipped:", len(r["skipped"]), "| variants:", len(r.get("variants", [])), "| elapsed", round(r.get("elapsed_s", 0)), "s")
PY
    tail -n 2 "$RES/gpu_bench_log.txt"
fi

left=$(( BUDGET - $(elapsed) ))
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
if [ "$left" -ge 70 ] && [ -n "$NCU" ]; then
    echo "== ncu ($(elapsed) s; ${left} s left): $NCU"
    cat > /tmp/ncu_case.py <<'PY'
import numpy as np, torch
from iem_ref.accel import cuda as C
rng = np.random.default_rng(0)
q, k, v, g = (torch.from_numpy(rng.standard_normal((4096, 64)).astype(np.float32)).cuda() for _ in range(4))
a, lse = C.attention(q, k, v, return_lse=True)
C.attention_vjp(q, k, v, g, out=a, lse=lse)
torch.cuda.synchronize()
PY
    timeout $(( left - 10 )) "$NCU" --clock-control none --target-processes all -k "regex:forward|dq" -c 2 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis $PY /tmp/ncu_case.py > "$RES/gpu_ncu.txt" 2>&1
    echo "ncu exit status: $?" >> "$RES/gpu_ncu.txt"
    grep -E "Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Throughput|Memory Throughput|ncu exit" "$RES/gpu_ncu.txt" | head -n 16
fi
echo "device_run.sh done in $(elapsed) s"
