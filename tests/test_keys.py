import os

import pytest
import torch

from fastedit.editing.context import context_templates
from fastedit.editing.keys import block_outputs_at_lookup, compute_keys, values_at_lookup
from fastedit.editing.requests import Request
from fastedit.editing.tokens import encode_with_lookup
from fastedit.errors import InputError
from fastedit.models import capture, get_adapter, tiny_model
from fastedit.models.tiny import ARCHS as ALL_ARCHS, tiny_tokenizer
from fastedit.testing import assert_close

ARCHS = ["gpt2", "gptj", "llama"]
REQUESTS = [
    Request("{} is located in", "The Eiffel Tower", "Rome"),
    Request("The mother tongue of {} is", "Danielle Darrieux", "English"),
    Request("You know {}, the capital of", "Paris", "Italy"),
]


def _setup(arch):
    seed = int.from_bytes(os.urandom(2), "little")
    model = tiny_model(arch, dtype=torch.float64, seed=seed)
    tok = tiny_tokenizer(bos=arch != "gpt2")
    return model, tok, get_adapter(model), seed


def _single(model, tok, module, template, subject, *, inputs):
    """The module's input (or output) at the lookup token of one unpadded text."""
    ids, at = encode_with_lookup(tok, template, subject)
    with torch.no_grad(), capture({"m": module}, inputs=inputs) as got:
        model(input_ids=torch.tensor([ids]))
    return got["m"][0, at]


@pytest.mark.parametrize("arch", ARCHS)
def test_keys_are_the_two_level_template_average(arch):
    model, tok, ad, seed = _setup(arch)
    tpl = context_templates(model, tok, n=3, length=3)
    layers = [2, 0]
    got = compute_keys(model, tok, ad, REQUESTS, layers, templates=tpl, padding_side="left")
    assert sorted(got) == sorted(layers)
    for layer in layers:
        assert got[layer].shape == (ad.d_k, len(REQUESTS)) and got[layer].dtype == torch.float64
        for i, r in enumerate(REQUESTS):
            def key(t):
                return _single(model, tok, ad.rewrite_module(layer), t.replace("{}", r.prompt), r.subject, inputs=True)
            bare = key("{}")
            contexts = torch.stack([key(t) for t in tpl[1]]).mean(0)
            assert_close(got[layer][:, i], (bare + contexts) / 2, 1e-10, f"{arch} seed {seed} layer {layer} request {i}")
    chunked = compute_keys(model, tok, ad, REQUESTS, [2], templates=tpl, chunk_size=2)
    assert_close(chunked[2], got[2], 1e-10, "chunked keys")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_block_outputs_and_values_at_lookup(arch, side):
    model, tok, ad, seed = _setup(arch)
    layer = 1
    h = block_outputs_at_lookup(model, tok, ad, REQUESTS, layer, padding_side=side)
    v = values_at_lookup(model, tok, ad, REQUESTS, layer, padding_side=side)
    assert h.shape == v.shape == (len(REQUESTS), ad.d)
    for i, r in enumerate(REQUESTS):
        ids, at = encode_with_lookup(tok, r.prompt, r.subject)
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        assert_close(h[i], hidden[layer + 1][0, at], 1e-10, f"{arch} seed {seed} block output {i}")
        expected_v = _single(model, tok, ad.rewrite_module(layer), r.prompt, r.subject, inputs=False)
        assert_close(v[i], expected_v, 1e-10, f"{arch} seed {seed} value {i}")


def test_reads_stop_after_the_highest_layer():
    model, tok, ad, seed = _setup("llama")
    ran = []
    handle = ad.block(3).register_forward_hook(lambda *a: ran.append(3))
    try:
        compute_keys(model, tok, ad, REQUESTS, [1, 2], templates=[["{}"]])
        block_outputs_at_lookup(model, tok, ad, REQUESTS, 2)
        values_at_lookup(model, tok, ad, REQUESTS, 2)
    finally:
        handle.remove()
    assert ran == []


def test_float32_model_gives_float32_and_bad_inputs():
    model = tiny_model("gpt2")
    tok = tiny_tokenizer(bos=False)
    ad = get_adapter(model)
    assert compute_keys(model, tok, ad, REQUESTS, [1], templates=[["{}"]])[1].dtype == torch.float32
    with pytest.raises(InputError, match="layers is empty"):
        compute_keys(model, tok, ad, REQUESTS, [], templates=[["{}"]])
    with pytest.raises(InputError, match="out of range"):
        compute_keys(model, tok, ad, REQUESTS, [7], templates=[["{}"]])
    with pytest.raises(InputError, match="chunk_size"):
        block_outputs_at_lookup(model, tok, ad, REQUESTS, 1, chunk_size=0)
    with pytest.raises(InputError, match="no requests"):
        values_at_lookup(model, tok, ad, [], 1)
    model.train()
    with pytest.raises(InputError, match="eval"):
        compute_keys(model, tok, ad, REQUESTS, [1], templates=[["{}"]])


