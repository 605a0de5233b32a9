import pytest
import torch

from fastedit.errors import InputError
from fastedit.models import capture, edit_output, forward_until, get_adapter, tiny_model

ARCHS = ["gpt2", "gptj", "llama"]


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_shapes_and_key_value_relation(arch):
    model = tiny_model(arch)
    ad = get_adapter(model)
    assert ad.num_layers == 4
    assert ad.transposed == (arch == "gpt2")
    d = model.config.hidden_size if arch == "llama" else model.config.n_embd
    assert ad.d == d and ad.d_k > d
    ids = torch.randint(0, 97, (2, 9))
    with capture({"k": ad.rewrite_module(2)}, inputs=True) as keys, capture({"v": ad.rewrite_module(2)}) as vals:
        model(input_ids=ids)
    k, v = keys["k"], vals["v"]
    assert k.shape == (2, 9, ad.d_k) and v.shape == (2, 9, ad.d)
    bias = getattr(ad.rewrite_module(2), "bias", None)
    expect = k @ ad.weight(2).T + (bias if bias is not None else 0)
    torch.testing.assert_close(v, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_view_edits_the_model(arch):
    model = tiny_model(arch)
    ad = get_adapter(model)
    before = ad.weight_param(1).detach().clone()
    dW = torch.randn(ad.d, ad.d_k)
    ad.weight(1).add_(dW)
    stored = ad.weight_param(1).detach()
    torch.testing.assert_close(stored - before, dW.T if ad.transposed else dW)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_output_offset_changes_logits_and_forward_until_stops(arch):
    model = tiny_model(arch)
    ad = get_adapter(model)
    ids = torch.randint(0, 97, (1, 7))
    base = model(input_ids=ids).logits
    with edit_output(ad.block(1), lambda h: h + 1.0):
        shifted = model(input_ids=ids).logits
    assert not torch.allclose(base, shifted)
    torch.testing.assert_close(model(input_ids=ids).logits, base)  # hook removed
    seen = []
    h = ad.block(3).register_forward_hook(lambda *a: seen.append(3))
    try:
        with capture({"b1": ad.block(1)}) as out:
            forward_until(model, ad.block(1), input_ids=ids)
    finally:
        h.remove()
    assert seen == [] and out["b1"].shape[:2] == (1, 7)


def test_final_norm_and_head_reproduce_logits():
    model = tiny_model("llama")
    ad = get_adapter(model)
    ids = torch.randint(0, 97, (1, 5))
    with capture({"last": ad.block(ad.num_layers - 1)}) as out:
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(ad.lm_head(ad.final_norm(out["last"])), logits, rtol=1e-5, atol=1e-5)


def test_overrides_and_errors():
    model = tiny_model("llama")
    with pytest.raises(InputError, match="out of range"):
        get_adapter(model).block(4)
    with pytest.raises(InputError, match="no module"):
        get_adapter(model, rewrite="model.layers.{}.mlp.nope")
    ad = get_adapter(model, rewrite="model.layers.{}.mlp.up_proj")
    assert (ad.d, ad.d_k) == (112, 48)

    class Odd(torch.nn.Module):
        pass

    with pytest.raises(InputError, match="no built-in layout"):
        get_adapter(Odd())
