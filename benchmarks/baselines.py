"""Faithful baselines of the reference research code, written as the references run them.

Each block is our own code reproducing what the reference implementation does, step for step,
so that benchmarks compare fastedit against the real procedure (and tests can check that
fastedit computes the same thing).
"""
from __future__ import annotations

import torch

from fastedit.linalg import alphaedit_dense_reference

# --- Covariance statistics and norm anchoring (kernels branch) -----------------------------


def covariance_fp32_running_sum(batches, d_k: int, masks=None):
    """The references' second-moment statistic: per batch, the real tokens' keys in fp32 and
    ``mom2 += kᵀk`` into an fp32 running sum (full matrix, both triangles), plus the count.

    batches: iterable of (tokens, d_k) tensors; masks: matching (tokens,) bool or None.
    Returns (sum (d_k, d_k) float32, count).
    """
    total, count = None, 0
    for i, x in enumerate(batches):
        rows = x.float()
        if masks is not None:
            rows = rows[masks[i]]
        if total is None:
            total = torch.zeros(d_k, d_k, dtype=torch.float32, device=x.device)
        total += rows.mT @ rows
        count += rows.shape[0]
    return total, count


def norm_anchor_per_fact(v: torch.Tensor, mu: float, max_ratio: float = 2.0):
    """NAS as the reference applies it: one value vector at a time, a Python decision per fact.
    Returns (scaled v, keep)."""
    out = v.clone()
    keep = []
    for i in range(v.shape[0]):
        norm = v[i].norm()
        if norm > max_ratio * mu:
            keep.append(False)
            continue
        keep.append(True)
        out[i] = v[i] * (mu / norm)
    return out, torch.tensor(keep)


