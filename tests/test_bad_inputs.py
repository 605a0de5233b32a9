"""Hostile inputs and faults at every boundary (requests, statistics, caches, files, CLI): each is
refused before anything runs with an error that names the input, or rolled back exactly.

The cases of issue 13 first, then cases found by going further (marked "beyond the list").
Tiny models throughout; the statistics passes read a few dozen short documents.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import _editing_world as W
from fastedit import presets
from fastedit.editing import Editor, Request
from fastedit.editing import editor as editor_mod
from fastedit.editing.hparams import EditParams
from fastedit.editing.requests import load_records, validate_requests
from fastedit.errors import CacheMismatchError, EditError, InputError, NotPositiveDefiniteError
from fastedit.linalg import CovarianceAccumulator, NullSpace, UpdateSolver
from fastedit.stats import cache, collect_stats, load_stats, read_reference_npz

HP = presets.get("tiny").replace(v_num_grad_steps=3, context_n=1, context_length=2)


def _docs(n, seed=0, words=6):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(W.WORDS[int(i)] for i in torch.randint(0, len(W.WORDS), (words,), generator=g))
            for _ in range(n)]


@pytest.fixture(scope="module")
def llama():
    return W.model("llama")


def _collect(model, corpus, cache_dir, **kw):
    kw = {"max_length": 16, "token_budget": 64, "model_name": "tiny", "progress": False, **kw}
    return collect_stats(model, W.tokenizer(), [1], corpus, cache_dir=cache_dir, **kw)


def _psd(n, gen):
    A = torch.randn(n, 2 * n, dtype=torch.float64, generator=gen)
    return A @ A.T / (2 * n)


# ------------------------------------------------------------------ silent wrong results
def test_alphaedit_and_memit_refuse_a_matrix_that_is_no_covariance(gen):
    C = _psd(9, gen)
    with pytest.raises(NotPositiveDefiniteError, match="smallest eigenvalue"):
        NullSpace.from_covariance(-C)
    skew = C + torch.triu(torch.randn(9, 9, dtype=torch.float64, generator=gen), 1)
    for build in (lambda: NullSpace.from_covariance(skew), lambda: UpdateSolver(skew, 1.0)):
        with pytest.raises(InputError, match="not symmetric"):
            build()
    # rounding-level asymmetry and eigenvalues just below zero (a rank-deficient float32 product) pass
    K = torch.randn(9, 4, generator=gen)
    assert NullSpace.from_covariance((K @ K.T).double(), threshold=1e-3).rank >= 5


def test_stats_cache_is_keyed_by_corpus_content_and_model_weights(tmp_path, llama):
    docs = _docs(12)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(docs) + "\n")
    first = _collect(llama, str(corpus), tmp_path / "cache")[1]
    corpus.write_text("\n".join(_docs(12, seed=1)) + "\n")  # same name, same line count, other text
    with pytest.raises(CacheMismatchError, match="content"):
        _collect(llama, str(corpus), tmp_path / "cache")
    # a named Python list whose documents changed
    _collect(llama, docs, tmp_path / "cache")
    with pytest.raises(CacheMismatchError, match="content"):
        _collect(llama, [*docs[:-1], "the sun"], tmp_path / "cache")
    # another model under the same name (other weights, same shapes)
    with pytest.raises(CacheMismatchError, match="another model.*weights"):
        _collect(W.model("llama", seed=3), docs, tmp_path / "cache")
    corpus.write_text("\n".join(docs) + "\n")  # the original text again: the cache is used
    again = _collect(llama, str(corpus), tmp_path / "cache", on_batch=lambda *a: pytest.fail("recomputed"))[1]
    assert torch.equal(again.sum, first.sum)
    # a one-shot iterator cannot be checked against a cache; a re-iterable one can
    with pytest.raises(InputError, match="one-shot"):
        _collect(llama, iter(docs), tmp_path / "cache")


def test_weights_fingerprint_ignores_dtype_and_edits_but_not_other_weights():
    from fastedit.models import get_adapter

    def fp(m):
        return cache.weights_fingerprint(m, get_adapter(m))
    base = fp(W.model("llama"))
    assert fp(W.model("llama").to(torch.bfloat16)) == base  # one checkpoint loaded in another dtype
    edited = W.model("llama")
    edited.model.layers[1].mlp.down_proj.weight.data.add_(1.0)  # what an edit writes
    assert fp(edited) == base
    tuned = W.model("llama")
    tuned.model.layers[1].mlp.up_proj.weight.data.mul_(1.01)  # a fine-tune of a weight below the keys
    assert fp(tuned) != base


def test_a_flipped_bit_in_a_stored_sum_is_detected(tmp_path):
    acc = CovarianceAccumulator(5)
    acc.update(torch.randn(7, 5, dtype=torch.float64))
    path = tmp_path / "layer_1.safetensors"
    acc.save(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # an exponent bit of the last float64 of the sum
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="checksum"):
        CovarianceAccumulator.load(path)


def test_requests_with_the_same_key_and_different_targets_are_refused():
    a = Request("the city of {}", "Alice Smith", "Tokyo")
    with pytest.raises(InputError, match=r"request 2 and request 0 .*different targets"):
        validate_requests([a, W.REQUESTS[1], Request("the city of {}", "Alice Smith", "Paris")])
    validate_requests([a, Request("the city of {}", "Alice Smith", " Tokyo")])  # an exact repeat is one fact


def test_one_layer_blue_and_fractional_layers_are_refused():
    tok, model = W.tokenizer(), W.model("llama")
    with pytest.raises(InputError, match="distribute"):
        Editor(model, tok, strategy="blue", hparams=HP, layers=(2,))
    for bad in ([1.5], [True], "12"):
        with pytest.raises(InputError, match="layer"):
            EditParams(layers=bad)


def _prune_editor():
    hp = presets.get("tiny", method="memit", strategy="distribute").replace(v_num_grad_steps=3, context_n=1,
                                                                               context_length=2)
    return Editor(W.model("llama"), W.tokenizer(), method="memit", regularizer="prune", hparams=hp,
                  stats=W.fresh_covariances("llama", hp.layers), progress=False)


def test_ctrl_c_inside_prune_restores_the_weights_of_the_whole_call(monkeypatch):
    ed = _prune_editor()
    ed.edit(W.REQUESTS[:2], batch_size=2)
    before, raw = W.weights(ed.model), {l: d.clone() for l, d in ed._raw_delta.items()}
    real, calls = editor_mod.prune_restrain, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:  # the first layer is already pruned
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(editor_mod, "prune_restrain", interrupted)
    with pytest.raises(KeyboardInterrupt) as info:  # itself, not an EditError
        ed.edit(W.REQUESTS[2:], batch_size=2)
    assert not isinstance(info.value, Exception)
    assert info.value.report.rolled_back and len(info.value.report.batches) == 1
    W.assert_unchanged(ed.model, before)  # both batches and the half-done PRUNE undone
    assert ed.batches_done == 1 and all(torch.equal(ed._raw_delta[l], raw[l]) for l in raw)
    monkeypatch.setattr(editor_mod, "prune_restrain", lambda *a: (_ for _ in ()).throw(ValueError("bad svd")))
    with pytest.raises(EditError, match="bad svd.*undone too") as info:
        ed.edit(W.REQUESTS[2:], batch_size=2)
    assert info.value.stage == "prune"
    W.assert_unchanged(ed.model, before)


def test_ctrl_c_while_preparing_is_itself(monkeypatch):
    ed = Editor(W.model("llama"), W.tokenizer(), method="memit", hparams=HP,
                stats=W.fresh_covariances("llama", HP.layers), progress=False)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(editor_mod, "context_templates", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ed.edit(W.REQUESTS[:1])


def test_fastedit_edit_exits_130_on_ctrl_c(tmp_path, monkeypatch, capsys):
    from fastedit.cli import main

    model = W.model("llama")
    model.save_pretrained(tmp_path / "m")
    W.tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "r.json").write_text(json.dumps([{"requested_rewrite": {"prompt": "north of {}", "subject": "Bob",
                                                                       "target_new": {"str": "Lima"}}}]))
    (tmp_path / "stats").mkdir()

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(Editor, "edit", interrupted)
    # The statistics are never read (the edit is interrupted first): skip their pre-load check.
    monkeypatch.setattr("fastedit.editing.cli.check_stats_dir", lambda directory, layers: None)
    argv = ["edit", "--model", str(tmp_path / "m"), "--requests", str(tmp_path / "r.json"), "--preset", "tiny",
            "--stats", str(tmp_path / "stats"), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err


# ------------------------------------------------------------------ crashes and unclear messages
def test_a_cache_dir_that_is_a_file_is_refused_before_the_pass(tmp_path, llama):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        _collect(llama, _docs(5), tmp_path / "file" / "sub", on_batch=lambda *a: pytest.fail("the pass ran"))


def test_non_utf8_files_name_the_file(tmp_path, llama):
    bad = tmp_path / "c.txt"
    bad.write_bytes(b"the sun\nthe \xff moon\n")
    with pytest.raises(InputError, match=r"c\.txt: document 1 .*not UTF-8"):
        collect_stats(llama, W.tokenizer(), [1], str(bad), max_length=16, progress=False)
    req = tmp_path / "r.json"
    req.write_bytes(b'[{"requested_rewrite": "\xff"}]')
    with pytest.raises(InputError, match=r"r\.json.*not UTF-8"):
        load_records(req)


@pytest.mark.parametrize("record, msg", [
    ({"prompt": 5, "subject": "A", "target_new": "x"}, "prompt must be a string"),
    ({"prompt": "{} x", "subject": None, "target_new": "x"}, "subject must be a string"),
    ({"prompt": "{} x", "subject": "A", "target_new": {"id": 3}}, "target_new is a dict without the 'str' field"),
    ({"prompt": "{} x", "subject": "A", "target_new": ["x"]}, "target_new must be a string"),
])
def test_non_string_request_fields_name_the_request(record, msg):
    with pytest.raises(InputError, match=rf"request 4: {msg}"):
        Request.from_dict(record, index=4)


def test_damaged_checkpoint_record_and_template_cache(tmp_path, llama, monkeypatch):
    docs = _docs(20)

    def stop(done, consumed):
        if done == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _collect(llama, docs, tmp_path, checkpoint_every=1, token_budget=16, on_batch=stop)
    (progress,) = tmp_path.rglob("progress.json")
    progress.write_text('{"documents": ')
    with pytest.raises(InputError, match="progress.json.*damaged"):
        _collect(llama, docs, tmp_path, checkpoint_every=1, token_budget=16)
    for state in ('{"documents": -1, "layers": [], "request": {}}', '{"documents": true, "layers": [], "request": {}}'):
        progress.write_text(state)
        with pytest.raises(InputError, match="progress.json.*damaged"):
            _collect(llama, docs, tmp_path, checkpoint_every=1, token_budget=16)
    # a damaged context-template cache entry is regenerated (the templates are a function of the model)
    from fastedit.editing import context

    model = W.model("llama")
    model.config._name_or_path = "tiny-llama"
    fresh = context.context_templates(model, W.tokenizer(), n=1, length=2, cache=False)
    context.context_templates(model, W.tokenizer(), n=1, length=2, cache_dir=tmp_path / "t")
    (entry,) = (tmp_path / "t").rglob("*.json")
    entry.write_text("[[")
    monkeypatch.setattr(context, "_MEMORY", {})
    assert context.context_templates(model, W.tokenizer(), n=1, length=2, cache_dir=tmp_path / "t") == fresh


def test_prompt_that_fits_only_without_the_context_prefix_is_refused_before_editing():
    ed = Editor(W.model("llama"), W.tokenizer(), method="memit", hparams=HP.replace(context_length=8),
                stats=W.fresh_covariances("llama", HP.layers), progress=False)
    before = W.weights(ed.model)
    long = Request(" ".join(["the"] * 123) + " {}", "Bob", "Lima")  # 125 tokens of the 128 the model takes
    with pytest.raises(EditError, match="context prefix.*longer than the model's limit of 128") as info:
        ed.edit([W.REQUESTS[0], long])
    assert info.value.stage == "validate"
    W.assert_unchanged(ed.model, before)


def test_nan_activations_name_float16_overflow():
    from fastedit.editing.targets import compute_targets
    from fastedit.errors import FastEditError
    from fastedit.models import get_adapter

    model = W.model("llama")
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(FastEditError, match="float16, overflow is the usual cause"):
        compute_targets(model, W.tokenizer(), get_adapter(model), W.REQUESTS[:1], 1, templates=[["{}"]],
                        hparams=HP)


def test_pickled_or_non_finite_npz_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "mom2.npz"
    np.savez(path, **{"mom2.mom2": np.array([[1.0]], dtype=object), "mom2.count": np.array(3)})
    with pytest.raises(InputError, match=r"mom2\.npz.*pickled"):
        read_reference_npz(path)
    np.savez(path, **{"mom2.mom2": np.array([[np.inf]]), "mom2.count": np.array(3)})  # beyond the list
    with pytest.raises(InputError, match=r"mom2\.npz.*NaN or Inf"):
        read_reference_npz(path)


def test_cache_files_are_shared_readable_and_stale_temporaries_go(tmp_path, llama):
    from fastedit import _io

    _collect(llama, _docs(6), tmp_path)
    (path,) = tmp_path.rglob("layer_1.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = path.parent / f".layer_1.safetensors.{_io._host()}.{int(dead.stdout)}.abcd.tmp"
    live = path.parent / f".layer_2.safetensors.{_io._host()}.{os.getpid()}.abcd.tmp"
    stale.write_text("half")
    live.write_text("being written")
    _collect(llama, _docs(6), tmp_path)
    assert not stale.exists() and live.exists()


def test_time_based_checkpoints_bound_the_lost_work(tmp_path, llama):
    docs, seen = _docs(12), []

    def stop(done, consumed):
        if done == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):  # far fewer batches than checkpoint_every
        _collect(llama, docs, tmp_path, token_budget=16, checkpoint_seconds=1e-9, on_batch=stop)
    resumed = _collect(llama, docs, tmp_path, token_budget=16, on_batch=lambda d, c: seen.append(c))
    assert seen[0] > 4  # resumed after batch 3, not from document 0
    full = _collect(llama, docs, None, token_budget=16)
    assert torch.equal(resumed[1].sum, full[1].sum) and resumed[1].count == full[1].count


# ------------------------------------------------------------------ the null-space cache (issue 10)
def test_null_space_basis_is_cached_beside_the_statistics_and_checked(tmp_path, monkeypatch):
    from test_editor import _write_stats

    model, tok = W.model("llama"), W.tokenizer()
    hp = presets.get("tiny", method="alphaedit")
    for l, C in W.fresh_covariances("llama", hp.layers).items():
        _write_stats(tmp_path, model, l, C)

    def solver(layer):
        return Editor(model, tok, method="alphaedit", hparams=hp, stats=tmp_path, progress=False)._solver(layer)
    first = solver(1).impl
    (basis,) = tmp_path.glob("nullspace_1-*.safetensors")
    monkeypatch.setattr(NullSpace, "from_covariance", lambda *a, **k: pytest.fail("recomputed"))
    again = solver(1).impl
    assert torch.equal(again.Q, first.Q) and torch.equal(again.eigenvalues, first.eigenvalues)
    # a file under the key's name whose metadata disagrees (another threshold) is refused
    from fastedit import _io

    tensors, meta = _io.load_tensors(basis)
    _io.save_tensors(basis, tensors, {**meta, "threshold": "0.5"})
    with pytest.raises(CacheMismatchError, match="threshold"):
        solver(1)
    raw = bytearray(basis.read_bytes())
    raw[-5] ^= 0x01
    basis.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="checksum"):
        solver(1)
    with pytest.raises(InputError, match="columns but"):
        NullSpace.from_basis(first.Q[:, 1:], first.eigenvalues, first.threshold)


# ------------------------------------------------------------------ beyond the list
def test_beyond_the_list_stats_arguments(tmp_path, llama):
    docs = _docs(6)
    for kw, msg in [({"num_samples": 2.5}, "num_samples"), ({"num_samples": True}, "num_samples"),
                    ({"seed": "1"}, "seed"), ({"checkpoint_seconds": 0}, "checkpoint_seconds"),
                    ({"token_budget": True}, "token_budget")]:
        with pytest.raises(InputError, match=msg):
            collect_stats(llama, W.tokenizer(), [1], docs, max_length=16, progress=False, **kw)
    with pytest.raises(InputError, match="layers must be ints"):
        collect_stats(llama, W.tokenizer(), [True], docs, max_length=16, progress=False)
    # token ids outside the vocabulary would index past the embedding
    with pytest.raises(InputError, match="token id 97, outside the model's vocabulary 0..96"):
        collect_stats(llama, None, [1], [[3, 4], [5, 97]], max_length=16, progress=False)
    with pytest.raises(InputError, match="token id -1"):
        collect_stats(llama, None, [1], [[3, -1]], max_length=16, progress=False)
    # a .jsonl record whose text field is not text
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "the sun"}) + "\n" + json.dumps({"text": 7}) + "\n")
    with pytest.raises(InputError, match=r"c\.jsonl: document 1 has a int"):
        collect_stats(llama, W.tokenizer(), [1], str(tmp_path / "c.jsonl"), max_length=16, progress=False)
    with pytest.raises(InputError, match="hold no tokens"):  # nothing would be cached as C0 = 0/0
        _collect(llama, ["", "  "], tmp_path)
    with pytest.raises(InputError, match="got a dict"):
        collect_stats(llama, W.tokenizer(), [1], {0: "the sun"}, max_length=16, progress=False)
    # None in a document list
    with pytest.raises(InputError, match="must be a string or a sequence of token ids"):
        collect_stats(llama, W.tokenizer(), [1], ["the sun", None], max_length=16, progress=False)
    with pytest.raises(InputError, match="unknown metadata"):
        load_stats(tmp_path, "tiny", [1], "python", sead=1)
    with pytest.raises(InputError, match="empty string"):
        _collect(llama, docs, "")


def test_beyond_the_list_records_and_batch_size(tmp_path):
    zsre = {"subject": "Bob", "src": "Where does Bob live?", "answers": "Lima", "rephrase": "Bob lives in?",
            "loc": "q", "loc_ans": "a"}
    with pytest.raises(InputError, match="'answers' must be a list"):  # "Lima"[0] would be the target "L"
        load_records([zsre], format="zsre")
    (tmp_path / "r.json").write_text("5")
    with pytest.raises(InputError, match="JSON list"):
        load_records(tmp_path / "r.json")
    with pytest.raises(InputError, match="limit"):
        load_records([{"requested_rewrite": {"prompt": "{} x", "subject": "s", "target_new": "t"}}], limit=0)
    ed = Editor(W.model("llama"), W.tokenizer(), method="memit", hparams=HP, stats={}, progress=False)
    with pytest.raises(EditError, match="batch_size"):
        ed.edit(W.REQUESTS, batch_size=True)
    with pytest.raises(InputError, match="stats must be a dict"):
        Editor(W.model("llama"), W.tokenizer(), method="memit", hparams=HP, stats=[torch.eye(192)],
               progress=False).covariance(1)
