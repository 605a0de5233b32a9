"""The synthetic world, the shipped testbed models (they load offline and know the world),
their records, the training loop (a micro smoke run) and `fastedit testbed`."""
from __future__ import annotations

import json

import pytest
import torch

from fastedit import testbed
from fastedit.editing.requests import load_records, requests_from_records, validate_requests
from fastedit.errors import InputError
from fastedit.testbed.world import RELATIONS, make_world



def test_llama_testbed_ships():
    assert "llama" in testbed.shipped()


@pytest.fixture(scope="module", params=testbed.shipped())
def shipped(request):
    model, tok = testbed.load(request.param)
    return request.param, model, tok


def test_world_is_deterministic_per_seed():
    a, b, c = make_world(3, n_subjects=60), make_world(3, n_subjects=60), make_world(4, n_subjects=60)
    assert a.subjects == b.subjects and a.facts == b.facts
    assert a.subjects != c.subjects
    assert len(set(a.subjects)) == 60
    ta, tb = a.training_texts(5), b.training_texts(5)
    assert [next(ta) for _ in range(30)] == [next(tb) for _ in range(30)]
    assert list(a.generic_texts(5, seed=2)) == list(b.generic_texts(5, seed=2))


def test_heldout_templates_never_in_training_text():
    w = make_world(0, n_subjects=30)
    texts = w.training_texts(0)
    corpus = " ".join(next(texts) for _ in range(400))
    for rel in RELATIONS.values():
        assert not set(rel["train"]) & set(rel["heldout"])
        assert rel["rewrite"] in rel["train"]
        assert not [t for t in rel["train"] + rel["heldout"] if t != rel["rewrite"] and t.startswith(rel["rewrite"])]
        for t in rel["heldout"]:
            assert t.replace("{}", "").strip() not in corpus.replace(".", " "), t


def test_shipped_tokenizer_splits_names_and_keeps_objects_whole(shipped):
    arch, _, tok = shipped
    w = testbed.world(arch=arch)
    for rel in RELATIONS.values():
        for o in rel["objects"]:
            assert len(tok(" " + o, add_special_tokens=False)["input_ids"]) == 1, o
    lengths = [len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in w.subjects]
    assert min(lengths) >= 2
    assert tok("x")["input_ids"][0] == tok.bos_token_id


def test_shipped_model_knows_the_world(shipped):
    from fastedit.testbed.train import fact_accuracy

    arch, model, tok = shipped
    assert not model.training and model.dtype == torch.float32
    # training.json holds the top-1 accuracy measured over all subjects after training
    # (0.97 for the Llama); a sample of subjects must reach 0.8x of it.
    measured = testbed.training_info(arch)["train_template_top1"]
    assert measured > 0.9
    acc = fact_accuracy(model, tok, testbed.world(arch=arch), heldout=False, n_subjects=20)
    assert acc >= 0.8 * measured, (arch, acc, measured)
    layers = testbed.edit_layers(arch)
    assert layers and all(0 < l < model.config.num_hidden_layers for l in layers)
    for l in layers:
        assert model.get_submodule(testbed.EDIT_MODULES[arch].format(l)) is not None


def test_records_are_known_facts_and_validate(shipped):
    from fastedit.eval import evaluate

    arch, model, tok = shipped
    recs = testbed.records(12, seed=1, arch=arch)
    norm = load_records(recs)
    validate_requests(requests_from_records(norm), tok)
    rep = evaluate(model, tok, norm, progress=False)
    # Before any edit, the model prefers the true object on every rewrite prompt.
    assert rep["efficacy"] == 0.0
    assert rep["specificity"] > 80.0
    for r in recs:
        rr = r["requested_rewrite"]
        assert rr["target_new"]["str"] != rr["target_true"]["str"]
        assert all(rr["subject"] in p for p in r["paraphrase_prompts"])
        assert all(rr["subject"] not in p for p in r["neighborhood_prompts"])
    z = load_records(testbed.records(10, format="zsre", seed=1, arch=arch))
    assert [r["format"] for r in z] == ["zsre"] * 10
    validate_requests(requests_from_records(z), tok)


def test_case_ids_are_stable():
    every = {r["case_id"]: r for r in testbed.records()}
    some = testbed.records(12, seed=5)
    assert len({r["case_id"] for r in some}) == 12
    for r in some:
        assert r == every[r["case_id"]]
    assert testbed.records(12, seed=5) == some
    assert testbed.records(12, seed=6) != some
    with pytest.raises(InputError, match="n must be between"):
        testbed.records(len(every) + 1)


def test_generic_corpus():
    texts = list(testbed.generic_corpus(20, seed=3))
    assert len(texts) == 20 and all(isinstance(t, str) and t for t in texts)
    assert texts == list(testbed.generic_corpus(20, seed=3))


def test_training_smoke_is_deterministic_and_learns():
    from fastedit.testbed.train import train

    kw = dict(seed=2, steps=12, batch_size=4, lr=1e-2, n_subjects=20, vocab_size=400, n_eval_subjects=2,
              size={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                    "num_attention_heads": 2}, log=None)
    m1, _, met = train("llama", **kw)
    m2, _, _ = train("llama", **kw)
    assert met["last_loss"] < met["first_loss"] - 0.5
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n


def test_testbed_cli_world(tmp_path):
    from fastedit.cli import main

    out = tmp_path / "z.json"
    assert main(["testbed", "world", "--out", str(out), "-n", "7", "--format", "zsre"]) == 0
    recs = load_records(out)
    assert len(recs) == 7 and recs[0]["format"] == "zsre"
    assert json.loads(out.read_text()) == testbed.records(7, format="zsre")


def test_stats_cached_reads_the_format(tmp_path):
    from fastedit.linalg import CovarianceAccumulator
    from fastedit.stats.cache import layer_path

    kw = dict(layers=[1], cache_dir=tmp_path, n_docs=8)
    assert not testbed.stats_cached("llama", **kw)
    acc = testbed.stats("llama", **kw)[1]
    assert testbed.stats_cached("llama", **kw)
    path = next(tmp_path.rglob(layer_path(tmp_path, 1).name))
    meta = dict(CovarianceAccumulator.load(path).metadata)
    acc.save(path, {**meta, "format": "fastedit-covariance-1"})  # as an older release wrote it
    assert not testbed.stats_cached("llama", **kw)
