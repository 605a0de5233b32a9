"""Train the testbed models on the synthetic world (deterministic per seed on CPU).

The corpus is an endless stream of paragraphs about one subject each (its facts in random
order, each with a random training template, sometimes with filler in between), packed whole
into fixed-length rows. Next-token cross-entropy over all real tokens, AdamW, warmup + cosine.
"""
from __future__ import annotations

import json
import math
import pathlib
import time
from functools import partial

import torch

from fastedit.errors import InputError
from fastedit.testbed.tokenizer import build_tokenizer
from fastedit.testbed.world import World, make_world, tokenizer_corpus

#: Architecture of the shipped testbed models. The editing methods rewrite the MLP output
#: projection of the middle layers (``EDIT_LAYERS``), as MEMIT does on the real models.
ARCHS = {
    "llama": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
    # No dropout: the model has to memorise the world, not regularise away from it.
    "gpt2": dict(n_embd=128, n_inner=512, n_layer=4, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0),
}
#: The larger world (issue 12: sequential editing long enough to reach collapse): the same
#: Llama shape trained on 2000 subjects (12000 facts) instead of 400.
ARCHS["llama-2k"] = ARCHS["llama"]
#: The ``transformers`` model class each testbed arch is built from.
BASE = {"llama": "llama", "gpt2": "gpt2", "llama-2k": "llama"}
EDIT_LAYERS = [1, 2]
#: The training settings of the shipped models (``fastedit testbed train`` reproduces them).
DEFAULTS = {
    "llama": dict(steps=1500, batch_size=32, lr=3e-3, n_subjects=400),
    "gpt2": dict(steps=1500, batch_size=32, lr=3e-3, n_subjects=400),
    "llama-2k": dict(steps=5000, batch_size=32, lr=3e-3, n_subjects=2000),
}
VOCAB_SIZE = 1024
MAX_LEN = 128


def make_model(arch: str, tokenizer, seed: int, **overrides):
    """A freshly initialised testbed model (``transformers`` LlamaForCausalLM or GPT2LMHeadModel)."""
    if arch not in ARCHS:
        raise InputError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    size = {**ARCHS[arch], **overrides}
    testbed_info = {"edit_layers": EDIT_LAYERS, "seed": seed}
    if BASE[arch] == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=MAX_LEN * 2,
                             tie_word_embeddings=True, **size, **ids)
        config.fastedit_testbed = testbed_info
        return LlamaForCausalLM(config)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=MAX_LEN * 2, **size, **ids)
    config.fastedit_testbed = testbed_info
    return GPT2LMHeadModel(config)


