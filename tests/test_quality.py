"""Editing quality on the shipped testbed Llama: 100 facts (records(100, seed=0)) in one batch,
with the ``testbed-llama`` preset, for every method × strategy (and NAS on the demo's default).

Efficacy and generalization are CounterFact's rates (p(new) > p(true) on the rewrite prompt and
on two held-out paraphrases); specificity is measured on neighbours that keep the true object.
"""
import pytest

from fastedit import presets, testbed

pytestmark = pytest.mark.skipif("llama" not in testbed.shipped(), reason="testbed Llama not installed")

EFFICACY_MIN = 90.0
GENERALIZATION_MIN = 60.0
SPECIFICITY_DROP_MAX = 10.0


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    from fastedit.editing.requests import load_records, requests_from_records
    from fastedit.eval import evaluate

    model, tok = testbed.load("llama")
    records = load_records(testbed.records(100, seed=0))
    hp = presets.get("testbed-llama")
    stats = testbed.stats("llama", model=model, tokenizer=tok, layers=hp.layers,
                          cache_dir=tmp_path_factory.mktemp("stats"))
    return {"model": model, "tok": tok, "records": records, "requests": requests_from_records(records),
            "stats": stats, "base": evaluate(model, tok, records, progress=False)}


@pytest.mark.parametrize("method,strategy,nas", [
    ("memit", "distribute", False), ("alphaedit", "distribute", False),
    ("memit", "blue", False), ("alphaedit", "blue", False), ("alphaedit", "blue", True)])
def test_hundred_edits_reach_quality(bed, method, strategy, nas):
    from fastedit.editing.editor import Editor
    from fastedit.eval import evaluate

    model, tok = bed["model"], bed["tok"]
    editor = Editor(model, tok, method=method, strategy=strategy, nas=nas, stats=bed["stats"], progress=False,
                    hparams=presets.get("testbed-llama", method=method, strategy=strategy))
    try:
        report = editor.edit(bed["requests"], batch_size=100)
        after = evaluate(model, tok, bed["records"], progress=False)
    finally:
        editor.restore()
    assert report.n_edited >= 90
    assert after["efficacy"] >= EFFICACY_MIN
    assert after["generalization"] >= GENERALIZATION_MIN
    assert after["specificity"] >= bed["base"]["specificity"] - SPECIFICITY_DROP_MAX
    assert after["efficacy"] > bed["base"]["efficacy"] + 50