def test_token_budget_chunks_give_the_same_reads():
    model, tok, ad, seed = _setup("llama")
    tpl = [["{}"], ["Paris is in Italy. {}", "The guitar. {}"]]
    reqs = REQUESTS * 3
    whole = compute_keys(model, tok, ad, reqs, [1, 2], templates=tpl, max_chunk_tokens=10 ** 6)
    small = compute_keys(model, tok, ad, reqs, [1, 2], templates=tpl, max_chunk_tokens=40)
    for layer in (1, 2):
        assert_close(small[layer], whole[layer], 1e-12, f"seed {seed} keys layer {layer}")
    h = block_outputs_at_lookup(model, tok, ad, reqs, 2, max_chunk_tokens=10 ** 6)
    assert_close(block_outputs_at_lookup(model, tok, ad, reqs, 2, max_chunk_tokens=12), h, 1e-12, f"seed {seed}")
    with pytest.raises(InputError, match="max_chunk_tokens"):
        values_at_lookup(model, tok, ad, reqs, 2, max_chunk_tokens=-1)


def _count_blocks(ad):
    """Blocks computed, counted at their rewrite module (a skipped block calls none of its modules)."""
    ran = []
    handles = [ad.rewrite_module(l).register_forward_pre_hook(lambda *a, _l=l: ran.append(_l))
               for l in range(ad.num_layers)]
    return ran, handles


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_key_passes_of_successive_layers_reuse_the_lower_blocks_bit_for_bit(arch):
    """Layers 1 < 2 < 3 edited in turn: each key pass starts at the block the previous one left its
    hidden states at and gives, bit for bit (float64, one thread), the keys of a pass from the
    embeddings on the model as edited so far; 2 + 2 + 2 blocks run instead of 2 + 3 + 4."""
    import _editing_world as W
    from fastedit.editing.keys import HiddenCache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order for both passes
    try:
        model, tok = tiny_model(arch, dtype=torch.float64, initializer_range=0.1), W.tokenizer()
        ad, tpl, reqs = get_adapter(model), [["{}"], ["Paris is in Italy. {}", "The guitar. {}"]], W.REQUESTS * 2
        seed = int.from_bytes(os.urandom(2), "little")
        gen = torch.Generator().manual_seed(seed)
        cache, counts = HiddenCache(), []
        for layer in (1, 2, 3):
            ran, handles = _count_blocks(ad)
            try:
                reused = compute_keys(model, tok, ad, reqs, [layer], templates=tpl, cache=cache)[layer]
            finally:
                for h in handles:
                    h.remove()
            counts.append(len(ran))
            fresh = compute_keys(model, tok, ad, reqs, [layer], templates=tpl)[layer]
            assert torch.equal(reused, fresh), (arch, layer, seed)
            w = ad.weight_param(layer)
            with torch.no_grad():  # the edit of this layer
                w.add_(0.1 * w.norm() / w.numel() ** 0.5 * torch.randn(w.shape, generator=gen, dtype=w.dtype))
            cache.changed(layer)
        assert counts == [2, 2, 2] and (cache.blocks_run, cache.blocks_skipped) == (6, 3), (arch, counts)
    finally:
        torch.set_num_threads(threads)


def test_the_key_cache_keeps_what_fits_its_budget_and_drops_what_is_stale():
    """A budget that holds some chunks' states or none: those chunks start from the embeddings,
    the keys are the same; a cache for other prompts, or below whose start a layer changed, is
    not used."""
    from fastedit.editing.keys import HiddenCache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok, ad, seed = _setup("llama")
        tpl = [["{}"], ["Paris is in Italy. {}", "The guitar. {}"]]
        reqs = REQUESTS * 3
        ref = {l: compute_keys(model, tok, ad, reqs, [l], templates=tpl, max_chunk_tokens=40)[l] for l in (1, 2, 3)}
        whole = HiddenCache()
        compute_keys(model, tok, ad, reqs, [1], templates=tpl, max_chunk_tokens=40, cache=whole)
        chunks = len(whole.states)
        assert chunks > 2 and whole.nbytes > 0
        sizes = sorted(t.numel() * t.element_size() for t in whole.states.values())
        for budget, kept in ((0, 0), (sizes[0], 1), (None, chunks)):
            cache = HiddenCache(budget_bytes=budget)
            for layer in (1, 2, 3):
                got = compute_keys(model, tok, ad, reqs, [layer], templates=tpl, max_chunk_tokens=40, cache=cache)
                assert torch.equal(got[layer], ref[layer]), (budget, layer, seed)
                assert len(cache.states) == kept, (budget, layer)
            assert cache.blocks_skipped == 3 * kept, budget  # 1 block a kept chunk at layer 2, 2 at layer 3
        # other prompts: not used (and replaced); a change below the start: dropped
        cache = HiddenCache()
        compute_keys(model, tok, ad, reqs, [2], templates=tpl, cache=cache)
        other = compute_keys(model, tok, ad, REQUESTS, [3], templates=tpl, cache=cache)
        assert cache.blocks_skipped == 0 and cache.start == 3
        assert torch.equal(other[3], compute_keys(model, tok, ad, REQUESTS, [3], templates=tpl)[3])
        cache.changed(3)
        assert cache.start == 3
        cache.changed(1)
        assert cache.start is None and not cache.states
        with pytest.raises(InputError, match="budget_bytes"):
            HiddenCache(budget_bytes=-1)
    finally:
        torch.set_num_threads(threads)
