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
(:mod:`fastedit.models.replay`); with causal attention the positions before the lookup token do
not depend on δ either, so the replay runs on the columns from the lookup token on, attending to
a key/value cache of the prefix (``_Run``'s ``suffix`` path). When at most half of the replayed
edits are still running, the next forward records again for the running ones only. The edits
are optimised in chunks of at most ``max_chunk_tokens`` padded tokens, packed by length; chunks
share nothing, so chunking changes no value. No model parameter receives a gradient.

``autocast="bfloat16"`` (off by default) runs what each iteration recomputes, the blocks above
``layer`` and the readout (final norm, LM head), under :func:`torch.autocast` on the model's
device type: their matmuls in bfloat16, the residual stream, δ, the Adam state and the loss's
log-softmax in the work dtype. Everything up to block ``layer`` (h_init, v0, the cached hidden
state, the prefix cache) runs as without it, so the targets z = h_init + δ differ only by δ's
optimisation. Autocast leaves float64 tensors alone: a float64 model is unaffected.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from fastedit import _hf, _mem
from fastedit.editing.context import check_templates, flatten
from fastedit.editing.hparams import VSTAR_AUTOCAST
from fastedit.editing.keys import require_eval
from fastedit.editing.requests import Request, validate_requests
from fastedit.editing.tokens import (EncodedRows, TokenBatch, check_max_tokens, chunk_budget_bytes, encode_rows,
                                     length_chunks, target_ids, token_bytes)
from fastedit.errors import EditError, FastEditError, InputError
from fastedit.models import ModelAdapter, capture, edit_output, forward_until
from fastedit.models.replay import PrefixCache, logits_from_hidden, record_blocks

KL_PROMPT = "{} is a"
AUTOCAST_DTYPES = {name: getattr(torch, name) for name in VSTAR_AUTOCAST}
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
    chunks: how many chunks were optimised one after another; path: ``suffix``, ``replay`` or
    ``hook`` (``_Run``).
    """

    layer: int
    z: torch.Tensor
    h_init: torch.Tensor
    delta: torch.Tensor
    v0: torch.Tensor
    steps: torch.Tensor
    loss: torch.Tensor
    nll: torch.Tensor
    chunks: int = 1
    path: str = "replay"


def _work_dtype(model_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(model_dtype, torch.float32)


def autocast_dtype(value, name: str = "autocast") -> torch.dtype | None:
    """The dtype of v*'s autocast: None (off) or "bfloat16" (also as ``torch.bfloat16``); anything
    else is refused, naming ``name``."""
    if value is None:
        return None
    for key, dtype in AUTOCAST_DTYPES.items():
        if value == key or value is dtype:
            return dtype
    raise InputError(f"{name} must be None (off) or one of {', '.join(map(repr, AUTOCAST_DTYPES))}, got {value!r}")


@contextlib.contextmanager
def _autocast_blocks(adapter: ModelAdapter, first: int, last: int, amp):
    """Inside, blocks ``first..last`` of any forward pass run under ``amp`` (an autocast context,
    entered before block ``first`` and left after block ``last``); nothing else does."""
    if amp is None or first > last:
        yield
        return
    entered = []

    def enter(mod, args):
        amp.__enter__()
        entered.append(True)

    def leave(mod, args, output):
        if entered:
            entered.pop()
            amp.__exit__(None, None, None)

    handles = [adapter.block(first).register_forward_pre_hook(enter, prepend=True),
               adapter.block(last).register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while entered:  # a forward stopped inside the span (an error) must not leave autocast on
            entered.pop()
            amp.__exit__(None, None, None)


class _Chunk:
    """The prompts of a set of edits (tokenised rows, ``per_edit`` per edit), padded once, and
    where their loss is read."""

    def __init__(self, rows: EncodedRows, targets: Sequence[list[int]], per_edit: int, side: str, pad_id: int,
                 device):
        self.m = len(targets)
        self.per_edit = P = per_edit
        self.batch = rows.pad(side=side, pad_id=pad_id, device=device)
        self.pad_id = pad_id
        self.row_edit = torch.arange(self.m, device=device).repeat_interleave(P)
        # Target token k of a context row is predicted at prompt_last + k; each token's NLL is
        # weighted by 1 / (tokens · context prompts), giving the mean over tokens then prompts.
        rows_, pos, labels, weights = [], [], [], []
        prompt_last = self.batch.prompt_last.tolist()
        for e, t in enumerate(targets):
            for p in range(P - 1):
                row = e * P + p
                start = prompt_last[row]
                rows_ += [row] * len(t)
                pos += range(start, start + len(t))
                labels += t
                weights += [1.0 / (len(t) * (P - 1))] * len(t)
        self.tok_row = torch.tensor(rows_, device=device)
        self.tok_pos = torch.tensor(pos, device=device)
        self.tok_label = torch.tensor(labels, device=device)
        self.tok_weight = torch.tensor(weights, dtype=torch.float64, device=device)
        self.kl_row = torch.arange(self.m, device=device) * P + (P - 1)
        self.first_row = torch.arange(self.m, device=device) * P

    def rows_of(self, edits: torch.Tensor) -> torch.Tensor:
        return (edits[:, None] * self.per_edit + torch.arange(self.per_edit, device=edits.device)).reshape(-1)


class _View:
    """The part of a chunk restricted to some edits: batch rows (columns that are padding in
    every selected row dropped) and readout indices into them."""

    def __init__(self, chunk: _Chunk, edits: torch.Tensor):
        self.edits = edits
        rows = chunk.rows_of(edits)
        batch: TokenBatch = chunk.batch.select(rows)
        real = batch.attention_mask.any(0).nonzero()[:, 0]
        lo, hi = int(real[0]), int(real[-1]) + 1
        self.batch = TokenBatch(batch.input_ids[:, lo:hi], batch.attention_mask[:, lo:hi],
                                batch.position_ids[:, lo:hi], batch.lookup - lo, batch.prompt_last - lo)
        local = torch.full((len(chunk.batch),), -1, dtype=torch.long, device=rows.device)
        local[rows] = torch.arange(len(rows), device=rows.device)
        keep = local[chunk.tok_row] >= 0
        self.rows = rows
        self.row_edit = chunk.row_edit[rows]
        self.tok_row = local[chunk.tok_row[keep]]
        self.tok_pos = chunk.tok_pos[keep] - lo
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


PATHS = ("suffix", "replay", "hook")


class _Run:
    """One chunk's optimisation.

    ``path``: how each iteration's forward is computed (all give the same values):
      - ``suffix``: the batch is laid out with every row's lookup token in one column s (see
        :meth:`EncodedRows.pad`); the columns before s, which δ cannot change, run once
        (no gradient) into a key/value cache (:class:`PrefixCache`); each iteration replays
        the blocks above ``layer`` on the columns from s on only, attending to that cache.
      - ``replay``: block ``layer``'s output is cached over the whole batch and the blocks
        above it are replayed with the recorded masks and position embeddings.
      - ``hook``: the whole model runs every iteration, δ added by a forward hook.
    The recording forward of the first two is itself an iteration's forward (δ added by a
    hook), so no iteration is computed twice.
    """

    def __init__(self, model, adapter: ModelAdapter, chunk: _Chunk, layer: int, last: int, hp: VStarParams,
                 path: str, checkpointed: bool = False, autocast: torch.dtype | None = None):
        self.model, self.adapter, self.chunk = model, adapter, chunk
        self.layer, self.last, self.hp, self.path = layer, last, hp, path
        self.checkpointed = checkpointed
        self.autocast = autocast
        self.dtype = _work_dtype(adapter.dtype)
        self.replayer = None
        self.prefix: PrefixCache | None = None
        self.cached = None
        self.view: _View | None = None
        self.p_init = None
        self.forwards = 0

    def _amp(self):
        """A fresh autocast context for what each iteration recomputes (None when off)."""
        if self.autocast is None:
            return None
        return torch.autocast(device_type=self.adapter.device.type, dtype=self.autocast)

    def _add(self, delta: torch.Tensor, m_rows: torch.Tensor, shape, lookup: torch.Tensor) -> torch.Tensor:
        """The (B, T, d) offset of block ``layer``'s output: the block offset of δ at each row's
        lookup token, zero elsewhere."""
        ad = self.adapter
        d_rows = ad.block_offset(self.layer, m_rows, delta[self.view.row_edit]).to(ad.dtype)
        add = torch.zeros((*shape, ad.d), dtype=ad.dtype, device=delta.device)
        return add.index_put((torch.arange(shape[0], device=delta.device), lookup), d_rows)

    def _record(self, delta: torch.Tensor) -> torch.Tensor:
        """The recording forward over the current view with δ added: returns block ``last``'s
        output and, for the replay paths, keeps what the next iterations replay from."""
        ad, layer, last, view = self.adapter, self.layer, self.last, self.view
        b = view.batch
        split = 0
        if self.path == "suffix" and int(b.lookup.min()) > 0:
            split = int(b.lookup.min())
            self.prefix = PrefixCache(self.model, ad, last, b.input_ids[:, :split], b.attention_mask[:, :split],
                                      b.position_ids[:, :split])
            inputs = dict(input_ids=b.input_ids[:, split:], attention_mask=b.attention_mask,
                          position_ids=b.position_ids[:, split:], **self.prefix.kwargs())
        else:
            inputs = b.inputs()
        self.split = split
        lookup = b.lookup - split
        rows = torch.arange(len(b), device=lookup.device)
        store = {}

        def add_delta(h):
            store["h"] = h.detach()
            if not hasattr(self, "m_rows"):
                self.m_rows = ad.as_tokens(got["v"], h.shape[:2])[rows, lookup].to(self.dtype)
                self.h_init = h[self.chunk.first_row, lookup[self.chunk.first_row]].detach().to(self.dtype)
                self.v0 = self.m_rows[self.chunk.first_row]
            return h + self._add(delta, self.m_rows[view.rows], h.shape[:2], lookup)

        replaying = self.path != "hook" and last > layer
        with contextlib.ExitStack() as stack:
            got = stack.enter_context(capture({"v": ad.rewrite_module(layer)}))
            stack.enter_context(edit_output(ad.block(layer), add_delta))
            out = stack.enter_context(capture({"last": ad.block(last)}, detach=False))
            if replaying:
                self.replayer = stack.enter_context(record_blocks(ad, layer + 1, last))
            stack.enter_context(_autocast_blocks(ad, layer + 1, last, self._amp()))
            forward_until(self.model, ad.block(last), **inputs)
        self.forwards += 1
        if self.path != "hook":
            self.cached = store["h"]
        if split == 0:
            self.prefix = None
        if self.prefix is not None:
            self.prefix.restore()
        return out["last"]

    def _replay(self, delta: torch.Tensor) -> torch.Tensor:
        hidden = self.cached + self._add(delta, self.m_rows[self.view.rows], self.cached.shape[:2],
                                         self.view.batch.lookup - self.split)
        if self.last == self.layer:
            return hidden
        with self._amp() or contextlib.nullcontext():
            out = self.replayer.run(hidden, checkpointed=self.checkpointed)
        if self.prefix is not None:
            self.prefix.restore()
        return out

    def use(self, edits: torch.Tensor) -> None:
        """Restrict the following iterations to ``edits`` (the running ones). The replay paths
        record again (at the next forward) once at most half of the recorded edits still run."""
        if self.view is None:
            self.view = _View(self.chunk, edits)
        elif self.path == "hook":
            if len(edits) < len(self.view.edits):
                self.view = _View(self.chunk, edits)
        elif 2 * len(edits) <= len(self.view.edits):
            self.view = _View(self.chunk, edits)
            self.cached = None

    def backward_ready(self) -> None:
        """Before a backward through checkpointed blocks: they recompute against the prefix."""
        if self.prefix is not None:
            self.prefix.restore()

    def losses(self, delta: torch.Tensor):
        """Per-edit (loss, nll) of the current view's edits, as (m,) tensors (0 elsewhere)."""
        view, ad = self.view, self.adapter
        h_last = self._replay(delta) if self.cached is not None else self._record(delta)
        off = self.split if self.path == "suffix" else 0
        m = self.chunk.m
        with self._amp() or contextlib.nullcontext():
            logp = _log_probs(ad, h_last[view.tok_row, view.tok_pos - off], self.dtype)
        tok_nll = -logp.gather(1, view.tok_label[:, None])[:, 0] * view.tok_weight.to(self.dtype)
        nll = torch.zeros(m, dtype=self.dtype, device=delta.device).index_add(0, view.tok_edit, tok_nll)
        with self._amp() or contextlib.nullcontext():
            logq = _log_probs(ad, h_last[view.kl_row, view.kl_pos - off], self.dtype)
        if self.p_init is None:
            # the first forward runs at δ = 0 over every edit: its distribution is p_init
            self.p_init = logq.detach()
        kl_rows = (logq.exp() * (logq - self.p_init[view.edits])).sum(-1)
        kl = torch.zeros(m, dtype=self.dtype, device=delta.device).index_add(0, view.edits, kl_rows)
        decay = self.hp.v_weight_decay * delta.norm(dim=-1) / self.h_init.norm(dim=-1) ** 2
        return nll + self.hp.kl_factor * kl + decay, nll


