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


def test_lookup_layout_and_length_chunks():
    """The 'lookup' layout puts every lookup token in one column with the padding inside the
    row, before the lookup token; a float64 forward gives the same values as right padding."""
    from fastedit.editing.tokens import encode_rows, length_chunks

    tok = tiny_tokenizer(bos=True)
    rows = encode_rows(tok, [p for p, _ in CASES], [s for _, s in CASES], appended=[[5, 6]] * len(CASES))
    right = rows.pad(side="right", pad_id=0)
    mid = rows.pad(side="lookup", pad_id=0)
    assert len(set(mid.lookup.tolist())) == 1 and len(set(right.lookup.tolist())) > 1
    for b in range(len(CASES)):
        real = mid.input_ids[b][mid.attention_mask[b].bool()]
        assert real.tolist() == rows.ids[b]
        assert mid.input_ids[b, mid.lookup[b]] == rows.ids[b][rows.lookup[b]]
        assert mid.prompt_last[b] - mid.lookup[b] == rows.prompt_last[b] - rows.lookup[b]
        assert mid.attention_mask[b, 0] == 1  # no row starts with padding
    model = tiny_model("llama", dtype=torch.float64, seed=1)
    with torch.no_grad():
        a = model(**right.inputs()).logits
        c = model(**mid.inputs()).logits
    for b in range(len(CASES)):
        torch.testing.assert_close(c[b][mid.attention_mask[b].bool()], a[b][right.attention_mask[b].bool()],
                                   rtol=1e-12, atol=1e-12)

    widths = [(3, 5), (0, 9), (2, 4), (7, 1), (1, 5), (0, 30)]
    chunks = length_chunks(widths, 40, group=2)
    assert sorted(i for c in chunks for i in c) == list(range(len(widths)))
    for c in chunks:
        cost = 2 * len(c) * (max(widths[i][0] for i in c) + max(widths[i][1] for i in c))
        assert cost <= 40 or len(c) == 1
    assert [5] in chunks  # larger than the budget: alone
    assert length_chunks(widths, None) == [list(range(len(widths)))]
