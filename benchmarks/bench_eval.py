"""Batched CounterFact scoring (fastedit.eval.evaluate_counterfact) against the references'
one-case-at-a-time scoring with per-token .item() calls, on the shipped testbed model.

Small by default (CI smoke test); ``FASTEDIT_BENCH_SIZE=full`` or a GPU scores 2000 cases.
"""
from __future__ import annotations

import pytest
import torch

from baselines import counterfact_nll_per_case
from fastedit import testbed
from fastedit.editing.requests import load_records
from fastedit.eval import evaluate_counterfact


@pytest.fixture(scope="module")
def setup(device, bench_size):
    model, tok = testbed.load("llama", device=device)
    n_cases = bench_size.pick(small=8, full=2000, gpu=2000)
    recs = load_records(testbed.records(min(n_cases, len(testbed.records())), seed=0))
    cases = []
    for r in recs:
        rr = r["requested_rewrite"]
        prompts = [rr["prompt"].format(rr["subject"])] + r["paraphrase_prompts"] + r["neighborhood_prompts"]
        cases.append((prompts, rr["target_new"]["str"], rr["target_true"]["str"]))
    return model, tok, recs, cases


def _info(benchmark, recs, role):
    benchmark.group = f"counterfact scoring, {len(recs)} cases"
    benchmark.extra_info.update(role=role, op="counterfact scoring", cases=len(recs))


def test_counterfact_baseline(benchmark, setup, timed):
    model, tok, recs, cases = setup
    _info(benchmark, recs, "baseline")
    res = benchmark(timed(counterfact_nll_per_case), model, tok, cases)
    assert len(res) == len(recs)


def test_counterfact_fastedit(benchmark, setup, timed):
    model, tok, recs, cases = setup
    _info(benchmark, recs, "fastedit")
    rep = benchmark(timed(lambda: evaluate_counterfact(model, tok, recs, batch_size=256, progress=False)))
    # Same numbers as the baseline, so the two timings compare equal work.
    ref = counterfact_nll_per_case(model, tok, cases[:3])
    for case, r in zip(rep["cases"], ref):
        got = case["nll"]["rewrite"] + case["nll"]["paraphrase"] + case["nll"]["neighborhood"]
        assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(r, dtype=torch.float64),
                              rtol=1e-4, atol=1e-5)
