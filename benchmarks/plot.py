"""PNG of the speedup of each fastedit entry over its baseline, per op and size.

    python benchmarks/plot.py [--csv benchmarks/results/results.csv] [-o benchmarks/results/speedup.png]

Draws the newest result of each benchmark that has a baseline, as table.py selects them (log scale, one colour per device,
the ARCHITECTURE.md target as a tick where the bench gave one). Needs matplotlib, which is not a
dependency of fastedit: ``pip install -e ".[bench]"``.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import record
import table

DEFAULT_PNG = record.HERE / "results" / "speedup.png"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('plot: matplotlib is not installed; pip install -e ".[bench]" (or pip install matplotlib)') from None
    matplotlib.use("Agg")  # files only; no display on CI or the GPU machine
    import matplotlib.pyplot as plt

    return plt


def plot(rows: list[dict], path: pathlib.Path, include_small: bool = False) -> int:
    """Write the chart of ``rows`` (CSV rows) to ``path``; returns the number of bars drawn."""
    bars = [r for r in table.shown(rows, include_small) if r["speedup"]]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.38 * max(len(bars), 1)))
    if not bars:
        ax.text(0.5, 0.5, "no speedups recorded yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        devices = list(dict.fromkeys(f"{r['device_kind'].upper()} · {r['device']}" for r in bars))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        y = list(range(len(bars)))[::-1]
        for yi, r in zip(y, bars):
            label = f"{r['device_kind'].upper()} · {r['device']}"
            speedup = float(r["speedup"])
            ax.barh(yi, speedup, color=colours[devices.index(label) % len(colours)], label=label)
            ax.text(speedup, yi, f" {speedup:.3g}×", va="center", fontsize=8)
            goal = table.speedup_target(r["target"])
            if goal is not None:
                ax.plot([goal, goal], [yi - 0.4, yi + 0.4], color="black", linewidth=2)
        ax.set_yticks(y)
        ax.set_yticklabels([f"{r['op']} [{r['size']}]" if r["size"] else r["op"] for r in bars], fontsize=8)
        ax.set_xscale("log")
        ax.axvline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("speedup over the faithful baseline (median time, same run; black tick: target)")
        handles, labels = ax.get_legend_handles_labels()
        one_per_device = dict(zip(labels, handles))
        ax.legend(one_per_device.values(), one_per_device.keys(), fontsize=8, frameon=False,
                  loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2)
        # Room on the right for the value labels.
        ax.set_xlim(right=3 * max([float(r["speedup"]) for r in bars] + [1.0]))
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(bars)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=pathlib.Path, default=record.DEFAULT_CSV, help="results CSV (default: %(default)s)")
    parser.add_argument("-o", "--output", type=pathlib.Path, default=DEFAULT_PNG, help="PNG to write (default: %(default)s)")
    parser.add_argument("--include-small", action="store_true", help="also draw results of the small (CI smoke) size")
    args = parser.parse_args(argv)
    try:
        n = plot(record.read_csv(args.csv), args.output, args.include_small)
    except record.RecordError as exc:
        print(f"plot: error: {exc}", file=sys.stderr)
        return 2
    print(f"plot: {n} speedups drawn in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
