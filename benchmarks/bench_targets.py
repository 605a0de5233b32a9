"""Batched v* (fastedit.editing.targets.compute_targets) against the references' one-edit-at-a-time
compute_z loop (baselines.vstar_one_at_a_time), on random Llama models.

Entries of one group: the baseline; fastedit batched with the upper-block replay (the default);
fastedit batched with a hook and the whole model run each step (replay=False); fastedit one
edit at a time (batched=False, replay on), which separates the gain of batching from the gain
of skipping the lower layers. Every entry runs the full step count (loss_stop=0: random models
never reach the reference's 5e-2), so all do the same optimisation work.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from baselines import vstar_one_at_a_time
from fastedit.editing.context import context_templates
from fastedit.editing.requests import Request
from fastedit.editing.targets import VStarParams, compute_targets
from fastedit.models import get_adapter, tiny_model
from fastedit.models.tiny import tiny_tokenizer
from fastedit.testing import rel_error

SIZES = {
    "small": [dict(layers=6, d=48, d_ff=112, vocab=97, n=8, layer=1, steps=5)],
    "full": [dict(layers=8, d=256, d_ff=688, vocab=4096, n=32, layer=2, steps=10)],
    "gpu": [dict(layers=16, d=2048, d_ff=5632, vocab=32000, n=100, layer=4, steps=20)],
}

SUBJECTS = ["Danielle Darrieux", "Michael Jordan", "Toko Yasuda", "The Eiffel Tower", "Thomas", "Paris", "Rome",
            "Italy", "France"]
PROMPTS = ["{} is located in", "The mother tongue of {} is", "{} plays", "Because {} speaks",
           "You know {}, the capital of", "The guitar of {} is"]
TARGETS = ["Rome", "English", "the guitar", "French", "Italy", "Paris", "basketball"]
GROUP = "v* batched"

_PROBLEMS: dict = {}


def _problem(size: dict, device: torch.device, dtype: torch.dtype | None = None):
    """(model, tokenizer, adapter, requests, templates, VStarParams) of one size, made once;
    the model in ``dtype`` (default bfloat16 on CUDA, float32 on the CPU)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    key = (tuple(sorted(size.items())), str(device), dtype)
    if key not in _PROBLEMS:
        model = tiny_model("llama", vocab_size=size["vocab"], dtype=dtype, hidden_size=size["d"],
                           intermediate_size=size["d_ff"], num_hidden_layers=size["layers"],
                           num_attention_heads=max(4, size["d"] // 128), num_key_value_heads=max(2, size["d"] // 256),
                           initializer_range=0.2).to(device)
        tok = tiny_tokenizer()
        # One target per (prompt, subject): two targets for one key are refused as contradictory.
        pairs = list(itertools.product(PROMPTS, SUBJECTS))
        requests = [Request(*pairs[i % len(pairs)], TARGETS[i % len(pairs) % len(TARGETS)]) for i in range(size["n"])]
        templates = context_templates(model, tok, n=5, length=10)
        hp = VStarParams(size["steps"], v_lr=0.1, loss_stop=0.0)
        _PROBLEMS[key] = (model, tok, get_adapter(model), requests, templates, hp)
    return _PROBLEMS[key]


def _label(size):
    return f"L={size['layers']} d={size['d']} n={size['n']} steps={size['steps']}"


def _run(benchmark, timed, bench_size, fn, size, role, **info):
    benchmark.group = GROUP
    benchmark.extra_info.update(role=role, op="v* (compute_z)", size=_label(size), edits=size["n"], **info)
    rounds = bench_size.pick(small=3, full=2, gpu=1)
    return benchmark.pedantic(timed(fn), rounds=rounds, iterations=1, warmup_rounds=0)


def _baseline_z(size, device):
    model, tok, ad, requests, templates, hp = _problem(size, device)
    key = ("baseline z", tuple(sorted(size.items())), str(device))
    if key not in _PROBLEMS:
        _PROBLEMS[key] = vstar_one_at_a_time(model, tok, ad, requests, size["layer"], templates=templates,
                                             hparams=hp)[0]
    return _PROBLEMS[key]


def test_vstar_baseline_one_at_a_time(benchmark, timed, bench_size, device, size):
    model, tok, ad, requests, templates, hp = _problem(size, device)
    z, _, _ = _run(benchmark, timed, bench_size,
                   lambda: vstar_one_at_a_time(model, tok, ad, requests, size["layer"], templates=templates,
                                               hparams=hp), size, "baseline")
    _PROBLEMS[("baseline z", tuple(sorted(size.items())), str(device))] = z


@pytest.mark.parametrize("variant", ["batched replay", "batched hook", "one at a time replay"])
def test_vstar_fastedit(benchmark, timed, bench_size, device, size, variant):
    model, tok, ad, requests, templates, hp = _problem(size, device)
    kw = {"batched replay": dict(), "batched hook": dict(replay=False),
          "one at a time replay": dict(batched=False)}[variant]
    info = {"variant": variant}
    if variant == "batched replay" and bench_size == "gpu" and size["n"] == 100:
        info["target"] = "≥ 10× vs one edit at a time"
    out = _run(benchmark, timed, bench_size,
               lambda: compute_targets(model, tok, ad, requests, size["layer"], templates=templates, hparams=hp,
                                       **kw), size, "fastedit", **info)
    # Same optimisation as the baseline: report how far the final z is from the baseline's.
    benchmark.extra_info["z_diff_vs_baseline"] = f"{rel_error(out.z, _baseline_z(size, device)):.1e}"


# --- FLOPs per edit-iteration: fastedit's v* against the reference's whole-model steps ---------
# Counted with torch.utils.flop_counter.FlopCounterMode (matmuls and attention) over whole v*
# calls of n edits with `steps` and `steps + 2` iterations (no early stop): the difference over
# 2n is the cost of one edit-iteration (forward + backward), the rest the one-off passes
# (fastedit: readout and suffix checks, prefix passes; both: tokenisation-free set-up).
# "8b-proportioned" has Llama3-8B's depth and edit layer (32 blocks, v* at layer 4) and its width
# ratios (d_ff = 3.5 d, vocab ≈ 31 d, 4:1 grouped-query attention) at d = 128, on the testbed's
# facts and tokenizer.

FLOP_SIZES = {
    "small": [dict(name="tiny", layers=4, d=48, d_ff=112, vocab=1024, heads=4, kv=2, layer=1, n=3, steps=1)],
    "full": [dict(name="mid", layers=8, d=256, d_ff=1024, vocab=4096, heads=4, kv=2, layer=2, n=8, steps=3),
             dict(name="8b-proportioned", layers=32, d=128, d_ff=448, vocab=4008, heads=8, kv=2, layer=4, n=8,
                  steps=3)],
}
_FLOPS: dict = {}


def _flop_problem(c):
    from fastedit import testbed
    from fastedit.editing import requests_from_records

    key = c["name"]
    if key not in _FLOPS:
        tok = testbed.load("llama")[1]
        model = tiny_model("llama", vocab_size=c["vocab"], hidden_size=c["d"], intermediate_size=c["d_ff"],
                           num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                           num_key_value_heads=c["kv"], initializer_range=0.2)
        requests = requests_from_records(testbed.records(c["n"]))
        templates = context_templates(model, tok, n=5, length=10)
        _FLOPS[key] = dict(model=model, tok=tok, ad=get_adapter(model), requests=requests, templates=templates)
    return _FLOPS[key]


@pytest.mark.parametrize("impl", ["baseline", "fastedit"])
@pytest.mark.parametrize("c", FLOP_SIZES.get(__import__("os").environ.get("FASTEDIT_BENCH_SIZE", "small"), []),
                         ids=lambda c: c["name"])
def test_vstar_flops_per_edit_iteration(benchmark, timed, c, impl):
    from torch.utils.flop_counter import FlopCounterMode

    p = _flop_problem(c)

    def fn(steps):
        hp = VStarParams(steps, v_lr=0.1, loss_stop=0.0)
        if impl == "baseline":
            return vstar_one_at_a_time(p["model"], p["tok"], p["ad"], p["requests"], c["layer"],
                                       templates=p["templates"], hparams=hp)
        return compute_targets(p["model"], p["tok"], p["ad"], p["requests"], c["layer"], templates=p["templates"],
                               hparams=hp)

    counts = []
    for steps in (c["steps"], c["steps"] + 2):
        counter = FlopCounterMode(display=False)
        with counter:
            fn(steps)
        counts.append(counter.get_total_flops())
    per = (counts[1] - counts[0]) / (2 * c["n"])
    benchmark.group = f"v* FLOPs per edit-iteration ({c['name']})"
    benchmark.extra_info.update(role=impl, op="v* FLOPs", size=f"{c['name']} L={c['layers']} d={c['d']} "
                                f"layer={c['layer']} n={c['n']} steps={c['steps']}", flops=counts[0],
                                edits=c["n"], flops_per_edit_iteration=per,
                                one_off_flops_per_edit=(counts[0] - c["steps"] * c["n"] * per) / c["n"])
    key = (c["name"], "flops")
    _FLOPS.setdefault(key, {})[impl] = per
    if len(_FLOPS[key]) == 2:
        benchmark.extra_info["flop_ratio_reference_over_fastedit"] = round(_FLOPS[key]["baseline"] /
                                                                           _FLOPS[key]["fastedit"], 2)
    benchmark.pedantic(timed(lambda: fn(c["steps"])), rounds=1, iterations=1, warmup_rounds=0)


# --- bfloat16 autocast of v* (EditParams.vstar_autocast) ----------------------------------------
# A float32 random Llama (the case autocast is for: a float32 model whose v* matmuls could run in
# bfloat16), v* with and without autocast="bfloat16" on the same problem; the bfloat16 entry
# records how far its δ and z are from the float32 ones. And the testbed: AlphaEdit + BLUE + NAS
# on its facts in the demo's batches, with and without, and the CounterFact metrics after.

# "wide" (CPU): matmuls large enough that bfloat16's speed shows (AMX on this project's CPU).
AUTOCAST_SIZES = {"small": [dict(name="tiny", layers=6, d=48, d_ff=112, vocab=97, n=8, layer=1, steps=5)],
                  "full": [dict(name="mid", layers=8, d=256, d_ff=688, vocab=4096, n=32, layer=2, steps=10),
                           dict(name="wide", layers=6, d=1024, d_ff=2816, vocab=4096, n=16, layer=2, steps=4)],
                  "gpu": [dict(name="gpu", layers=16, d=2048, d_ff=5632, vocab=32000, n=100, layer=4, steps=20)]}
_AUTOCAST: dict = {}


@pytest.mark.parametrize("autocast", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", AUTOCAST_SIZES[__import__("os").environ.get("FASTEDIT_BENCH_SIZE") or
                                                 ("gpu" if torch.cuda.is_available() else "small")],
                         ids=lambda c: c["name"])
