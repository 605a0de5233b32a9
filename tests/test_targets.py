import importlib.util
import os
import pathlib

import pytest
import torch

from fastedit.editing.context import context_templates, flatten
from fastedit.editing.keys import block_outputs_at_lookup, values_at_lookup
from fastedit.editing.requests import Request
from fastedit.editing.targets import KL_PROMPT, VStarParams, compute_targets
from fastedit.editing.tokens import encode_with_lookup, target_ids
from fastedit.errors import EditError, FastEditError, InputError
from fastedit.models import edit_output, get_adapter, tiny_model
from fastedit.models.tiny import tiny_tokenizer
from fastedit.testing import assert_close

ARCHS = ["gpt2", "gptj", "llama"]
LAYER = 1
REQUESTS = [
    Request("{} is located in", "The Eiffel Tower", "Rome"),
    Request("The mother tongue of {} is", "Danielle Darrieux", "English"),
    Request("{} plays", "Michael Jordan", "the guitar"),
    Request("You know {}, the capital of", "Paris", "Italy"),
    Request("Because {} speaks", "Thomas", "French"),
]


def _baselines():
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "baselines.py"
    spec = importlib.util.spec_from_file_location("fastedit_bench_baselines", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _setup(arch, seed=None, dtype=torch.float64, templates=3):
    # A larger init than the default 0.02 makes the tiny models' predictions depend on δ, so the
    # loss falls steadily over the steps (early stops at different steps, clamping active).
    seed = int.from_bytes(os.urandom(2), "little") if seed is None else seed
    model = tiny_model(arch, dtype=dtype, seed=seed, initializer_range=0.2)
    tok = tiny_tokenizer(bos=arch == "llama")
    return model, tok, get_adapter(model), context_templates(model, tok, n=templates, length=3), seed


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_equals_one_at_a_time_and_the_reference_loop(arch):
    model, tok, ad, tpl, seed = _setup(arch, templates=2)
    reqs, steps = REQUESTS[:3], 5
    # Threshold halfway along the edit whose loss falls most, so edits stop at different steps;
    # a small clamp radius so that clamping is active.
    first = compute_targets(model, tok, ad, reqs, LAYER, templates=tpl, hparams=VStarParams(1, loss_stop=0.0))
    last = compute_targets(model, tok, ad, reqs, LAYER, templates=tpl,
                           hparams=VStarParams(steps, clamp_norm_factor=0.3, loss_stop=0.0))
    i = int((first.loss - last.loss).argmax())
    hp = VStarParams(steps, clamp_norm_factor=0.3, loss_stop=float(first.loss[i] + last.loss[i]) / 2)

    z_ref, steps_ref, loss_ref = _baselines().vstar_one_at_a_time(model, tok, ad, reqs, LAYER, templates=tpl,
                                                                   hparams=hp)
    assert len(set(steps_ref.tolist())) >= 2 and ((steps_ref > 0) & (steps_ref < steps - 1)).any(), (seed, steps_ref)
    runs = {
        "batched right": dict(padding_side="right"),
        "batched left": dict(padding_side="left"),
        "one at a time": dict(batched=False),
        "hook, left": dict(replay=False, padding_side="left"),
    }
    for name, kw in runs.items():
        t = compute_targets(model, tok, ad, reqs, LAYER, templates=tpl, hparams=hp, **kw)
        what = f"{arch} seed {seed} {name}"
        assert t.steps.tolist() == steps_ref.tolist(), what
        assert_close(t.z, z_ref, 1e-6, what)
        assert_close(t.delta, z_ref - t.h_init, 1e-6, what)
        assert_close(t.loss, loss_ref, 1e-6, what)
        torch.testing.assert_close(t.z, t.h_init + t.delta, rtol=0, atol=0)
    assert (t.delta.norm(dim=1) / t.h_init.norm(dim=1)).max() <= 0.3 * (1 + 1e-12)


@pytest.mark.parametrize("suffix", [False, True])
def test_cache_is_rebuilt_for_the_running_edits(suffix):
    model, tok, ad, tpl, seed = _setup("gpt2", templates=1)
    reqs, steps = REQUESTS[:4], 4
    first = compute_targets(model, tok, ad, reqs, LAYER, templates=tpl, hparams=VStarParams(1, loss_stop=0.0))
    top2 = first.loss.topk(2).values
    # All but the edit with the highest initial loss stop at once: from iteration 1 on, one edit of
    # four runs, so the replay cache is recorded again for it alone.
    hp = VStarParams(steps, loss_stop=float(top2.mean()))
    forwards = []
    handle = model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        t = compute_targets(model, tok, ad, reqs, LAYER, templates=tpl, hparams=hp, suffix=suffix)
    finally:
        handle.remove()
    assert t.path == ("suffix" if suffix else "replay")
    assert sorted(t.steps.tolist())[:3] == [0, 0, 0] and t.steps.max() > 0
    # the readout check; the first recording (iteration 0's forward) and the one for the running
    # edit. The suffix path checks itself on one edit first (a full forward, then the prefix and
    # suffix passes) and each of its recordings is two passes (prefix, suffix).
    assert len(forwards) == (1 + 3 + 2 + 2 if suffix else 3)
    z_ref, steps_ref, _ = _baselines().vstar_one_at_a_time(model, tok, ad, reqs, LAYER, templates=tpl, hparams=hp)
    assert t.steps.tolist() == steps_ref.tolist()
    assert_close(t.z, z_ref, 1e-6, f"seed {seed} rebuilt cache")


def test_step_count_semantics():
    model, tok, ad, tpl, seed = _setup("llama", templates=2)
    reqs = REQUESTS[:3]
    one = compute_targets(model, tok, ad, reqs, LAYER, templates=tpl, hparams=VStarParams(1, loss_stop=0.0))
    assert one.steps.tolist() == [0] * len(reqs)
    assert torch.equal(one.delta, torch.zeros_like(one.delta)) and torch.equal(one.z, one.h_init)
    torch.testing.assert_close(one.loss, one.nll, rtol=1e-12, atol=0)  # KL and decay vanish at δ = 0
    stop_now = compute_targets(model, tok, ad, reqs, LAYER, templates=tpl,
                               hparams=VStarParams(5, loss_stop=1e9))
    assert stop_now.steps.tolist() == [0] * len(reqs)
    # With a tiny radius every step ends clamped: all edits end on the ball, as in the reference loop.
    hp = {"v_num_grad_steps": 4, "loss_stop": 0.0, "clamp_norm_factor": 0.02}
    full = compute_targets(model, tok, ad, reqs, LAYER, templates=tpl, hparams=hp, padding_side="left")
    assert full.steps.tolist() == [3] * len(reqs)
    assert_close(full.delta.norm(dim=1), 0.02 * full.h_init.norm(dim=1), 1e-12, "clamped norms")
    z_ref, steps_ref, _ = _baselines().vstar_one_at_a_time(model, tok, ad, reqs, LAYER, templates=tpl, hparams=hp)
    assert steps_ref.tolist() == full.steps.tolist()
    assert_close(full.z, z_ref, 1e-6, f"seed {seed} clamped")


def _manual_loss(model, tok, ad, tpl, req, delta, hp):
    """Loss of one edit at a given δ from single-prompt forwards (no batching, no padding)."""
    tgt = target_ids(tok, req.target_new)

    def run(template, d, appended=()):
        ids, at = encode_with_lookup(tok, template, req.subject)
        ids = torch.tensor([ids + list(appended)])

        def add(h):
            h = h.clone()
            h[0, at] += d
            return h

        with edit_output(ad.block(LAYER), add):
            return model(input_ids=ids).logits[0].log_softmax(-1), at, len(ids[0]) - len(appended) - 1

    nlls = []
    for t in flatten(tpl):
        logp, _, start = run(t.replace("{}", req.prompt), delta, tgt[:-1])
        nlls.append(-torch.stack([logp[start + k, tok_id] for k, tok_id in enumerate(tgt)]).mean())
    nll = torch.stack(nlls).mean()
    init, at, _ = run(KL_PROMPT, torch.zeros_like(delta))
    cur, _, _ = run(KL_PROMPT, delta)
    p, q = init[at], cur[at]
    kl_cur_init = (q.exp() * (q - p)).sum()
    kl_init_cur = (p.exp() * (p - q)).sum()
    ids, at0 = encode_with_lookup(tok, flatten(tpl)[0].replace("{}", req.prompt), req.subject)
    with torch.no_grad():
        h0 = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0, at0]
    decay = hp.v_weight_decay * delta.norm() / h0.norm() ** 2
    return nll, kl_cur_init, kl_init_cur, decay


