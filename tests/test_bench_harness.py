"""The benchmark harness: benchmarks/conftest.py hooks, record.py (CSV + speedups), table.py, plot.py.

Synthetic pytest-benchmark JSON with random times checks the arithmetic and the file handling;
one end-to-end case runs pytest on a tiny bench file with the real conftest.
"""
from __future__ import annotations

import csv
import importlib
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def harness():
    """The record and table modules (they are scripts in benchmarks/, importing each other)."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        yield importlib.import_module("record"), importlib.import_module("table")
    finally:
        sys.path.remove(str(BENCH_DIR))


def _bench(name, group, median, *, size=None, **extra):
    return {
        "group": group, "name": name, "fullname": f"benchmarks/bench_fake.py::{name}",
        "params": {"size": size} if size is not None else None, "param": None, "extra_info": extra,
        "stats": {"min": median * 0.9, "max": median * 1.2, "mean": median * 1.01, "stddev": median * 0.05,
                  "median": median, "rounds": 7},
    }


def _run(benchmarks, *, date="2026-11-21T10:00:00Z", device="NVIDIA H100 80GB HBM3", kind="gpu", commit="abc123def456"):
    return {
        "machine_info": {"node": "x", "fastedit": {
            "device": device, "device_kind": kind, "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
            "capability": "9.0", "bench_size": "gpu" if kind == "gpu" else "full", "triton_interpret": False}},
        "commit_info": {"id": commit, "dirty": False},
        "benchmarks": benchmarks, "datetime": "2026-11-21T10:00:00+00:00", "version": "5.2.3",
        "fastedit": {"date": date, "command": "FASTEDIT_BENCH_SIZE=gpu python -m pytest benchmarks", "driver": ""},
    }


def _write(path, run):
    path.write_text(json.dumps(run))
    return path


def test_speedups_pair_each_fastedit_entry_with_its_groups_baseline_per_size(harness):
    record, _ = harness
    rnd = random.Random()
    base = {s: rnd.uniform(0.1, 2.0) for s in ("a", "b")}
    fast = {s: rnd.uniform(1e-3, 0.1) for s in ("a", "b")}
    other = rnd.uniform(1e-3, 0.1)
    flops, nbytes = rnd.uniform(1e11, 1e13), rnd.uniform(1e8, 1e10)
    run = _run([
        _bench("lu[a]", "solve", base["a"], size={"d_k": 4096, "n": 100}, role="baseline"),
        _bench("chol[a]", "solve", fast["a"], size={"d_k": 4096, "n": 100}, role="fastedit", flops=flops, bytes=nbytes,
               rel_err=3e-13, target="≥ 30× vs fp64 LU", backend="cuda"),
        _bench("triton[a]", "solve", other, size={"d_k": 4096, "n": 100}, role="fastedit"),
        _bench("lu[b]", "solve", base["b"], size={"d_k": 17, "n": 3}, role="baseline"),
        _bench("chol[b]", "solve", fast["b"], size={"d_k": 17, "n": 3}, role="fastedit", edits=100),
        _bench("syrk", "syrk", 0.25, role="fastedit", tokens=1000),
    ])
    rows = {r["name"]: r for r in record.rows(run)}
    assert rows["chol[a]"]["size"] == "d_k=4096 n=100"
    assert rows["chol[a]"]["baseline"] == "lu[a]"
    assert float(rows["chol[a]"]["speedup"]) == pytest.approx(base["a"] / fast["a"], rel=1e-5)
    assert float(rows["triton[a]"]["speedup"]) == pytest.approx(base["a"] / other, rel=1e-5)
    assert float(rows["chol[b]"]["speedup"]) == pytest.approx(base["b"] / fast["b"], rel=1e-5)
    assert float(rows["chol[a]"]["tflops"]) == pytest.approx(flops / fast["a"] / 1e12, rel=1e-5)
    assert float(rows["chol[a]"]["gbps"]) == pytest.approx(nbytes / fast["a"] / 1e9, rel=1e-5)
    assert float(rows["chol[b]"]["edits_per_s"]) == pytest.approx(100 / fast["b"], rel=1e-5)
    assert float(rows["syrk"]["tokens_per_s"]) == pytest.approx(4000, rel=1e-5)
    assert rows["chol[a]"]["info"] == "backend=cuda" and rows["chol[a]"]["rel_err"] == "3e-13"
    assert rows["syrk"]["speedup"] == "" and rows["lu[a]"]["speedup"] == ""
    assert rows["chol[a]"]["op"] == "solve" and rows["chol[a]"]["file"] == "benchmarks/bench_fake.py"


@pytest.mark.parametrize("bad, message", [
    ([_bench("x", "g", 1.0, role="baseline"), _bench("y", "g", 2.0, role="baseline")], "two baselines"),
    ([_bench("x", "g", 1.0, role="fast_edit")], "role"),
    ([_bench("x", "g", 0.0, role="fastedit")], "not positive"),
])
def test_ambiguous_or_malformed_entries_are_refused(harness, bad, message):
    record, _ = harness
    with pytest.raises(record.RecordError, match=message):
        record.rows(_run(bad))


def test_csv_header_written_once_and_runs_not_recorded_twice(harness, tmp_path):
    record, _ = harness
    csv_path = tmp_path / "results" / "results.csv"
    first = _write(tmp_path / "a.json", _run([_bench("lu", "g", 1.0, role="baseline"), _bench("ch", "g", 0.1, role="fastedit")]))
    second = _write(tmp_path / "b.json", _run([_bench("ch", "g", 0.05, role="fastedit")], date="2026-11-21T11:00:00Z"))
    assert len(record.record([first], csv_path, tmp_path / "results")) == 2
    assert len(record.record([second], csv_path, tmp_path / "results")) == 1
    assert record.record([second], csv_path, None) == []  # already there
    assert len(record.record([second], csv_path, None, force=True)) == 1
    lines = csv_path.read_text().splitlines()
    assert sum(line.startswith("date,commit,") for line in lines) == 1 and len(lines) == 1 + 4
    assert sorted(p.name for p in (tmp_path / "results").glob("*.json")) == [
        "2026-11-21T100000Z-nvidia-h100-80gb-hbm3-abc123def456.json",
        "2026-11-21T110000Z-nvidia-h100-80gb-hbm3-abc123def456.json",
    ]
    with csv_path.open() as f:
        assert [r["median_s"] for r in csv.DictReader(f)] == ["1", "0.1", "0.05", "0.05"]


def test_a_csv_with_another_header_is_refused_not_mixed(harness, tmp_path):
    record, _ = harness
    csv_path = tmp_path / "results.csv"
    csv_path.write_text("date,name,time\n2026-01-01,x,1\n")
    run = _write(tmp_path / "a.json", _run([_bench("x", "g", 1.0)]))
    with pytest.raises(record.RecordError, match="header"):
        record.record([run], csv_path, None)
    assert csv_path.read_text() == "date,name,time\n2026-01-01,x,1\n"


def test_merge_joins_files_of_one_machine_and_refuses_two_devices(harness, tmp_path):
    record, _ = harness
    a = _write(tmp_path / "a.json", _run([_bench("lu", "g", 0.4, role="baseline")], date="2026-11-21T10:05:00Z"))
    b = _write(tmp_path / "b.json", _run([_bench("ch", "g", 0.1, role="fastedit")], date="2026-11-21T10:01:00Z"))
    rows = record.record([a, b], tmp_path / "r.csv", tmp_path, merge_inputs=True)
    assert {r["date"] for r in rows} == {"2026-11-21T10:01:00Z"}
    assert float(next(r for r in rows if r["name"] == "ch")["speedup"]) == pytest.approx(4.0)
    c = _write(tmp_path / "c.json", _run([_bench("x", "g", 0.1)], device="NVIDIA H200"))
    with pytest.raises(record.RecordError, match="device"):
        record.record([a, c], tmp_path / "r2.csv", None, merge_inputs=True)


def test_a_json_without_the_fastedit_metadata_is_refused(harness, tmp_path):
    record, _ = harness
    plain = _run([_bench("x", "g", 1.0)])
    del plain["machine_info"]["fastedit"]
    with pytest.raises(record.RecordError, match="conftest"):
        record.load(_write(tmp_path / "p.json", plain))


@pytest.mark.parametrize("target, speedup, median, rel_err, met", [
    ("≥ 30× vs fp64 LU, rel. err ≤ 1e-6", 31.0, 1.0, 3e-9, True),
    ("≥ 30× vs fp64 LU, rel. err ≤ 1e-6", 31.0, 1.0, 2e-6, False),
    ("≥ 30× vs fp64 LU, rel. err ≤ 1e-6", 31.0, 1.0, None, None),
    ("≥ 30× vs fp64 LU, rel. err ≤ 1e-6", 29.0, 1.0, 3e-9, False),
    ("≥ 30× vs fp64 LU", 29.9, 1.0, None, False),
    (">= 8x", 8.0, 1.0, None, True),
    ("≥ 10× vs one edit at a time", None, 1.0, None, None),
    ("< 3 min", None, 179.0, None, True),
    ("< 3 min", None, 181.0, None, False),
    ("≥ 70% of measured bf16 GEMM peak", 2.0, 1.0, None, None),
])
def test_target_check(harness, target, speedup, median, rel_err, met):
    _, table = harness
    assert table.target_met(target, speedup, median, rel_err) is met


def test_table_shows_the_newest_result_gpu_rows_first(harness, tmp_path):
    record, table = harness
    csv_path = tmp_path / "results.csv"
    old = _run([_bench("lu", "solve", 1.0, role="baseline"), _bench("ch", "solve", 0.5, role="fastedit", target="≥ 30× vs LU")])
    new = _run([_bench("lu", "solve", 1.0, role="baseline"), _bench("ch", "solve", 0.025, role="fastedit", target="≥ 30× vs LU")],
               date="2026-11-21T12:00:00Z")
    cpu = _run([_bench("lu", "solve", 1.0, role="baseline"), _bench("ch", "solve", 0.2, role="fastedit", target="≥ 8× vs LU")],
               device="AMD EPYC 9654", kind="cpu")
    for i, run in enumerate((cpu, old, new)):
        record.record([_write(tmp_path / f"{i}.json", run)], csv_path, None)
    md = table.markdown(record.read_csv(csv_path))
    body = [line for line in md.splitlines() if line.startswith("| solve")]
    assert len(body) == 2, md
    assert "GPU · NVIDIA H100" in body[0] and "**40×**" in body[0] and "≥ 30× vs LU ✓" in body[0]
    assert "CPU · AMD EPYC 9654" in body[1] and "**5×**" in body[1] and "✗ (missed)" in body[1]
    assert "-k \"ch or lu\"" in body[0] and "FASTEDIT_BENCH_SIZE=gpu" in body[0]


def test_table_leaves_out_smoke_size_results_unless_asked(harness, tmp_path):
    record, table = harness
    smoke = _run([_bench("ch", "solve", 0.1, role="fastedit")], device="AMD EPYC 9654", kind="cpu")
    smoke["machine_info"]["fastedit"]["bench_size"] = "small"
    rows = record.rows(smoke)
    assert table.markdown(rows).startswith("_No results recorded yet")
    assert "| solve | — | CPU · AMD EPYC 9654 |" in table.markdown(rows, include_small=True)


def test_readme_block_rewrite_keeps_the_rest_intact(harness, tmp_path):
    _, table = harness
    head = "# Title\n\nIntro with <!-- other --> comment.\n\n## Results\n"
    tail = "\n\n## After\n\nText | with pipe.\n"
    readme = tmp_path / "README.md"
    readme.write_text(f"{head}{table.START}\nold table\n{table.END}{tail}")
    assert table.update_readme(readme, "| new |\n|---|")
    text = readme.read_text()
    assert text == f"{head}{table.START}\n| new |\n|---|\n{table.END}{tail}"
    assert not table.update_readme(readme, "| new |\n|---|")
    readme.write_text(head + tail)
    with pytest.raises(table.TableError, match="results:start"):
        table.update_readme(readme, "x")
    assert readme.read_text() == head + tail


def test_plot_writes_a_png(harness, tmp_path):
    pytest.importorskip("matplotlib")
    record, _ = harness
    plot = importlib.import_module("plot")
    csv_path = tmp_path / "r.csv"
    run = _run([_bench("lu", "solve", 1.0, role="baseline"), _bench("ch", "solve", 0.1, role="fastedit", target="≥ 8×")])
    record.record([_write(tmp_path / "a.json", run)], csv_path, None)
    assert plot.plot(record.read_csv(csv_path), tmp_path / "s.png") == 1
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


DUMMY_BENCH = '''
import torch

SIZES = {"small": [{"d": 5}], "full": [{"d": 7}, {"d": 9}]}


def test_base(benchmark, size, device, timed, bench_size):
    a = torch.rand(size["d"], size["d"], device=device)
    benchmark.group = "mm"
    benchmark.extra_info.update(role="baseline", bench_size_seen=str(bench_size))
    benchmark(timed(lambda: a @ a))


def test_fast(benchmark, size, device, timed):
    a = torch.rand(size["d"], size["d"], device=device)
    benchmark.group = "mm"
    benchmark.extra_info.update(role="fastedit", flops=2 * size["d"] ** 3)
    benchmark(timed(lambda: a + a))
'''


def test_conftest_hooks_end_to_end(harness, tmp_path):
    """pytest on a tiny bench file with the real conftest, then record and table on its JSON."""
    record, table = harness
    shutil.copy(BENCH_DIR / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "bench_mm.py").write_text(DUMMY_BENCH)
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTEDIT_")}
    env.update(FASTEDIT_BENCH_SIZE="full", FASTEDIT_BENCH_DEVICE="cpu", FASTEDIT_COMMIT="feedc0ffee12",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py",
         "--rootdir", str(tmp_path), "--benchmark-enable", "--benchmark-min-rounds=1", "--benchmark-max-time=0.001",
         f"--benchmark-json={out}", "bench_mm.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fastedit benchmarks: size=full device=cpu" in proc.stdout
    run = record.load(out)
    assert run["commit_info"]["id"] == "feedc0ffee12"
    assert run["machine_info"]["fastedit"]["bench_size"] == "full"
    assert run["fastedit"]["command"].startswith("FASTEDIT_BENCH_SIZE=full python -m pytest")
    rows = record.rows(run)
    assert sorted(r["name"] for r in rows) == ["test_base[d=7]", "test_base[d=9]", "test_fast[d=7]", "test_fast[d=9]"]
    fast = {r["size"]: r for r in rows if r["role"] == "fastedit"}
    assert set(fast) == {"d=7", "d=9"} and all(r["speedup"] for r in fast.values())
    assert all(r["bench_size"] == "full" and r["commit"] == "feedc0ffee12" for r in rows)
    assert "bench_size_seen=full" in next(r["info"] for r in rows if r["role"] == "baseline")
    assert table.markdown(rows).count("| mm |") == 2


INTERRUPTED_BENCH = '''
import pathlib
import time


def test_finished(benchmark):
    benchmark.group = "g"
    benchmark.extra_info["role"] = "fastedit"
    benchmark(lambda: sum(range(100)))


def test_interrupted(benchmark):
    def slow():
        pathlib.Path("started").touch()
        time.sleep(60)

    benchmark.pedantic(slow, rounds=3)
'''


def _bench_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTEDIT_")}
    env.update(FASTEDIT_BENCH_DEVICE="cpu", FASTEDIT_COMMIT="feedc0ffee12", **extra,
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    return env


def test_sigint_keeps_the_finished_benchmarks(harness, tmp_path):
    """A run interrupted as a time limit does it (SIGINT in the middle of a benchmark) still
    writes its JSON with the benchmarks that finished; the interrupted one is named, not kept."""
    record, _ = harness
    shutil.copy(BENCH_DIR / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "bench_stop.py").write_text(INTERRUPTED_BENCH)
    out = tmp_path / "bench.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py",
         "--rootdir", str(tmp_path), "--benchmark-enable", "--benchmark-min-rounds=1", "--benchmark-max-time=0.001",
         f"--benchmark-json={out}", "bench_stop.py"],
        cwd=tmp_path, env=_bench_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # A shell's background job (`cmd &` without job control) starts with SIGINT ignored, and a
        # Python started so keeps ignoring it: give the child the default disposition back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert (tmp_path / "started").exists(), output
    run = record.load(out)
    assert [b["name"] for b in run["benchmarks"]] == ["test_finished"], output
    assert run["fastedit"]["unfinished"] == ["bench_stop.py::test_interrupted"]
    assert [r["name"] for r in record.rows(run)] == ["test_finished"]


def test_bench_size_default_pick_and_bad_environment(monkeypatch):
    import torch

    spec = importlib.util.spec_from_file_location("fastedit_bench_conftest", BENCH_DIR / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    monkeypatch.delenv("FASTEDIT_BENCH_SIZE", raising=False)
    assert conftest._bench_size(torch.device("cpu")) == "small"
    assert conftest._bench_size(torch.device("cuda")) == "gpu"
    monkeypatch.setenv("FASTEDIT_BENCH_SIZE", "Full")
    size = conftest._bench_size(torch.device("cuda"))
    assert size == "full" and size.pick(small=1, full=2, gpu=3) == 2
    with pytest.raises(TypeError, match="full"):
        size.pick(small=1, gpu=3)
    with pytest.raises(TypeError, match="unknown"):
        size.pick(full=1, huge=2)
    monkeypatch.setenv("FASTEDIT_BENCH_SIZE", "huge")
    with pytest.raises(pytest.UsageError, match="FASTEDIT_BENCH_SIZE"):
        conftest._bench_size(torch.device("cpu"))
    monkeypatch.setenv("FASTEDIT_BENCH_DEVICE", "tpu")
    with pytest.raises(pytest.UsageError, match="FASTEDIT_BENCH_DEVICE"):
        conftest._device()


def test_gpu_script_parses():
    script = BENCH_DIR / "gpu_run.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def _gpu_run(out, *args):
    env = _bench_env(PYTHON=sys.executable)
    del env["FASTEDIT_BENCH_DEVICE"]  # the script's dry run sets it
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(BENCH_DIR / "gpu_run.sh"), "--dry-run", *args, str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    summary = {line.split("\t")[0]: line.split("\t")[1] for line in (out / "summary.tsv").read_text().splitlines()}
    return proc, summary


def test_gpu_script_dry_run_records_each_step_and_skips_what_does_not_fit(harness, tmp_path):
    """The GPU script's plumbing on CPU: versions, one benchmark step recorded into the output
    folder's CSV and table as soon as it finished, and a step the budget cannot fit skipped."""
    record, _ = harness
    proc, summary = _gpu_run(tmp_path / "a", "--steps", "versions,syrk", "--budget", "90")
    out = tmp_path / "a"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary == {"versions": "ok", "syrk": "ok"}
    assert "CUDA toolkit:" in (out / "versions.txt").read_text() and "END syrk: ok" in (out / "log").read_text()
    (raw,) = sorted((out / "raw").glob("*-syrk.json"))
    names = {b["name"] for b in record.load(raw)["benchmarks"]}
    assert names and {r["name"] for r in record.read_csv(out / "results.csv")} == names
    assert "CovarianceAccumulator" in (out / "table.md").read_text()

    proc, summary = _gpu_run(tmp_path / "b", "--steps", "solver,edit", "--budget", "5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary == {"solver": "skipped", "edit": "skipped"}
    assert not list((tmp_path / "b" / "raw").iterdir())


@pytest.mark.parametrize("commit, dirty, shown", [("abc1", False, "abc1"), ("abc1", True, "abc1-dirty"),
                                                   ("abc1-dirty", True, "abc1-dirty")])
def test_commit_marked_dirty_once(harness, commit, dirty, shown):
    record, _ = harness
    run = _run([_bench("x", "g", 1.0)], commit=commit)
    run["commit_info"]["dirty"] = dirty
    assert record.rows(run)[0]["commit"] == shown


def test_testbed_quality_neighbours_and_collapse():
    """benchmarks/testbed_quality.py: a neighbourhood prompt about a subject whose fact of the
    same relation is edited in the run is left out (its true object changes by design); the
    collapse point is the first curve point below the level."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        tq = importlib.import_module("testbed_quality")
    finally:
        sys.path.remove(str(BENCH_DIR))

    def rec(subject, relation, neighbours):
        return {"requested_rewrite": {"subject": subject, "relation_id": relation},
                "neighborhood_prompts": neighbours}

    recs = [rec("Ana Bo", "speaks", ["Cid Du speaks", "Eve Fa speaks"]), rec("Cid Du", "speaks", ["Ana Bo speaks"]),
            rec("Eve Fa", "plays", ["Gil Ha plays the", "Ana Bo plays the"])]
    kept, dropped = tq.unaffected_neighbours(recs)
    assert [r["neighborhood_prompts"] for r in kept] == [["Eve Fa speaks"], [], ["Gil Ha plays the", "Ana Bo plays the"]]
    assert dropped == 2 and recs[0]["neighborhood_prompts"] == ["Cid Du speaks", "Eve Fa speaks"]
    curve = [{"edits": 100, "efficacy": 90.0, "specificity": 80.0}, {"edits": 200, "efficacy": 60.0, "specificity": 49.0},
             {"edits": 300, "efficacy": 40.0, "specificity": 30.0}]
    assert tq.collapse_point(curve, 50.0) == 200 and tq.collapse_point(curve, 20.0) is None
