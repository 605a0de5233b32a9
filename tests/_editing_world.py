"""A tiny word-level world for the editing tests: tokenizer, requests, held-out prompts, C0.

Every word is one token, so targets are single tokens and lookup positions are easy to see.
Shared by test_editor / test_methods / test_nas / test_regularizers (not a test module itself).
"""
from __future__ import annotations

import functools

import torch

from fastedit.editing import Request
from fastedit.models import capture, get_adapter, tiny_model

SPECIAL = ["<pad>", "<eos>", "<unk>"]
WORDS = ("the a of in is was to and lives works plays speaks city country language born capital "
         "Paris Rome Tokyo Berlin Madrid Oslo Lima Cairo French German Spanish Japanese Italian "
         "piano guitar violin drums football tennis chess Alice Bob Carol Dave Erin Frank Grace Heidi "
         "Smith Jones Brown Lee King Wright Green Hall river mountain lake forest house tower bridge "
         "red blue green black white one two three four five big small old new sun moon star sky "
         "river road stone wood gold iron day night north south east west music art film").split()
VOCAB = list(dict.fromkeys(SPECIAL + WORDS))
assert len(VOCAB) <= 97, len(VOCAB)

# The subject ends each prompt: in a random-init model the later layers route almost nothing
# from an earlier position to the predicting one, so v* can only steer the next token from there.
REQUESTS = [
    Request("the city of {}", "Alice Smith", "Tokyo", case_id=11),
    Request("music of {}", "Bob Jones", "violin", case_id=12),
    Request("the language of {}", "Carol Brown", "Japanese", case_id=13),
    Request("north of {}", "the old kingdom", "Lima", case_id=14),
]
MORE_REQUESTS = [
    Request("the house of {}", "Dave Lee", "Oslo", case_id=21),
    Request("born in {}", "Erin King", "Cairo", case_id=22),
    Request("the film of {}", "Frank Wright", "chess", case_id=23),
]
HELD = ["the sun is", "Grace Hall works", "a small house", "north of the river", "one two three",
        "the big stone bridge", "Heidi Green plays", "gold and iron", "the moon star", "west road of",
        "the new film", "music and art", "black white red", "a day in the", "the tower of",
        "Paris and Rome", "east of the lake", "German language is", "the old wood", "five big"]
HELD += [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (4,), generator=torch.Generator().manual_seed(s)))
         for s in range(200)]


@functools.lru_cache(maxsize=None)
def tokenizer():
    """A WordLevel Hugging Face fast tokenizer over :data:`VOCAB` (whitespace split, no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=128)


def model(arch: str, dtype=torch.float32, seed: int = 0):
    """A 4-layer random model; initializer_range 0.1 (not 0.02) so its next-token
    distributions are peaked enough for "keeps its top-1 prediction" to mean something."""
    extra = {"intermediate_size": 192} if arch == "llama" else {}  # d_k = 192 as GPT-2 / GPT-J's 4·48
    return tiny_model(arch, vocab_size=97, seed=seed, dtype=dtype, initializer_range=0.1, **extra)


def covariances(model, layers, *, n_seq: int = 256, seq_len: int = 16, seed: int = 1) -> dict:
    """{layer: C0} = per-token mean of k kᵀ (float64) over random token sequences, via explicit hooks."""
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL), len(VOCAB), (n_seq, seq_len), generator=g)
    mods = {l: ad.rewrite_module(l) for l in layers}
    with capture(mods, inputs=True) as keys, torch.no_grad():
        model(input_ids=ids)
    out = {}
    for l in layers:
        k = keys[l].reshape(-1, ad.d_k).to(torch.float64)
        out[l] = k.T @ k / k.shape[0]
    return out


def next_logits(model, tok, texts) -> torch.Tensor:
    """(len(texts), vocab) next-token logits after each text (one right-padded forward)."""
    ids = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    pad = tok.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    last = torch.tensor([len(x) - 1 for x in ids])
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits
    return logits[torch.arange(len(ids)), last]


def top1(model, tok, texts) -> list:
    """Greedy next token id after each text."""
    return next_logits(model, tok, texts).argmax(-1).tolist()


def firm(model, tok, texts, margin: float = 0.5) -> tuple[list, list]:
    """(texts whose top-1 logit leads the runner-up by >= margin, their top-1 ids). A random
    model's logits are flat: near-ties flip under any change, so preservation is measured on these."""
    lg = next_logits(model, tok, texts)
    top = lg.topk(2, dim=-1)
    keep = (top.values[:, 0] - top.values[:, 1]) >= margin
    return [t for t, k in zip(texts, keep) if k], top.indices[keep, 0].tolist()


def target_id(tok, r: Request) -> int:
    ids = tok(" " + r.target_new)["input_ids"]
    assert len(ids) == 1
    return ids[0]


def weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model, before: dict) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"parameter {n} changed"


def fresh_generator() -> torch.Generator:
    """A freshly seeded generator (the seed is printed, so a failure can be replayed)."""
    import os

    seed = int.from_bytes(os.urandom(4), "little")
    print(f"generator seed {seed}")
    return torch.Generator().manual_seed(seed)
