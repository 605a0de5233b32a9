"""The Editor end to end on tiny random models: edits land, unrelated prompts keep their
predictions, only the right layers change, failures restore the weights bit for bit."""
import json

import pytest
import torch

import _editing_world as W
from fastedit import presets
from fastedit.editing import Editor, Request
from fastedit.editing import methods as methods_mod
from fastedit.errors import EditError, InputError

# Share of the held-out prompts with a firm top-1 prediction (margin >= 0.25 logits over the
# runner-up, see _editing_world.firm) that must keep it through the edit.
HELD_KEPT = 0.75

# Every (arch, method), (arch, strategy), (method, strategy) pair and NAS on/off with each of
# them, at least once: the architecture is met through its adapter (keys, targets, the weight's
# layout), the method and the strategy through the solve and the layers, so the full grid would
# repeat each pair two or three times at ~20 CPU-seconds a case.
CASES = [("gpt2", "memit", "distribute", False), ("gpt2", "memit_seq", "blue", True),
         ("gpt2", "alphaedit", "distribute", True), ("gptj", "memit", "blue", True),
         ("gptj", "memit_seq", "distribute", False), ("gptj", "alphaedit", "blue", False),
         ("llama", "memit", "blue", False), ("llama", "memit_seq", "distribute", True),
         ("llama", "alphaedit", "distribute", False), ("llama", "alphaedit", "blue", True)]


@pytest.mark.parametrize("arch,method,strategy,nas", CASES)
def test_edits_land_and_unrelated_predictions_survive(arch, method, strategy, nas):
    tok = W.tokenizer()
    model = W.model(arch)
    hp = presets.get("tiny", method=method, strategy=strategy)
    stats = W.fresh_covariances(arch, hp.layers)
    held, held_before = W.firm(model, tok, W.HELD)
    assert len(held) >= 10
    editor = Editor(model, tok, method=method, strategy=strategy, nas=nas, hparams=hp, stats=stats, progress=False)
    report = editor.edit(W.REQUESTS, batch_size=len(W.REQUESTS))
    got = W.top1(model, tok, [r.text for r in W.REQUESTS])
    assert got == [W.target_id(tok, r) for r in W.REQUESTS]
    held_after = W.top1(model, tok, held)
    kept = sum(a == b for a, b in zip(held_before, held_after)) / len(held)
    assert kept >= HELD_KEPT, f"only {kept:.0%} of the held-out predictions survived"
    d = json.loads(json.dumps(report.to_dict()))
    assert d["n_edited"] == len(W.REQUESTS) and d["n_dropped"] == 0
    layers = set(hp.layers) if strategy == "distribute" else set(hp.boundary_layers)
    assert set(d["batches"][0]["layers"]) == {str(l) for l in layers}
    for info in d["batches"][0]["layers"].values():
        assert info["delta_norm"] > 0 and info["w_norm_after"] != info["w_norm_before"]
    assert set(d["batches"][0]["times"]) >= {"targets", "keys", "solve", "apply"}


@pytest.mark.parametrize("strategy", ["distribute", "blue"])
def test_only_the_strategys_layers_change_and_restore_undoes_everything(strategy):
    tok = W.tokenizer()
    model = W.model("llama")
    hp = presets.get("tiny").replace(layers=(0, 1, 2))
    before = W.weights(model)
    editor = Editor(model, tok, method="memit", strategy=strategy, hparams=hp,
                    stats=W.fresh_covariances("llama", hp.layers), progress=False)
    editor.edit(W.REQUESTS, batch_size=2)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    expect = {0, 1, 2} if strategy == "distribute" else {0, 2}
    assert changed == {f"model.layers.{l}.mlp.down_proj.weight" for l in expect}
    editor.restore()
    W.assert_unchanged(model, before)


def _editor(method="memit_seq", strategy="distribute", arch="llama", **kw):
    tok = W.tokenizer()
    model = W.model(arch)
    hp = presets.get("tiny", method=method, strategy=strategy)
    return Editor(model, tok, method=method, strategy=strategy, hparams=hp,
                  stats=W.fresh_covariances(arch, hp.layers), progress=False, **kw)


