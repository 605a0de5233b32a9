import pytest
import torch

from fastedit.errors import InputError
from fastedit.models import Layout, capture, edit_output, forward_until, get_adapter, tiny_model

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


# --------------------------------------------------------------------------- layouts and refusals
def test_capture_keeps_a_copy_when_the_model_changes_the_output_in_place():
    lin = torch.nn.Linear(3, 3)

    class AddsInPlace(torch.nn.Module):  # as Falcon's block: mlp_output += attention_output
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            y = self.lin(x)
            y += 1.0
            return y

    x = torch.randn(2, 3)
    with capture({"y": lin}) as got:
        AddsInPlace()(x)
    torch.testing.assert_close(got["y"], lin(x))


def test_lm_head_and_embedding_come_from_the_models_accessors():
    model = tiny_model("gpt_neox")  # transformers 5 names the head lm_head, 4.x embed_out
    ad = get_adapter(model)
    assert ad.lm_head is model.get_output_embeddings() and ad.embed is model.get_input_embeddings()
    assert ad.num_layers == model.config.num_hidden_layers


def test_a_family_without_a_built_in_layout_takes_one(tmp_path):
    import json

    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    torch.manual_seed(0)
    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=97, n_embd=32, n_layer=3, n_head=4,
                                                   n_positions=64)).eval()
    with pytest.raises(InputError, match="no built-in layout for model_type 'gpt_bigcode'"):
        get_adapter(model)
    fields = {"rewrite": "transformer.h.{}.mlp.c_proj", "final_norm": "transformer.ln_f"}
    path = tmp_path / "starcoder.json"
    path.write_text(json.dumps(fields))
    text = ",".join(f"{k}={v}" for k, v in fields.items())
    for layout in (fields, Layout(**fields), str(path), text):
        ad = get_adapter(model, layout)
        # block from the decoder layer list, head and embedding from the accessors
        assert (ad.layout.block, ad.layout.lm_head, ad.layout.embed) == ("transformer.h.{}", "lm_head",
                                                                         "transformer.wte")
        assert ad.num_layers == 3 and (ad.d, ad.d_k) == (32, 128)
    ids = torch.randint(0, 97, (2, 6))
    with capture({"last": ad.block(2)}) as out:
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(ad.logits(out["last"]), logits)
    with pytest.raises(InputError, match="unknown layout field"):
        get_adapter(model, {**fields, "rewrtie": "x"})
    with pytest.raises(InputError, match="field=template"):
        get_adapter(model, "transformer.h.{}.mlp.c_proj")


def test_cli_layout_option_parses_through_the_shared_helper():
    import argparse

    from fastedit.loading import add_layout_argument

    parser = argparse.ArgumentParser()
    add_layout_argument(parser)
    args = parser.parse_args(["--layout", "rewrite=model.layers.{}.mlp.up_proj,final_norm=model.norm"])
    assert args.layout == {"rewrite": "model.layers.{}.mlp.up_proj", "final_norm": "model.norm"}
    assert get_adapter(tiny_model("llama"), args.layout).d_k == 48
    with pytest.raises(SystemExit):
        parser.parse_args(["--layout", "nope=1"])
    from fastedit.editing import cli as edit_cli
    from fastedit.stats import cli as stats_cli

    for module, required in ((edit_cli, ["--model", "m", "--requests", "r", "--out", "o"]),
                             (stats_cli, ["--model", "m", "--layers", "1", "--corpus", "c"])):
        parser = argparse.ArgumentParser()
        module.configure(parser)
        assert parser.parse_args([*required, "--layout", "final_norm=model.norm"]).layout == {"final_norm": "model.norm"}


