"""The drivers against written-out references: MEMIT's layer loop (ALGORITHMS.md section 3) in
float64, the sequential state of MEMIT_seq and AlphaEdit (section 4's recomputed keys)."""
import copy

import pytest
import torch

import _editing_world as W
from fastedit import presets
from fastedit.editing import Editor, compute_keys, context_templates
from fastedit.editing import methods as methods_mod
from fastedit.editing.methods import make_solver
from fastedit.errors import InputError
from fastedit.models import capture, get_adapter
from fastedit.testing import assert_close


def _lookup(tok, text_with_slot: str, subject: str):
    """Token ids of the filled text and the index of the subject's last token (word-level tokenizer)."""
    at = text_with_slot.index("{}")
    ids = tok(text_with_slot.replace("{}", subject))["input_ids"]
    return ids, len(tok(text_with_slot[:at] + subject)["input_ids"]) - 1


def _reference_keys(model, tok, requests, layer, templates):
    """K (d_k, n): per request, the rewrite-module input at the lookup token, averaged within each
    template group, then over the groups (half bare prompt, half generated contexts)."""
    ad = get_adapter(model)
    cols = []
    for r in requests:
        groups = []
        for group in templates:
            ks = []
            for t in group:
                ids, pos = _lookup(tok, t.replace("{}", r.prompt), r.subject)
                with capture({"k": ad.rewrite_module(layer)}, inputs=True) as got, torch.no_grad():
                    model(input_ids=torch.tensor([ids]))
                ks.append(got["k"][0, pos])
            groups.append(torch.stack(ks).mean(0))
        cols.append(torch.stack(groups).mean(0))
    return torch.stack(cols, 1)


def _reference_block_outputs(model, tok, requests, layer):
    ad = get_adapter(model)
    rows = []
    for r in requests:
        ids, pos = _lookup(tok, r.prompt, r.subject)
        with capture({"h": ad.block(layer)}) as got, torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        rows.append(got["h"][0, pos])
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_memit_driver_equals_written_out_float64_reference(monkeypatch, arch):
    tok = W.tokenizer()
    model = W.model(arch, dtype=torch.float64)
    ref = copy.deepcopy(model)
    hp = presets.get("tiny").replace(layers=(0, 1, 2))
    stats = W.covariances(model, hp.layers)
    seen = []
    real = methods_mod.compute_targets

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(methods_mod, "compute_targets", spy)
    editor = Editor(model, tok, method="memit", strategy="distribute", hparams=hp, stats=stats, progress=False)
    editor.edit(W.REQUESTS, batch_size=len(W.REQUESTS))
    assert len(seen) == 1 and seen[0].z.dtype == torch.float64
    z = seen[0].z  # same v*: the reference starts from the driver's targets

    # ALGORITHMS.md section 3, plainly: per layer, K and cur on the current model, R divided by the
    # number of layers left, ΔW = R (solve(λC0 + KKᵀ, K))ᵀ, applied before the next layer.
    ad = get_adapter(ref)
    L = hp.layers
    for i, layer in enumerate(L):
        K = _reference_keys(ref, tok, W.REQUESTS, layer, editor._templates)
        cur = _reference_block_outputs(ref, tok, W.REQUESTS, L[-1])
        R = (z - cur).T / (len(L) - i)
        dW = R @ torch.linalg.solve(hp.lam * stats[layer] + K @ K.T, K).T
        ad.weight(layer).add_(dW)

    drv = get_adapter(model)
    for layer in L:
        w0 = editor._originals[layer]
        w0 = w0.T if drv.transposed else w0
        assert_close(drv.weight(layer) - w0, ad.weight(layer) - w0, 1e-6, f"ΔW of layer {layer}")


def _spy_accumulate(monkeypatch, cls):
    log = []
    real = cls.accumulate

    def accumulate(self, K, sign=1):
        log.append((self, K.clone(), sign))
        return real(self, K, sign)

    monkeypatch.setattr(cls, "accumulate", accumulate)
    return log


