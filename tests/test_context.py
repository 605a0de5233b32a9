import json

import pytest

from fastedit.editing import context
from fastedit.editing.context import SEED_WORDS, check_templates, context_templates, flatten
from fastedit.errors import InputError
from fastedit.models import tiny_model
from fastedit.models.tiny import tiny_tokenizer


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.fixture
def llama():
    return tiny_model("llama", seed=3)


def test_structure_seeds_and_determinism(llama):
    tok = tiny_tokenizer()
    t = context_templates(llama, tok, n=7, length=4, seed=11, cache=False)
    assert t[0] == ["{}"] and len(t) == 2 and len(t[1]) == 7
    flat = flatten(t)
    assert flat[0] == "{}" and len(flat) == 8
    check_templates(t)
    # Seed words in the reference's order, the first n % 5 of them once more.
    seeds = ["The", "The", "Therefore", "Therefore", "Because", "I", "You"]
    assert all(g.startswith(s) for g, s in zip(t[1], seeds))
    for g, s in zip(t[1], seeds):
        assert g.endswith(". {}") and g.count("{") == 1 and g.count("}") == 1
        assert len(g) > len(s) + len(". {}")  # the seed word plus generated text
    assert context_templates(llama, tok, n=7, length=4, seed=11, cache=False) == t
    assert context_templates(llama, tok, n=7, length=4, seed=12, cache=False) != t
    assert context_templates(llama, tok, n=0) == [["{}"]]
    five = context_templates(llama, tok, n=5, length=2, cache=False)[1]
    assert all(g.startswith(s) for g, s in zip(five, SEED_WORDS))


def test_braces_in_generated_text_are_removed(llama, monkeypatch):
    monkeypatch.setattr(context, "_sample", lambda model, tok, seeds, length, g: [s + " {x} }{" for s in seeds])
    t = context_templates(llama, tiny_tokenizer(), n=2, cache=False)
    assert t[1] == ["The  x    . {}", "Therefore  x    . {}"]


def test_memory_and_disk_cache(llama, tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    llama.config._name_or_path = "tiny/llama-test"
    calls, handle = _count_forwards(llama)
    try:
        first = context_templates(llama, tok, n=3, length=3, seed=5, cache_dir=tmp_path)
        assert len(calls) == 3  # one forward per new token
        files = list((tmp_path / "context_templates").glob("*.json"))
        assert len(files) == 1 and json.loads(files[0].read_text()) == first
        assert context_templates(llama, tok, n=3, length=3, seed=5, cache_dir=tmp_path) == first
        assert len(calls) == 3  # memory hit
        monkeypatch.setattr(context, "_MEMORY", {})
        assert context_templates(llama, tok, n=3, length=3, seed=5, cache_dir=tmp_path) == first
        assert len(calls) == 3  # disk hit
        # Another random model with the same name is not served the first model's templates.
        other = tiny_model("llama", seed=4)
        other.config._name_or_path = "tiny/llama-test"
        assert context_templates(other, tok, n=3, length=3, seed=5, cache_dir=tmp_path) != first
    finally:
        handle.remove()


def test_bad_arguments(llama):
    tok = tiny_tokenizer()
    with pytest.raises(InputError, match="n "):
        context_templates(llama, tok, n=-1)
    with pytest.raises(InputError, match="length"):
        context_templates(llama, tok, length=0)
    for bad in ([], ["{}"], [["no slot"]], [[]], "{}"):
        with pytest.raises(InputError):
            check_templates(bad)