def test_loss_formula_and_kl_direction():
    model, tok, ad, tpl, seed = _setup("gptj", templates=2)
    hp = VStarParams(3, kl_factor=1.0, loss_stop=0.0)
    t = compute_targets(model, tok, ad, REQUESTS[:2], LAYER, templates=tpl, hparams=hp, padding_side="left")
    for i, req in enumerate(REQUESTS[:2]):
        with torch.no_grad():
            nll, kl_fwd, kl_rev, decay = _manual_loss(model, tok, ad, tpl, req, t.delta[i], hp)
        assert_close(t.nll[i], nll, 1e-9, f"seed {seed} nll")
        assert_close(t.loss[i], nll + kl_fwd + decay, 1e-9, f"seed {seed} loss")
        assert abs(float(kl_fwd - kl_rev)) > 1e-6 * float(kl_fwd) and kl_fwd > 0
        assert not abs(float(t.loss[i] - (nll + kl_rev + decay))) < 1e-9 * float(t.loss[i])


def test_h_init_and_v0_are_the_reads_at_the_bare_prompt():
    model, tok, ad, tpl, seed = _setup("gpt2", templates=1)
    t = compute_targets(model, tok, ad, REQUESTS, 2, templates=tpl, hparams=VStarParams(2), progress=True)
    assert_close(t.h_init, block_outputs_at_lookup(model, tok, ad, REQUESTS, 2), 1e-12, "h_init")
    assert_close(t.v0, values_at_lookup(model, tok, ad, REQUESTS, 2), 1e-12, "v0")
    assert t.z.shape == t.delta.shape == t.v0.shape == (len(REQUESTS), ad.d) and t.z.dtype == torch.float64


