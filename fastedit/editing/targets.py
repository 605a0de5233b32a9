"""Target values v* (the references' ``compute_z``), for many edits at once.

For edit i with lookup (last subject) token, find an offset δ_i added to the output of block
``layer`` at that token such that the model predicts the new target (ALGORITHMS.md section 5):

    loss_i(δ_i) = mean_p NLL_p(target | δ_i)                       (p: the context prompts)
                + kl_factor · KL(p_current ‖ p_initial)             (KL prompt "{subject} is a")
                + v_weight_decay · ‖δ_i‖ / ‖h_init,i‖²              (unsquared ‖δ‖, as the references)

- The context prompts are each flattened context template applied to the edit's prompt,
  followed by the target tokens except the last (teacher forcing); NLL_p is the mean over the
  target tokens of −log p(token). The KL term compares the next-token distribution read at the
  lookup token (the subject's last token) of the KL prompt, as the references read it, with the
  same distribution before optimisation (δ = 0); the direction is KL(current ‖ initial) =
  Σ p_cur (log p_cur − log p_init). δ is added at the lookup token of every prompt, the KL
  prompt included.
- Logits are read at block ``loss_layer``'s output (default: the last block) through the final
  norm and the LM head, in float32 or wider.
- Adam (torch's update rule, betas 0.9/0.999, eps 1e-8) with lr = v_lr on δ (float32, float64
  for a float64 model). Each iteration computes the loss; an edit stops if its loss is below
  ``loss_stop`` or this is the last iteration; otherwise it takes one step, then δ is clamped to
  ‖δ‖ ≤ clamp_norm_factor · ‖h_init‖. So at most v_num_grad_steps − 1 steps are taken.
- h_init is block ``layer``'s output at the lookup token of the first prompt (the bare "{}"
  template); z = h_init + δ. v0 is the rewrite module's output there (NAS: v* = v0 + δ).
- Where a norm sits between the rewrite module and the residual stream (Gemma 2/3, OLMo 2/3),
  δ is added to the rewrite module's output, where the update lands, so the block output moves
  by post(m + δ) − post(m) (:meth:`ModelAdapter.block_offset`) and z = h_init + that offset;
  the solve then targets v* = v0 + δ in the rewrite module's output space. For the pre-norm
  families the offset is δ itself and both readings coincide.

Batched: all edits' prompts go through one forward and one backward per iteration, with the
loss summed over the edits still running. The prompts of different edits share no computation
path, so edit i's gradient is that of its own loss, and an elementwise Adam per edit row
reproduces each single-edit trajectory; an edit that has stopped keeps its δ exactly (its row
gets no update and no Adam state change). The layers below ``layer`` do not depend on δ: by
default they run once (no gradient), block ``layer``'s output is cached, and each iteration only
replays the blocks above it with the recorded masks and position embeddings
(:mod:`fastedit.models.replay`). When at most half of the replayed edits are still running,
the cache is rebuilt for the running ones only. No model parameter receives a gradient.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from fastedit.editing.context import check_templates, flatten
from fastedit.editing.keys import require_eval
from fastedit.editing.requests import Request, validate_requests
from fastedit.editing.tokens import TokenBatch, encode_prompts, target_ids
from fastedit.errors import EditError, FastEditError, InputError
from fastedit.models import ModelAdapter, capture, edit_output, forward_until
from fastedit.models.replay import logits_from_hidden, record_blocks

KL_PROMPT = "{} is a"
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class VStarParams:
    """Hyperparameters of the v* optimisation (reference defaults, GPT2-XL's step count)."""

    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    loss_stop: float = 5e-2

    def __post_init__(self):
        if not isinstance(self.v_num_grad_steps, int) or self.v_num_grad_steps < 1:
            raise InputError(f"v_num_grad_steps must be an integer >= 1, got {self.v_num_grad_steps!r}")
        for name in ("v_lr", "clamp_norm_factor"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("kl_factor", "v_weight_decay", "loss_stop"):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @classmethod
    def coerce(cls, hparams) -> "VStarParams":
        """From None (defaults), a VStarParams, a dict or any object with these attribute names
        (other keys and attributes are ignored, so a whole method preset can be passed)."""
        if hparams is None:
            return cls()
        if isinstance(hparams, cls):
            return hparams
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(hparams, dict):
            return cls(**{k: hparams[k] for k in names if k in hparams})
        return cls(**{k: getattr(hparams, k) for k in names if hasattr(hparams, k)})


@dataclass
class Targets:
    """Result of :func:`compute_targets` for n edits at one layer (rows follow the requests).

    z, h_init, delta, v0: (n, d), z = h_init + delta (h_init + post(v0 + δ) − post(v0) with a
    post-MLP norm). steps: (n,) Adam steps taken.
    loss, nll: (n,) total loss and target NLL at the last evaluation (the one that stopped).
    """

    layer: int
    z: torch.Tensor
    h_init: torch.Tensor
    delta: torch.Tensor
    v0: torch.Tensor
    steps: torch.Tensor
    loss: torch.Tensor
    nll: torch.Tensor


def _work_dtype(model_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(model_dtype, torch.float32)


class _Chunk:
    """The prompts of a set of edits, tokenised once, and where their loss is read."""

    def __init__(self, tokenizer, requests: Sequence[Request], targets: Sequence[list[int]], flat: list[str],
                 padding_side, device):
        self.m = len(requests)
        self.per_edit = len(flat) + 1
        texts, subjects, appended = [], [], []
        for r, t in zip(requests, targets):
            for template in flat:
                texts.append(template.replace("{}", r.prompt, 1))
                subjects.append(r.subject)
                appended.append(t[:-1])
            texts.append(KL_PROMPT)
            subjects.append(r.subject)
            appended.append([])
        self.batch = encode_prompts(tokenizer, texts, subjects, appended=appended, padding_side=padding_side,
                                    device=device)
        P = self.per_edit
        self.row_edit = torch.arange(self.m, device=device).repeat_interleave(P)
        # Target token k of a context row is predicted at prompt_last + k; each token's NLL is
        # weighted by 1 / (tokens · context prompts), giving the mean over tokens then prompts.
        rows, pos, labels, weights = [], [], [], []
        prompt_last = self.batch.prompt_last.tolist()
        for e, t in enumerate(targets):
            for p in range(P - 1):
                row = e * P + p
                start = prompt_last[row]
                rows += [row] * len(t)
                pos += range(start, start + len(t))
                labels += t
                weights += [1.0 / (len(t) * (P - 1))] * len(t)
        self.tok_row = torch.tensor(rows, device=device)
        self.tok_pos = torch.tensor(pos, device=device)
        self.tok_label = torch.tensor(labels, device=device)
        self.tok_weight = torch.tensor(weights, dtype=torch.float64, device=device)
        self.kl_row = torch.arange(self.m, device=device) * P + (P - 1)
        self.first_row = torch.arange(self.m, device=device) * P

    def rows_of(self, edits: torch.Tensor) -> torch.Tensor:
        return (edits[:, None] * self.per_edit + torch.arange(self.per_edit, device=edits.device)).reshape(-1)


class _View:
    """The part of a chunk restricted to some edits: batch rows and readout indices into them."""

    def __init__(self, chunk: _Chunk, edits: torch.Tensor):
        self.edits = edits
        rows = chunk.rows_of(edits)
        self.batch: TokenBatch = chunk.batch.select(rows)
        local = torch.full((len(chunk.batch),), -1, dtype=torch.long, device=rows.device)
        local[rows] = torch.arange(len(rows), device=rows.device)
        keep = local[chunk.tok_row] >= 0
        self.row_edit = chunk.row_edit[rows]
        self.tok_row = local[chunk.tok_row[keep]]
        self.tok_pos = chunk.tok_pos[keep]
        self.tok_label = chunk.tok_label[keep]
        self.tok_weight = chunk.tok_weight[keep]
        self.tok_edit = chunk.row_edit[chunk.tok_row[keep]]
        self.kl_row = local[chunk.kl_row[edits]]
        self.kl_pos = self.batch.lookup[self.kl_row]


def _log_probs(adapter: ModelAdapter, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.log_softmax(logits_from_hidden(adapter, hidden).to(dtype), dim=-1)


def _check_readout(model, adapter: ModelAdapter, batch: TokenBatch) -> None:
    """The loss reads logits as lm_head(final_norm(last block output)); check on a few prompts
    that this is what the model computes (a model with extra output processing is refused)."""
    with torch.no_grad(), capture({"last": adapter.block(adapter.num_layers - 1)}) as got:
        theirs = model(**batch.inputs()).logits.to(torch.float64)
    ours = logits_from_hidden(adapter, got["last"]).to(torch.float64)
    mask = batch.attention_mask.bool()
    err = ((ours - theirs)[mask].norm() / theirs[mask].norm().clamp_min(1e-30)).item()
    tol = max(1e-4, 16 * torch.finfo(adapter.dtype).eps)
    if not (torch.isfinite(theirs[mask]).all() and torch.isfinite(ours[mask]).all()):
        raise FastEditError(f"the model's activations hold NaN or Inf on the edit prompts (dtype "
                            f"{str(adapter.dtype).removeprefix('torch.')}); in float16, overflow is the usual cause: "
                            "load the model in bfloat16 or float32. Otherwise check the weights for NaN/Inf")
    if not err <= tol:
        raise FastEditError(f"this model's logits are not lm_head(final_norm(last hidden state)) (relative "
                            f"difference {err:.2e}), so v* cannot read its loss at the final layer; "
                            "use a model whose adapter has that output path")


class _Run:
    """One chunk's optimisation."""

    def __init__(self, model, adapter: ModelAdapter, chunk: _Chunk, layer: int, last: int, hp: VStarParams,
                 replay: bool):
        self.model, self.adapter, self.chunk = model, adapter, chunk
        self.layer, self.last, self.hp, self.replay = layer, last, hp, replay
        self.dtype = _work_dtype(adapter.dtype)
        self.replayer = None
        self.view: _View | None = None

    def record(self, edits: torch.Tensor, *, first: bool) -> None:
        """No-gradient forward over the prompts of ``edits`` up to block ``last``: caches block
        ``layer``'s output and the upper blocks' inputs; on the first call also h_init, v0 and
        the initial KL-prompt distribution p_init."""
        view = _View(self.chunk, edits)
        ad, layer, last = self.adapter, self.layer, self.last
        mods = {"h": ad.block(layer), "last": ad.block(last), "v": ad.rewrite_module(layer)}
        with torch.no_grad(), capture(mods) as got:
            if self.replay and last > layer:
                with record_blocks(ad, layer + 1, last) as rec:
                    forward_until(self.model, ad.block(last), **view.batch.inputs())
                self.replayer = rec
            else:
                forward_until(self.model, ad.block(last), **view.batch.inputs())
        self.view = view
        self.cached = got["h"] if self.replay else None
        if not first:
            return
        c, b = self.chunk, view.batch
        self.h_init = got["h"][c.first_row, b.lookup[c.first_row]].to(self.dtype)
        self.v0 = got["v"][c.first_row, b.lookup[c.first_row]].to(self.dtype)
        # The rewrite module's output at every row's lookup token: where δ lands (block_offset).
        self.m_rows = got["v"][torch.arange(len(b), device=b.lookup.device), b.lookup].to(self.dtype)
        self.p_init = _log_probs(ad, got["last"][view.kl_row, view.kl_pos], self.dtype)

    def use(self, edits: torch.Tensor) -> None:
        """Restrict the following iterations to ``edits`` (the running ones). With replay the
        cache is rebuilt only once at most half of the cached edits still run."""
        if self.replay:
            if 2 * len(edits) <= len(self.view.edits):
                self.record(edits, first=False)
        elif len(edits) < len(self.view.edits):
            self.view = _View(self.chunk, edits)

    def losses(self, delta: torch.Tensor):
        """Per-edit (loss, nll) of the current view's edits, as (m,) tensors (0 elsewhere)."""
        view, ad = self.view, self.adapter
        b = view.batch
        rows = self.chunk.rows_of(view.edits)
        d_rows = ad.block_offset(self.layer, self.m_rows[rows], delta[view.row_edit]).to(ad.dtype)
        width = b.input_ids.shape[1]
        add = torch.zeros((len(b), width, ad.d), dtype=ad.dtype, device=delta.device)
        add = add.index_put((torch.arange(len(b), device=delta.device), b.lookup), d_rows)
        if self.replay:
            hidden = self.cached + add
            h_last = self.replayer.run(hidden) if self.last > self.layer else hidden
        else:
            with edit_output(ad.block(self.layer), lambda h: h + add), \
                    capture({"last": ad.block(self.last)}, detach=False) as got:
                forward_until(self.model, ad.block(self.last), **b.inputs())
            h_last = got["last"]
        m = self.chunk.m
        logp = _log_probs(ad, h_last[view.tok_row, view.tok_pos], self.dtype)
        tok_nll = -logp.gather(1, view.tok_label[:, None])[:, 0] * view.tok_weight.to(self.dtype)
        nll = torch.zeros(m, dtype=self.dtype, device=delta.device).index_add(0, view.tok_edit, tok_nll)
        logq = _log_probs(ad, h_last[view.kl_row, view.kl_pos], self.dtype)
        kl_rows = (logq.exp() * (logq - self.p_init[view.edits])).sum(-1)
        kl = torch.zeros(m, dtype=self.dtype, device=delta.device).index_add(0, view.edits, kl_rows)
        decay = self.hp.v_weight_decay * delta.norm(dim=-1) / self.h_init.norm(dim=-1) ** 2
        return nll + self.hp.kl_factor * kl + decay, nll


def _optimise(run: _Run, indices: list[int], bar) -> tuple:
    hp, m = run.hp, run.chunk.m
    device = run.adapter.device
    run.record(torch.arange(m, device=device), first=True)
    delta = torch.zeros((m, run.adapter.d), dtype=run.dtype, device=device, requires_grad=True)
    exp_avg = torch.zeros((m, run.adapter.d), dtype=run.dtype, device=device)
    exp_avg_sq = torch.zeros_like(exp_avg)
    steps = torch.zeros(m, dtype=torch.long, device=device)
    running = torch.ones(m, dtype=torch.bool, device=device)
    final_loss = torch.full((m,), float("nan"), dtype=run.dtype, device=device)
    final_nll = torch.full_like(final_loss, float("nan"))
    radius = hp.clamp_norm_factor * run.h_init.norm(dim=-1)
    beta1, beta2 = ADAM_BETAS
    for it in range(hp.v_num_grad_steps):
        run.use(running.nonzero()[:, 0])
        loss, nll = run.losses(delta)
        with torch.no_grad():
            bad = running & ~torch.isfinite(loss)
            if bad.any():
                i = int(bad.nonzero()[0, 0])
                raise EditError(f"request {indices[i]}: the v* loss is not finite at iteration {it} "
                                f"(loss {loss[i].item()}); check the model's dtype and the request's target",
                                request_index=indices[i], stage="compute_targets")
            final_loss[running] = loss[running].detach()
            final_nll[running] = nll[running].detach()
            stop = running & (loss < hp.loss_stop) if it < hp.v_num_grad_steps - 1 else running.clone()
            stepping = running & ~stop
            running &= ~stop
        if bar is not None:
            bar.update(int(stop.sum()))
        if not stepping.any():
            break
        (grad,) = torch.autograd.grad(loss[stepping].sum(), delta)
        with torch.no_grad():
            # torch.optim.Adam's update, applied to the stepping rows only.
            idx = stepping.nonzero()[:, 0]
            g = grad[idx]
            steps[idx] += 1
            t = steps[idx].to(run.dtype)[:, None]
            exp_avg[idx] = exp_avg[idx].lerp(g, 1 - beta1)
            exp_avg_sq[idx] = exp_avg_sq[idx] * beta2 + (1 - beta2) * g * g
            bias1 = 1 - beta1 ** t
            bias2_sqrt = (1 - beta2 ** t).sqrt()
            denom = exp_avg_sq[idx].sqrt() / bias2_sqrt + ADAM_EPS
            new = delta[idx] - (hp.v_lr / bias1) * exp_avg[idx] / denom
            norm = new.norm(dim=-1, keepdim=True)
            scale = torch.where(norm > radius[idx, None], radius[idx, None] / norm, torch.ones_like(norm))
            delta[idx] = new * scale
    delta = delta.detach()
    with torch.no_grad():
        z = run.h_init + run.adapter.block_offset(run.layer, run.v0, delta)
    return z, run.h_init, delta, run.v0, steps, final_loss, final_nll


def compute_targets(model, tokenizer, adapter: ModelAdapter, requests: Sequence[Request], layer: int, *,
                    templates: list[list[str]], hparams=None, loss_layer: int | None = None, batched: bool = True,
                    progress: bool = False, chunk_size: int | None = None, replay: bool = True,
                    padding_side: str | None = None) -> Targets:
    """Target residual-stream values z (n, d) at block ``layer`` for ``requests`` (see the module
    docstring for the loss and the optimisation).

    Args:
        templates: two-level context templates (:func:`fastedit.editing.context.context_templates`).
        hparams: :class:`VStarParams`, or a dict/object with its field names (defaults otherwise).
        loss_layer: block whose output is read through the final norm and LM head (default: the
            last block, i.e. the model's own logits).
        batched: optimise all edits together (True) or one after another (False; same result).
        chunk_size: at most this many edits per forward/backward (bounds memory; chunks group
            edits of similar prompt length to cut padding); default all in one.
        replay: cache the layers below ``layer`` and replay only the blocks above it each step
            (True), or run the whole model with a hook adding δ each step (False).
        padding_side: 'left' or 'right' (default: the tokenizer's); it does not change results.
    Returns:
        :class:`Targets`, rows in request order, in float32 (float64 for a float64 model).
    """
    hp = VStarParams.coerce(hparams)
    require_eval(model)
    validate_requests(requests)
    adapter.check_layer(layer)
    last = adapter.num_layers - 1 if loss_layer is None else adapter.check_layer(loss_layer)
    if last < layer:
        raise InputError(f"loss_layer {loss_layer} is below the edited layer {layer}; the loss must be read "
                         "at or above the layer where δ is added")
    flat = flatten(check_templates(templates))
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    size = (chunk_size or len(requests)) if batched else 1
    tgt = [target_ids(tokenizer, r.target_new) for r in requests]
    params = list(model.parameters())
    had_grad = [p.requires_grad for p in params]
    parts = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(requests), desc=f"v* layer {layer}", unit="edit")
    try:
        for p in params:
            p.requires_grad_(False)
        # Chunks of edits with similar prompt lengths waste less compute on padding.
        order = list(range(len(requests)))
        if 1 < size < len(requests):
            order.sort(key=lambda i: len(tokenizer(requests[i].text)["input_ids"]) + len(tgt[i]))
        for start in range(0, len(requests), size):
            idx = order[start:start + size]
            chunk = _Chunk(tokenizer, [requests[i] for i in idx], [tgt[i] for i in idx], flat, padding_side,
                           adapter.device)
            if start == 0:
                _check_readout(model, adapter, chunk.batch.select(chunk.rows_of(torch.arange(1, device=adapter.device))))
            with torch.enable_grad():
                parts.append(_optimise(_Run(model, adapter, chunk, layer, last, hp, replay), idx, bar))
    finally:
        for p, g in zip(params, had_grad):
            p.requires_grad_(g)
        if bar is not None:
            bar.close()
    back = torch.argsort(torch.tensor(order)).to(adapter.device)
    z, h_init, delta, v0, steps, loss, nll = (torch.cat(x).index_select(0, back) for x in zip(*parts))
    return Targets(layer=layer, z=z, h_init=h_init, delta=delta, v0=v0, steps=steps, loss=loss, nll=nll)
