"""Editing quality on the shipped testbed Llama: 100 facts of distinct subjects in one batch,
with the ``testbed-llama`` preset, for every method × strategy (and NAS on the demo's default).

Efficacy and generalization are CounterFact's rates (p(new) > p(true) on the rewrite prompt and
on two held-out paraphrases); specificity is measured on neighbours that keep the true object.
"""
import random

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
    # One fact per subject, as in CounterFact. records(100, seed=0) has 21 facts sharing a subject
    # with another: their keys are equal (the subject precedes the relation), so they contend, and
    # single-layer distribute stops at 84-89 % efficacy on that sample.
    pool, seen = testbed.records(None), set()
    random.Random(0).shuffle(pool)
    records = load_records([r for r in pool if r["requested_rewrite"]["subject"] not in seen
                            and not seen.add(r["requested_rewrite"]["subject"])][:100])
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
    got = {k: round(after[k], 1) for k in ("efficacy", "generalization", "specificity")}
    print(f"{method}/{strategy}/nas={nas}: {got}, unedited specificity {bed['base']['specificity']:.1f}")
    assert report.n_edited >= 90
    assert after["efficacy"] >= EFFICACY_MIN, got
    assert after["generalization"] >= GENERALIZATION_MIN, got
    assert after["specificity"] >= bed["base"]["specificity"] - SPECIFICITY_DROP_MAX, got
    assert after["efficacy"] > bed["base"]["efficacy"] + 50, got
