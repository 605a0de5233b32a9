"""NAS: the drop rule and rescale, the anchor (estimated once, cached in memory and on disk),
and the report of dropped edits."""
import json

import pytest
import torch

import _editing_world as W
from fastedit import presets, testbed
from fastedit.editing import Editor
from fastedit.editing import editor as editor_mod
from fastedit.editing import methods as methods_mod
from fastedit.editing.nas import AnchorCache, apply_anchor, choose_sample
from fastedit.errors import InputError
from fastedit.testing import assert_close

NAS_TESTBED_N = 8
NAS_DELTA_SLACK = 1.05


def test_apply_anchor_drops_outliers_and_rescales_the_rest(gen):
    n, d, mu = 37, 13, 2.5
    h = torch.randn(n, d, dtype=torch.float64, generator=gen)
    v0 = torch.randn(n, d, dtype=torch.float64, generator=gen)
    delta = torch.randn(n, d, dtype=torch.float64, generator=gen) * torch.linspace(0.1, 3, n, dtype=torch.float64)[:, None]
    out = apply_anchor(h, v0, delta, mu, max_ratio=2.0)
    v = v0 + delta
    norms = v.norm(dim=-1)
    keep = norms <= 2.0 * mu
    assert 0 < int(keep.sum()) < n
    assert torch.equal(out.keep, keep)
    assert_close(out.v_norm, norms, 1e-12, "‖v*‖")
    expect = (h - v0) + torch.where(keep[:, None], v * (mu / norms)[:, None], v)
    assert_close(out.z, expect, 1e-12, "z")
    assert_close((out.z - (h - v0))[keep].norm(dim=-1), torch.full((int(keep.sum()),), mu, dtype=torch.float64),
                 1e-12, "rescaled norms")
    with pytest.raises(InputError, match="anchor"):
        apply_anchor(h, v0, delta, 0.0)


def test_choose_sample_is_seeded_and_bounded():
    items = list(range(50))
    assert choose_sample(items, 60) == items
    a, b = choose_sample(items, 10, seed=0), choose_sample(items, 10, seed=0)
    assert a == b and len(set(a)) == 10 and a != choose_sample(items, 10, seed=1)


def _count_estimates(monkeypatch):
    calls = []
    real = editor_mod.estimate_anchor

    def counting(*args, **kwargs):
        calls.append(args[4])  # the layer
        return real(*args, **kwargs)

    monkeypatch.setattr(editor_mod, "estimate_anchor", counting)
    return calls


@pytest.mark.parametrize("strategy", ["distribute", "blue"])
def test_anchor_is_estimated_once_cached_and_reused_from_disk(monkeypatch, tmp_path, strategy):
    calls = _count_estimates(monkeypatch)
    tok = W.tokenizer()
    model = W.model("llama")
    hp = presets.get("tiny", method="memit_seq", strategy=strategy)
    stats = W.covariances(model, hp.layers)
    ed = Editor(model, tok, method="memit_seq", strategy=strategy, nas=True, hparams=hp, stats=stats,
                progress=False, cache_dir=tmp_path)
    report = ed.edit(W.REQUESTS, batch_size=2, nas_requests=W.REQUESTS + W.MORE_REQUESTS)
    # one anchor: where the fact is written from scratch (MEMIT's last layer, BLUE's first)
    anchor_layers = [hp.layers[-1]] if strategy == "distribute" else [hp.boundary_layers[0]]
    assert sorted(calls) == anchor_layers
    assert sorted(ed.anchors) == anchor_layers and all(mu > 0 for mu in ed.anchors.values())
    assert {int(k) for k in report.to_dict()["anchors"]} == set(anchor_layers)
    assert report.to_dict()["anchors"][str(anchor_layers[0])]["n"] == len(W.REQUESTS + W.MORE_REQUESTS)
    ed.edit(W.MORE_REQUESTS, batch_size=3, nas_requests=W.REQUESTS + W.MORE_REQUESTS)
    assert len(calls) == len(anchor_layers)  # reused in memory
    assert len(list(tmp_path.glob("nas_anchor_*.json"))) == len(anchor_layers)
    fresh = W.model("llama")
    ed2 = Editor(fresh, tok, method="memit_seq", strategy=strategy, nas=True, hparams=hp,
                 stats=W.covariances(fresh, hp.layers), progress=False, cache_dir=tmp_path)
    ed2.edit(W.REQUESTS[:1], batch_size=1, nas_requests=W.REQUESTS + W.MORE_REQUESTS)
    assert len(calls) == len(anchor_layers)  # loaded from disk
    assert ed2.anchors == pytest.approx(ed.anchors, rel=1e-12)


