#!/usr/bin/env bash
# The GPU checks of e2vd in one go, for the lent GPU machine (the `run` tool's nvidia-h200: python3
# 3.12 with torch+CUDA, no registry, no systemd); the README's "Running the GPU checks" gives the call.
#
#   scripts/gpu_checks.sh                 # there, after scripts/gpu_wheels.sh filled .whl here
#
# Steps, each under its own time limit, each's output tee'd into $OUT/<step>.log (the pytest steps
# share $OUT/tests.log: at most 8 files come back), going on when one fails; whatever a step left
# running (a daemon of a failed benchmark) is ended with its process group before the next one:
#   setup         the wheels of .whl into $GPU_CHECKS_SITE (skipped where e2vd's needs import
#                 already), then the large, base and tiny stand-ins built at once where the tests
#                 and benchmarks look (tests/conftest.py: .cache/standin/<preset>-<hash>, kept
#                 when there)
#   test_gpu_device, test_gpu, test_engine (-k "gpu or cuda or padded"), test_fallback (-k cuda),
#   test_gpu_lock (-k "gpu or cuda": the whole file)
#                 the GPU tests (they skip where torch sees no GPU), -m "not systemd": no systemd there
#   bench_gpu     bench/gpu.py (large stand-in)
#   conc_mixed    bench/concurrency.py --device cuda --mixed --per-client 4
#   conc          bench/concurrency.py --device cuda --per-client 4
# then one line per step (status, seconds, its telling line) on stdout and in $OUT/summary.txt.
# Exit status: the number of steps not ok (0: all passed).
#
# Environment:
#   OUT                   where logs go (default /tmp/gpu-checks; the run tool sets it)
#   GPU_CHECKS_PYTHON     interpreter (default python3; here e.g. /work/main/.venv/bin/python)
#   GPU_CHECKS_SITE       install target of the wheels (default /tmp/site)
#   GPU_CHECKS_BUDGET     seconds for everything (default 480); a step gets the smaller of its own
#                         limit and what is left, and is skipped with under 20 s left
#   GPU_CHECKS_STEPS      the steps to run (default: all). A rerun on the still-warm machine may
#                         leave setup out: the wheels' folder and .cache/standin are still there
#   GPU_CHECKS_SCALE      multiplies every step's limit (e.g. 4 on a 2-core CPU)
#
# On this project's 2-core CPU machine (no GPU: the GPU tests skip, the benchmarks fail at
# once on --device cuda, bench/gpu.py runs on the CPU until its limit), from a fresh copy of the
# tree in an environment of the image's packages only, setup took 23-41 s: 1 s installing the
# wheels, 4 s importing e2vd, 18-33 s building the three stand-ins (1.97 GB, 379 MB, 3 MB).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu-checks}
PY=${GPU_CHECKS_PYTHON:-python3}
SITE=${GPU_CHECKS_SITE:-/tmp/site}
BUDGET=${GPU_CHECKS_BUDGET:-480}
SCALE=${GPU_CHECKS_SCALE:-1}
STEPS=${GPU_CHECKS_STEPS:-setup test_gpu_device test_gpu test_engine test_fallback test_gpu_lock bench_gpu conc_mixed conc}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
START=$SECONDS
SUMMARY=()
FAILED=0

wanted() { [[ " $STEPS " == *" $1 "* ]]; }

# step NAME LOG LIMIT_S SUMMARY_PATTERN CMD...: run CMD under `timeout` (it signals the whole
# process group: daemons the step started go too), output appended to $OUT/LOG and shown
step() {
    local name=$1 log=$OUT/$2 limit=$3 pattern=$4
    shift 4
    wanted "$name" || return 0
    limit=$(awk -v l="$limit" -v s="$SCALE" 'BEGIN { printf "%d", l * s }')
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 20)); then
        SUMMARY+=("$(printf '%-16s %-9s %5s s  %s' "$name" SKIPPED - "budget spent (${left} s left of ${BUDGET})")")
        FAILED=$((FAILED + 1))
        return 0
    fi
    ((limit > left - 5)) && limit=$((left - 5))
    echo "=== $name (limit ${limit} s): $*" | tee -a "$log"
    local t0=$SECONDS rc pgfile pg
    pgfile=$(mktemp)
    # timeout makes itself a process group's leader (the pid written here) and, at the limit, ends
    # the group; afterwards the group is ended anyway: a daemon a failed benchmark left running
    # (tests/daemon_proc.py's start() raising leaves its process) must not hold the GPU for the
    # steps after it
    bash -c 'echo $$ >"$1"; shift; exec timeout -k 10 "$@"' _ "$pgfile" "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    pg=$(cat "$pgfile"); rm -f "$pgfile"
    if [[ -n $pg ]] && pgrep -g "$pg" >/dev/null; then
        echo "=== $name left processes running: $(pgrep -g "$pg" | tr '\n' ' ')- ending process group $pg" | tee -a "$log"
        kill -TERM -- "-$pg" 2>/dev/null; sleep 3; kill -KILL -- "-$pg" 2>/dev/null
    fi
    local took=$((SECONDS - t0)) status=ok
    if ((rc == 124 || rc == 137)); then status=TIMEOUT; elif ((rc == 5)); then status=NO-TESTS; elif ((rc != 0)); then status="FAIL($rc)"; fi
    [[ $status == ok ]] || FAILED=$((FAILED + 1))
    echo "=== $name: $status in ${took} s" | tee -a "$log"
    # the step's telling line: pytest's closing line, or a benchmark's result lines
    local line
    line=$(awk -v start="=== $name (limit" 'index($0, start) == 1 { keep = 1; next } keep' "$log" \
           | grep -E "$pattern" | tail -n 2 | tr -s ' \n' ' ' | cut -c1-170)
    [[ -n $line ]] || line=$(grep -v '^===' "$log" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-170)
    SUMMARY+=("$(printf '%-16s %-9s %5d s  %s' "$name" "$status" "$took" "$line")")
}

