"""fastedit.eval: batched scoring against one-prompt-at-a-time, metric definitions on a stub
model whose NLLs we choose, n-gram entropy and TF-IDF consistency on hand-made inputs, the
real CounterFact/zsRE samples end to end on tiny random models, and the CLI's errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fastedit.editing.requests import load_records
from fastedit.errors import InputError
from fastedit.eval import consistency, evaluate, evaluate_counterfact, evaluate_zsre, fluency
from fastedit.eval.scoring import encode_pairs, greedy_generate, next_token_argmax, score_pairs, target_scores


@pytest.fixture(scope="module")
def tok():
    from fastedit.testbed.tokenizer import build_tokenizer
    from fastedit.testbed.world import tokenizer_corpus

    return build_tokenizer(tokenizer_corpus(0, n=300))


def _tiny(arch, tok, seed=0):
    from fastedit.testbed.train import make_model

    size = ({"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 2}
            if arch == "llama" else {"n_embd": 24, "n_inner": 40, "n_layer": 2, "n_head": 2})
    return make_model(arch, tok, seed, **size).double().eval()


PROMPTS = ["Zorbel Tain lives in", "x", "The weather was quiet that day. Ke Failvail speaks",
           "A b c d e f g h i j k l m n o p q r s t u"]
TARGETS = ["Paris", "two long target words here", "French", "z"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_scores_equal_one_at_a_time(arch, side, tok):
    model = _tiny(arch, tok)
    nll, acc = score_pairs(model, encode_pairs(tok, PROMPTS, TARGETS, padding_side=side))
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
        # Unbatched reference written out by hand: the whole sequence, no padding, no mask.
        p_ids = tok(p)["input_ids"]
        t_ids = tok(" " + t, add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([p_ids + t_ids])).logits[0]
        logp = torch.log_softmax(logits[len(p_ids) - 1: -1], -1)
        ref_nll = -logp[torch.arange(len(t_ids)), torch.tensor(t_ids)].mean()
        ref_acc = (logits[len(p_ids) - 1: -1].argmax(-1) == torch.tensor(t_ids)).double().mean()
        assert abs(nll[i].item() - ref_nll.item()) <= 1e-10 * max(1.0, ref_nll.item())
        assert acc[i].item() == ref_acc.item()


def test_encode_pairs_positions(tok):
    for side in ("left", "right"):
        enc = encode_pairs(tok, PROMPTS, TARGETS, padding_side=side)
        B, T = enc.input_ids.shape
        assert enc.attention_mask.shape == enc.position_ids.shape == (B, T)
        rows = torch.arange(B)[:, None].expand_as(enc.target_pos)
        # The token after each target position is the target token itself.
        got = enc.input_ids[rows, enc.target_pos + 1]
        assert torch.equal(got[enc.target_mask], enc.target_ids[enc.target_mask])
        # Real tokens are numbered 0.. in every row, whatever the padding side.
        for b in range(B):
            m = enc.attention_mask[b].bool()
            assert torch.equal(enc.position_ids[b][m], torch.arange(int(m.sum())))
        if side == "left":
            assert enc.attention_mask[:, -1].all()
        else:
            assert enc.attention_mask[:, 0].all()


def test_target_scores_chunks_and_errors(tok):
    model = _tiny("gpt2", tok)
    a = target_scores(model, tok, PROMPTS, TARGETS, batch_size=3)
    b = target_scores(model, tok, PROMPTS, TARGETS, batch_size=64)
    assert torch.allclose(a[0], b[0], rtol=1e-12, atol=0)
    c = target_scores(model, tok, PROMPTS, TARGETS, batch_size=64, max_chunk_tokens=12)  # a token budget
    assert torch.allclose(c[0], b[0], rtol=1e-12, atol=0) and torch.equal(c[1], b[1])
    with pytest.raises(InputError, match="targets"):
        encode_pairs(tok, PROMPTS, TARGETS[:2])
    with pytest.raises(InputError, match="target 1"):
        encode_pairs(tok, PROMPTS[:2], ["Paris", ""])
    with pytest.raises(InputError, match="padding_side"):
        encode_pairs(tok, PROMPTS, TARGETS, padding_side="middle")
    with pytest.raises(InputError, match="batch_size"):
        target_scores(model, tok, PROMPTS, TARGETS, batch_size=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_target_scores_share_rows_and_equal_pairs(side, tok):
    """Pairs whose inputs (prompt + target minus its last token) coincide share one row, and
    every score equals the pair scored on its own (whole sequence, :func:`score_pairs`)."""
    model = _tiny("llama", tok, seed=5)
    prompts = [p for p in PROMPTS for _ in range(3)] + ["Zorbel Tain lives"]
    targets = [t for _ in PROMPTS for t in ("Paris", "Rome", "two long words")] + ["in"]
    rows = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        nll, acc = target_scores(model, tok, prompts, targets, batch_size=5, padding_side=side)
    finally:
        handle.remove()
    # Single-token targets after one prompt need one row; "two long words" needs its own row.
    assert sum(rows) == len(PROMPTS) * 2 + 1
    ref_nll, ref_acc = score_pairs(model, encode_pairs(tok, prompts, targets, padding_side=side))
    assert torch.allclose(nll, ref_nll, rtol=1e-12, atol=0) and torch.equal(acc, ref_acc)
    assert target_scores(model, tok, [], [])[0].numel() == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_and_argmax_batched_equal_single(arch, tok):
    model = _tiny(arch, tok, seed=3)
    batched = greedy_generate(model, tok, PROMPTS, max_new_tokens=6)
    single = [greedy_generate(model, tok, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == single
    assert all(b.startswith(p) for b, p in zip(batched, PROMPTS))
    arg = next_token_argmax(model, tok, PROMPTS, batch_size=2)
    for p, a in zip(PROMPTS, arg):
        assert model(torch.tensor([tok(p)["input_ids"]])).logits[0, -1].argmax().item() == a.item()


class BigramStub(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next-token distribution depends on the
    current token only, so a test sets each prompt's NLLs through its last token's row."""

    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab, dtype=torch.float64), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        class Out:
            pass

        out = Out()
        out.logits = self.table[input_ids]
        return out


