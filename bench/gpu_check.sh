#!/usr/bin/env bash
# One command for a machine with a GPU: make cupy/numba-cuda importable, run the GPU tests, time the
# production chain (bench/gpu.py --batches 1 8 --size 4096 -> bench/gpu.json). Ends within 8 minutes.
#
#   bench/gpu_check.sh               # on the GPU machine, from anywhere (it cds to the repository)
#   bench/gpu_check.sh --cpu-smoke   # dry run of the plumbing on a CPU: numpy, 512^2, B = 1 2,
#                                    # writes bench/gpu-check-cpu.json (no install of cupy)
#
# Steps (each is timed out so the whole script ends by its deadline; every step runs even if an
# earlier one failed; the exit status is non-zero if any step failed, and the summary says which):
#   (a) install: when `python -c "import cupy"` fails, `pip install -e '.[gpu]'` -- except that the
#       lent H200 image has NO network: when a .whl/ folder with wheels is present (cupy-cuda12x,
#       numba-cuda and their dependencies, built elsewhere) they are installed instead with
#       `pip install --no-index --no-deps .whl/*.whl`. astropy/sep/fastavro/pytest the same way when
#       missing, and nightsift itself (`pip install --no-deps --no-build-isolation -e .`) when it is
#       not importable. No root needed (pip falls back to a user install).
#   (b) GPU tests: `python -m pytest -q -m gpu tests/kernels tests/engine`, then the Numba CUDA
#       kernel tests in-process on the GPU: `python -m pytest -q tests/kernels/test_cuda_*.py`
#   (c) bench: `python bench/gpu.py --batches 1 8 --size 4096 --out bench/gpu.json` with what is
#       left of the 8 minutes (it writes its JSON after every row, so a cut-short run keeps rows)
#   (d) summary; exit 1 if any step failed.
# Seen on the lent H200 (2026-12-04): its numpy 2.5.2 breaks numba-cuda 0.30.4 at import (np.row_stack),
# so carry numpy 2.4.x in .whl/ too; there the GPU tests need more than 95 s (give GPU_CHECK_BUDGET_S
# >= 600 when the device time allows) and bench/gpu.py --batches 1 8 about 5 minutes. The command used
# is in bench/RESULTS.md ("gpu").
# Environment: PYTHON (default .venv/bin/python when present, else python3), GPU_CHECK_BUDGET_S
# (default 480), BENCH_MIN_S (seconds kept for the bench, default 300). When $OUT names a writable
# folder (the device runner's), the JSON and the logs are copied there.
set -u

SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.." || exit 2
if command -v bash >/dev/null 2>&1; then SH=bash; else SH=sh; fi
MODE=${GPU_CHECK_MODE:-gpu}
STEP=""
case "${1:-}" in
  --cpu-smoke) MODE=cpu ;;
  --step) STEP=${2:-} ;;  # internal: run one step (so that `timeout` can bound it)
  "" ) ;;
  -h|--help) sed -n '2,26p' "$SELF"; exit 0 ;;
  *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
elif command -v python3 >/dev/null 2>&1; then PY=python3
else PY=python
fi
BUDGET=${GPU_CHECK_BUDGET_S:-480}
BENCH_MIN=${BENCH_MIN_S:-300}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
FAILED=""
HAVE_TIMEOUT=0
command -v timeout >/dev/null 2>&1 && HAVE_TIMEOUT=1

now() { date +%s; }
left() { echo $((DEADLINE - $(now))); }
# run_step NAME SECONDS CMD...: run with a time limit, log to $LOGDIR/NAME.log, record failure
run_step() {
  name=$1; secs=$2; shift 2
  [ "$secs" -lt 10 ] && secs=10
  echo "== $name (limit ${secs} s): $*"
  t0=$(now)
  if [ "$HAVE_TIMEOUT" = 1 ]; then
    timeout -k 15 "$secs" "$@" > "$LOGDIR/$name.log" 2>&1
  else
    "$@" > "$LOGDIR/$name.log" 2>&1
  fi
  rc=$?
  tail -n 25 "$LOGDIR/$name.log"
  [ -n "$(tail -c 1 "$LOGDIR/$name.log")" ] && echo  # the log's last line may lack its newline
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "!! $name: timed out after ${secs} s (log: $LOGDIR/$name.log)"
    FAILED="$FAILED $name(timeout)"
  elif [ "$rc" != 0 ]; then
    echo "!! $name: exit status $rc (log: $LOGDIR/$name.log)"
    FAILED="$FAILED $name(rc=$rc)"
  else
    echo "ok $name ($(( $(now) - t0 )) s)"
  fi
  return "$rc"
}

importable() { "$PY" -c "import $1" >/dev/null 2>&1; }