def test_chunks_loss_layer_and_float32():
    model, tok, ad, tpl, seed = _setup("llama", templates=2)
    reqs, hp = [REQUESTS[1], REQUESTS[0], REQUESTS[3]], VStarParams(3, loss_stop=0.0)
    lengths = [len(tok(r.text)["input_ids"]) + len(target_ids(tok, r.target_new)) for r in reqs]
    assert lengths != sorted(lengths)  # chunks are formed by length: the edits get reordered
    whole = compute_targets(model, tok, ad, reqs, LAYER, templates=tpl, hparams=hp)
    chunked = compute_targets(model, tok, ad, reqs, LAYER, templates=tpl, hparams=hp, chunk_size=2)
    assert_close(chunked.z, whole.z, 1e-10, f"seed {seed} chunks")
    assert chunked.steps.tolist() == whole.steps.tolist()
    mid = compute_targets(model, tok, ad, reqs, LAYER, templates=tpl, hparams=hp, loss_layer=2)
    mid_hook = compute_targets(model, tok, ad, reqs, LAYER, templates=tpl, hparams=hp, loss_layer=2, replay=False)
    assert_close(mid_hook.z, mid.z, 1e-10, f"seed {seed} loss_layer=2")
    assert (mid.loss - whole.loss).abs().max() > 1e-3  # the loss is read elsewhere
    model32 = tiny_model("llama", seed=seed, initializer_range=0.2)
    t32 = compute_targets(model32, tok, get_adapter(model32), reqs, LAYER, templates=tpl, hparams=hp)
    assert t32.z.dtype == torch.float32
    assert_close(t32.z, whole.z, 1e-4, f"seed {seed} float32 vs float64")