def test_a_request_failing_validation_changes_nothing():
    ed = _editor()
    before = W.weights(ed.model)
    bad = [*W.REQUESTS[:2], Request("no placeholder here", "Alice", "Tokyo", case_id=99), *W.REQUESTS[2:]]
    with pytest.raises(EditError) as info:
        ed.edit(bad, batch_size=2)
    assert info.value.stage == "validate" and info.value.request_index == 2
    assert "case 99" in str(info.value)
    assert isinstance(info.value.__cause__, InputError)
    W.assert_unchanged(ed.model, before)
    with pytest.raises(EditError, match="batch_size"):
        ed.edit(W.REQUESTS, batch_size=0)


def _probe(ed, layer):
    """A fixed solve through the layer's solver: changes iff its sequential state changes."""
    g = torch.Generator().manual_seed(5)
    K = torch.randn(ed.adapter.d_k, 3, dtype=torch.float64, generator=g)
    R = torch.randn(ed.adapter.d, 3, dtype=torch.float64, generator=g)
    return ed._solvers[layer].solve(K, R)


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("method,strategy", [("memit_seq", "distribute"), ("alphaedit", "blue")])
def test_fault_after_the_first_layer_restores_weights_and_state(monkeypatch, method, strategy, exc_type):
    ed = _editor(method, strategy)
    ed.edit(W.REQUESTS[:2], batch_size=2)  # some sequential state to protect
    before = W.weights(ed.model)
    probes = {l: _probe(ed, l) for l in ed.edit_layers}
    real = methods_mod.compute_keys
    calls = []

    def failing_keys(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first layer has been solved and applied by now
            raise exc_type("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(methods_mod, "compute_keys", failing_keys)
    # Ctrl-C is rolled back and re-raised as itself (so `except Exception` cannot swallow it),
    # carrying the EditError that names the stage, and the report.
    with pytest.raises(EditError if exc_type is RuntimeError else KeyboardInterrupt) as info:
        ed.edit(W.REQUESTS[2:], batch_size=2)
    error = info.value if exc_type is RuntimeError else info.value.edit_error
    assert error.stage == "keys"
    assert isinstance(error.__cause__ if exc_type is RuntimeError else info.value, exc_type)
    assert "case_id 13, 14" in str(error)
    assert info.value.report.batches == []
    W.assert_unchanged(ed.model, before)
    for l in ed.edit_layers:
        assert torch.equal(_probe(ed, l), probes[l])


def test_a_fault_while_accumulating_rolls_the_solver_state_back(monkeypatch):
    ed = _editor("memit_seq", "distribute")
    ed.edit(W.REQUESTS[:2], batch_size=2)
    before = W.weights(ed.model)
    probes = {l: _probe(ed, l) for l in ed.edit_layers}
    last = ed.edit_layers[-1]
    solver = ed._solvers[last]

    def broken(K, sign=1):
        if sign == 1:
            raise RuntimeError("accumulate failed")
    monkeypatch.setattr(solver, "accumulate", broken)
    with pytest.raises(EditError) as info:
        ed.edit(W.REQUESTS[2:], batch_size=2)
    assert info.value.stage == "state"
    W.assert_unchanged(ed.model, before)
    for l in ed.edit_layers:  # the first layer's accumulated keys were removed again
        torch.testing.assert_close(_probe(ed, l), probes[l], rtol=1e-9, atol=1e-12)


def test_error_names_stage_and_earlier_batches_stay(monkeypatch):
    ed = _editor("memit", "blue")
    real = methods_mod.compute_targets
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # batch 2, first boundary layer
            raise ValueError("v* exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(methods_mod, "compute_targets", failing)
    before = W.weights(ed.model)
    with pytest.raises(EditError) as info:
        ed.edit(W.REQUESTS, batch_size=2)
    assert info.value.stage == "targets" and "requests 2-3" in str(info.value)
    assert len(info.value.report.batches) == 1  # the first batch is applied and reported
    changed = [n for n, p in ed.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed  # batch 1 stays; batch 2 left nothing behind (checked by the tests above)


def test_bad_configuration_is_refused():
    tok, model = W.tokenizer(), W.model("llama")
    hp = presets.get("tiny")
    with pytest.raises(InputError, match="method"):
        Editor(model, tok, method="rome", hparams=hp)
    with pytest.raises(InputError, match="strategy"):
        Editor(model, tok, strategy="all", hparams=hp)
    with pytest.raises(InputError, match="hparams"):
        Editor(model, tok)
    with pytest.raises(InputError, match="layer 7"):
        Editor(model, tok, hparams=hp, layers=(1, 7))
    ed = Editor(model, tok, method="memit", hparams=hp, progress=False)
    with pytest.raises(EditError, match="fastedit stats") as info:
        ed.edit(W.REQUESTS)
    assert info.value.stage == "prepare"
    with pytest.raises(EditError, match=r"shape"):
        Editor(model, tok, method="memit", hparams=hp, stats={1: torch.eye(3), 2: torch.eye(3)},
               progress=False).edit(W.REQUESTS)


def _write_stats(directory, model, layer, C, override=None):
    """Statistics of ``layer`` whose Σ k kᵀ is C (over d_k "tokens", so C0 = C / d_k), written
    through the stats cache with ``model``'s identity (fields in ``override`` replaced)."""
    from fastedit.linalg import CovarianceAccumulator
    from fastedit.models import get_adapter
    from fastedit.stats import cache

    acc = CovarianceAccumulator(C.shape[0])
    acc.update(torch.linalg.cholesky(C).T.contiguous())
    directory.mkdir(parents=True, exist_ok=True)
    cache.save_layer(cache.layer_path(directory, layer), acc,
                     {**cache.identity(model, get_adapter(model), layer), **(override or {})})


def test_stats_directory_from_fastedit_stats(tmp_path):
    from fastedit.errors import CacheMismatchError

    tok, model = W.tokenizer(), W.model("llama")
    hp = presets.get("tiny")
    stats = W.fresh_covariances("llama", hp.layers)
    for l, C in stats.items():
        _write_stats(tmp_path / "ok", model, l, C)
    a = Editor(model, tok, method="memit", hparams=hp, stats=tmp_path / "ok", progress=False).covariance(1)
    torch.testing.assert_close(a * a.shape[0], stats[1], rtol=1e-10, atol=1e-12)
    with pytest.raises(InputError, match="layer_3"):
        Editor(model, tok, method="memit", hparams=hp, layers=(3,), stats=tmp_path / "ok",
               progress=False).covariance(3)
    # Another model of the same shapes (other weights), another module, layer or an old format:
    # each refused, naming the field, never used.
    other = W.model("llama", seed=1)
    with pytest.raises(CacheMismatchError, match="another model.*weights"):
        Editor(other, tok, method="memit", hparams=hp, stats=tmp_path / "ok", progress=False).covariance(1)
    for field, value in [("module", "transformer.h.1.mlp.c_proj"), ("layer", 2), ("d_k", 7),
                         ("format", "fastedit-covariance-1")]:
        _write_stats(tmp_path / field, model, 1, stats[1], {field: value})
        with pytest.raises(CacheMismatchError, match=field):
            Editor(model, tok, method="memit", hparams=hp, stats=tmp_path / field, progress=False).covariance(1)


def _records(requests):
    return [{"case_id": r.case_id, "requested_rewrite": {"prompt": r.prompt, "subject": r.subject,
                                                         "target_new": {"str": r.target_new},
                                                         "target_true": {"str": "Paris"}}} for r in requests]


def test_cli_edits_saves_the_model_and_a_report(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from fastedit.cli import main

    tok, model = W.tokenizer(), W.model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    hp = presets.get("tiny")
    stats_dir = tmp_path / "stats"
    for l, C in W.covariances(model, hp.layers).items():
        _write_stats(stats_dir, model, l, C)
    (tmp_path / "req.json").write_text(json.dumps(_records(W.REQUESTS)))
    common = ["edit", "--model", str(tmp_path / "model"), "--requests", str(tmp_path / "req.json"), "--preset", "tiny",
              "--device", "cpu", "--no-progress"]
    out = tmp_path / "out"
    assert main([*common, "--method", "memit", "--stats", str(stats_dir), "--out", str(out), "--batch-size", "2"]) == 0
    report = json.loads((out / "edit_report.json").read_text())
    assert report["n_edited"] == len(W.REQUESTS) and len(report["batches"]) == 2
    edited = AutoModelForCausalLM.from_pretrained(out)
    assert W.top1(edited, tok, [r.text for r in W.REQUESTS]) == [W.target_id(tok, r) for r in W.REQUESTS]
    # without --stats, --corpus collects them first (fastedit.stats)
    corpus = tmp_path / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    corpus.write_text("\n".join(" ".join(W.WORDS[int(i)] for i in torch.randint(0, len(W.WORDS), (12,), generator=g))
                                 for _ in range(60)))
    assert main([*common, "--method", "alphaedit", "--strategy", "blue", "--corpus", str(corpus),
                 "--out", str(tmp_path / "o1")]) == 0
    assert json.loads((tmp_path / "o1" / "edit_report.json").read_text())["config"]["strategy"] == "blue"
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "o2")]) == 2
    assert "--stats" in capsys.readouterr().err
    assert main([*common[:4], str(tmp_path / "missing.json"), *common[5:], "--stats", str(stats_dir),
                 "--out", str(tmp_path / "o3")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(["edit", "--model", str(tmp_path / "model"), "--requests", str(tmp_path / "req.json"),
                 "--stats", str(stats_dir), "--out", str(tmp_path / "o4")]) == 2
    assert "--preset" in capsys.readouterr().err


def test_guess_preset_from_model_names():
    from fastedit.editing.cli import guess_preset

    assert guess_preset("gpt2-xl") == "gpt2-xl"
    assert guess_preset("EleutherAI/gpt-j-6B") == "gpt-j-6b"
    assert guess_preset("meta-llama/Meta-Llama-3-8B-Instruct") == "llama3-8b"
    assert guess_preset("/models/tiny") is None


def test_presets_match_the_reference_hyperparameters():
    for name, layers, lam, steps, lr, blue_l2 in [("gpt2-xl", (13, 14, 15, 16, 17), 20000, 20, 0.5, 80),
                                                   ("gpt-j-6b", (3, 4, 5, 6, 7, 8), 15000, 25, 0.5, 95),
                                                   ("llama3-8b", (4, 5, 6, 7, 8), 15000, 25, 0.1, 1)]:
        p = presets.get(name)
        assert (p.layers, p.lam, p.v_num_grad_steps, p.v_lr) == (layers, lam, steps, lr)
        assert p.boundary_layers == (layers[0], layers[-1])
        assert (p.clamp_norm_factor, p.kl_factor, p.v_weight_decay, p.nullspace_threshold) == (0.75, 0.0625, 0.5, 2e-2)
        assert presets.get(name, method="alphaedit").L2 == 10
        assert presets.get(name, method="alphaedit", strategy="blue").L2 == blue_l2
        assert presets.get(name, method="memit", strategy="blue").L2 == 10
    with pytest.raises(InputError, match="known presets"):
        presets.get("gpt5")


def test_a_failed_rollback_blocks_further_edits_until_restore(monkeypatch):
    ed = _editor("memit_seq", "distribute")
    before = W.weights(ed.model)
    ed.edit(W.REQUESTS[:1], batch_size=1)
    l0, l1 = ed.edit_layers

    def fail(K, sign=1):
        raise RuntimeError("accumulate failed")

    def fail_undo(K, sign=1):
        if sign == -1:
            raise RuntimeError("undo failed")

    # the last layer's accumulate fails, then so does undoing the first layer's
    monkeypatch.setattr(ed._solvers[l1], "accumulate", fail)
    monkeypatch.setattr(ed._solvers[l0], "accumulate", fail_undo)
    with pytest.raises(EditError, match="stage 'state'"):
        ed.edit(W.REQUESTS[1:2], batch_size=1)
    with pytest.raises(EditError, match="restore") as info:
        ed.edit(W.REQUESTS[2:3], batch_size=1)
    assert info.value.stage == "state"
    ed.restore()
    W.assert_unchanged(ed.model, before)
    monkeypatch.undo()
    ed.edit(W.REQUESTS[2:3], batch_size=1)  # usable again, with fresh solvers
