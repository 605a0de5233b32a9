#!/usr/bin/env bash
# The whole GPU session in one call, within a time budget: versions and toolkit check,
# `fastedit build-ext`, the GPU-only tests, then the benchmarks in order of importance.
#
#   bash benchmarks/gpu_run.sh [--dry-run] [--budget SECONDS] [--steps NAME,NAME...] [OUTDIR]
#
# Steps, in this order (a step that will not fit in what is left of the budget is skipped):
#   versions     nvidia-smi, python/torch/triton/numpy versions, the CUDA toolkit fastedit builds with
#   build-ext    `fastedit build-ext` with FASTEDIT_REQUIRE_EXT=1: a build without CUDA ops fails loudly
#   tests-cuda   `pytest tests -m cuda` only (CI runs the CPU tests), Triton compiled, not interpreted
#   solver       bench_solver.py at d_k=14336 (cached-factor solve vs fp64 LU)
#   syrk         bench_syrk.py (SYRK kernel vs the measured bf16 GEMM rate)
#   null_space   bench_null_space.py (AlphaEdit's reduced solve)
#   edit         bench_edit.py -k "alphaedit and blue" (2000 edits, AlphaEdit_BLUE, Llama3-8B shape)
#   stats        bench_stats.py (covariance pass)
#   targets      bench_targets.py (batched v*), without the autocast entries of the next step
#   autocast     bench_targets.py -k autocast: v* of a float32 model with and without bfloat16 autocast
#                (EditParams.vstar_autocast): time, δ / z difference; the testbed edit's metrics with it
#   ext          bench_ext.py (the compiled ops)
#   norm_anchor  bench_norm_anchor.py
#
# Output folder: $OUT when set (the device tool sets it), else OUTDIR. Everything is written
# there as soon as it exists, so a killed run still returns what it measured:
#   log          this script's output          summary.tsv   step, status, exit code, seconds
#   versions.txt versions and toolkit          build-ext.log the extension build
#   tests-cuda.xml                             raw/<n>-<step>.json  pytest-benchmark JSON per step
#   results.csv  the rows of every finished benchmark step (record.py), table.md (table.py)
# A step past its limit gets SIGINT; benchmarks/conftest.py then keeps its finished entries.
#
# --dry-run: the same plumbing on a CPU-only machine at the CI smoke sizes (FASTEDIT_BENCH_SIZE=
# small), one round per benchmark, `build-ext --help` instead of a build, a 30 s budget: a check
# of this script (tests/test_bench_harness.py runs it), not a measurement.
#
# Environment: OUT, FASTEDIT_COMMIT (the GPU machine's copy of the tree has no git history:
# pass the commit), PYTHON (default python3). Back on the development machine:
#   python benchmarks/record.py --merge <files_at>/raw/*.json     # into benchmarks/results/
#   python benchmarks/table.py --update-readme README.md && python benchmarks/plot.py
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }

DRY=0 BUDGET_S="" ONLY="" DIR=""
while (($#)); do
    case $1 in
        --dry-run) DRY=1 ;;
        --budget) BUDGET_S=${2:?--budget needs seconds}; shift ;;
        --steps) ONLY=${2:?--steps needs a comma-separated list}; shift ;;
        -h|--help) usage ;;
        -*) echo "gpu_run.sh: unknown option $1" >&2; usage ;;
        *) DIR=$1 ;;
    esac
    shift
done
OUT=${OUT:-$DIR}
[[ -n $OUT ]] || { echo "gpu_run.sh: give an output folder (or set OUT)" >&2; exit 2; }
mkdir -p "$OUT/raw" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2

PY=${PYTHON:-python3}
RESERVE_S=10  # kept for the last record and the summary
if ((DRY)); then
    BUDGET_S=${BUDGET_S:-30}
    export FASTEDIT_BENCH_SIZE=small FASTEDIT_BENCH_DEVICE=cpu TRITON_INTERPRET=1
    BENCH_OPTS=(--benchmark-min-rounds=1 --benchmark-max-time=0 --benchmark-warmup=off
                --benchmark-calibration-precision=1)