def _last(tok, text):
    return tok(text)["input_ids"][-1]


def _one(tok, word):
    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, word
    return ids[0]


def test_counterfact_metrics_on_stub(tok):
    new, true = "Paris", "London"
    prompts = {"rewrite": "Zorbel Tain lives in", "p1": "Rain fell. Zorbel Tain has a home at",
               "p2": "Snow. Zorbel Tain moved to", "n1": "The home of Ke Failvail is a city of",
               "n2": "Bas Vaisbur lives near the", "n3": "The city of Bas is"}
    last = {k: _last(tok, p) for k, p in prompts.items()}
    assert len(set(last.values())) == len(last), "the stub needs distinct last tokens"
    stub = BigramStub(len(tok))
    prefer = {"rewrite": (2.0, 0.5), "p1": (1.0, 0.0), "p2": (0.0, 3.0), "n1": (0.0, 1.0),
              "n2": (0.0, 2.0), "n3": (4.0, 0.0)}  # (logit of new, logit of true)
    for k, (ln, lt) in prefer.items():
        stub.table.data[last[k], _one(tok, new)] = ln
        stub.table.data[last[k], _one(tok, true)] = lt
    rec = {"case_id": 7, "requested_rewrite": {"prompt": "{} lives in", "subject": "Zorbel Tain",
                                               "target_new": {"str": new, "id": "Q1"},
                                               "target_true": {"str": true, "id": "Q2"}},
           "paraphrase_prompts": [prompts["p1"], prompts["p2"]],
           "neighborhood_prompts": [prompts["n1"], prompts["n2"], prompts["n3"]]}
    rep = evaluate(stub, tok, [rec], progress=False)
    assert rep["format"] == "counterfact"
    assert rep["efficacy"] == 100.0
    assert rep["generalization"] == 50.0
    assert rep["specificity"] == pytest.approx(200 / 3)
    assert rep["score"] == pytest.approx(3 / (1 / 100 + 1 / 50 + 3 / 200))
    case = rep["cases"][0]
    assert case["case_id"] == 7
    # The reference's *_prompts_correct: the expected target (new; true for neighbours) is the argmax.
    assert case["rewrite_prompts_correct"] == [True] and case["paraphrase_prompts_correct"] == [True, False]
    assert case["neighborhood_prompts_correct"] == [True, True, False]
    assert (rep["rewrite_acc"], rep["paraphrase_acc"]) == (100.0, 50.0)
    assert rep["neighborhood_acc"] == pytest.approx(200 / 3)
    # The NLLs are the stub's log-softmax values, new then true.
    for kind, key in (("rewrite", "rewrite"), ("paraphrase", "p2")):
        row = torch.log_softmax(stub.table[last[key]], -1)
        pair = case["nll"][kind][0 if kind == "rewrite" else 1]
        assert pair[0] == pytest.approx(-row[_one(tok, new)].item(), rel=1e-12)
        assert pair[1] == pytest.approx(-row[_one(tok, true)].item(), rel=1e-12)
    p = lambda k, w: math.exp(torch.log_softmax(stub.table[last[k]], -1)[_one(tok, w)].item())  # noqa: E731
    assert case["efficacy_magnitude"] == pytest.approx(100 * (p("rewrite", new) - p("rewrite", true)))
    # Two cases: averaged per case, then over cases; a case without paraphrases is left out.
    rec2 = json.loads(json.dumps(rec))
    rec2["case_id"], rec2["paraphrase_prompts"], rec2["neighborhood_prompts"] = 8, [], [prompts["n3"]]
    rep2 = evaluate_counterfact(stub, tok, load_records([rec, rec2]), progress=False, batch_size=2)
    assert rep2["generalization"] == 50.0
    assert rep2["specificity"] == pytest.approx((200 / 3 + 0) / 2)
    assert rep2["cases"][1]["generalization"] is None