def _optimise(run: _Run, indices: list[int], bar) -> tuple:
    hp, m = run.hp, run.chunk.m
    device = run.adapter.device
    delta = torch.zeros((m, run.adapter.d), dtype=run.dtype, device=device, requires_grad=True)
    exp_avg = torch.zeros((m, run.adapter.d), dtype=run.dtype, device=device)
    exp_avg_sq = torch.zeros_like(exp_avg)
    steps = torch.zeros(m, dtype=torch.long, device=device)
    running = torch.ones(m, dtype=torch.bool, device=device)
    final_loss = torch.full((m,), float("nan"), dtype=run.dtype, device=device)
    final_nll = torch.full_like(final_loss, float("nan"))
    beta1, beta2 = ADAM_BETAS
    for it in range(hp.v_num_grad_steps):
        run.use(running.nonzero()[:, 0])
        loss, nll = run.losses(delta)
        if it == 0:
            radius = hp.clamp_norm_factor * run.h_init.norm(dim=-1)
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
        run.backward_ready()
        (grad,) = torch.autograd.grad(loss[stepping].sum(), delta)
        run.backward_ready()
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


def _suffix_matches(model, adapter: ModelAdapter, probe: _Chunk, layer: int, last: int, hp: VStarParams) -> bool:
    """Whether the suffix path reproduces the model at δ = 0 on ``probe`` (one edit's rows in the
    lookup layout): its logits at the positions the loss reads against the full model's on the
    same padded batch. False also where the model is not finite on that layout."""
    with torch.no_grad():
        logits = model(**probe.batch.inputs()).logits.to(torch.float64)
    run = _Run(model, adapter, probe, layer, last, hp, "suffix")
    run.use(torch.arange(probe.m, device=adapter.device))
    view = run.view
    try:
        with torch.no_grad():
            h = run._record(torch.zeros((probe.m, adapter.d), dtype=run.dtype, device=adapter.device))
    except (TypeError, ValueError, AttributeError, RuntimeError, NotImplementedError, KeyError):
        # a model whose forward takes no such cache, or a cache that cannot be resumed
        return False
    rows = torch.cat([view.tok_row, view.kl_row])
    pos = torch.cat([view.tok_pos, view.kl_pos])
    ours = logits_from_hidden(adapter, h[rows, pos - run.split]).to(torch.float64)
    theirs = logits[rows, pos]
    err = ((ours - theirs).norm() / theirs.norm().clamp_min(1e-30)).item()
    # bf16: 16 ulps (0.125) allows the rounding of 30-odd bf16 blocks, not a cache that misses the
    # prefix (an O(1) change of the logits)
    return err <= max(1e-5, 16 * torch.finfo(adapter.dtype).eps)