def test_vstar_autocast(benchmark, timed, bench_size, device, autocast, case):
    size = case
    model, tok, ad, requests, templates, hp = _problem(size, device, torch.float32)
    out = []
    benchmark.group = f"v* bfloat16 autocast, float32 model ({device.type})"
    benchmark.extra_info.update(role="fastedit", op=f"v* float32 model, {autocast} matmuls", edits=size["n"],
                                size=_label(size), variant=autocast)
    run = lambda: out.append(compute_targets(model, tok, ad, requests, size["layer"], templates=templates, hparams=hp,
                                             autocast=None if autocast == "float32" else autocast))
    benchmark.pedantic(timed(run), rounds=bench_size.pick(small=1, full=2, gpu=3), iterations=1, warmup_rounds=0)
    _AUTOCAST[(autocast, size["name"], str(device))] = out[-1]
    ref = _AUTOCAST.get(("float32", size["name"], str(device)))
    if autocast != "float32" and ref is not None:
        benchmark.extra_info["delta_rel_diff_vs_float32"] = f"{rel_error(out[-1].delta, ref.delta):.1e}"
        benchmark.extra_info["z_rel_diff_vs_float32"] = f"{rel_error(out[-1].z, ref.z):.1e}"
        benchmark.extra_info["loss_rel_diff_vs_float32"] = f"{rel_error(out[-1].loss, ref.loss):.1e}"