def test_zsre_metrics_on_stub(tok):
    stub = BigramStub(len(tok))
    src, reph, loc = "Zorbel Tain speaks", "The language of Zorbel Tain is", "nq question: who won the"
    a = tok(" French Dutch", add_special_tokens=False)["input_ids"]
    b = tok(" Rome", add_special_tokens=False)["input_ids"]
    assert len(a) == 2 and len(b) == 1
    assert len({_last(tok, src), _last(tok, reph), _last(tok, loc), a[0]}) == 4
    stub.table.data[_last(tok, src), a[0]] = 5.0   # first answer token right,
    stub.table.data[a[0], b[0]] = 5.0              # second wrong: 50 %
    stub.table.data[_last(tok, reph), a[0]] = 5.0
    stub.table.data[a[0], a[1]] = 0.0
    # loc answered right after the "?" the references append to MEND's loc questions: 100 %
    assert _last(tok, loc + "?") not in (_last(tok, loc), _last(tok, src), _last(tok, reph), a[0])
    stub.table.data[_last(tok, loc + "?"), b[0]] = 5.0
    raw = {"subject": "Zorbel Tain", "src": src, "rephrase": reph, "answers": ["French Dutch"],
           "alt": "", "loc": loc, "loc_ans": "Rome", "pred": "x", "cond": ""}
    rep = evaluate(stub, tok, [raw], progress=False)
    assert rep["format"] == "zsre"
    assert rep["efficacy"] == 50.0 and rep["generalization"] == 50.0 and rep["specificity"] == 100.0
    with pytest.raises(InputError, match="CounterFact"):
        evaluate(stub, tok, [raw], fluency=True)


def test_ngram_entropy_known_strings():
    assert fluency.ngram_entropy("a b a b".split(), 2) == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    assert fluency.ngram_entropy("a b a b".split(), 3) == pytest.approx(1.0)
    assert fluency.ngram_entropy("a a a a a".split(), 2) == 0.0
    assert fluency.ngram_entropy(["a"], 2) == 0.0
    # 8 distinct bigrams and 7 distinct trigrams: log2 8 and log2 7.
    text = "one two three four five six seven eight nine"
    assert fluency.text_entropy(text) == pytest.approx((2 / 3 * 3 + 4 / 3 * math.log2(7)) / 2)
    assert fluency.words("Paris, France.") == ["Paris", ",", "France", "."]
    assert fluency.mean_text_entropy(["a a a a", text]) == pytest.approx(fluency.text_entropy(text) / 2)


def _snippet_files(tmp_path):
    (tmp_path / "attribute_snippets.json").write_text(json.dumps([
        {"relation_id": "P1", "target_id": "Q1", "samples": [{"text": "Paris city"}, {"text": "the river"}]},
        {"relation_id": "P1", "target_id": "Q2", "samples": [{"text": "river"}]},
    ]))
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0, 3.0]))
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps({"paris": 0, "city": 1, "river": 2}))