def prompt_rows(tokenizer, requests: Sequence[Request], flat: list[str]) -> tuple[EncodedRows, list[list[int]]]:
    """The v* prompts of ``requests``, tokenised once: per edit, each flattened context template
    applied to its prompt followed by the target tokens but the last (teacher forcing), then the
    KL prompt; P = len(flat) + 1 rows an edit. Returns (rows, each edit's target ids)."""
    tgt = [target_ids(tokenizer, r.target_new) for r in requests]
    texts, subjects, appended = [], [], []
    for r, t in zip(requests, tgt):
        for template in flat:
            texts.append(template.replace("{}", r.prompt, 1))
            subjects.append(r.subject)
            appended.append(t[:-1])
        texts.append(KL_PROMPT)
        subjects.append(r.subject)
        appended.append([])
    return encode_rows(tokenizer, texts, subjects, appended=appended), tgt


def edit_widths(rows: EncodedRows, P: int, layout: str) -> list[tuple[int, int]]:
    """The cost of each edit for :func:`~fastedit.editing.tokens.length_chunks`: its P rows as
    wide as its widest row in the chunk's layout, (prefix, suffix) columns for ``"lookup"``
    (lookup tokens aligned), (0, length) otherwise."""
    n = len(rows.ids) // P
    if layout == "lookup":
        return [(max(rows.lookup[e * P + p] for p in range(P)),
                 max(len(rows.ids[e * P + p]) - rows.lookup[e * P + p] for p in range(P))) for e in range(n)]
    return [(0, max(len(rows.ids[e * P + p]) for p in range(P))) for e in range(n)]