wheels_present() { ls .whl/*.whl >/dev/null 2>&1; }

# the Numba CUDA kernels can launch on a GPU here (numba-cuda, or numba's own cuda target)
numba_on_gpu() {
  "$PY" -c "import sys; from nightsift.kernels._cuda import cuda_mode; sys.exit(cuda_mode() != 'gpu')" \
    >/dev/null 2>&1
}

# install DESC ONLINE-PIP-ARGS...: offline from .whl/ when wheels are there, else from the index
install() {
  desc=$1; shift
  if wheels_present; then
    echo "installing $desc from .whl/*.whl (offline; the lent H200 image has no network)"
    "$PY" -m pip install --no-index --no-deps .whl/*.whl
  else
    echo "installing $desc from the package index: needs network (the lent H200 image has none:"
    echo "  put the wheels, dependencies included (fastrlock, cuda-bindings, ...), in .whl/ and rerun:"
    echo "  pip download -d .whl 'cupy-cuda12x>=13' 'numba-cuda[cu12]>=0.30' on a machine with network)"
    "$PY" -m pip install "$@"
  fi
}

step_install() {
  rc=0
  echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
  if ! importable nightsift.engine; then
    echo "nightsift is not importable: installing it (editable, no dependencies)"
    "$PY" -m pip install --no-deps --no-build-isolation -e . || rc=1
  fi
  for m in astropy sep fastavro pytest; do
    if ! importable "$m"; then
      install "$m" "$m" || rc=1
      importable "$m" || { echo "$m still not importable"; rc=1; }
    fi
  done
  if [ "$MODE" = gpu ]; then
    if ! importable cupy || ! numba_on_gpu; then
      install "cupy and numba-cuda" -e '.[gpu]' || rc=1
    fi
    "$PY" - <<'EOF' || rc=1
import cupy
n = cupy.cuda.runtime.getDeviceCount()
p = cupy.cuda.runtime.getDeviceProperties(0)
name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
print(f"cupy {cupy.__version__}: {n} device(s), device 0 = {name}")
from nightsift.kernels._cuda import cuda_mode
mode = cuda_mode()
print(f"numba CUDA mode: {mode}")
if mode != "gpu":
    raise SystemExit("the Numba CUDA kernels cannot run on the GPU (numba-cuda missing or too old?)")
EOF
  else
    echo "cpu smoke: cupy/numba-cuda not installed (no GPU here)"
  fi
  return "$rc"
}

step_gpu_tests() {
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/engine
  rc=$?
  if [ "$rc" = 5 ]; then  # pytest: no tests collected
    if [ "$MODE" = cpu ]; then echo "cpu smoke: no GPU test selected here (expected)"; return 0; fi
    echo "no GPU test ran: cupy does not see the GPU?"
  fi
  return "$rc"
}

step_cuda_kernel_tests() {
  # on a GPU the kernel tests run in this process on cupy arrays (their simulator twin skips);
  # on a CPU each file reruns itself under NUMBA_ENABLE_CUDASIM=1 in a subprocess
  "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_cuda_*.py
}

if [ -n "$STEP" ]; then
  case "$STEP" in
    install) step_install ;;
    gpu_tests) step_gpu_tests ;;
    cuda_kernel_tests) step_cuda_kernel_tests ;;
    *) echo "unknown step $STEP" >&2; exit 2 ;;
  esac
  exit $?
fi

export PYTHON="$PY" GPU_CHECK_MODE="$MODE"
LOGDIR=${TMPDIR:-/tmp}/nightsift-gpu-check.$$
mkdir -p "$LOGDIR"
echo "nightsift gpu_check ($MODE) in $(pwd), python $PY, budget ${BUDGET} s, logs in $LOGDIR"
run_step install 150 "$SH" "$SELF" --step install

# the tests share what is left after the bench's reserve (at least 60 s)
T=$(( $(left) - BENCH_MIN ))
[ "$T" -lt 60 ] && T=60
T_GPU=$(( T * 2 / 3 ))
run_step gpu_tests "$T_GPU" "$SH" "$SELF" --step gpu_tests
T_CUDA=$(( $(left) - BENCH_MIN ))
[ "$T_CUDA" -lt 30 ] && T_CUDA=30
run_step cuda_kernel_tests "$T_CUDA" "$SH" "$SELF" --step cuda_kernel_tests

if [ "$MODE" = gpu ]; then
  JSON=bench/gpu.json
  set -- "$PY" bench/gpu.py --batches 1 8 --size 4096 --out "$JSON"
else
  JSON=bench/gpu-check-cpu.json
  set -- "$PY" bench/gpu.py --backends numpy --size 512 --batches 1 2 --repeat 1 --out "$JSON"
fi
T_BENCH=$(( $(left) - 5 ))
run_step bench "$T_BENCH" "$@"

if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ -w "$OUT" ]; then
  cp "$LOGDIR"/*.log "$OUT"/ 2>/dev/null
  [ -f "$JSON" ] && cp "$JSON" "$OUT"/
  echo "copied $JSON and the logs to $OUT"
fi

echo
echo "== summary ($MODE, $(( $(now) - START )) s of ${BUDGET} s)"
[ -f "$JSON" ] && echo "results: $JSON"
if [ -n "$FAILED" ]; then
  echo "FAILED:$FAILED"
  exit 1
fi
echo "all steps passed"
exit 0