def test_consistency_tfidf_on_tiny_files(tmp_path):
    _snippet_files(tmp_path)
    sn = consistency.load_snippets(tmp_path)
    assert sn.texts["P1"]["Q1"] == ["Paris city", "the river"]
    # generations: paris x2, city x1 -> (2, 2, 0); snippets: paris, city, river -> (1, 2, 3)
    got = sn.consistency(["The city of Paris.", "Paris!"], "P1", "Q1")
    assert got == pytest.approx((2 * 1 + 2 * 2) / (math.sqrt(8) * math.sqrt(14)))
    assert sn.consistency(["nothing known"], "P1", "Q1") == 0.0
    assert sn.consistency(["Paris"], "P9", "Q1") is None


def test_consistency_bad_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        consistency.load_snippets(tmp_path)
    _snippet_files(tmp_path)
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps({"paris": 5}))
    with pytest.raises(InputError, match="do not belong together"):
        consistency.load_snippets(tmp_path)
    (tmp_path / "attribute_snippets.json").write_text(json.dumps([{"relation": "P1"}]))
    with pytest.raises(InputError, match="attribute snippets"):
        consistency.load_snippets(tmp_path)


def test_real_samples_end_to_end(shared_data, tok, tmp_path):
    _snippet_files(tmp_path)
    model = _tiny("llama", tok).float()
    cf = load_records(shared_data / "counterfact_500.json", limit=4)
    rr = cf[0]["requested_rewrite"]
    snips = json.loads((tmp_path / "attribute_snippets.json").read_text())
    snips.append({"relation_id": rr["relation_id"], "target_id": rr["target_new"]["id"],
                  "samples": [{"text": "paris city river"}]})
    (tmp_path / "attribute_snippets.json").write_text(json.dumps(snips))
    rep = evaluate_counterfact(model, tok, cf, batch_size=16, fluency=True, snippets=tmp_path,
                               max_new_tokens=4, progress=False)
    n_prompts = [len(c["nll"]["paraphrase"]) for c in rep["cases"]]
    assert n_prompts == [len(r["paraphrase_prompts"]) for r in cf]
    assert all(len(c["generations"]) == len(r["generation_prompts"]) for c, r in zip(rep["cases"], cf))
    for key in ("efficacy", "generalization", "specificity", "score", "fluency"):
        assert 0 <= rep[key] <= 100 or key == "fluency"
        assert not math.isnan(rep[key])
    # Only the first case has snippets for its new object.
    assert 0 <= rep["cases"][0]["consistency"] <= 100
    assert [c["consistency"] for c in rep["cases"][1:]] == [None] * 3
    assert rep["consistency"] == rep["cases"][0]["consistency"]
    zs = load_records(shared_data / "zsre_mend_eval_1037.json", limit=6)
    rz = evaluate_zsre(model, tok, zs, batch_size=5, progress=False)
    assert len(rz["cases"]) == 6 and all(0 <= c["efficacy"] <= 100 for c in rz["cases"])
    # Left padding gives the same scores on real, unevenly long records.
    rl = evaluate_zsre(model, tok, zs, batch_size=5, padding_side="left", progress=False)
    assert [c["specificity"] for c in rl["cases"]] == [c["specificity"] for c in rz["cases"]]


def test_eval_cli_errors(tmp_path, capsys):
    from fastedit.cli import main

    assert main(["eval", "--model", "testbed", "--records", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and err.count("\n") == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["eval", "--model", "testbed", "--records", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"subject": "a", "src": "a b", "answers": ["c"], "rephrase": "a d",
                                 "loc": "e", "loc_ans": "f"}]))
    assert main(["eval", "--model", str(tmp_path / "no_model"), "--records", str(good)]) == 2
    assert "cannot load model" in capsys.readouterr().err


