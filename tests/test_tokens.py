import os

import pytest
import torch

from fastedit.editing.tokens import encode_prompts, encode_with_lookup, fill_subject, target_ids
from fastedit.errors import InputError
from fastedit.models import tiny_model
from fastedit.models.tiny import tiny_tokenizer

CASES = [  # (prompt with {}, subject): subject at the start, in the middle, multi-token, before punctuation
    ("{} is located in", "The Eiffel Tower"),
    ("The mother tongue of {} is", "Danielle Darrieux"),
    ("You know {}, the capital", "Paris"),
    ("Because {}'s guitar is", "Toko Yasuda"),
    ("{}", "Michael Jordan"),
]


def _expected_lookup(tok, prompt, subject):
    """Index of the subject's last token: the length of the encoding of the text up to the end of
    the subject, minus one (valid for this tokenizer, which splits at spaces and punctuation)."""
    text, end = fill_subject(prompt, subject)
    return len(tok(text[:end])["input_ids"]) - 1


@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
def test_lookup_is_last_subject_token(bos, side):
    tok = tiny_tokenizer(bos=bos)
    batch = encode_prompts(tok, [p for p, _ in CASES], [s for _, s in CASES], padding_side=side)
    for b, (prompt, subject) in enumerate(CASES):
        ids = tok(fill_subject(prompt, subject)[0])["input_ids"]
        assert (ids[0] == tok.bos_token_id) == bos
        real = batch.input_ids[b][batch.attention_mask[b].bool()].tolist()
        assert real == ids
        pad = len(batch.input_ids[b]) - len(ids) if side == "left" else 0
        assert int(batch.lookup[b]) == pad + _expected_lookup(tok, prompt, subject)
        # The token at the lookup position carries the subject's last characters.
        last_word = subject.split()[-1]
        piece = tok.convert_ids_to_tokens(int(batch.input_ids[b, batch.lookup[b]])).removeprefix("##")
        assert last_word.endswith(piece)
        assert batch.position_ids[b, batch.attention_mask[b].bool()].tolist() == list(range(len(ids)))


def test_lookup_with_subject_merged_across_a_word_boundary():
    # A subject ending inside a token: the token holding its last character is the lookup.
    tok = tiny_tokenizer(bos=True)
    ids, at = encode_with_lookup(tok, "{}is here", "Par")  # "Paris" tokenises as 'Par', '##is'
    assert tok.convert_ids_to_tokens(ids[at]) == "Par"
    ids, at = encode_with_lookup(tok, "{}s here", "Pari")
    assert tok.convert_ids_to_tokens(ids)[at] == "##is"


@pytest.mark.parametrize("side", ["left", "right"])
def test_appended_target_follows_prompt(side):
    tok = tiny_tokenizer(bos=True)
    tgt = target_ids(tok, "the guitar")
    assert tgt and tok.bos_token_id not in tgt
    batch = encode_prompts(tok, ["{} plays", "The mother tongue of {} is"], ["Michael Jordan", "Danielle Darrieux"],
                           appended=[tgt[:-1], tgt], padding_side=side)
    for b, t in enumerate([tgt[:-1], tgt]):
        start = int(batch.prompt_last[b]) + 1
        assert batch.input_ids[b, start:start + len(t)].tolist() == t
        assert int(batch.attention_mask[b, start:].sum()) == len(t)


def test_padding_side_does_not_change_the_forward():
    # GPT-2 has learned absolute positions: left padding would shift them without position ids.
    model = tiny_model("gpt2", dtype=torch.float64, seed=int.from_bytes(os.urandom(2), "little"))
    tok = tiny_tokenizer(bos=False)
    outs = {}
    for side in ("left", "right"):
        batch = encode_prompts(tok, [p for p, _ in CASES], [s for _, s in CASES], padding_side=side)
        logits = model(**batch.inputs()).logits
        outs[side] = logits[torch.arange(len(batch)), batch.lookup]
    torch.testing.assert_close(outs["left"], outs["right"], rtol=1e-10, atol=1e-10)


def test_bad_inputs_are_refused():
    tok = tiny_tokenizer()
    with pytest.raises(InputError, match="exactly once"):
        encode_prompts(tok, ["no slot here"], ["Paris"])
    with pytest.raises(InputError, match="exactly once"):
        fill_subject("{} and {}", "Paris")
    with pytest.raises(InputError, match="empty subject"):
        fill_subject("{} is", "  ")
    with pytest.raises(InputError, match="one subject per prompt"):
        encode_prompts(tok, ["{} is"], ["a", "b"])
    with pytest.raises(InputError, match="padding_side"):
        encode_prompts(tok, ["{} is"], ["Paris"], padding_side="middle")
    with pytest.raises(InputError, match="no tokens"):
        target_ids(tok, "")

    class Slow:
        is_fast = False

    with pytest.raises(InputError, match="fast"):
        encode_with_lookup(Slow(), "{} is", "Paris")
