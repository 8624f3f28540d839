#!/usr/bin/env bash
# The GPU check in one call on a machine with an NVIDIA GPU: build the kernels for this
# device with CMake, run `python -m engine.selftest`, the GPU tests (pytest -m gpu) and the GPU
# benchmarks, and leave every log and JSON under $OUT (default ./gpu_check_out).
#
#   bench/gpu_check.sh                 # everything that fits in about 9.5 minutes
#   bench/gpu_check.sh selftest|tests|bench|build   # one phase
#   bench/gpu_check.sh --fetch-wheels  # on a machine with pip access: download the Python
#                                      # wheels the GPU machine lacks into .whl/ (carry it)
#
# The device tool's machines have CuPy but not nvmath-python (cuBLASLt bindings); carry its
# wheel in .whl/ (git-ignored: `echo /.whl/ >> .git/info/exclude`) and this script installs it
# into /tmp/site. Phases that would overrun the deadline are skipped and say so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PHASE=${1:-all}
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-570}
START=$(date +%s)
PY=${PYTHON:-python3}

if [[ "$PHASE" == "--fetch-wheels" ]]; then
  mkdir -p .whl
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "nvmath-python==1.0.0"
  ls -l .whl
  exit $?
fi

left() { echo $((DEADLINE_S - ($(date +%s) - START))); }
run_phase() {  # name, seconds it needs, command...
  local name=$1 need=$2
  shift 2
  if [[ "$PHASE" != "all" && "$PHASE" != "$name" ]]; then return 0; fi
  local budget
  budget=$(left)
  if ((budget < need)); then
    echo "== $name: skipped (needs ~${need} s, ${budget} s left)" | tee -a "$OUT/summary.txt"
    return 0
  fi
  echo "== $name (${budget} s left)"
  local t0=$(date +%s)
  timeout "$budget" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc in $(($(date +%s) - t0)) s" | tee -a "$OUT/summary.txt"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
: >"$OUT/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
  --format=csv | tee "$OUT/gpu.txt"
"$PY" - <<'EOF' | tee -a "$OUT/summary.txt"
import importlib.util
for mod in ("cupy", "nvmath", "numba", "ml_dtypes", "pynvml", "pytest_benchmark"):
    print(f"{mod}: {'ok' if importlib.util.find_spec(mod) else 'MISSING'}")
EOF

ARCH=$("$PY" -c "import cupy; p = cupy.cuda.runtime.getDeviceProperties(0); \
cc = f\"{p['major']}{p['minor']}\"; print(cc + ('a' if cc in ('90', '100', '103') else ''))")
echo "device target: sm_$ARCH" | tee -a "$OUT/summary.txt"

run_phase build 60 bash -c "cmake -S . -B build -DTPJ_ARCHS=$ARCH >/dev/null && \
  cmake --build build -j $(nproc) 2>&1 | grep -E 'error|spill|stack frame, [1-9]' ; \
  test -f build/kernels/manifest.json && cat build/kernels/manifest.json"
run_phase selftest 300 "$PY" -m engine.selftest --out "$OUT/selftest" --quick
run_phase tests 60 "$PY" -m pytest -q -m gpu -x -p no:cacheprovider tests/
run_phase bench 60 "$PY" -m pytest -q -s -p no:cacheprovider bench/test_bench_gpu.py \
  --benchmark-json="$OUT/bench.json"
cat "$OUT/summary.txt"