def _published_zsre_evaluator(model, tok, raw: dict) -> dict:
    """MEMIT's dsets/zsre.py record + AlphaEdit's compute_rewrite_quality_zsre, transcribed one
    prompt at a time (each prompt its own forward, no padding)."""
    llama = "llama" in model.config._name_or_path.lower()
    ans_toks = tok(" " + raw["loc_ans"])["input_ids"]
    neigh = [(raw["loc"] + "?" + tok.decode(ans_toks[:i]), tok.decode(ans_toks[i])) for i in range(len(ans_toks))]
    target_tok = tok(" " + raw["answers"][0])["input_ids"]
    if llama:
        target_tok = target_tok[1:]

    def acc(prompt, target):
        ans = model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].argmax().item()
        ids = tok(target)["input_ids"]
        return ans == (ids[1] if llama else ids[0])

    out = {}
    for kind, p in (("rewrite", raw["src"]), ("paraphrase", raw["rephrase"])):
        out[kind] = [acc(p + tok.decode(target_tok[:i]) if not llama or i == 0 else p + " " + tok.decode(target_tok[:i]),
                         tok.decode(target_tok[i])) for i in range(len(target_tok))]
    out["neighborhood"] = [acc(p, t) for p, t in neigh]
    return out


@pytest.mark.parametrize("arch,name", [("llama", "tiny-Llama-3"), ("gpt2", "tiny-gpt2")])
def test_zsre_reference_mode_reproduces_the_published_evaluator(shared_data, tok, arch, name):
    model = _tiny(arch, tok)
    model.config._name_or_path = name
    raws = json.loads((shared_data / "zsre_mend_eval_1037.json").read_text())[:3]
    rep = evaluate_zsre(model, tok, load_records(raws), batch_size=7, progress=False, mode="reference")
    assert rep["mode"] == "reference"
    for raw, case in zip(raws, rep["cases"]):
        want = _published_zsre_evaluator(model, tok, raw)
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            assert case[f"{kind}_prompts_correct"] == want[kind], kind
        # the BOS quirk: the testbed tokenizer adds BOS, which the reference scores as a loc answer token
        assert len(case["neighborhood_prompts_correct"]) == len(tok(" " + raw["loc_ans"])["input_ids"])
        assert len(tok(" " + raw["loc_ans"], add_special_tokens=False)["input_ids"]) == \
            len(case["neighborhood_prompts_correct"]) - 1
    assert rep["specificity"] == pytest.approx(
        sum(sum(c["neighborhood_prompts_correct"]) / len(c["neighborhood_prompts_correct"]) for c in rep["cases"]) / 3 * 100)
    with pytest.raises(InputError, match="mode"):
        evaluate_zsre(model, tok, load_records(raws), mode="paper")


def test_zsre_reference_mode_scores_bos_as_a_loc_answer_token(tok):
    """A bigram stub that answers every zsRE prompt right: fastedit's specificity is 100, the
    published evaluator's (a 'llama' model name, a tokenizer adding BOS) misses the BOS item."""
    from types import SimpleNamespace

    raw = {"subject": "Zorbel Tain", "src": "Zorbel Tain speaks", "rephrase": "The language of Zorbel Tain is",
           "answers": ["French Dutch"], "alt": "", "loc": "nq question: who won the", "loc_ans": "Rome Paris",
           "pred": "x", "cond": ""}
    ans = tok(" " + raw["answers"][0], add_special_tokens=False)["input_ids"]
    loc = tok(" " + raw["loc_ans"], add_special_tokens=False)["input_ids"]
    rows = [(_last(tok, raw["src"]), ans[0]), (_last(tok, raw["rephrase"]), ans[0]),
            (_last(tok, raw["loc"] + "?"), loc[0])] + list(zip(ans, ans[1:])) + list(zip(loc, loc[1:]))
    # the reference's second loc prefix is "<loc>?" + decode([BOS]): it ends on BOS
    rows.append((tok.bos_token_id, loc[0]))
    assert len({r for r, _ in rows}) == len(rows), "the stub needs one row per predicted token"
    stub = BigramStub(len(tok))
    stub.config = SimpleNamespace(_name_or_path="stub-llama")
    for r, c in rows:
        stub.table.data[r, c] = 5.0
    recs = load_records([raw])
    ours = evaluate_zsre(stub, tok, recs, progress=False)
    assert (ours["efficacy"], ours["generalization"], ours["specificity"]) == (100.0, 100.0, 100.0)
    ref = evaluate_zsre(stub, tok, recs, progress=False, mode="reference")
    case = ref["cases"][0]
    assert all(case["rewrite_prompts_correct"]) and all(case["paraphrase_prompts_correct"])
    assert case["neighborhood_prompts_correct"] == [False] + [True] * len(loc)
    assert ref["specificity"] == pytest.approx(100 * len(loc) / (len(loc) + 1))
