#!/usr/bin/env bash
# One call on the lent GPU machine: versions, extension build, GPU tests or timed benchmarks,
# recorded results. Everything it writes goes under $OUT (at most 8 files come back).
#
#   bash benchmarks/run_gpu.sh MODE [STEM ...]
#
#   tests          nvidia-smi and versions, `fastedit build-ext`, `pytest -m cuda`, then the rest of
#                  the test suite with FASTEDIT_TEST_GPU=1 (Triton compiled, not interpreted)
#   bench-solvers  benchmarks of solver, null_space, ext, norm_anchor
#   bench-kernels  benchmarks of syrk, stats
#   bench-e2e      benchmarks of targets, edit, eval
#   bench [STEM..] the named benchmarks/bench_<STEM>.py (all of them when none is named)
#   bench-smoke    CPU plumbing check: every bench file at the small size, few rounds, no GPU needed
#
# A call of the device tool is limited to 10 minutes, so the modes above are meant as separate
# calls, e.g. run(command="FASTEDIT_COMMIT=<sha> bash benchmarks/run_gpu.sh bench-solvers").
# The copy of the tree on the GPU machine has no git history: pass the commit as FASTEDIT_COMMIT.
#
# Environment: OUT (required: where results go), FASTEDIT_COMMIT, FASTEDIT_BENCH_SIZE (default
# gpu; small for bench-smoke), FASTEDIT_REQUIRE_EXT (default 1 on the GPU modes: the extension
# must build), FASTEDIT_GPU_BUDGET_S (whole-script budget, default 560 s),
# FASTEDIT_BENCH_FILE_S (per bench file, default 300 s), PYTHON (default python3).
# Each step runs under `timeout`; a bench file that overruns is interrupted (SIGINT), so the
# results it finished are still written. The exit status is non-zero when any step failed.
#
# Files under $OUT: log, tests-cuda.xml / tests-gpu.xml (tests), <date>-<device>-<commit>.json
# (the merged benchmark JSON), results.csv (this run's rows), table.md, speedup.png (if
# matplotlib is there). Back on the development machine, record the run into the versioned CSV:
#   python benchmarks/record.py <files_at>/<date>-<device>-<commit>.json
#   python benchmarks/table.py --update-readme README.md && python benchmarks/plot.py
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 ]] || usage
MODE=$1
shift
[[ -n ${OUT:-} ]] || { echo "run_gpu.sh: set OUT to the folder for results (the device tool sets it)" >&2; exit 2; }

mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2