@contextlib.contextmanager
def _frozen(model):
    """No model parameter requires a gradient inside (v* differentiates δ only); restored after."""
    params = list(model.parameters())
    had_grad = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, g in zip(params, had_grad):
            p.requires_grad_(g)


def compute_targets(model, tokenizer, adapter: ModelAdapter, requests: Sequence[Request], layer: int, *,
                    templates: list[list[str]], hparams=None, loss_layer: int | None = None, batched: bool = True,
                    progress: bool = False, chunk_size: int | None = None, max_chunk_tokens: int | None = None,
                    replay: bool = True, suffix: bool = True, checkpoint: bool = False,
                    padding_side: str | None = None, autocast: str | None = None) -> Targets:
    """Target residual-stream values z (n, d) at block ``layer`` for ``requests`` (see the module
    docstring for the loss and the optimisation).

    Args:
        templates: two-level context templates (:func:`fastedit.editing.context.context_templates`).
        hparams: :class:`VStarParams`, or a dict/object with its field names (defaults otherwise).
        loss_layer: block whose output is read through the final norm and LM head (default: the
            last block, i.e. the model's own logits).
        batched: optimise all edits together (True) or one after another (False; same result).
        chunk_size: at most this many edits per chunk.
        max_chunk_tokens: at most this many padded token positions (rows × width) per chunk;
            default: :func:`fastedit.editing.tokens.chunk_budget_bytes` (from the device's free
            memory; 128 MiB on the CPU) over :func:`fastedit.editing.tokens.token_bytes`, a
            suffix-path chunk's prefix columns counted without gradient. Edits are packed by
            length, so chunks pad little. Each chunk is optimised on its own and only its
            results are kept: the same values as one chunk.
        replay: run only the blocks above ``layer`` each step (True), or the whole model with a
            hook adding δ (False).
        suffix: with replay, run those blocks on the columns from the lookup token on only,
            attending to a cache of the prefix's keys and values (``_Run``'s ``suffix`` path);
            used where a check on the first edit shows it reproduces the model, else the whole
            batch is replayed.
        checkpoint: recompute the replayed blocks in the backward pass instead of keeping their
            activations (less memory, about one more forward per step; same values).
        padding_side: 'left' or 'right' for the paths that pad on one side (default: the
            tokenizer's); it does not change results.
        autocast: None (default) or "bfloat16": the blocks above ``layer`` and the readout run
            under :func:`torch.autocast` (see the module docstring); δ, Adam and z stay in the
            work dtype. Faster where bfloat16 matmuls are (GPUs), at bfloat16's precision.
    Returns:
        :class:`Targets`, rows in request order, in float32 (float64 for a float64 model);
        ``chunks`` and ``path`` say how it was computed.
    """
    hp = VStarParams.coerce(hparams)
    amp = autocast_dtype(autocast)
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
    check_max_tokens(max_chunk_tokens)
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {side!r}")
    P = len(flat) + 1
    rows, tgt = prompt_rows(tokenizer, requests, flat)
    pad_id = _hf.pad_id(tokenizer)
    device = adapter.device
    _check_readout(model, adapter, _Chunk(rows.subset(range(P)), tgt[:1], P, side, pad_id, device).batch)
    path = "hook" if not replay else "replay"
    if replay and suffix:
        with _frozen(model):
            probe = _Chunk(rows.subset(range(P)), tgt[:1], P, "lookup", pad_id, device)
            path = "suffix" if _suffix_matches(model, adapter, probe, layer, last, hp) else "replay"
    layout = "lookup" if path == "suffix" else side
    widths = edit_widths(rows, P, layout)
    if max_chunk_tokens is None:
        # A budget in bytes: the prefix columns of the suffix path run once without gradient,
        # the suffix columns (all columns on the other paths) through the differentiated blocks.
        limit = chunk_budget_bytes(adapter)
        pre, suf = token_bytes(adapter), token_bytes(adapter, grad_layers=last - layer)
        costs = [(a * pre, b * suf) for a, b in widths]
    else:
        limit, costs = max_chunk_tokens, widths
    if not batched:
        groups = [[i] for i in range(len(requests))]
    else:
        groups = [g[start:start + (chunk_size or len(g))] for g in length_chunks(costs, limit, group=P)
                  for start in range(0, len(g), chunk_size or len(g))]
    parts = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(requests), desc=f"v* layer {layer}", unit="edit")
    try:
        with _frozen(model):
            for idx in groups:
                chunk = _Chunk(rows.subset([e * P + p for e in idx for p in range(P)]), [tgt[i] for i in idx], P,
                               layout, pad_id, device)
                with torch.enable_grad():
                    parts.append(_optimise(_Run(model, adapter, chunk, layer, last, hp, path, checkpoint, amp), idx, bar))
                del chunk
                _mem.trim(device)  # only the chunk's results remain: give its activations' pages back
    finally:
        if bar is not None:
            bar.close()
    order = [i for g in groups for i in g]
    back = torch.argsort(torch.tensor(order)).to(device)
    z, h_init, delta, v0, steps, loss, nll = (torch.cat(x).index_select(0, back) for x in zip(*parts))
    return Targets(layer=layer, z=z, h_init=h_init, delta=delta, v0=v0, steps=steps, loss=loss, nll=nll,
                   chunks=len(groups), path=path)
