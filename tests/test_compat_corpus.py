"""Statistics corpora from today's Hugging Face datasets: the hub names of the references'
corpora, in-memory Dataset / DatasetDict / IterableDataset objects and save_to_disk
directories, through open_corpus, collect_stats and the ``fastedit stats`` CLI. Skipped
cleanly when the optional ``datasets`` package is absent."""
import pytest
import torch

from fastedit.errors import InputError
from fastedit.models import tiny_model
from fastedit.stats import collect_stats, load_stats, open_corpus
from fastedit.stats.corpus import KNOWN_DATASETS, StreamCorpus

TEXTS = ["the city of Paris", "music of Bob Jones", "a small house", "north of the river and the lake",
         "one two three", "the old stone bridge", "gold and iron"]


def _tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in TEXTS for w in t.split()})
    tok = Tokenizer(models.WordLevel({w: i + 2 for i, w in enumerate(words)} | {"<pad>": 0, "<unk>": 1},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def test_reference_corpus_names_are_todays_hub_datasets():
    assert KNOWN_DATASETS == {"wikipedia": ("wikimedia/wikipedia", "20231101.en"),
                              "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1")}


def test_dataset_objects_and_saved_directories(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})
    dd = datasets.DatasetDict({"train": ds, "validation": ds.select([1, 3])})
    c = open_corpus(ds, name="mine")
    assert len(c) == len(TEXTS) and c[4] == TEXTS[4] and c.name == "mine"
    assert list(open_corpus(dd, split="validation").documents(range(2))) == [TEXTS[1], TEXTS[3]]
    with pytest.raises(InputError, match="no split 'test'.*train, validation"):
        open_corpus(dd, split="test")
    with pytest.raises(InputError, match="no column 'body'"):
        open_corpus(ds, text_field="body")
    stream = open_corpus(ds.to_iterable_dataset())
    assert isinstance(stream, StreamCorpus)
    assert list(stream.documents()) == TEXTS and list(stream.documents(2, 4)) == TEXTS[2:4]
    ds.save_to_disk(str(tmp_path / "one"))
    dd.save_to_disk(str(tmp_path / "two"))
    assert [open_corpus(str(tmp_path / "one"))[i] for i in range(len(TEXTS))] == TEXTS
    assert open_corpus(str(tmp_path / "two"), split="validation")[1] == TEXTS[3]
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a saved dataset"):
        open_corpus(str(tmp_path / "plain"))


def test_collect_stats_api_and_cli_read_datasets_like_a_list(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from fastedit.cli import main

    tok = _tok()
    model = tiny_model("llama", vocab_size=64)
    kw = dict(max_length=16, progress=False)
    want = collect_stats(model, tok, [1], TEXTS, **kw)[1]
    ds = datasets.Dataset.from_dict({"text": TEXTS})
    for source in (ds, datasets.DatasetDict({"train": ds}), ds.to_iterable_dataset()):
        got = collect_stats(model, tok, [1], source, **kw)[1]
        assert got.count == want.count and torch.equal(got.sum, want.sum)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    argv = ["stats", "--model", str(tmp_path / "model"), "--layers", "1", "--corpus", str(tmp_path / "saved"),
            "--max-length", "16", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    got = load_stats(tmp_path / "cache", str(tmp_path / "model"), [1], "saved/train", dtype="float32")[1]
    assert got.count == want.count
    torch.testing.assert_close(got.sum, want.sum, rtol=1e-6, atol=1e-6)