@pytest.mark.parametrize("strategy", ["distribute", "blue"])
def test_alphaedit_accumulates_the_keys_of_the_edited_model(monkeypatch, strategy):
    """The reference recomputes a batch's keys on the edited model for C_p; the driver adds the
    keys it solved with. They are the same keys (layer l's keys do not depend on the rewrite
    weights of layers >= l): checked here against a recomputation after the batch."""
    tok = W.tokenizer()
    model = W.model("llama")
    hp = presets.get("tiny", method="alphaedit", strategy=strategy).replace(layers=(0, 1, 2))
    stats = W.covariances(model, hp.layers)
    log = _spy_accumulate(monkeypatch, methods_mod.AlphaEditSolver)
    editor = Editor(model, tok, method="alphaedit", strategy=strategy, hparams=hp, stats=stats, progress=False)
    templates = context_templates(model, tok, n=hp.context_n, length=hp.context_length)
    before = compute_keys(model, tok, editor.adapter, W.REQUESTS, list(hp.layers), templates=templates)
    editor.edit(W.REQUESTS, batch_size=len(W.REQUESTS))
    layers = list(editor.edit_layers)
    assert [s.layer for s, _, sign in log] == layers and all(sign == 1 for *_, sign in log)
    after = compute_keys(model, tok, editor.adapter, W.REQUESTS, layers, templates=editor._templates)
    for s, K, _ in log:
        assert_close(K, after[s.layer], 1e-6, f"accumulated keys of layer {s.layer}")
    # and the edit did change the keys above the first edited layer, so the check has teeth
    assert not torch.allclose(before[layers[-1]], after[layers[-1]], rtol=1e-3, atol=1e-5)


def test_memit_seq_grows_its_system_and_memit_does_not(monkeypatch):
    tok = W.tokenizer()
    hp = presets.get("tiny")
    log = _spy_accumulate(monkeypatch, methods_mod.MemitSolver)
    g = torch.Generator().manual_seed(3)
    for method in ("memit", "memit_seq"):
        log.clear()
        model = W.model("llama")
        stats = W.covariances(model, hp.layers)
        editor = Editor(model, tok, method=method, hparams=hp, stats=stats, progress=False)
        editor.edit(W.REQUESTS + W.MORE_REQUESTS, batch_size=3)  # 3 batches
        layer = hp.layers[0]
        K = torch.randn(editor.adapter.d_k, 2, dtype=torch.float64, generator=g)
        R = torch.randn(editor.adapter.d, 2, dtype=torch.float64, generator=g)
        A = hp.lam * stats[layer]
        if method == "memit_seq":
            keys = [k for s, k, _ in log if s is editor._solvers[layer]]
            assert len(keys) == 3
            for k in keys:
                A = A + k.to(torch.float64) @ k.to(torch.float64).T
        expect = R @ torch.linalg.solve(A + K @ K.T, K).T
        assert_close(editor._solvers[layer].solve(K, R), expect, 1e-6, f"{method} solve after 3 batches")


def test_make_solver_rejects_unknown_methods_and_empty_null_spaces():
    C0 = torch.eye(5, dtype=torch.float64)
    hp = presets.get("tiny")
    with pytest.raises(InputError, match="method"):
        make_solver("rome", C0, hp, 1)
    with pytest.raises(InputError, match="null-space threshold"):
        make_solver("alphaedit", C0, hp.replace(nullspace_threshold=0.5), 1)


