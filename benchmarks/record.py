"""Record pytest-benchmark results: one CSV row per benchmark, with each fastedit entry's speedup.

    python benchmarks/record.py BENCH.json [BENCH.json ...] [--merge] [--csv PATH] [--json-dir DIR]

Each input is one run (a ``--benchmark-json`` file written with benchmarks/conftest.py loaded);
``--merge`` joins all inputs into one run first (gpu_run.sh runs one pytest per bench file; they
must share device and commit). For each run this

- pairs entries by (``benchmark.group``, size): the entry with ``extra_info["role"] == "baseline"``
  is the baseline, and every ``"fastedit"`` entry gets speedup = baseline median / its median;
- derives rates from the work counts in ``extra_info`` and the median time: ``flops`` -> TFLOP/s,
  ``bytes`` -> GB/s, ``edits`` -> edits/s, ``tokens`` -> tokens/s;
- appends the rows to the CSV (header written once; a file with another header is refused, not
  mixed) and writes the run's JSON as ``<json-dir>/<date>-<device>-<commit>.json``.

A run already in the CSV (same date, device and commit) is skipped unless ``--force``.
benchmarks/README.md documents the ``extra_info`` keys.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_CSV = HERE / "results" / "results.csv"
DEFAULT_JSON_DIR = HERE / "results"

COLUMNS = [
    "date", "commit", "device", "device_kind", "torch", "triton", "cuda", "bench_size",
    "group", "op", "size", "name", "role",
    "median_s", "min_s", "mean_s", "stddev_s", "rounds",
    "tflops", "gbps", "edits_per_s", "tokens_per_s", "rel_err",
    "baseline", "baseline_median_s", "speedup", "target", "info", "file", "command", "run",
]
# extra_info work count -> (CSV column, unit divisor): the rate is count / median / divisor.
RATES = {"flops": ("tflops", 1e12), "bytes": ("gbps", 1e9), "edits": ("edits_per_s", 1.0), "tokens": ("tokens_per_s", 1.0)}
RESERVED = {"role", "op", "size", "rel_err", "target", *RATES}
ROLES = ("baseline", "fastedit")


class RecordError(Exception):
    """A benchmark file or results CSV that cannot be recorded as it is."""


def _num(x: float) -> str:
    return f"{x:.6g}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def load(path: pathlib.Path) -> dict:
    """Read one pytest-benchmark JSON file and check it carries the fastedit metadata."""
    try:
        run = json.loads(pathlib.Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: cannot read a benchmark JSON ({exc})") from exc
    if "fastedit" not in run.get("machine_info", {}) or "benchmarks" not in run:
        raise RecordError(f"{path}: not a pytest-benchmark JSON written with benchmarks/conftest.py loaded "
                          "(run pytest from the repository root with --benchmark-json)")
    command = run.get("fastedit", {}).get("command", "")
    for bench in run["benchmarks"]:
        bench.setdefault("fastedit_command", command)
    return run


def _run_date(run: dict) -> str:
    date = run.get("fastedit", {}).get("date")
    if date:
        return date
    stamp = datetime.datetime.fromisoformat(run["datetime"]).astimezone(datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(runs: list[dict]) -> dict:
    """One run holding every benchmark of ``runs`` (same device and commit), dated by the earliest."""
    first = runs[0]
    for other in runs[1:]:
        for key, a, b in (("device", first["machine_info"]["fastedit"]["device"], other["machine_info"]["fastedit"]["device"]),
                          ("commit", first["commit_info"].get("id"), other["commit_info"].get("id"))):
            if a != b:
                raise RecordError(f"--merge: the inputs differ in {key} ({a!r} vs {b!r}); record them separately")
    merged = dict(first)
    merged["benchmarks"] = [b for run in runs for b in run["benchmarks"]]
    merged["fastedit"] = dict(first.get("fastedit", {}), date=min(_run_date(r) for r in runs))
    return merged


def run_name(run: dict) -> str:
    """``<date>-<device>-<commit>``: the name of the run's JSON copy, and its key in the CSV."""
    date = _run_date(run).replace(":", "")
    device = _slug(run["machine_info"]["fastedit"]["device"])[:40].strip("-")
    commit = _slug(str(run["commit_info"].get("id", "unknown")))[:12]
    return f"{date}-{device}-{commit}"


def _size(bench: dict) -> str:
    extra = bench.get("extra_info") or {}
    if "size" in extra:
        return str(extra["size"])
    value = (bench.get("params") or {}).get("size")
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return "" if value is None else str(value)


def _commit(info: dict) -> str:
    commit = str(info.get("id", "unknown"))
    # gpu_run.sh passes "<sha>-dirty" itself; git's own flag comes as commit_info["dirty"].
    if info.get("dirty") and not commit.endswith("-dirty"):
        commit += "-dirty"
    return commit