def test_dropped_edits_are_reported_and_not_edited():
    tok = W.tokenizer()
    model = W.model("gpt2")
    # max_ratio 1: an edit whose ‖v*‖ exceeds the (95%-trimmed) mean is dropped; the anchor sample
    # is the batch itself, so its largest norm is always above the anchor.
    hp = presets.get("tiny").replace(nas_max_ratio=1.0)
    ed = Editor(model, tok, method="memit", nas=True, hparams=hp, stats=W.covariances(model, hp.layers),
                progress=False)
    report = ed.edit(W.REQUESTS, batch_size=len(W.REQUESTS))
    d = json.loads(report.to_json())
    dropped = {x["request"] for x in d["batches"][0]["dropped"]}
    edited = set(d["batches"][0]["edited"])
    assert dropped and edited and dropped.isdisjoint(edited) and dropped | edited == set(range(len(W.REQUESTS)))
    mu = ed.anchors[hp.layers[-1]]
    for x in d["batches"][0]["dropped"]:
        assert x["v_norm"] > mu and x["ratio"] == pytest.approx(x["v_norm"] / mu)
        assert x["case_id"] == W.REQUESTS[x["request"]].case_id
    vst = d["batches"][0]["vstar"][str(hp.layers[-1])]
    for i, norm in zip(vst["requests"], vst["v_norm"]):
        assert (norm <= mu) == (i in edited)
    assert d["n_dropped"] == len(dropped) and d["n_edited"] == len(edited)
    for layer, w in d["weight_norms"].items():
        assert w["growth"] == pytest.approx(w["current"] / w["original"])
    # the edited requests took; a dropped request's target is not forced
    got = W.top1(model, tok, [W.REQUESTS[i].text for i in sorted(edited)])
    assert got == [W.target_id(tok, W.REQUESTS[i]) for i in sorted(edited)]


def test_anchor_cache_ignores_damaged_files(tmp_path):
    cache = AnchorCache(tmp_path)
    cache.put("k", {"mu": 1.5})
    assert AnchorCache(tmp_path).get("k")["mu"] == 1.5
    (tmp_path / "nas_anchor_bad.json").write_text("{not json")
    assert AnchorCache(tmp_path).get("bad") is None


@pytest.fixture
def one_thread():
    # the testbed model is tiny: one thread is faster than two on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_blue_rescales_only_the_first_boundary_layers_vstar(monkeypatch, one_thread):
    """ALGORITHMS.md 7 under BLUE: R at the first boundary layer is z_NAS − cur with
    z_NAS = (h_init − v0) + v*·μ/‖v*‖; R at the last one is h_init + δ − cur from that layer's own,
    unscaled v*, so it holds no multiple of v0."""
    tok = W.tokenizer()
    model = W.model("llama", dtype=torch.float64)
    hp = presets.get("tiny", method="memit", strategy="blue").replace(layers=(0, 1, 2))
    targets, currents, residuals = {}, {}, {}
    real_targets, real_current, real_apply = (methods_mod.compute_targets, methods_mod.BatchRun.current,
                                              methods_mod.BatchRun.solve_and_apply)

    def spy_targets(*args, **kwargs):
        t = real_targets(*args, **kwargs)
        targets[args[4]] = t
        return t

    def spy_current(self, layer):
        currents[layer] = real_current(self, layer)
        return currents[layer]

    def spy_apply(self, layer, K, R):
        residuals[layer] = R.clone()
        return real_apply(self, layer, K, R)

    monkeypatch.setattr(methods_mod, "compute_targets", spy_targets)
    monkeypatch.setattr(methods_mod.BatchRun, "current", spy_current)
    monkeypatch.setattr(methods_mod.BatchRun, "solve_and_apply", spy_apply)
    ed = Editor(model, tok, method="memit", strategy="blue", nas=True, hparams=hp,
                stats=W.covariances(model, hp.layers), progress=False)
    first, last = hp.boundary_layers
    # the anchor sample is not the batch, so the scale s = μ/‖v*‖ of an edit is not 1
    report = ed.edit(W.REQUESTS, batch_size=len(W.REQUESTS), nas_requests=W.MORE_REQUESTS)
    assert sorted(ed.anchors) == [first] and report.n_edited == len(W.REQUESTS)
    t = targets[first]
    a = apply_anchor(t.h_init, t.v0, t.delta, ed.anchors[first], hp.nas_max_ratio)
    scale = ed.anchors[first] / a.v_norm
    assert (scale - 1).abs().min() > 1e-3
    assert_close(residuals[first], (a.z - currents[first]).T, 1e-12, "R at the first boundary layer")
    t = targets[last]
    z = (t.h_init + t.delta).to(torch.float64)
    assert_close(residuals[last], (z - currents[last]).T, 1e-12, "R at the last boundary layer")
    assert "v_norm" not in report.batches[0].vstar[last]  # no NAS statistics where NAS does not act