else
    BUDGET_S=${BUDGET_S:-480}
    export FASTEDIT_BENCH_SIZE=gpu FASTEDIT_TEST_GPU=1
    unset TRITON_INTERPRET  # compiled kernels: interpreted timings would mean nothing
    # Warm up (Triton compiles, cuBLAS handles) before the rounds that count.
    BENCH_OPTS=(--benchmark-warmup=on --benchmark-warmup-iterations=3)
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FASTEDIT_BENCH_DRIVER="bash benchmarks/gpu_run.sh$( ((DRY)) && echo ' --dry-run')"
if [[ -z ${FASTEDIT_COMMIT:-} ]]; then
    FASTEDIT_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
    if [[ $FASTEDIT_COMMIT != unknown && -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        FASTEDIT_COMMIT+="-dirty"
    fi
fi
export FASTEDIT_COMMIT
FAILED=()
EXT_OK=0
N=0

log() { printf '[gpu_run %s +%ss] %s\n' "$(date -u +%H:%M:%S)" "$SECONDS" "$*"; }
note() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$OUT/summary.tsv"; }
selected() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }

# run NAME NEED MAX COMMAND...: skipped unless NEED seconds are left; limited to MAX or what is
# left. Sets RC (0, the command's status, 124 for its time limit, or -1 when skipped). Exit
# codes in OK_CODES (default 0) count as success.
run() {
    local name=$1 need=$2 max=$3 left limit start status
    shift 3
    RC=-1
    if ((DRY)); then need=3 max=20; fi
    left=$((BUDGET_S - SECONDS - RESERVE_S))
    if ! selected "$name"; then
        return
    fi
    if ((left < need)); then
        log "SKIP $name: needs ${need}s, ${left}s of the ${BUDGET_S}s budget left"
        note "$name" skipped - 0
        return
    fi
    limit=$((max < left ? max : left))
    log "BEGIN $name (limit ${limit}s): $*"
    start=$SECONDS
    # SIGINT makes pytest stop as on Ctrl-C and write its report; --foreground signals the
    # command alone, not a second time through its process group.
    timeout --foreground --signal=INT --kill-after=15 "$limit" "$@"
    RC=$?
    status=ok
    if [[ " ${OK_CODES:-0} " == *" $RC "* ]]; then
        status=ok
    elif ((RC == 124 || RC == 137)); then
        status=timeout
    elif ((RC != 0)); then
        status=failed
    fi
    log "END $name: $status (exit $RC) after $((SECONDS - start))s"
    note "$name" "$status" "$RC" $((SECONDS - start))
    [[ $status == ok ]] || FAILED+=("$name($status)")
}

versions() {
    print_versions >"$OUT/versions.txt" 2>&1
    local rc=$?
    cat "$OUT/versions.txt"
    return $rc
}

print_versions() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    fi
    "$PY" - "$DRY" <<'EOF'
import importlib.metadata as md, platform, subprocess, sys
import torch
from torch.utils import cpp_extension
from fastedit import _ext

dry = sys.argv[1] == "1"
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", version("triton"), "| numpy", version("numpy"))
triton, numpy = version("triton"), version("numpy")
if triton.startswith("3.6") and numpy != "absent" and tuple(map(int, numpy.split(".")[:2])) >= (2, 4):
    print(f"note: triton {triton}'s interpreter (TRITON_INTERPRET=1) needs numpy<2.4 (found {numpy}); "
          "this script runs compiled kernels only")
try:
    print("ninja", subprocess.check_output(["ninja", "--version"], text=True).strip())
except (OSError, subprocess.CalledProcessError):
    print("ninja MISSING: torch builds the extension with it (pip install ninja)")
home = _ext.find_cuda_home()
print("CUDA toolkit:", home, "|", _ext.nvcc_release(home) if home else "-", "| torch's guess:", cpp_extension.CUDA_HOME)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
elif not dry:
    sys.exit("no CUDA device")
if home is None and not dry:
    sys.exit("no CUDA toolkit found: set CUDA_HOME")
EOF
}

