import pytest
import torch

from fastedit.editing.regularizers import prune_restrain, rect, rect_mask
from fastedit.errors import InputError
from fastedit.testing import assert_close


@pytest.mark.parametrize("keep", [0.4, 0.25, 1.0])
def test_rect_keeps_exactly_the_top_fraction_of_relative_change(keep, gen):
    d, d_k = 13, 29
    W = torch.randn(d, d_k, dtype=torch.float64, generator=gen)
    dW = torch.randn(d, d_k, dtype=torch.float64, generator=gen)
    W[0, 0] = 0.0  # relative change of a zero weight is |ΔW|/1e-8: always kept
    out = rect(dW, W, keep)
    kept = rect_mask(dW, W, keep)
    assert int(kept.sum()) == int(keep * d * d_k)
    assert kept[0, 0]
    assert torch.equal(out, torch.where(kept, dW, torch.zeros_like(dW)))
    if keep < 1:
        rel = dW.abs() / (W.abs() + 1e-8)
        # every kept entry has a relative change at least as large as every dropped one
        assert rel[kept].min() >= rel[~kept].max()


def test_rect_rejects_bad_input():
    with pytest.raises(InputError, match="same shape"):
        rect(torch.zeros(3, 4), torch.zeros(4, 3))
    with pytest.raises(InputError, match="keep"):
        rect(torch.zeros(3, 4), torch.zeros(3, 4), keep=0.0)


def test_prune_maps_large_singular_values_and_keeps_the_rest(gen):
    d, d_k = 11, 23
    W0 = torch.randn(d, d_k, dtype=torch.float64, generator=gen)
    s0 = torch.linalg.matrix_norm(W0, ord=2)
    # a total update with known singular values, some above σ_max(W0)
    u, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(d_k, d, dtype=torch.float64, generator=gen))
    sig = torch.linspace(0.1, 4.0, d, dtype=torch.float64) * s0
    delta = (u * sig) @ v.T
    restrained, info = prune_restrain(delta, W0)
    expect_sig = torch.where(sig >= s0, torch.log(sig) - torch.log(s0) + s0, sig)
    assert_close(restrained, (u * expect_sig) @ v.T, 1e-10, "restrained ΔW")
    assert info["restrained"] == int((sig >= s0).sum()) > 0
    assert info["sigma_max_w0"] == pytest.approx(float(s0))
    got_sig = torch.linalg.svdvals(restrained)
    assert_close(got_sig, expect_sig.sort(descending=True).values, 1e-10, "singular values")


def _edit(regularizer, arch="gpt2", **changes):
    import _editing_world as W
    from fastedit import presets
    from fastedit.editing import Editor

    tok, model = W.tokenizer(), W.model(arch, dtype=torch.float64)
    hp = presets.get("tiny").replace(**changes)
    ed = Editor(model, tok, method="memit_seq", hparams=hp, regularizer=regularizer,
                stats=W.covariances(model, hp.layers), progress=False)
    report = ed.edit(W.REQUESTS + W.MORE_REQUESTS, batch_size=4)
    return ed, report


def test_rect_through_the_editor_adds_exactly_the_kept_entries():
    ed, report = _edit("rect")
    for layer, info in report.batches[0].layers.items():
        assert info["rect_kept"] == int(0.4 * ed.adapter.d * ed.adapter.d_k)
    # after two batches each layer's total change touches at most two masks' worth of entries
    for layer in ed.edit_layers:
        w0 = ed._originals[layer].T if ed.adapter.transposed else ed._originals[layer]
        changed = int((ed.adapter.weight(layer) != w0).sum())
        assert 0.4 * w0.numel() - 1 <= changed <= 2 * int(0.4 * w0.numel())


def test_prune_writes_w0_plus_the_restrained_total_update():
    # λ small: large updates, so that some singular values of ΔW_total exceed σ_max(W0)
    raw, _ = _edit(None, lam=0.5)
    pruned, report = _edit("prune", lam=0.5)
    assert any(info["restrained"] > 0 for info in report.prune.values())
    for layer in pruned.edit_layers:
        w0 = pruned._originals[layer].T if pruned.adapter.transposed else pruned._originals[layer]
        w_raw = raw.adapter.weight(layer)
        restrained, info = prune_restrain(w_raw - w0, w0)
        assert info == pytest.approx(report.prune[layer], rel=1e-10)
        assert_close(pruned.adapter.weight(layer), w0 + restrained, 1e-10, f"PRUNE layer {layer}")
        if info["restrained"]:
            # the buggy variant adds the restrained update on top of the edited weight
            buggy = w_raw + restrained
            assert (pruned.adapter.weight(layer) - buggy).norm() > 0.1 * restrained.norm()
    pruned.restore()
    for layer in pruned.edit_layers:
        assert torch.equal(pruned.adapter.weight_param(layer), pruned._originals[layer])


@pytest.mark.parametrize("strategy", ["distribute", "blue"])
def test_rect_masks_each_layer_before_the_next_is_measured(monkeypatch, strategy):
    """fastedit masks as it goes (the reference masks every layer at the end, from unmasked
    updates): each later layer's residual is measured on the model holding the masked updates."""
    import _editing_world as W
    from fastedit import presets
    from fastedit.editing import Editor
    from fastedit.editing import methods as methods_mod

    tok, model = W.tokenizer(), W.model("llama", dtype=torch.float64)
    hp = presets.get("tiny", method="memit", strategy=strategy).replace(layers=(0, 1, 2))
    ed = Editor(model, tok, method="memit", strategy=strategy, hparams=hp, regularizer="rect",
                stats=W.covariances(model, hp.layers), progress=False)
    solved, seen = {}, []
    real_apply, real_current = methods_mod.BatchRun.solve_and_apply, methods_mod.BatchRun.current

    def spy_apply(self, layer, K, R):
        solved[layer] = (self.solvers[layer].solve(K, R), self.adapter.weight(layer).clone())
        return real_apply(self, layer, K, R)

    def spy_current(self, layer):
        seen.append({l: self.adapter.weight(l).clone() for l in solved})
        return real_current(self, layer)

    monkeypatch.setattr(methods_mod.BatchRun, "solve_and_apply", spy_apply)
    monkeypatch.setattr(methods_mod.BatchRun, "current", spy_current)
    ed.edit(W.REQUESTS, batch_size=len(W.REQUESTS))
    layers = list(ed.edit_layers)
    assert len(seen) == len(layers) and list(solved) == layers
    for i, weights in enumerate(seen):
        assert list(weights) == layers[:i]  # the residual of layer i is measured after layers < i
        for l, w in weights.items():
            dW, w_before = solved[l]
            assert_close(w, w_before + rect(dW, w_before, hp.rect_keep), 1e-12, f"layer {l} when measuring")
            assert (w - (w_before + dW)).norm() > 0.1 * dW.norm()  # the mask did remove a part