TESTBED_AUTOCAST = {"small": dict(n=4, batch=4, steps=4), "full": dict(n=100, batch=50), "gpu": dict(n=100, batch=50)}


@pytest.mark.parametrize("autocast", ["float32", "bfloat16"])
def test_vstar_autocast_testbed(benchmark, timed, bench_size, device, autocast):
    """AlphaEdit + BLUE + NAS on the testbed Llama (float32), preset testbed-llama, the demo's
    facts and batches (100 in 2 batches of 50 at the full size), with v* in float32 or with
    bfloat16 autocast: time, v* time, CounterFact metrics after, and δ of the first boundary
    layer on the unedited model against float32's. The smoke size takes 4 v* steps."""
    from fastedit import presets, testbed
    from fastedit.editing import Editor, load_records, requests_from_records
    from fastedit.eval import evaluate

    c = TESTBED_AUTOCAST[bench_size]
    key = ("testbed", str(device))
    if key not in _AUTOCAST:
        model, tok = testbed.load("llama", device=device)
        records = load_records(testbed.records(c["n"]))
        _AUTOCAST[key] = dict(model=model, tok=tok, records=records, requests=requests_from_records(records),
                              stats=testbed.stats("llama", model=model, tokenizer=tok, progress=False),
                              weights={l: p.detach().clone() for l, p in
                                       ((l, get_adapter(model).weight_param(l)) for l in (0, 1))})
    s = _AUTOCAST[key]
    model, tok, ad = s["model"], s["tok"], get_adapter(s["model"])
    hp = presets.get("testbed-llama", method="alphaedit", strategy="blue").replace(
        vstar_autocast=None if autocast == "float32" else autocast)
    if "steps" in c:
        hp = hp.replace(v_num_grad_steps=c["steps"])

    def reset():
        for l, w in s["weights"].items():
            ad.weight_param(l).data.copy_(w)

    reset()
    templates = context_templates(model, tok, n=hp.context_n, length=hp.context_length)
    layer = hp.boundary_layers[0]
    t = compute_targets(model, tok, ad, s["requests"], layer, templates=templates, hparams=hp.vstar_params(),
                        autocast=hp.vstar_autocast)
    _AUTOCAST[("testbed delta", autocast, str(device))] = t
    reports = []

    def run():
        editor = Editor(model, tok, method="alphaedit", strategy="blue", nas=True, hparams=hp, stats=s["stats"],
                        progress=False)
        reports.append(editor.edit(s["requests"], batch_size=c["batch"]))

    benchmark.group = f"AlphaEdit+BLUE+NAS on the testbed, v* bfloat16 autocast ({device.type})"
    benchmark.extra_info.update(role="fastedit", op=f"testbed AlphaEdit+BLUE+NAS, v* {autocast}", edits=c["n"],
                                size=f"testbed llama {c['n'] // c['batch']}x{c['batch']}", variant=autocast)
    benchmark.pedantic(timed(run), setup=reset, rounds=1, iterations=1, warmup_rounds=0)
    metrics = evaluate(model, tok, s["records"], progress=False)
    reset()
    r = reports[-1]
    benchmark.extra_info.update(
        {k: round(metrics[k], 2) for k in ("efficacy", "generalization", "specificity", "score")},
        n_edited=r.n_edited, vstar_seconds=round(r.times().get("targets", 0.0), 3),
        stage_seconds={k: round(v, 3) for k, v in r.times().items()}, prepare_seconds=round(r.prepare_seconds, 3))
    ref = _AUTOCAST.get(("testbed delta", "float32", str(device)))
    if autocast != "float32" and ref is not None:
        benchmark.extra_info["delta_rel_diff_vs_float32"] = f"{rel_error(t.delta, ref.delta):.1e}"
        benchmark.extra_info["z_rel_diff_vs_float32"] = f"{rel_error(t.z, ref.z):.1e}"