build_ext() {
    if ((DRY)); then
        "$PY" -m fastedit build-ext --help
    else
        FASTEDIT_REQUIRE_EXT=1 "$PY" -m fastedit build-ext --verbose >"$OUT/build-ext.log" 2>&1
        local rc=$?
        tail -n 5 "$OUT/build-ext.log"
        return $rc
    fi
}

# bench NAME NEED MAX FILE [PYTEST ARGS...]: one benchmark file, then its rows into results.csv.
bench() {
    local name=$1 need=$2 max=$3 file=$4 json
    shift 4
    N=$((N + 1))
    json=$(printf '%s/raw/%02d-%s.json' "$OUT" "$N" "$name")
    run "$name" "$need" "$max" "$PY" -m pytest "benchmarks/$file" -q -p no:cacheprovider --benchmark-enable \
        --benchmark-only --benchmark-json="$json" --benchmark-columns=median,min,rounds "${BENCH_OPTS[@]}" "$@"
    ((RC == -1)) && return
    if [[ -s $json ]]; then
        "$PY" benchmarks/record.py --csv "$OUT/results.csv" --json-dir "$OUT/runs" "$json" \
            && "$PY" benchmarks/table.py --include-small --csv "$OUT/results.csv" >"$OUT/table.md" \
            || FAILED+=("$name(record)")
    else
        log "$name: no benchmark JSON written"
    fi
}

# Steps run under timeout, which runs programs: the shell functions go through bash -c.
export -f versions print_versions build_ext
export PY DRY OUT

main() {
    local ok=()
    log "start: budget ${BUDGET_S}s, commit $FASTEDIT_COMMIT$( ((DRY)) && echo ', dry run on CPU')"
    : >"$OUT/summary.tsv"
    run versions 0 60 bash -c versions
    run build-ext 60 300 bash -c build_ext
    ((RC == 0)) && EXT_OK=1
    if ((!DRY && !EXT_OK)); then
        log "WARNING: the extension did not build with its CUDA ops; the benchmarks below use the torch fallback"
    fi
    # A build that failed is recorded: later steps must not stop on it, only report it.
    ((EXT_OK)) && export FASTEDIT_REQUIRE_EXT=1
    local tests=(tests)
    # pytest's exit 5 ("no tests collected") is what a CPU run of the cuda marker gives.
    ((DRY)) && tests=(tests/test_syrk.py) ok=(0 5)
    OK_CODES="${ok[*]:-0}" run tests-cuda 60 180 "$PY" -m pytest "${tests[@]}" -m cuda -q -p no:cacheprovider \
        --junitxml="$OUT/tests-cuda.xml"
    local solver_k=(-k 14336)  # pytest -k takes no "=": the d_k=14336 ids, not d_k=16384
    ((DRY)) && solver_k=()
    bench solver 45 120 bench_solver.py "${solver_k[@]}"
    bench syrk 40 90 bench_syrk.py
    bench null_space 60 150 bench_null_space.py
    bench edit 150 300 bench_edit.py -k "alphaedit and blue"
    bench stats 60 150 bench_stats.py
    bench targets 60 150 bench_targets.py -k "not autocast"
    bench autocast 60 180 bench_targets.py -k autocast
    bench ext 30 90 bench_ext.py
    bench norm_anchor 20 60 bench_norm_anchor.py
    [[ -s $OUT/table.md ]] && { echo; cat "$OUT/table.md"; }
    echo
    column -t -s $'\t' "$OUT/summary.tsv" 2>/dev/null || cat "$OUT/summary.tsv"
    if ((${#FAILED[@]})); then
        log "FAILED: ${FAILED[*]}"
        exit 1
    fi
    log "done in ${SECONDS}s"
}

main 2>&1 | tee -a "$OUT/log"
exit "${PIPESTATUS[0]}"
