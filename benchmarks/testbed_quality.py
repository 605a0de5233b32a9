"""Editing quality on the shipped testbed model in sequential editing, for the README.

    python benchmarks/testbed_quality.py [--arch llama-2k] [--n 2000] [--batch-size 100] [--eval-every 2]

Edits ``--n`` facts of distinct subjects of a testbed model in sequential batches
with MEMIT, AlphaEdit, MEMIT+BLUE and AlphaEdit+BLUE, each with and without NAS (preset
``testbed-<arch>``), and writes (``<stem>`` = ``testbed_quality`` for ``--arch llama``,
``testbed_quality_<arch>`` otherwise)

- ``benchmarks/results/<stem>.json``: per config the final CounterFact metrics on all
  edited facts (efficacy, generalization, specificity, score, fluency on ``--fluency-n`` of
  them), the curve (edits so far; efficacy and generalization on the edits so far; specificity
  on the neighbourhood prompts of the first ``--spec-n`` facts; ‖W‖/‖W0‖ of each layer) and the
  collapse point: the first measured number of edits where efficacy on the edits so far or
  specificity falls below ``--collapse-below`` percent (None: no collapse within the run);
- ``benchmarks/results/<stem>.md``: the table;
- ``benchmarks/results/<stem>.png``: edited-weight norm, efficacy and specificity against the
  number of edits, with and without NAS (needs matplotlib, the optional [bench] extra).

Specificity counts only neighbours that stay true: a neighbourhood prompt about a subject whose
fact of the same relation is itself edited in the run (its true object legitimately changes)
is left out of every evaluation.

``--nas off`` / ``--nas on`` measure half of the configs each (two processes on two cores);
``--render off.json on.json`` then writes the table and plot of both.
"""
from __future__ import annotations

import argparse
import json
import random
import pathlib
import textwrap
import time

CONFIGS = [("memit", "distribute"), ("alphaedit", "distribute"), ("memit", "blue"), ("alphaedit", "blue")]
NAMES = {("memit", "distribute"): "MEMIT", ("alphaedit", "distribute"): "AlphaEdit",
         ("memit", "blue"): "MEMIT+BLUE", ("alphaedit", "blue"): "AlphaEdit+BLUE"}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def unaffected_neighbours(records: list) -> tuple[list, int]:
    """``records`` with the neighbourhood prompts left out whose subject has a fact of the same
    relation among ``records`` (that edit changes the neighbour's true object); and how many
    prompts were left out."""
    edited: dict[str, list[str]] = {}
    for r in records:
        rr = r["requested_rewrite"]
        edited.setdefault(rr["relation_id"], []).append(rr["subject"])
    out, dropped = [], 0
    for r in records:
        subjects = edited[r["requested_rewrite"]["relation_id"]]
        keep = [p for p in r["neighborhood_prompts"] if not any(s in p for s in subjects)]
        dropped += len(r["neighborhood_prompts"]) - len(keep)
        out.append({**r, "neighborhood_prompts": keep})
    return out, dropped


def collapse_point(curve: list, below: float):
    """The first number of edits in ``curve`` where efficacy or specificity is below ``below``."""
    return next((c["edits"] for c in curve if min(c["efficacy"], c["specificity"]) < below), None)


