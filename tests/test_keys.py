import os

import pytest
import torch

from fastedit.editing.context import context_templates
from fastedit.editing.keys import block_outputs_at_lookup, compute_keys, values_at_lookup
from fastedit.editing.requests import Request
from fastedit.editing.tokens import encode_with_lookup
from fastedit.errors import InputError
from fastedit.models import capture, get_adapter, tiny_model
from fastedit.models.tiny import tiny_tokenizer
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