def test_model_is_left_untouched():
    model, tok, ad, tpl, seed = _setup("gpt2", templates=1)
    params = dict(model.named_parameters())
    frozen = "transformer.wte.weight"
    params[frozen].requires_grad_(False)
    before = {k: v.detach().clone() for k, v in params.items()}
    compute_targets(model, tok, ad, REQUESTS[:2], LAYER, templates=tpl, hparams=VStarParams(3, loss_stop=0.0))
    for k, v in params.items():
        assert torch.equal(v.detach(), before[k]), k
        assert v.grad is None, k
        assert v.requires_grad == (k != frozen), k


def test_bad_inputs_and_failures():
    model, tok, ad, tpl, seed = _setup("llama")
    with pytest.raises(InputError, match="below the edited layer"):
        compute_targets(model, tok, ad, REQUESTS, 2, templates=tpl, loss_layer=1)
    with pytest.raises(InputError, match="v_num_grad_steps"):
        compute_targets(model, tok, ad, REQUESTS, 1, templates=tpl, hparams={"v_num_grad_steps": 0})
    with pytest.raises(InputError, match="out of range"):
        compute_targets(model, tok, ad, REQUESTS, 9, templates=tpl)
    with pytest.raises(InputError, match="chunk_size"):
        compute_targets(model, tok, ad, REQUESTS, 1, templates=tpl, chunk_size=0)
    with pytest.raises(InputError, match="templates"):
        compute_targets(model, tok, ad, REQUESTS, 1, templates=["{}"])
    model.train()
    with pytest.raises(InputError, match="eval"):
        compute_targets(model, tok, ad, REQUESTS, 1, templates=tpl)
    model.eval()
    # A model whose logits are not lm_head(final_norm(h)) is refused, not silently mis-optimised.
    handle = model.register_forward_hook(lambda mod, args, out: out.__setitem__("logits", out["logits"] * 2) or out)
    try:
        with pytest.raises(FastEditError, match="lm_head"):
            compute_targets(model, tok, ad, REQUESTS, 1, templates=tpl)
    finally:
        handle.remove()
    # A non-finite loss names the request (rows of request 1 onwards are poisoned).
    per_edit = len(flatten(tpl)) + 1

    def poison(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        if h.shape[0] > per_edit:
            h = h.clone()
            h[per_edit:] = float("nan")
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = ad.block(3).register_forward_hook(poison)
    try:
        with pytest.raises(EditError, match="request 1") as err:
            compute_targets(model, tok, ad, REQUESTS[:2], 1, templates=tpl)
        assert err.value.request_index == 1 and err.value.stage == "compute_targets"
    finally:
        handle.remove()
    assert all(p.requires_grad for p in model.parameters())


RAGGED = REQUESTS[:3] + [  # long and short prompts and targets: chunks of different widths
    Request("In the old town of Rome, the guitar of {} is", "Toko Yasuda", "Michael Jordan of Paris"),
    Request("{} is", "Italy", "Rome"),
]


def _gemma2(seed):
    import transformers

    cfg = transformers.Gemma2Config(vocab_size=97, hidden_size=48, intermediate_size=112, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                    max_position_embeddings=128, final_logit_softcapping=30.0,
                                    attn_logit_softcapping=50.0, initializer_range=0.2)
    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM(cfg).to(torch.float64).eval()


# Gemma 2's eager attention takes its softmax in float32 even for a float64 model, so two batch
# layouts of it agree to float32 rounding only.
SUFFIX_ARCHS = {"gpt2": 1e-9, "llama": 1e-9, "gemma2": 2e-5}


@pytest.mark.parametrize("arch", list(SUFFIX_ARCHS))
def test_suffix_path_equals_the_full_model(arch):
    """The suffix-only replay (prefix key/value cache, lookup-aligned layout) against the whole
    model run every step with a hook (replay=False): same steps, same z, also in chunks and
    with checkpointed blocks; a Gemma 2 model (post-MLP norm, soft-capped logits) included."""
    if arch == "gemma2":
        seed = int.from_bytes(os.urandom(2), "little")
        model, tok = _gemma2(seed), tiny_tokenizer(bos=True)
        ad, tpl = get_adapter(model), [["{}"], ["Paris is in Italy. {}", "The guitar. {}"]]
    else:
        model, tok, ad, tpl, seed = _setup(arch, templates=2)
    hp = VStarParams(3, clamp_norm_factor=0.3, loss_stop=0.0)
    full = compute_targets(model, tok, ad, RAGGED, LAYER, templates=tpl, hparams=hp, replay=False)
    tol, what = SUFFIX_ARCHS[arch], f"{arch} seed {seed}"
    one = compute_targets(model, tok, ad, RAGGED, LAYER, templates=tpl, hparams=hp, max_chunk_tokens=10 ** 6)
    assert one.path == "suffix" and one.chunks == 1 and full.path == "hook", what
    assert one.steps.tolist() == full.steps.tolist(), what
    assert_close(one.z, full.z, tol, what)
    assert_close(one.v0, full.v0, tol, what)
    assert_close(one.loss, full.loss, tol, what)
    # Chunks of about two edits, blocks recomputed in the backward pass.
    per_edit = len(flatten(tpl)) + 1
    chunked = compute_targets(model, tok, ad, RAGGED, LAYER, templates=tpl, hparams=hp, checkpoint=True,
                              max_chunk_tokens=2 * per_edit * 24)
    assert chunked.chunks >= 3, (what, chunked.chunks)
    assert chunked.steps.tolist() == full.steps.tolist(), what
    assert_close(chunked.z, full.z, tol, what)


def test_chunks_are_independent_bit_for_bit():
    """Each chunk is optimised on its own: chunked v* gives, bit for bit, what each chunk gives
    alone, and within float64 rounding what one chunk of every edit gives. Nothing of one edit
    reaches another (per-edit losses summed, per-edit Adam), but the CPU's float64 GEMM picks
    its kernel and blocking by the number of rows: F.linear(x[:M], W)[:2] differs in the last
    bits between M = 2 and M = 4 (and the attention's softmax by the padded width), so the same
    row in a batch of another shape rounds differently; the chunked and whole results differ by
    ~2e-15 even when every edit has the same widths. Bit for bit across chunk sizes would need
    a row-by-row GEMM, many times slower; the default path keeps batched GEMMs."""
    model, tok, ad, tpl, seed = _setup("llama", templates=2)
    hp = VStarParams(4, clamp_norm_factor=0.3, loss_stop=0.0)
    per_edit = len(flatten(tpl)) + 1
    budget = 2 * per_edit * 26
    chunked = compute_targets(model, tok, ad, RAGGED, LAYER, templates=tpl, hparams=hp, max_chunk_tokens=budget)
    whole = compute_targets(model, tok, ad, RAGGED, LAYER, templates=tpl, hparams=hp, max_chunk_tokens=10 ** 6)
    assert chunked.chunks >= 3 and whole.chunks == 1
    assert chunked.steps.tolist() == whole.steps.tolist()
    assert_close(chunked.z, whole.z, 1e-12, f"seed {seed}")
    assert_close(chunked.loss, whole.loss, 1e-12, f"seed {seed}")
    from fastedit.editing.targets import edit_widths, prompt_rows
    from fastedit.editing.tokens import length_chunks

    # The same packing, then each chunk's edits run alone, in the packing's order.
    rows, _ = prompt_rows(tok, RAGGED, flatten(tpl))
    groups = length_chunks(edit_widths(rows, per_edit, "lookup"), budget, group=per_edit)
    assert len(groups) == chunked.chunks
    for g in groups:
        alone = compute_targets(model, tok, ad, [RAGGED[i] for i in g], LAYER, templates=tpl, hparams=hp,
                                max_chunk_tokens=10 ** 6)
        for field in ("z", "delta", "h_init", "v0", "loss", "nll", "steps"):
            assert torch.equal(getattr(chunked, field)[g], getattr(alone, field)), (field, g, seed)
    # Checkpointing recomputes the same blocks: bit for bit the same.
    ckpt = compute_targets(model, tok, ad, RAGGED, LAYER, templates=tpl, hparams=hp, max_chunk_tokens=budget,
                           checkpoint=True)
    assert torch.equal(ckpt.z, chunked.z) and torch.equal(ckpt.loss, chunked.loss)


def test_suffix_path_falls_back_to_the_whole_replay(monkeypatch):
    """A model the prefix cache cannot serve (here: a cache that fails) gets the whole-batch
    replay, with the same result, and the result says so."""
    import fastedit.editing.targets as targets

    model, tok, ad, tpl, seed = _setup("gpt2", templates=1)
    hp = VStarParams(3, loss_stop=0.0)
    ok = compute_targets(model, tok, ad, REQUESTS[:3], LAYER, templates=tpl, hparams=hp)

    class Broken:
        def __init__(self, *args, **kwargs):
            raise TypeError("this model takes no cache")

    monkeypatch.setattr(targets, "PrefixCache", Broken)
    back = compute_targets(model, tok, ad, REQUESTS[:3], LAYER, templates=tpl, hparams=hp)
    assert ok.path == "suffix" and back.path == "replay"
    assert back.steps.tolist() == ok.steps.tolist()
    assert_close(back.z, ok.z, 1e-10, f"seed {seed}")
    with pytest.raises(InputError, match="max_chunk_tokens"):
        compute_targets(model, tok, ad, REQUESTS[:1], LAYER, templates=tpl, max_chunk_tokens=0)


def test_bfloat16_autocast_runs_only_the_upper_blocks_and_the_readout_in_bfloat16(monkeypatch):
    """autocast="bfloat16": the blocks above the edited layer and the readout run under autocast,
    the blocks up to it do not (h_init, v0 bit for bit those of the float32 run), δ stays float32
    and lands within bfloat16's reach of the float32 δ. Off (the default), nothing runs under
    autocast. Tolerances from 5 steps on random tiny float32 models (δ: 1-5e-2 measured)."""
    model, tok, ad, tpl, seed = _setup("llama", dtype=torch.float32, templates=2)
    hp = VStarParams(5, clamp_norm_factor=0.3, loss_stop=0.0)
    import fastedit.editing.targets as targets

    seen: dict = {}  # where the optimisation's forwards ran under autocast (not the checks before it)
    inside = []
    real = targets._optimise

    def optimise(*args, **kwargs):
        inside.append(True)
        try:
            return real(*args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(targets, "_optimise", optimise)

    def note(where):
        def hook(mod, args):
            if inside and torch.is_grad_enabled():  # not the no-gradient prefix passes
                seen.setdefault(where, set()).add(torch.is_autocast_enabled("cpu"))
        return hook

    handles = [ad.block(l).register_forward_pre_hook(note(l)) for l in range(ad.num_layers)]
    handles.append(ad.final_norm.register_forward_pre_hook(note("readout")))
    try:
        off = compute_targets(model, tok, ad, RAGGED, LAYER, templates=tpl, hparams=hp)
        assert all(v == {False} for v in seen.values()), seen
        seen.clear()
        on = compute_targets(model, tok, ad, RAGGED, LAYER, templates=tpl, hparams=hp, autocast="bfloat16")
        assert {k: v for k, v in seen.items() if k != "readout" and k <= LAYER} == {l: {False} for l in
                                                                                     range(LAYER + 1)}, seen
        assert all(seen[l] == {True} for l in range(LAYER + 1, ad.num_layers)) and seen["readout"] == {True}, seen
    finally:
        for h in handles:
            h.remove()
    assert not torch.is_autocast_enabled("cpu")
    what = f"seed {seed}"
    assert on.path == off.path == "suffix" and on.delta.dtype == torch.float32, what
    assert torch.equal(on.h_init, off.h_init) and torch.equal(on.v0, off.v0), what
    assert not torch.equal(on.delta, off.delta), what  # it did run in bfloat16
    assert_close(on.delta, off.delta, 0.2, what)
    assert_close(on.z, off.z, 0.05, what)
    assert_close(on.loss, off.loss, 1e-2, what)
    # the whole-model path and checkpointed replay take it too
    hook = compute_targets(model, tok, ad, RAGGED, LAYER, templates=tpl, hparams=hp, autocast=torch.bfloat16,
                           replay=False, checkpoint=True)
    assert_close(hook.delta, off.delta, 0.2, what)
    for bad in ("float16", "bf16", torch.float16, True):
        with pytest.raises(InputError, match="autocast"):
            compute_targets(model, tok, ad, REQUESTS[:1], LAYER, templates=tpl, autocast=bad)


def test_bfloat16_autocast_leaves_a_float64_model_alone():
    model, tok, ad, tpl, seed = _setup("gpt2", templates=1)
    hp = VStarParams(3, loss_stop=0.0)
    off = compute_targets(model, tok, ad, REQUESTS[:2], LAYER, templates=tpl, hparams=hp)
    on = compute_targets(model, tok, ad, REQUESTS[:2], LAYER, templates=tpl, hparams=hp, autocast="bfloat16")
    assert torch.equal(on.z, off.z) and torch.equal(on.delta, off.delta), f"seed {seed}"


def test_default_budget_counts_prefix_columns_without_gradient(monkeypatch):
    """Without max_chunk_tokens the chunks come from a byte budget: a suffix-path edit costs its
    prefix columns at a no-gradient token's bytes and its suffix columns at a differentiated
    one's, so a chunk holds more edits than a flat token count would allow; results as one chunk."""
    from fastedit.editing import tokens
    from fastedit.editing.targets import edit_widths, prompt_rows

    model, tok, ad, tpl, seed = _setup("llama", templates=2)
    hp = VStarParams(3, clamp_norm_factor=0.3, loss_stop=0.0)
    P = len(flatten(tpl)) + 1
    widths = edit_widths(prompt_rows(tok, RAGGED, flatten(tpl))[0], P, "lookup")
    pre, suf = tokens.token_bytes(ad), tokens.token_bytes(ad, grad_layers=ad.num_layers - 1 - LAYER)
    assert suf > pre
    costs = [(a * pre, b * suf) for a, b in widths]
    budget = 2 * P * max(a + b for a, b in costs)  # about two edits a chunk
    monkeypatch.setattr(tokens, "CPU_BUDGET_BYTES", budget)
    got = compute_targets(model, tok, ad, RAGGED, LAYER, templates=tpl, hparams=hp)
    expected = tokens.length_chunks(costs, budget, group=P)
    assert got.chunks == len(expected) >= 2, (got.chunks, expected)
    for g in expected:
        assert len(g) == 1 or P * len(g) * (max(costs[i][0] for i in g) + max(costs[i][1] for i in g)) <= budget
    whole = compute_targets(model, tok, ad, RAGGED, LAYER, templates=tpl, hparams=hp, max_chunk_tokens=10 ** 6)
    assert got.steps.tolist() == whole.steps.tolist()
    assert_close(got.z, whole.z, 1e-12, f"seed {seed}")