def packed_batches(world: World, tokenizer, seed: int, batch_size: int, max_len: int = MAX_LEN):
    """Endless (input_ids, labels) batches of shape (batch_size, max_len).

    Whole documents (BOS text EOS) are packed greedily into each row; the rest of the row is
    padding with label -100 so it carries no loss.
    """
    texts = world.training_texts(seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pending: list[int] | None = None
    while True:
        ids = torch.full((batch_size, max_len), pad, dtype=torch.long)
        labels = torch.full((batch_size, max_len), -100, dtype=torch.long)
        for row in range(batch_size):
            fill = 0
            while True:
                if pending is None:
                    pending = tokenizer(next(texts))["input_ids"][: max_len - 1] + [eos]
                if fill + len(pending) > max_len:
                    break
                ids[row, fill: fill + len(pending)] = torch.tensor(pending)
                labels[row, fill: fill + len(pending)] = torch.tensor(pending)
                fill += len(pending)
                pending = None
        yield ids, labels


@torch.no_grad()
def fact_accuracy(model, tokenizer, world: World, *, heldout: bool, n_subjects: int | None = None,
                  batch_size: int = 256) -> float:
    """Top-1 accuracy of the next token after ``template.format(subject)`` being the fact's
    object, over every (subject, relation, template) of the chosen template set."""
    from fastedit.eval.scoring import next_token_argmax

    subjects = world.subjects[:n_subjects] if n_subjects else world.subjects
    prompts, answers = [], []
    for s in subjects:
        for r in world.relations:
            for t in world.prompts(r, heldout):
                prompts.append(t.format(s))
                answers.append(tokenizer(" " + world.facts[s][r], add_special_tokens=False)["input_ids"][0])
    pred = next_token_argmax(model, tokenizer, prompts, batch_size=batch_size)
    return (pred == torch.tensor(answers)).double().mean().item()


def train(arch: str = "llama", *, seed: int = 0, steps: int = 1500, batch_size: int = 32,
          lr: float = 3e-3, n_subjects: int = 400, out: str | pathlib.Path | None = None,
          device: str | None = None, size: dict | None = None, vocab_size: int = VOCAB_SIZE,
          n_eval_subjects: int | None = None, log_every: int = 100, log=partial(print, flush=True)):
    """Build the world and tokenizer from ``seed``, train a testbed model, save it to ``out``.

    ``size`` overrides the architecture's config fields (``ARCHS[arch]``), for small trials.
    Returns (model, tokenizer, metrics) where metrics holds the loss curve's end, the first
    step's loss and the top-1 fact accuracy on training and held-out templates (measured on
    the first ``n_eval_subjects`` subjects, default all). On CPU the result is bitwise
    reproducible for a given seed and torch build (single thread).
    """
    if steps < 1:
        raise InputError(f"steps must be positive, got {steps}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = make_world(seed, n_subjects=n_subjects)
    tokenizer = build_tokenizer(tokenizer_corpus(seed), vocab_size=vocab_size)
    model = make_model(arch, tokenizer, seed, **(size or {})).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    batches = packed_batches(world, tokenizer, seed, batch_size)
    model.train()
    t0, running, first = time.time(), None, None
    for step in range(steps):
        ids, labels = next(batches)
        ids, labels = ids.to(device), labels.to(device)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        first = loss.item() if first is None else first
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:5d}  loss {running:.4f}  lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:.0f}s")
    model.eval()
    metrics = {
        "arch": arch, "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
        "n_subjects": n_subjects, "first_loss": first, "last_loss": loss.item(),
        "final_loss": running,
        "train_template_top1": fact_accuracy(model, tokenizer, world, heldout=False,
                                             n_subjects=n_eval_subjects),
        "heldout_template_top1": fact_accuracy(model, tokenizer, world, heldout=True,
                                               n_subjects=n_eval_subjects),
        "seconds": time.time() - t0,
    }
    if log:
        log(json.dumps(metrics))
    if out is not None:
        save(model.cpu(), tokenizer, world, metrics, out)
    return model, tokenizer, metrics


def save(model, tokenizer, world: World, metrics: dict, out) -> None:
    """Write config.json, model.safetensors (float16), the tokenizer files and training.json to ``out``,
    plus known.json: the (subject index, relation) pairs whose rewrite template the model
    completes correctly, from which :func:`fastedit.testbed.records` draws edits."""
    from fastedit.eval.scoring import next_token_argmax

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Shipped in float16 to halve the package size; known.json is measured on the weights
    # as they load (float16 values in float32), not on the float32 training weights.
    model = model.half()
    model.save_pretrained(out, safe_serialization=True)
    model = model.float()
    tokenizer.save_pretrained(out)
    pairs, prompts, answers = [], [], []
    for i, s in enumerate(world.subjects):
        for r in world.relations:
            pairs.append([i, r])
            prompts.append(world.relations[r]["rewrite"].format(s))
            answers.append(tokenizer(" " + world.facts[s][r], add_special_tokens=False)["input_ids"][0])
    pred = next_token_argmax(model, tokenizer, prompts)
    known = [p for p, ok in zip(pairs, (pred == torch.tensor(answers)).tolist()) if ok]
    (out / "known.json").write_text(json.dumps(known))
    (out / "training.json").write_text(json.dumps(metrics, indent=1))