setup() {
    echo "host $(hostname), $(nproc) cores; $(date -u '+%F %T UTC')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
    if ((NEED_WHEELS)); then
        ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/*.whl: run scripts/gpu_wheels.sh here first and carry .whl"; return 1; }
        echo "installing $(ls .whl/*.whl | wc -l) wheels into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            && touch "$SITE/.e2vd-gpu-checks" || return 1
    else
        echo "e2vd's needs already import in $PY: no wheels installed"
    fi
    "$PY" -W ignore::DeprecationWarning - <<'PY' || return 1
import sys, torch, numpy, soundfile, soxr
from systemd import daemon
import distutils.version  # noqa: F401  (funasr's emotion2vec model imports it; on 3.12 setuptools provides it)
import e2vd.daemon, e2vd.engine  # noqa: F401
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}"
      + (f": {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
      + f"), numpy {numpy.__version__}, soundfile {soundfile.__version__}, soxr {soxr.__version__}; "
      f"systemd-python imports (booted: {daemon.booted()})")
PY
    local t0=$SECONDS pids=() preset rc=0
    for preset in large base tiny; do   # the longest first; all at once
        "$PY" -c "import sys; sys.path.insert(0, 'tests'); from conftest import standin_dir; print('stand-in', standin_dir(sys.argv[1]))" "$preset" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    echo "stand-ins ready in $((SECONDS - t0)) s"
    return $rc
}

# Do e2vd's needs that the image lacks import already (a local venv; a rerun)? The light funasr
# path's needs, and systemd-python (e2vd.daemon imports it through e2vd.systemd). Checked here,
# without torch, so that every step gets the wheels' folder on PYTHONPATH.
needs_import() {
    "$PY" - <<'PY' >/dev/null 2>&1
import importlib.util, sys
import soundfile, soxr, multipart, omegaconf, kaldiio  # noqa: F401
from systemd import daemon  # noqa: F401
sys.exit(0 if importlib.util.find_spec("funasr") and importlib.util.find_spec("librosa") else 1)
PY
}
NEED_WHEELS=0
if [[ -f $SITE/.e2vd-gpu-checks ]]; then
    export PYTHONPATH=$SITE:$PYTHONPATH   # installed by an earlier run on this machine
elif ! needs_import; then
    NEED_WHEELS=1
    export PYTHONPATH=$SITE:$PYTHONPATH
fi

export -f setup
export PY SITE NEED_WHEELS
step setup setup.log 150 'stand-ins ready|installing|already import|^python ' bash -c 'set -o pipefail; setup'

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra -m "not systemd")   # no systemd there
T='^[0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran|^=+ .*(passed|failed|error)'
step test_gpu_device tests.log 120 "$T" "${PYTEST[@]}" tests/test_gpu_device.py
step test_gpu        tests.log  40 "$T" "${PYTEST[@]}" tests/test_gpu.py
step test_engine     tests.log  60 "$T" "${PYTEST[@]}" tests/test_engine.py -k "gpu or cuda or padded"
step test_fallback   tests.log  60 "$T" "${PYTEST[@]}" tests/test_fallback.py -k cuda
step test_gpu_lock   tests.log  90 "$T" "${PYTEST[@]}" tests/test_gpu_lock.py -k "gpu or cuda"
step bench_gpu  bench_gpu.log  150 '^cold start:|^idle exit:|Traceback|Error' \
    "$PY" bench/gpu.py
step conc_mixed conc_mixed.log 110 'throughput ratio|Error' \
    "$PY" bench/concurrency.py --device cuda --mixed --per-client 4
step conc       conc.log        80 'throughput ratio|Error' \
    "$PY" bench/concurrency.py --device cuda --per-client 4

{
    echo "=== summary: $(( SECONDS - START )) s of ${BUDGET}; ${FAILED} step(s) not ok; python $PY; logs in $OUT"
    printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.txt"
exit "$FAILED"