def measure(arch: str, n: int, batch_size: int, eval_every: int, fluency_n: int, configs, log,
            on_row=lambda rows: None, spec_n: int = 100, collapse_below: float = 50.0) -> list:
    from fastedit import presets, testbed
    from fastedit.editing.editor import Editor
    from fastedit.editing.requests import load_records, requests_from_records
    from fastedit.eval import evaluate

    model, tok = testbed.load(arch)
    # One fact per subject, as in CounterFact: facts of one subject share its keys (the subject
    # comes before the relation in every prompt), so two of them in one run would contend.
    pool = testbed.records(None, arch=arch)
    random.Random(0).shuffle(pool)
    seen: set = set()
    distinct = [r for r in pool if r["requested_rewrite"]["subject"] not in seen
                and not seen.add(r["requested_rewrite"]["subject"])]
    if n > len(distinct):
        raise SystemExit(f"--n {n} exceeds the {len(distinct)} subjects of the testbed")
    kept, left_out = unaffected_neighbours(distinct[:n])
    log(f"{left_out} neighbourhood prompts left out: their subject's fact of that relation is edited in the run")
    records = load_records(kept)
    requests = requests_from_records(records)
    # The curve: efficacy and generalization on the edits so far (rewrite and paraphrase prompts),
    # specificity on the neighbours of the first spec_n facts (the same prompts at every point).
    so_far = [{**r, "neighborhood_prompts": [], "attribute_prompts": [], "generation_prompts": []} for r in records]
    spec_sample = [{**r, "paraphrase_prompts": [], "attribute_prompts": [], "generation_prompts": []}
                   for r in records[:spec_n]]
    stats = testbed.stats(arch, model=model, tokenizer=tok)
    base = evaluate(model, tok, records, progress=False)
    out = [{"config": "unedited", "efficacy": base["efficacy"], "generalization": base["generalization"],
            "specificity": base["specificity"], "score": base["score"], "neighbours_left_out": left_out}]
    for method, strategy, nas in configs:
        name = NAMES[(method, strategy)] + (" + NAS" if nas else "")
        hp = presets.get(f"testbed-{arch}", method=method, strategy=strategy)
        editor = Editor(model, tok, method=method, strategy=strategy, nas=nas, hparams=hp, stats=stats,
                        progress=False)
        curve, t0, edit_s, dropped = [], time.perf_counter(), 0.0, 0
        for b, start in enumerate(range(0, n, batch_size)):
            # The anchor sample is the first batch, on the unedited model, for every later batch too.
            rep = editor.edit(requests[start:start + batch_size], batch_size=batch_size,
                              nas_requests=requests[:batch_size])
            edit_s += rep.seconds
            dropped += len(rep.dropped)
            done = min(start + batch_size, n)
            if (b + 1) % eval_every == 0 or done == n:
                now = evaluate(model, tok, so_far[:done], progress=False)
                spec = evaluate(model, tok, spec_sample, progress=False)["specificity"]
                growth = {str(l): v["growth"] for l, v in editor.weight_norms().items()}
                curve.append({"edits": done, "efficacy": now["efficacy"], "generalization": now["generalization"],
                              "specificity": spec, "weight_growth": growth})
                log(f"{name}: {done} edits, efficacy {now['efficacy']:.1f}, generalization "
                    f"{now['generalization']:.1f}, specificity {spec:.1f}, weight growth {growth}")
        final = evaluate(model, tok, records, progress=False)
        flu = evaluate(model, tok, records[:fluency_n], fluency=True, progress=False)["fluency"]
        row = {"config": name, "method": method, "strategy": strategy, "nas": nas,
               "efficacy": final["efficacy"], "generalization": final["generalization"],
               "specificity": final["specificity"], "score": final["score"], "fluency": flu,
               "dropped": dropped, "edit_seconds": edit_s, "seconds": time.perf_counter() - t0,
               "collapse_below": collapse_below, "collapse_at": collapse_point(curve, collapse_below), "curve": curve}
        out.append(row)
        on_row(out)
        log(json.dumps({k: v for k, v in row.items() if k != "curve"}))
        editor.restore()
    return out


