"""Markdown table of the latest benchmark results, for the README.

    python benchmarks/table.py [--csv benchmarks/results/results.csv] [--update-readme README.md]

One row per fastedit entry (the newest of each benchmark, see record.latest; results of the
"small" CI smoke size only with --include-small), GPU rows first:
op, size, device, baseline time, fastedit time, speedup (measured in the same run), the target of
ARCHITECTURE.md the bench attached (``extra_info["target"]``, marked met/missed where it is a
speedup "≥ N×" or a time "< N min", with its "err ≤ X" clause if any), rates and error, and the command that reproduces it.
Without ``--update-readme`` the table goes to stdout; with it, the text between
``<!-- results:start -->`` and ``<!-- results:end -->`` is replaced and the rest is left alone.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys

import record

START = "<!-- results:start -->"
END = "<!-- results:end -->"
HEADER = ("op", "size", "device", "baseline", "fastedit", "speedup", "target", "metrics", "reproduce")


class TableError(Exception):
    """A README or results file the table cannot be written from or into."""


def speedup_target(target: str) -> float | None:
    """N of a speedup target "≥ N× ..." (or ">= Nx"), else None."""
    ratio = re.search(r"(?:≥|>=)\s*([\d.]+)\s*[×x](?![a-z])", target)
    return float(ratio[1]) if ratio else None


def target_met(target: str, speedup: float | None, median_s: float, rel_err: float | None = None) -> bool | None:
    """Whether ``target`` holds: "≥ 30× ..." against the speedup, "< 3 min" against the time,
    and a clause "err ≤ 1e-6" (if any) against the measured relative error.

    None when the target is of another kind (e.g. a fraction of peak) or has nothing to compare.
    """
    ratio = speedup_target(target)
    limit = re.search(r"(?:<|≤|<=)\s*([\d.]+)\s*(min|ms|s)(?![a-z])", target)
    if ratio is not None:
        met = None if speedup is None else speedup >= ratio
    elif limit:
        met = median_s <= float(limit[1]) * {"min": 60.0, "s": 1.0, "ms": 1e-3}[limit[2]]
    else:
        return None
    error = re.search(r"err\S*\s*(?:≤|<=)\s*([\d.]+(?:e[-+]?\d+)?)", target, re.IGNORECASE)
    if met and error:
        met = None if rel_err is None else rel_err <= float(error[1])
    return met


def natural_key(text: str) -> list:
    """Sort key that orders "n=100" after "n=20"."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def display_order(row: dict) -> tuple:
    """Sort key of a results row: GPU rows first, then device, op, size, name."""
    return (row["device_kind"] != "gpu", row["device"], row["op"], natural_key(row["size"]), row["name"])


def _metrics(row: dict) -> str:
    parts = []
    for column, fmt in (("tflops", "{:.3g} TFLOP/s"), ("gbps", "{:.3g} GB/s"),
                        ("edits_per_s", "{:.3g} edits/s"), ("tokens_per_s", "{:.3g} tokens/s"),
                        ("rel_err", "rel. err {:.1e}")):
        if row[column]:
            parts.append(fmt.format(float(row[column])))
    return ", ".join(parts)


def _function(name: str) -> str:
    return name.split("[")[0]


def _reproduce(row: dict) -> str:
    names = [_function(row["name"])] + ([_function(row["baseline"])] if row["baseline"] else [])
    k = " or ".join(dict.fromkeys(names))
    return (f"`FASTEDIT_BENCH_SIZE={row['bench_size']} python -m pytest {row['file']} "
            f"--benchmark-enable --benchmark-only -k \"{k}\"`")


def shown(rows: list[dict], include_small: bool = False) -> list[dict]:
    """The newest row of each benchmark that is not a baseline, in display order.

    Rows of the "small" size are CI smoke shapes, timed once at most: left out unless asked for.
    """
    keep = [r for r in record.latest(rows) if r["role"] != "baseline" and (include_small or r["bench_size"] != "small")]
    return sorted(keep, key=display_order)


def markdown(rows: list[dict], include_small: bool = False) -> str:
    """The results table (plus one line per run it draws on) for the newest row of each benchmark."""
    shown_rows = shown(rows, include_small)
    if not shown_rows:
        return "_No results recorded yet: see benchmarks/README.md._"
    per_slot: dict[tuple, set] = {}
    for r in shown_rows:
        per_slot.setdefault((r["device"], r["group"], r["size"]), set()).add(r["name"])

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in shown_rows:
        op = r["op"] if len(per_slot[(r["device"], r["group"], r["size"])]) == 1 else f"{r['op']} ({r['name']})"
        speedup = float(r["speedup"]) if r["speedup"] else None
        rel_err = float(r["rel_err"]) if r["rel_err"] else None
        met = target_met(r["target"], speedup, float(r["median_s"]), rel_err) if r["target"] else None
        target = r["target"] + {True: " ✓", False: " ✗ (missed)", None: ""}[met]
        cells = (
            op, r["size"] or "—", f"{r['device_kind'].upper()} · {r['device']}",
            record.format_seconds(r["baseline_median_s"]) if r["baseline_median_s"] else "—",
            record.format_seconds(r["median_s"]),
            f"**{speedup:.3g}×**" if speedup is not None else "—",
            target or "—", _metrics(r) or "—", _reproduce(r),
        )
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")

    runs = {}
    for r in shown_rows:
        runs.setdefault(r["run"], r)
    lines.append("")
    lines.append("Runs these results come from:")
    for name, r in runs.items():
        lines.append(f"- `{name}`: {r['device_kind'].upper()} {r['device']}, torch {r['torch']}, "
                     f"triton {r['triton']}, CUDA {r['cuda']}, commit `{r['commit']}`, size `{r['bench_size']}`")
    return "\n".join(lines)


def update_readme(path: pathlib.Path, block: str) -> bool:
    """Replace the text between the results markers of ``path``; True when the file changed."""
    path = pathlib.Path(path)
    text = path.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise TableError(f"{path}: needs exactly one {START} line followed by one {END} line "
                         "around the results block; add them where the table should go")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    new = f"{head}{START}\n{block}\n{END}{tail}"
    if new == text:
        return False
    path.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=pathlib.Path, default=record.DEFAULT_CSV, help="results CSV (default: %(default)s)")
    parser.add_argument("--include-small", action="store_true", help="also show results of the small (CI smoke) size")
    parser.add_argument("--update-readme", type=pathlib.Path, metavar="README", help="rewrite the results block of this file")
    args = parser.parse_args(argv)
    try:
        block = markdown(record.read_csv(args.csv), args.include_small)
        if args.update_readme:
            changed = update_readme(args.update_readme, block)
            print(f"table: {args.update_readme} {'updated' if changed else 'already up to date'}")
        else:
            print(block)
    except (record.RecordError, TableError) as exc:
        print(f"table: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