def test_the_chunk_budget_reaches_every_pass_and_changes_nothing(monkeypatch):
    """EditParams.max_chunk_tokens bounds v*, the key pass and the residual reads; a budget that
    splits the batch gives the same weights (float64), and the report counts the chunks."""
    tok = W.tokenizer()
    hp = presets.get("tiny", method="alphaedit", strategy="blue").replace(layers=(0, 1, 2), v_num_grad_steps=4)
    budgets = []
    for name in ("compute_targets", "compute_keys", "block_outputs_at_lookup", "values_at_lookup"):
        real = getattr(methods_mod, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            budgets.append((_name, kwargs.get("max_chunk_tokens")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(methods_mod, name, spy)
    deltas, reports = [], []
    for budget in (None, 60):
        model = W.model("llama", dtype=torch.float64)
        stats = W.covariances(model, hp.layers)
        editor = Editor(model, tok, method="alphaedit", strategy="blue", hparams=hp.replace(max_chunk_tokens=budget),
                        stats=stats, progress=False)
        reports.append(editor.edit(W.REQUESTS + W.MORE_REQUESTS, batch_size=100).to_dict())
        deltas.append({l: editor.adapter.weight(l) - (editor._originals[l].T if editor.adapter.transposed
                                                      else editor._originals[l]) for l in editor.edit_layers})
    assert {b for _, b in budgets[len(budgets) // 2:]} == {60} and len({n for n, _ in budgets}) == 3
    vstar = reports[1]["batches"][0]["vstar"]
    assert all(v["chunks"] > 1 for v in vstar.values()) and reports[0]["batches"][0]["vstar"]["0"]["chunks"] == 1
    for l in deltas[0]:
        assert_close(deltas[1][l], deltas[0][l], 1e-9, f"ΔW of layer {l} in chunks")
    with pytest.raises(InputError, match="max_chunk_tokens"):
        hp.replace(max_chunk_tokens=0)


def test_vstar_autocast_reaches_every_v_star_and_bad_values_are_refused(monkeypatch):
    """EditParams.vstar_autocast goes to each v* of a batch (off by default); with it on, a float32
    model's ΔW stays close to the float32 run's (bfloat16 in v*'s upper blocks only)."""
    tok = W.tokenizer()
    hp = presets.get("tiny", method="alphaedit", strategy="blue").replace(layers=(0, 1, 2), v_num_grad_steps=4)
    seen = []
    real = methods_mod.compute_targets

    def spy(*args, **kwargs):
        seen.append(kwargs.get("autocast"))
        return real(*args, **kwargs)

    monkeypatch.setattr(methods_mod, "compute_targets", spy)
    deltas = []
    for autocast in (None, "bfloat16"):
        model = W.model("llama", dtype=torch.float32)
        editor = Editor(model, tok, method="alphaedit", strategy="blue", hparams=hp.replace(vstar_autocast=autocast),
                        stats=W.covariances(model, hp.layers), progress=False)
        editor.edit(W.REQUESTS, batch_size=100)
        deltas.append({l: editor.adapter.weight(l) - (editor._originals[l].T if editor.adapter.transposed
                                                      else editor._originals[l]) for l in editor.edit_layers})
    assert seen == [None, None, "bfloat16", "bfloat16"]
    for l in deltas[0]:
        assert not torch.equal(deltas[1][l], deltas[0][l])
        assert_close(deltas[1][l], deltas[0][l], 0.05, f"ΔW of layer {l} with v* in bfloat16")  # 4e-3 measured
    for bad in ("float16", "bf16", True, torch.bfloat16):
        with pytest.raises(InputError, match="vstar_autocast"):
            hp.replace(vstar_autocast=bad)


@pytest.mark.parametrize("method,strategy,nas,regularizer", [("memit", "distribute", False, None),
                                                             ("alphaedit", "distribute", True, "rect"),
                                                             ("alphaedit", "blue", True, "prune")])
def test_key_passes_reuse_the_unchanged_lower_blocks_with_the_same_weights(monkeypatch, method, strategy, nas,
                                                                         regularizer):
    """Each layer's key pass starts at the block the previous layer's pass left its hidden states
    at: the edited weights are bit for bit those with nothing kept (float64, one thread), and the
    report counts the blocks each layer's key pass ran."""
    from fastedit.editing.keys import HiddenCache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = W.tokenizer()
    hp = presets.get("tiny", method=method, strategy=strategy).replace(layers=(1, 2, 3), v_num_grad_steps=3,
                                                                       nas_sample_size=4)
    out = []
    try:
        for budget in (None, 0):
            monkeypatch.setattr(methods_mod, "HiddenCache", lambda _b=budget: HiddenCache(budget_bytes=_b))
            model = W.model("llama", dtype=torch.float64)
            editor = Editor(model, tok, method=method, strategy=strategy, nas=nas, regularizer=regularizer,
                            hparams=hp, stats=W.covariances(model, hp.layers), progress=False)
            report = editor.edit(W.REQUESTS + W.MORE_REQUESTS, batch_size=100).to_dict()
            out.append(({l: editor.adapter.weight(l).clone() for l in range(editor.adapter.num_layers)},
                        {int(l): (v["key_blocks_run"], v["key_blocks_skipped"])
                         for l, v in report["batches"][0]["layers"].items()}))
    finally:
        torch.set_num_threads(threads)
    (reused, blocks), (fresh, fresh_blocks) = out
    for l in reused:
        assert torch.equal(reused[l], fresh[l]), (method, strategy, l)
    # one chunk here: distribute runs blocks 0-1, then 1-2, then 2-3; BLUE 0-1, then 1-3
    expected = {"distribute": {1: (2, 0), 2: (2, 1), 3: (2, 2)}, "blue": {1: (2, 0), 3: (3, 1)}}[strategy]
    assert blocks == expected and fresh_blocks == {l: (l + 1, 0) for l in expected}, (blocks, fresh_blocks)