@pytest.mark.skipif("llama" not in testbed.shipped(), reason="testbed Llama not installed")
def test_nas_does_not_raise_any_layers_update_on_the_testbed(one_thread):
    """MEMIT+BLUE on the shipped testbed, a fixed batch of real facts, NAS anchored on that batch:
    no layer's ‖ΔW‖ exceeds its value without NAS (by more than NAS_DELTA_SLACK). Rescaling the
    second boundary layer's v* too made that layer's ‖ΔW‖ 3.4 times larger on this batch."""
    from fastedit.editing.requests import load_records, requests_from_records

    model, tok = testbed.load("llama")
    requests = requests_from_records(load_records(testbed.records(NAS_TESTBED_N)))
    hp = presets.get("testbed-llama", method="memit", strategy="blue")
    stats = testbed.stats("llama", model=model, tokenizer=tok, layers=hp.layers)
    norms = {}
    for nas in (False, True):
        ed = Editor(model, tok, method="memit", strategy="blue", nas=nas, hparams=hp, stats=stats, progress=False)
        report = ed.edit(requests, batch_size=len(requests))
        ed.restore()
        assert report.n_edited == len(requests)
        norms[nas] = {l: v["delta_norm"] for l, v in report.batches[0].layers.items()}
    assert norms[True].keys() == norms[False].keys() == set(hp.boundary_layers)
    for l, plain in norms[False].items():
        assert norms[True][l] <= NAS_DELTA_SLACK * plain, (l, norms)


@pytest.mark.parametrize("strategy", ["distribute", "blue"])
def test_edited_means_some_weight_changed_for_it(one_thread, strategy):
    """NAS decides at the anchor layer, before any layer is written: a dropped edit is in no
    solve, every edited one is in every solve; when all are dropped no weight changes at all."""
    tok = W.tokenizer()
    model = W.model("gpt2")
    hp = presets.get("tiny", method="memit", strategy=strategy).replace(nas_max_ratio=1.0)
    stats = W.covariances(model, hp.layers)
    ed = Editor(model, tok, method="memit", strategy=strategy, nas=True, hparams=hp, stats=stats, progress=False)
    where = methods_mod.anchor_layer(strategy, hp)
    b = ed.edit(W.REQUESTS, batch_size=len(W.REQUESTS)).batches[0]
    dropped = [d["request"] for d in b.dropped]
    assert dropped and b.edited and sorted(dropped + b.edited) == list(range(len(W.REQUESTS)))
    assert {d["layer"] for d in b.dropped} == {where}
    assert sorted(b.layers) == sorted(ed.edit_layers)
    assert all(info["n"] == len(b.edited) and info["delta_norm"] > 0 for info in b.layers.values())
    for layer, v in b.vstar.items():  # BLUE's second v* runs for the edited requests only
        assert v["requests"] == (list(range(len(W.REQUESTS))) if layer == where else b.edited)
    ed.restore()

    before = {l: ed.adapter.weight_param(l).detach().clone() for l in ed.edit_layers}
    ed = Editor(model, tok, method="memit", strategy=strategy, nas=True, hparams=hp.replace(nas_max_ratio=1e-3),
                stats=stats, progress=False)
    report = ed.edit(W.REQUESTS, batch_size=len(W.REQUESTS))
    b = report.batches[0]
    assert b.edited == [] and report.n_edited == 0 and len(b.dropped) == len(W.REQUESTS) and b.layers == {}
    assert all(torch.equal(ed.adapter.weight_param(l), w) for l, w in before.items())


def test_anchor_is_the_trimmed_mean_of_bare_prompt_vstar_norms(one_thread):
    """As the NAS reference: the anchor's v* see the edit prompt alone, not the context templates."""
    from fastedit.editing.nas import estimate_anchor
    from fastedit.editing.targets import compute_targets
    from fastedit.linalg import anchor_from_norms
    from fastedit.models import get_adapter

    tok = W.tokenizer()
    model = W.model("llama")
    ad = get_adapter(model)
    hp = presets.get("tiny")
    requests = W.REQUESTS + W.MORE_REQUESTS
    mu, info = estimate_anchor(model, tok, ad, requests, 2, hparams=hp, batch_size=4)
    t = compute_targets(model, tok, ad, requests, 2, templates=[["{}"]], hparams=hp.vstar_params())
    norms = (t.v0.double() + t.delta.double()).norm(dim=-1)
    assert mu == pytest.approx(anchor_from_norms(norms, hp.nas_trim_quantile), rel=1e-6)
    assert info["n"] == len(requests) and info["norm_max"] == pytest.approx(float(norms.max()), rel=1e-6)
    templated = compute_targets(model, tok, ad, requests, 2, templates=[["{}"], ["one two . {}", "the sun . {}"]],
                                hparams=hp.vstar_params())
    assert not torch.allclose(templated.delta, t.delta)  # the prompts matter, so the check has teeth