def _moe(kind):
    import transformers

    common = dict(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, num_experts_per_tok=1)
    if kind == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=2, **common))
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        num_experts=2, moe_intermediate_size=8, shared_expert_intermediate_size=12, **common))


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_is_refused_naming_the_block(kind):
    model = _moe(kind)
    with pytest.raises(InputError, match=r"model\.layers\.0\.mlp \(\w+\) is a mixture-of-experts MLP.*dense"):
        get_adapter(model)
    with pytest.raises(InputError, match="mixture-of-experts"):  # the shared expert is gated per token too
        get_adapter(model, rewrite="model.layers.{}.mlp.shared_expert.down_proj", final_norm="model.norm",
                    block="model.layers.{}")


def test_post_norm_opt_is_refused():
    with pytest.raises(InputError, match="do_layer_norm_before=False"):
        get_adapter(tiny_model("opt", do_layer_norm_before=False))


class Int8Params(torch.nn.Parameter):
    """Stands in for bitsandbytes' parameter class (matched by name, bitsandbytes not needed)."""


class Linear4bit(torch.nn.Linear):
    """Stands in for bitsandbytes' 4-bit linear layer."""


def test_quantised_meta_and_integer_weights_are_refused_before_anything_runs():
    model = tiny_model("llama")
    mlp = model.model.layers[2].mlp
    w = mlp.down_proj.weight
    mlp.down_proj.weight = Int8Params(w.detach().clone())
    with pytest.raises(InputError, match=r"'model\.layers\.2\.mlp\.down_proj\.weight' is quantised.*float32"):
        get_adapter(model)
    mlp.down_proj.weight = torch.nn.Parameter(w.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(InputError, match=r"model\.layers\.2\.mlp\.down_proj\.weight has dtype torch\.int8"):
        get_adapter(model)
    q = Linear4bit(w.shape[1], w.shape[0], bias=False)
    mlp.down_proj = q
    with pytest.raises(InputError, match=r"rewrite module 'model\.layers\.2\.mlp\.down_proj' is quantised"):
        get_adapter(model)
    mlp.down_proj = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    model.model.layers[3].self_attn.q_proj.to("meta")
    with pytest.raises(InputError, match=r"'model\.layers\.3\.self_attn\.q_proj\.weight' is on the meta device"):
        get_adapter(model)


def test_accelerate_offloaded_model_is_refused():
    accelerate = pytest.importorskip("accelerate")
    model = accelerate.cpu_offload(tiny_model("llama"), execution_device="cpu")
    with pytest.raises(InputError, match="meta device.*offloaded"):
        get_adapter(model)


def test_edit_and_stats_on_a_model_dispatched_by_accelerate_match_the_plain_model():
    """A device_map'ed model (accelerate's hooks on every block; all on the CPU here) edits and
    collects statistics exactly as the plain model."""
    accelerate = pytest.importorskip("accelerate")
    import _editing_world as W
    from fastedit import presets
    from fastedit.editing import Editor
    from fastedit.stats import collect_stats

    tok = W.tokenizer()
    plain, hooked = (tiny_model("llama", dtype=torch.float64, initializer_range=0.1) for _ in range(2))
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" for i in range(4)}}
    hooked = accelerate.dispatch_model(hooked, device_map=device_map, force_hooks=True)
    assert hasattr(hooked.model.layers[1], "_hf_hook")
    hp = presets.get("tiny").replace(layers=(1,), v_num_grad_steps=6)
    results = []
    original = get_adapter(plain).weight(1).clone()
    for model in (plain, hooked):
        stats = collect_stats(model, tok, [1], W.HELD, max_length=16, progress=False)
        Editor(model, tok, method="memit", hparams=hp, stats=stats, progress=False).edit(W.REQUESTS[:2])
        results.append((stats[1].mean(), get_adapter(model).weight(1).clone()))
    (C_plain, W_plain), (C_hooked, W_hooked) = results
    torch.testing.assert_close(C_hooked, C_plain, rtol=1e-12, atol=1e-14)
    assert not torch.equal(W_plain, original)
    torch.testing.assert_close(W_hooked, W_plain, rtol=1e-10, atol=1e-12)
