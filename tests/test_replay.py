import os

import pytest
import torch

from fastedit.models import capture, edit_output, get_adapter, tiny_model
from fastedit.models.replay import logits_from_hidden, record_blocks

ARCHS = ["gpt2", "gptj", "llama"]


def _inputs(gen):
    ids = torch.randint(4, 97, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    mask[2, 7:] = 0  # a right-padded row
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_replay_equals_the_full_forward_and_its_gradient(arch):
    seed = int.from_bytes(os.urandom(2), "little")
    gen = torch.Generator().manual_seed(seed)
    model = tiny_model(arch, dtype=torch.float64, seed=seed)
    ad = get_adapter(model)
    inputs = _inputs(gen)
    layer, last = 1, ad.num_layers - 1
    with torch.no_grad(), capture({"h": ad.block(layer), "last": ad.block(last)}) as got, \
            record_blocks(ad, layer + 1, last) as replay:
        logits = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    same = replay.run(got["h"])
    torch.testing.assert_close(same[mask], got["last"][mask], rtol=0, atol=0)
    torch.testing.assert_close(logits_from_hidden(ad, same)[mask], logits[mask], rtol=1e-12, atol=1e-12)

    # An offset on block `layer`'s output: the replayed logits and their gradient equal the
    # model's own forward with the offset added by a hook.
    offset = torch.randn(got["h"].shape, dtype=torch.float64, generator=gen, requires_grad=True)
    weights = torch.randn(logits.shape, dtype=torch.float64, generator=gen) * mask[..., None]
    ours = logits_from_hidden(ad, replay.run(got["h"] + offset))
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), offset)
    with edit_output(ad.block(layer), lambda h: h + offset):
        theirs = model(**inputs).logits
    (g_theirs,) = torch.autograd.grad((theirs * weights).sum(), offset)
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12, msg=f"seed {seed}")


def test_replay_needs_a_recorded_pass():
    model = tiny_model("llama")
    ad = get_adapter(model)
    with record_blocks(ad, 2, 3) as replay:
        pass
    with pytest.raises(RuntimeError, match="not all run"):
        replay.run(torch.zeros(1, 2, ad.d))