def table(rows: list, header: str) -> str:
    below = next((r["collapse_below"] for r in rows if "collapse_below" in r), None)
    lines = [header, "", "| config | efficacy | generalization | specificity | score | fluency | NAS dropped | "
             + (f"collapse (< {below:g} %) |" if below is not None else "collapse |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = lambda k: f"{r[k]:.1f}" if isinstance(r.get(k), (int, float)) else "–"
        collapse = ("–" if "collapse_below" not in r else
                    f"{r['collapse_at']} edits" if r["collapse_at"] is not None else "none")
        lines.append(f"| {r['config']} | {f('efficacy')} | {f('generalization')} | {f('specificity')} | "
                     f"{f('score')} | {f('fluency')} | {r.get('dropped', '–')} | {collapse} |")
    return "\n".join(lines) + "\n"


def plot(rows: list, path: pathlib.Path, title: str) -> None:
    """Weight growth, efficacy and specificity against the number of edits: one colour per
    method, solid without NAS, dashed with it, one legend for all panels. At 0 edits: ‖W‖/‖W0‖ = 1
    for every curve, and the unedited model's efficacy and specificity on all the facts (black
    marks: "the edits so far" are none, so the efficacy curves themselves start at the first
    batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in rows if r["config"] == "unedited"), None)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    with_spec = any("specificity" in c for r in rows for c in r.get("curve", []))
    fig, axes = plt.subplots(1, 3 if with_spec else 2, figsize=(15 if with_spec else 11, 4.4))
    ax_w, ax_e = axes[0], axes[1]
    for r in rows:
        if not r.get("curve"):
            continue
        colour = colours[CONFIGS.index((r["method"], r["strategy"])) % len(colours)]
        style = dict(color=colour, linestyle="--" if r["nas"] else "-", marker="o", markersize=3, label=r["config"])
        x = [0] + [c["edits"] for c in r["curve"]]
        ax_w.plot(x, [1.0] + [max(c["weight_growth"].values()) for c in r["curve"]], **style)
        ax_e.plot(x[1:], [c["efficacy"] for c in r["curve"]], **style)
        if with_spec:
            axes[2].plot(x[1:], [c["specificity"] for c in r["curve"]], **style)
    if base is not None:
        ax_w.plot([0], [1.0], "k*", markersize=9, label="unedited model (0 edits)")
        ax_e.plot([0], [base["efficacy"]], "k*", markersize=9, clip_on=False)
        if with_spec:
            axes[2].plot([0], [base["specificity"]], "k*", markersize=9, clip_on=False)
    if with_spec:
        axes[2].set(xlabel="edits", ylabel="specificity, neighbours of the first facts (%)", title="specificity",
                    ylim=(0, 102))
    ax_w.set(xlabel="edits", ylabel="‖W‖ / ‖W0‖ (most-grown edited layer)", title="edited-weight norm")
    ax_e.set(xlabel="edits", ylabel="efficacy on the edits so far (%)", title="efficacy", ylim=(0, 102))
    ax_w.set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    handles, labels = ax_w.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle("\n".join(textwrap.wrap(title, 200 if with_spec else 150)), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=1, help="evaluate efficacy every this many batches")
    ap.add_argument("--fluency-n", type=int, default=20, help="facts whose generations measure fluency")
    ap.add_argument("--spec-n", type=int, default=100,
                    help="the curve's specificity: neighbourhood prompts of the first this many facts")
    ap.add_argument("--collapse-below", type=float, default=50.0,
                    help="collapse point: first measured point with efficacy or specificity below this (%%)")
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS)
    ap.add_argument("--nas", choices=("both", "on", "off"), default="both",
                    help="run each method with and without NAS (both), or only one of them")
    ap.add_argument("--only", nargs="+", choices=list(NAMES.values()), metavar="METHOD",
                    help=f"measure only these of {', '.join(NAMES.values())}")
    ap.add_argument("--render", type=pathlib.Path, nargs="+", metavar="JSON",
                    help="measure nothing: write the table and plot from these testbed_quality.json files "
                         "(e.g. an --nas off and an --nas on run; a later file's row replaces an earlier one's)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "testbed_quality" if args.arch == "llama" else f"testbed_quality_{args.arch}"
    if args.render:
        runs = [json.loads(f.read_text()) for f in args.render]
        by_name = {r["config"]: r for run in runs for r in run["rows"]}
        order = ["unedited"] + [NAMES[c] + suffix for c in CONFIGS for suffix in ("", " + NAS")]
        rows, header = [by_name[k] for k in order if k in by_name], runs[0]["header"]
    else:
        configs = [(m, s, nas) for m, s in CONFIGS for nas in {"both": (False, True), "on": (True,),
                                                                "off": (False,)}[args.nas]
                   if args.only is None or NAMES[(m, s)] in args.only]
        log = lambda msg: print(time.strftime("%H:%M:%S"), msg, flush=True)
        header = (f"Testbed {args.arch} (fastedit.testbed), {args.n} facts edited sequentially in batches of "
                  f"{args.batch_size}, preset testbed-{args.arch}; metrics on all edited facts (specificity on "
                  f"the neighbours no edit of the run touches), fluency on the first {args.fluency_n}; collapse: the "
                  f"first point (every {args.eval_every * args.batch_size} edits) with efficacy on the edits so far "
                  f"or specificity (neighbours of the first {args.spec_n}) below {args.collapse_below:g} %.")
        # written after every config, so a long run that is stopped keeps what it measured
        save = lambda rows: (args.out / f"{stem}.json").write_text(
            json.dumps({"header": header, "rows": rows}, indent=1))
        rows = measure(args.arch, args.n, args.batch_size, args.eval_every, args.fluency_n, configs, log, save,
                       spec_n=args.spec_n, collapse_below=args.collapse_below)
    (args.out / f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    (args.out / f"{stem}.md").write_text(table(rows, header))
    plot(rows, args.out / ("testbed_nas.png" if args.arch == "llama" else f"{stem}.png"), header)
    print(table(rows, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
