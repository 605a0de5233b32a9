"""Faithful baselines: the reference research code's algorithms, re-written here (our own code)
so that benchmarks can run them side by side with fastedit in one process.

Each helper appends its functions as one contiguous block, headed by the op it stands for.
"""
from __future__ import annotations

import torch


# --- CounterFact scoring (fastedit.eval.counterfact) -----------------------------------------
# The references score one case at a time: one right-padded forward over the case's prompts,
# each twice (followed by " " + new and by " " + true target), then a Python loop over the
# prompts and target tokens that sums log-probabilities with one .item() per token.

@torch.no_grad()
def counterfact_nll_per_case(model, tok, cases):
    """For each (prompts, new, true): [(nll_new, nll_true) per prompt], mean per-token NLL."""
    dev = next(model.parameters()).device
    out = []
    for prompts, new, true in cases:
        texts = [p for p in prompts for _ in (0, 1)]
        targets = [t for _ in prompts for t in (new, true)]
        p_ids = [tok(p)["input_ids"] for p in texts]
        t_ids = [tok(" " + t, add_special_tokens=False)["input_ids"] for t in targets]
        seqs = [p + t for p, t in zip(p_ids, t_ids)]
        width = max(len(s) for s in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=dev)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=dev)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, dim=-1)
        scores = []
        for i in range(len(seqs)):
            total = 0.0
            for j, t in enumerate(t_ids[i]):
                total += -logp[i, len(p_ids[i]) + j - 1, t].item()
            scores.append(total / len(t_ids[i]))
        out.append([(scores[2 * k], scores[2 * k + 1]) for k in range(len(prompts))])
    return out
