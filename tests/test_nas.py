"""NAS: the drop rule and rescale, the anchor (estimated once, cached in memory and on disk),
and the report of dropped edits."""
import json

import pytest
import torch

import _editing_world as W
from fastedit import presets
from fastedit.editing import Editor
from fastedit.editing import editor as editor_mod
from fastedit.editing.nas import AnchorCache, apply_anchor, choose_sample
from fastedit.errors import InputError
from fastedit.testing import assert_close


def test_apply_anchor_drops_outliers_and_rescales_the_rest():
    gen = W.fresh_generator()
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
    anchor_layers = [hp.layers[-1]] if strategy == "distribute" else list(hp.boundary_layers)
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