def clamp_norm_per_fact(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """compute_z's clamp, one edit at a time: δ ← δ · r/‖δ‖ when ‖δ‖ > r."""
    out = delta.clone()
    for i in range(delta.shape[0]):
        norm = delta[i].norm()
        if norm > radius[i]:
            out[i] = delta[i] * (radius[i] / norm)
    return out


# --- v* (compute_z) one edit at a time: fastedit.editing.targets -----------------------------


def vstar_one_at_a_time(model, tokenizer, adapter, requests, layer, *, templates, hparams):
    """The references' compute_z, looped over requests: for each edit, Adam on one δ (d,) with a
    hook adding it in place to block ``layer``'s output at the lookup tokens, the whole model
    run forward every step (logits over all positions and the full vocabulary), then backward.

    Prompts are tokenised with fastedit's tokenisation (prompt and target ids concatenated) so
    that the two compute the same quantity. Returns (z (n, d), steps (n,), loss (n,)).
    """
    from fastedit.editing.context import flatten
    from fastedit.editing.targets import KL_PROMPT, VStarParams
    from fastedit.editing.tokens import encode_prompts, target_ids
    from fastedit.models import edit_output

    hp = VStarParams.coerce(hparams)
    flat = flatten(templates)
    saved = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    zs, all_steps, losses = [], [], []
    try:
        for r in requests:
            tgt = target_ids(tokenizer, r.target_new)
            texts = [t.replace("{}", r.prompt, 1) for t in flat] + [KL_PROMPT]
            batch = encode_prompts(tokenizer, texts, [r.subject] * len(texts),
                                   appended=[tgt[:-1]] * len(flat) + [[]], padding_side="right",
                                   device=adapter.device)
            n_ctx = len(flat)
            labels = torch.full((n_ctx, batch.input_ids.shape[1]), -100, device=adapter.device)
            for i in range(n_ctx):
                start = int(batch.prompt_last[i])
                labels[i, start:start + len(tgt)] = torch.tensor(tgt, device=adapter.device)
            dtype = torch.promote_types(adapter.dtype, torch.float32)
            delta = torch.zeros(adapter.d, dtype=dtype, device=adapter.device, requires_grad=True)
            state = {"init": None}

            def add_delta(h):
                if state["init"] is None:
                    state["init"] = h[0, batch.lookup[0]].detach().clone()
                for i, idx in enumerate(batch.lookup.tolist()):
                    h[i, idx, :] += delta.to(h.dtype)
                return h

            opt = torch.optim.Adam([delta], lr=hp.v_lr)
            kl_init = None
            steps = 0
            for it in range(hp.v_num_grad_steps):
                opt.zero_grad()
                with edit_output(adapter.block(layer), add_delta):
                    logits = model(**batch.inputs()).logits
                kl_logits = logits[n_ctx, batch.lookup[n_ctx]][None]
                kl_log_probs = torch.log_softmax(kl_logits.to(dtype), dim=-1)
                if kl_init is None:
                    kl_init = kl_log_probs.detach().clone()
                log_probs = torch.log_softmax(logits[:n_ctx].to(dtype), dim=2)
                picked = torch.gather(log_probs, 2, torch.where(labels != -100, labels, 0)[..., None])[..., 0]
                nll = (-(picked * (labels != -100)).sum(1) / len(tgt)).mean()
                kl = hp.kl_factor * torch.nn.functional.kl_div(kl_init, kl_log_probs, log_target=True,
                                                               reduction="batchmean")
                decay = hp.v_weight_decay * (delta.norm() / state["init"].to(dtype).norm() ** 2)
                loss = nll + kl + decay
                if loss < hp.loss_stop or it == hp.v_num_grad_steps - 1:
                    break
                loss.backward()
                opt.step()
                steps += 1
                max_norm = hp.clamp_norm_factor * state["init"].to(dtype).norm()
                if delta.norm() > max_norm:
                    with torch.no_grad():
                        delta[...] = delta * max_norm / delta.norm()
            zs.append(state["init"].to(dtype) + delta.detach())
            all_steps.append(steps)
            losses.append(loss.detach())
    finally:
        for p, g in zip(model.parameters(), saved):
            p.requires_grad_(g)
    return torch.stack(zs), torch.tensor(all_steps), torch.stack(losses)

# --- end of v* baseline ----------------------------------------------------------------------


# --- Covariance pass over a corpus (stats branch) ------------------------------------------
# The references' layer_stats: for each layer separately, a float32 forward pass over every
# batch, stopped once that layer's rewrite module has run, its input keys of the non-pad
# tokens added into a float32 running sum (covariance_fp32_running_sum above).


class _StopAfterLayer(Exception):
    pass


def covariance_per_layer_fp32(model, module_names, batches, d_k: int):
    """{name: (Σ kᵀk float32 (d_k, d_k), token count)}, one forward pass per module.

    ``batches``: a list of (input_ids, attention_mask) pairs on the model's device.
    """
    masks = [mask.bool().reshape(-1) for _, mask in batches]
    out = {}
    for name in module_names:
        seen = {}

        def hook(mod, args, output):
            seen["x"] = args[0]
            raise _StopAfterLayer

        def keys():
            for input_ids, attention_mask in batches:
                try:
                    model(input_ids=input_ids, attention_mask=attention_mask)
                except _StopAfterLayer:
                    pass
                yield seen.pop("x").reshape(-1, d_k)

        handle = model.get_submodule(name).register_forward_hook(hook)
        try:
            with torch.no_grad():
                out[name] = covariance_fp32_running_sum(keys(), d_k, masks)
        finally:
            handle.remove()
    return out


# --- Closed-form solvers: MEMIT and AlphaEdit updates (solver branch) -----------------------


def memit_lu_update(C, K, R, lam):
    """MEMIT's update as the references compute it: adj = solve(λC + K Kᵀ, K) by a general LU
    in float64, ΔW = R adjᵀ. C (d_k, d_k), K (d_k, n), R (d, n) -> (d, d_k)."""
    adj = torch.linalg.solve(lam * C + K @ K.mT, K)
    return R @ adj.mT


def alphaedit_dense_update(P, K, R, alpha, cache_c):
    """AlphaEdit's update as the reference computes it: the dense projector P (d_k, d_k), the
    non-symmetric system solve(P (K Kᵀ + C_p) + αI, P K Rᵀ) by LU, in the inputs' dtype (float32
    in the reference). Returns ΔW (d, d_k)."""
    return alphaedit_dense_reference(P, K, R, alpha, cache_c)


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


# --- Sequential MEMIT end to end (editing branch): fastedit.editing.Editor ------------------


def memit_sequential_baseline(model, tokenizer, adapter, requests, layers, covariances, *, templates, hparams,
                              batch_size):
    """MEMIT as the reference runs a sequence of batches: for each batch, v* one edit at a time at
    the last critical layer, then per layer (in order) the keys and the last layer's outputs
    recomputed on the current model, R = (z − cur) / (layers left), and
    ΔW = R (solve(λC0 + KKᵀ, K))ᵀ by a general float64 LU on the full d_k × d_k system, added to
    the weight. C0 is fixed across batches (plain MEMIT). Edits ``model`` in place."""
    from fastedit.editing.keys import block_outputs_at_lookup, compute_keys

    vparams = hparams.vstar_params()
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        z, _, _ = vstar_one_at_a_time(model, tokenizer, adapter, batch, layers[-1], templates=templates,
                                      hparams=vparams)
        z = z.to(torch.float64)
        for i, layer in enumerate(layers):
            K = compute_keys(model, tokenizer, adapter, batch, [layer], templates=templates)[layer].to(torch.float64)
            cur = block_outputs_at_lookup(model, tokenizer, adapter, batch, layers[-1]).to(torch.float64)
            R = (z - cur).T / (len(layers) - i)
            C0 = covariances[layer].to(device=K.device, dtype=torch.float64)
            adj = torch.linalg.solve(hparams.lam * C0 + K @ K.T, K)
            W = adapter.weight(layer)
            W.add_((R @ adj.T).to(W.dtype))
    return model


# --- Sequential AlphaEdit and AlphaEdit_BLUE end to end (issue 11's faithful baseline) ---------


def alphaedit_sequential_baseline(model, tokenizer, adapter, requests, layers, covariances, *, templates, hparams,
                                  batch_size, blue: bool = False):
    """AlphaEdit as the reference runs a sequence of batches. Once: per layer, the SVD of C0 and
    the dense projector P = U_0 U_0ᵀ onto the singular vectors with singular value below
    ``nullspace_threshold``, C_p = 0. Per batch: v* one edit at a time (whole model each step);
    distribute (``blue=False``): z at the last layer, then per layer keys and the last layer's
    outputs on the current model, R = (z − cur) / (layers left); BLUE (``blue=True``): for the
    first then the last of ``layers``, z, keys and cur at that layer on the current model, the
    full residual. ΔWᵀ = solve(P(KKᵀ + C_p) + αI, P K Rᵀ) by a general float32 LU on d_k × d_k
    (as the reference). After the batch the keys are recomputed on the edited model and
    C_p += KKᵀ per layer. Edits ``model`` in place."""
    from fastedit.editing.keys import block_outputs_at_lookup, compute_keys

    vparams = hparams.vstar_params()
    P, cache = {}, {}
    for layer in layers:
        C0 = covariances[layer].to(device=adapter.device, dtype=torch.float32)
        U, S, _ = torch.linalg.svd(C0, full_matrices=False)
        U0 = U[:, S < hparams.nullspace_threshold]
        P[layer] = U0 @ U0.T
        cache[layer] = torch.zeros_like(C0)

    def update(layer, K, R):
        dW = alphaedit_dense_reference(P[layer], K.float(), R.float(), hparams.L2, cache[layer])
        W = adapter.weight(layer)
        W.add_(dW.to(W.dtype))

    edited = (layers[0], layers[-1]) if blue else tuple(layers)
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        if blue:
            for layer in edited:
                z, _, _ = vstar_one_at_a_time(model, tokenizer, adapter, batch, layer, templates=templates,
                                              hparams=vparams)
                K = compute_keys(model, tokenizer, adapter, batch, [layer], templates=templates)[layer]
                cur = block_outputs_at_lookup(model, tokenizer, adapter, batch, layer)
                update(layer, K, (z - cur).T)
        else:
            z, _, _ = vstar_one_at_a_time(model, tokenizer, adapter, batch, layers[-1], templates=templates,
                                          hparams=vparams)
            for i, layer in enumerate(layers):
                K = compute_keys(model, tokenizer, adapter, batch, [layer], templates=templates)[layer]
                cur = block_outputs_at_lookup(model, tokenizer, adapter, batch, layers[-1])
                update(layer, K, (z - cur).T / (len(layers) - i))
        for layer in edited:
            K = compute_keys(model, tokenizer, adapter, batch, [layer], templates=templates)[layer].float()
            cache[layer] += K @ K.T
    return model