def rows(run: dict) -> list[dict]:
    """The CSV rows of one run (all columns as strings), with speedups filled in."""
    info = run["machine_info"]["fastedit"]
    common = {
        "date": _run_date(run),
        "commit": _commit(run["commit_info"]),
        "device": info["device"], "device_kind": info["device_kind"], "torch": info["torch"],
        "triton": info["triton"], "cuda": info["cuda"], "bench_size": info["bench_size"], "run": run_name(run),
    }
    out = []
    for bench in run["benchmarks"]:
        extra = bench.get("extra_info") or {}
        role = str(extra.get("role", ""))
        if role and role not in ROLES:
            raise RecordError(f"{bench['fullname']}: extra_info['role']={role!r}; use one of {ROLES} (or none)")
        stats = bench["stats"]
        median = float(stats["median"])
        if not median > 0:
            raise RecordError(f"{bench['fullname']}: median time {median!r} is not positive")
        row = dict(common)
        row.update({
            "group": bench.get("group") or "", "op": str(extra.get("op") or bench.get("group") or bench["name"]),
            "size": _size(bench), "name": bench["name"], "role": role,
            "median_s": _num(median), "min_s": _num(stats["min"]), "mean_s": _num(stats["mean"]),
            "stddev_s": _num(stats["stddev"]), "rounds": str(stats["rounds"]),
            "rel_err": _num(float(extra["rel_err"])) if extra.get("rel_err") is not None else "",
            "target": str(extra.get("target", "")),
            "info": "; ".join(f"{k}={v}" for k, v in extra.items() if k not in RESERVED),
            "file": bench["fullname"].split("::")[0], "command": bench.get("fastedit_command", ""),
            "baseline": "", "baseline_median_s": "", "speedup": "",
        })
        for key, (column, unit) in RATES.items():
            row[column] = _num(float(extra[key]) / median / unit) if extra.get(key) else ""
        out.append(row)

    baselines: dict[tuple, dict] = {}
    for row in out:
        if row["role"] == "baseline":
            key = (row["group"], row["size"])
            if key in baselines:
                raise RecordError(f"group {row['group']!r} size {row['size']!r} has two baselines "
                                  f"({baselines[key]['name']} and {row['name']}); give each its own group")
            baselines[key] = row
    for row in out:
        base = baselines.get((row["group"], row["size"]))
        if row["role"] == "fastedit" and base is not None:
            row["baseline"] = base["name"]
            row["baseline_median_s"] = base["median_s"]
            row["speedup"] = _num(float(base["median_s"]) / float(row["median_s"]))
    return out


def read_csv(path: pathlib.Path) -> list[dict]:
    """The rows of a results CSV (empty when the file does not exist)."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise RecordError(f"{path}: its header is not record.py's {len(COLUMNS)} columns; "
                              "start a new CSV (or convert it) instead of mixing layouts")
        return list(reader)


def append_csv(new_rows: list[dict], path: pathlib.Path) -> None:
    """Append rows to the CSV, writing the header only when the file is new."""
    path = pathlib.Path(path)
    fresh = not path.exists() or path.stat().st_size == 0
    if not fresh:
        read_csv(path)  # refuses a foreign header
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        if fresh:
            writer.writeheader()
        writer.writerows(new_rows)


def latest(all_rows: list[dict]) -> list[dict]:
    """The newest row of each benchmark (device, group, size, name), in first-seen order.

    Rows are appended in run order, so the last one of a key is the newest; its speedup was
    measured against the baseline of the same run.
    """
    newest: dict[tuple, dict] = {}
    for row in all_rows:
        newest[(row["device"], row["group"], row["size"], row["name"])] = row
    return list(newest.values())


def record(paths: list[pathlib.Path], csv_path: pathlib.Path, json_dir: pathlib.Path | None,
           *, merge_inputs: bool = False, force: bool = False) -> list[dict]:
    """Record the runs in ``paths``; returns the rows appended."""
    runs = [load(p) for p in paths]
    if merge_inputs and len(runs) > 1:
        runs = [merge(runs)]
    known = {row["run"] for row in read_csv(csv_path)}
    appended = []
    for run in runs:
        name = run_name(run)
        if name in known and not force:
            print(f"record: {name} is already in {csv_path}; skipped (--force records it again)", file=sys.stderr)
            continue
        if run["machine_info"]["fastedit"].get("triton_interpret") and run["machine_info"]["fastedit"]["device_kind"] == "gpu":
            print(f"record: warning: {name} ran with TRITON_INTERPRET=1 on a GPU: its Triton timings mean nothing",
                  file=sys.stderr)
        new_rows = rows(run)
        append_csv(new_rows, csv_path)
        known.add(name)
        appended += new_rows
        if json_dir is not None:
            target = pathlib.Path(json_dir) / f"{name}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(run, indent=1) + "\n")
    return appended


def format_seconds(text: str) -> str:
    """A time in seconds (a CSV string) as "1.23 ms"."""
    s = float(text)
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=pathlib.Path, help="pytest-benchmark JSON files")
    parser.add_argument("--csv", type=pathlib.Path, default=DEFAULT_CSV, help="results CSV to append to (default: %(default)s)")
    parser.add_argument("--json-dir", type=pathlib.Path, default=DEFAULT_JSON_DIR, help="where the run's JSON copy goes (default: %(default)s)")
    parser.add_argument("--merge", action="store_true", help="join all inputs into one run")
    parser.add_argument("--force", action="store_true", help="record a run that the CSV already holds")
    args = parser.parse_args(argv)
    try:
        appended = record(args.inputs, args.csv, args.json_dir, merge_inputs=args.merge, force=args.force)
    except RecordError as exc:
        print(f"record: error: {exc}", file=sys.stderr)
        return 2
    for row in appended:
        speed = f"  {float(row['speedup']):.3g}x vs {row['baseline']}" if row["speedup"] else ""
        print(f"{row['group'] or '-'} [{row['size'] or '-'}] {row['name']}: {format_seconds(row['median_s'])}{speed}")
    print(f"record: {len(appended)} rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