PY=${PYTHON:-python3}
BUDGET_S=${FASTEDIT_GPU_BUDGET_S:-560}
FILE_S=${FASTEDIT_BENCH_FILE_S:-300}
RESERVE_S=30  # kept for recording results after the last step
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FASTEDIT_BENCH_DRIVER="bash benchmarks/run_gpu.sh $MODE${*:+ $*}"
if [[ -z ${FASTEDIT_COMMIT:-} ]]; then
    FASTEDIT_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
    if [[ $FASTEDIT_COMMIT != unknown && -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        FASTEDIT_COMMIT+="-dirty"
    fi
fi
export FASTEDIT_COMMIT
FAILED=()

log() { printf '[run_gpu %s +%ss] %s\n' "$(date -u +%H:%M:%S)" "$SECONDS" "$*"; }

# step NAME MAX_SECONDS COMMAND...: run under timeout, clipped to what is left of the budget.
step() {
    local name=$1 max=$2 left limit rc start
    shift 2
    left=$((BUDGET_S - SECONDS - RESERVE_S))
    if ((left < 15)); then
        log "SKIP $name: the ${BUDGET_S}s budget is spent"
        FAILED+=("$name(skipped)")
        return 0
    fi
    limit=$((max < left ? max : left))
    log "BEGIN $name (limit ${limit}s): $*"
    start=$SECONDS
    # SIGINT makes pytest stop like Ctrl-C: it still writes the benchmark JSON of what finished.
    # --foreground signals pytest alone; signalled as a group too, it got a second SIGINT while
    # it was writing up the first.
    timeout --foreground --signal=INT --kill-after=20 "$limit" "$@"
    rc=$?
    log "END $name: exit $rc after $((SECONDS - start))s$( ((rc == 124)) && echo ' (timed out)')"
    # pytest's 5 is "no tests collected": nothing is marked cuda yet, say, which is not a failure.
    if ((rc == 5)) && [[ ${ALLOW_EMPTY:-} == 1 ]]; then
        log "$name: no tests collected"
        return 0
    fi
    ((rc == 0)) || FAILED+=("$name(exit $rc)")
    return 0
}

versions() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
    fi
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton absent")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
else:
    print("no CUDA device: CPU only")
EOF
    log "commit $FASTEDIT_COMMIT, mode $MODE"
}

gpu_env() {
    # Compiled Triton, not the interpreter (tests/conftest.py honours FASTEDIT_TEST_GPU).
    export FASTEDIT_TEST_GPU=1
    unset TRITON_INTERPRET
    # As in CI: a failed extension build is an error here, not a silent fallback to torch ops.
    export FASTEDIT_REQUIRE_EXT=${FASTEDIT_REQUIRE_EXT:-1}
    export FASTEDIT_BENCH_SIZE=${FASTEDIT_BENCH_SIZE:-gpu}
    step build-ext 300 "$PY" -m fastedit build-ext
}

run_tests() {
    gpu_env
    ALLOW_EMPTY=1 step tests-cuda 240 "$PY" -m pytest tests -m cuda -q -p no:cacheprovider --junitxml="$OUT/tests-cuda.xml"
    # The rest of the suite is mostly CPU work and Triton compiles: spread it over the 16 cores
    # when pytest-xdist is there (it is in the GPU image, not a dependency of ours).
    local parallel=()
    "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 8)
    step tests-gpu 300 "$PY" -m pytest tests -m "not cuda" -q -p no:cacheprovider "${parallel[@]}" \
        --junitxml="$OUT/tests-gpu.xml"
}

# run_bench PYTEST_EXTRA_ARGS... -- STEM...: one pytest per bench file, then record + table + plot.
run_bench() {
    local extra=() stems=() stem file raw jsons=()
    while [[ $# -gt 0 && $1 != -- ]]; do extra+=("$1"); shift; done
    [[ $# -gt 0 ]] && shift
    stems=("$@")
    if ((${#stems[@]} == 0)); then
        for file in benchmarks/bench_*.py; do
            [[ -e $file ]] || continue
            stem=${file#benchmarks/bench_}
            stems+=("${stem%.py}")
        done
    fi
    raw=$(mktemp -d)
    for stem in "${stems[@]}"; do
        file=benchmarks/bench_$stem.py
        if [[ ! -f $file ]]; then
            log "SKIP $file: not in this tree"
            continue
        fi
        step "bench_$stem" "$FILE_S" "$PY" -m pytest "$file" -q -p no:cacheprovider --benchmark-enable \
            --benchmark-only --benchmark-json="$raw/bench_$stem.json" \
            --benchmark-columns=median,min,stddev,rounds,iterations "${extra[@]}"
        [[ -s $raw/bench_$stem.json ]] && jsons+=("$raw/bench_$stem.json")
    done
    if ((${#jsons[@]} == 0)); then
        log "no benchmark results to record"
        FAILED+=("record(no results)")
        return 0
    fi
    # The CSV under $OUT holds this run only; record.py appends it to the versioned one at home.
    "$PY" benchmarks/record.py --merge --csv "$OUT/results.csv" --json-dir "$OUT" "${jsons[@]}" \
        || FAILED+=("record")
    "$PY" benchmarks/table.py --include-small --csv "$OUT/results.csv" >"$OUT/table.md" || FAILED+=("table")
    if "$PY" -c "import matplotlib" 2>/dev/null; then
        "$PY" benchmarks/plot.py --include-small --csv "$OUT/results.csv" -o "$OUT/speedup.png" || FAILED+=("plot")
    fi
    echo
    cat "$OUT/table.md"
}

# GPU timing: warm up (Triton compiles, cuBLAS handles) before the rounds that count.
GPU_BENCH=(--benchmark-warmup=on --benchmark-warmup-iterations=5)

main() {
    log "start: $MODE $*"
    versions
    case $MODE in
        tests) run_tests ;;
        bench) gpu_env; run_bench "${GPU_BENCH[@]}" -- "$@" ;;
        bench-solvers) gpu_env; run_bench "${GPU_BENCH[@]}" -- solver null_space ext norm_anchor ;;
        bench-kernels) gpu_env; run_bench "${GPU_BENCH[@]}" -- syrk stats ;;
        bench-e2e) gpu_env; run_bench "${GPU_BENCH[@]}" -- targets edit eval ;;
        bench-smoke)
            export FASTEDIT_BENCH_SIZE=${FASTEDIT_BENCH_SIZE:-small}
            run_bench --benchmark-min-rounds=1 --benchmark-max-time=0.05 -- "$@"
            ;;
        *) echo "run_gpu.sh: unknown mode '$MODE'" >&2; exit 2 ;;
    esac
    if ((${#FAILED[@]})); then
        log "FAILED: ${FAILED[*]}"
        exit 1
    fi
    log "all steps passed in ${SECONDS}s"
}

main "$@" 2>&1 | tee -a "$OUT/log"
