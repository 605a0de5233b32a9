"""The covariance pass against explicit per-document hooks, its cache, resume, CLI and ranks."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from fastedit.errors import CacheMismatchError, InputError
from fastedit.models import capture, get_adapter, tiny_model
from fastedit.stats import collect_stats, layer_covariance, load_stats, open_corpus, read_reference_npz
from fastedit.stats import select_documents
from fastedit.stats.batching import pack, prefetch
from fastedit.testing import assert_close, rel_error

ARCHS = ["gpt2", "gptj", "llama"]
VOCAB = 97


def word_tokenizer(padding_side="right", bos=True):
    """A word-level tokenizer over "w0".."w93" (ids 3..96); <pad>=0, <s>=1 prepended like Llama's BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="<unk>",
                                   padding_side=padding_side)


def random_docs(gen, n, max_words=29):
    lengths = torch.randint(0, max_words + 1, (n,), generator=gen).tolist()
    return [" ".join(f"w{int(w)}" for w in torch.randint(0, VOCAB - 3, (k,), generator=gen)) for k in lengths]


def reference_stats(model, tokenizer, layers, docs, max_length):
    """One forward per document (no padding), float64 sums of the hooked rewrite inputs."""
    ad = get_adapter(model)
    sums = {l: torch.zeros(ad.d_k, ad.d_k, dtype=torch.float64) for l in layers}
    count = 0
    with torch.no_grad(), capture({l: ad.rewrite_module(l) for l in layers}, inputs=True) as keys:
        for doc in docs:
            ids = tokenizer(doc, truncation=True, max_length=max_length)["input_ids"]
            if not ids:
                continue
            model(input_ids=torch.tensor([ids]))
            count += len(ids)
            for l in layers:
                k = keys[l][0].to(torch.float64)
                sums[l] += k.T @ k
    return sums, count


@pytest.mark.parametrize("arch", ARCHS)
def test_one_pass_equals_per_document_float64_hooks(arch, gen):
    model = tiny_model(arch, dtype=torch.float64, seed=gen.initial_seed() % 1000)
    docs = random_docs(gen, 17)
    layers = [1, 3, 0]
    ref, count = reference_stats(model, word_tokenizer(), layers, docs, max_length=17)
    for side in ("right", "left"):
        stats = collect_stats(model, word_tokenizer(side), layers, docs, max_length=17, token_budget=53,
                              progress=False)
        assert list(stats) == layers
        for l in layers:
            assert stats[l].count == count
            assert_close(stats[l].sum, ref[l], 1e-10, f"{arch} layer {l} ({side} padding)")
            assert_close(stats[l].mean(), ref[l] / count, 1e-10)


def test_float32_pass_is_as_accurate_as_a_float32_per_layer_pass(gen):
    model64 = tiny_model("llama", dtype=torch.float64, seed=3)
    model32 = tiny_model("llama", dtype=torch.float32, seed=3)
    tok = word_tokenizer("left")
    docs = random_docs(gen, 19)
    ref, count = reference_stats(model64, tok, [2], docs, max_length=25)
    # The references' way: one fp32 forward per batch, fp32 running sum of the keys.
    ad = get_adapter(model32)
    fp32 = torch.zeros(ad.d_k, ad.d_k)
    with torch.no_grad(), capture({2: ad.rewrite_module(2)}, inputs=True) as keys:
        for doc in docs:
            ids = tok(doc, truncation=True, max_length=25)["input_ids"]
            model32(input_ids=torch.tensor([ids]))
            fp32 += keys[2][0].T @ keys[2][0]
    ours = collect_stats(model32, tok, [2], docs, max_length=25, token_budget=100, progress=False)[2]
    assert ours.count == count
    assert rel_error(ours.sum, ref[2]) <= 2 * rel_error(fp32, ref[2]) + 1e-12


def test_token_ids_corpus_and_truncation_count(gen):
    model = tiny_model("gpt2", dtype=torch.float64)
    docs = [torch.randint(0, VOCAB, (int(n),), generator=gen).tolist() for n in torch.randint(1, 40, (9,), generator=gen)]
    stats = collect_stats(model, None, [2], docs, max_length=16, token_budget=16, progress=False)
    assert stats[2].count == sum(min(len(d), 16) for d in docs)
    ref = torch.zeros(stats[2].d_k, stats[2].d_k, dtype=torch.float64)
    ad = get_adapter(model)
    with torch.no_grad(), capture({0: ad.rewrite_module(2)}, inputs=True) as keys:
        for d in docs:
            model(input_ids=torch.tensor([d[:16]]))
            ref += keys[0][0].T @ keys[0][0]
    assert_close(stats[2].sum, ref, 1e-10)
    assert_close(layer_covariance(model, None, 2, docs, max_length=16, progress=False), ref / stats[2].count, 1e-10)


def test_rewrite_template_override(gen):
    model = tiny_model("llama", dtype=torch.float64)
    docs = [torch.randint(0, VOCAB, (int(n),), generator=gen).tolist() for n in torch.randint(1, 20, (7,), generator=gen)]
    stats = collect_stats(model, None, [1], docs, max_length=20, rewrite="model.layers.{}.mlp.up_proj", progress=False)
    up = model.get_submodule("model.layers.1.mlp.up_proj")
    ref = torch.zeros(up.in_features, up.in_features, dtype=torch.float64)
    with torch.no_grad(), capture({0: up}, inputs=True) as keys:
        for d in docs:
            model(input_ids=torch.tensor([d]))
            ref += keys[0][0].T @ keys[0][0]
    assert stats[1].d_k == 48
    assert_close(stats[1].sum, ref, 1e-10)


def test_pack_keeps_order_and_budget(gen):
    lists = [list(range(int(n))) for n in torch.randint(0, 12, (40,), generator=gen)]
    batches = list(pack(lists, 24, pad_id=5, padding_side="left"))
    rows = []
    prev_end = 0
    for b in batches:
        assert b.input_ids.numel() <= 24 and b.end > prev_end
        prev_end = b.end
        for r in range(b.input_ids.shape[0]):
            m = b.attention_mask[r].bool()
            rows.append(b.input_ids[r][m].tolist())
            assert b.position_ids[r][m].tolist() == list(range(int(m.sum())))
            assert (b.input_ids[r][~m] == 5).all()
    assert rows == [x for x in lists if x] and prev_end == len(lists)
    with pytest.raises(InputError, match="token_budget"):
        list(pack([list(range(30))], 24))


def test_prefetch_keeps_order_raises_and_stops():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise InputError("bad document 1")

    with pytest.raises(InputError, match="bad document"):
        list(prefetch(failing()))
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = prefetch(endless(), depth=2)
    assert next(it) == 0
    it.close()  # the producer thread is stopped and joined, not left running
    assert len(produced) <= 5  # at most depth + 1 ahead of the consumer
    assert not any(t.name == "fastedit-stats-prefetch" for t in threading.enumerate())


def test_selection_is_seeded_distinct_and_recorded(tmp_path, gen):
    a = select_documents(1000, 37, seed=5)
    assert a == select_documents(1000, 37, seed=5) and a != select_documents(1000, 37, seed=6)
    assert len(set(a)) == 37 and a == sorted(a) and 0 <= a[0] and a[-1] < 1000
    assert list(select_documents(10, 50, seed=0)) == list(range(10)) == list(select_documents(10, None, seed=3))
    model = tiny_model("llama")
    docs = random_docs(gen, 30)
    collect_stats(model, word_tokenizer(), [1], docs, cache_dir=tmp_path, model_name="tiny", num_samples=11,
                  seed=4, max_length=16, progress=False)
    (record,) = (tmp_path / "tiny" / "python").glob("documents-*.json")
    assert json.loads(record.read_text())["indices"] == select_documents(30, 11, seed=4)
    picked = [docs[i] for i in select_documents(30, 11, seed=4)]
    direct = collect_stats(model, word_tokenizer(), [1], picked, max_length=16, progress=False)[1]
    cached = load_stats(tmp_path, "tiny", [1], "python", seed=4, num_samples=11)[1]
    assert cached.count == direct.count and torch.equal(cached.sum, direct.sum)


class Interrupt(Exception):
    pass


def _stop_at(batch):
    def on_batch(done, consumed):
        if done == batch:
            raise Interrupt
    return on_batch


def test_resume_after_interruption_is_bit_exact(tmp_path, gen):
    model = tiny_model("gptj")
    docs = random_docs(gen, 27)
    kw = dict(max_length=20, token_budget=40, checkpoint_every=3, model_name="tiny", progress=False)
    full = collect_stats(model, word_tokenizer(), [0, 2], docs, cache_dir=tmp_path / "a", **kw)
    with pytest.raises(Interrupt):
        collect_stats(model, word_tokenizer(), [0, 2], docs, cache_dir=tmp_path / "b", on_batch=_stop_at(7), **kw)
    assert not (tmp_path / "b" / "tiny" / "python" / "layer_0.safetensors").exists()
    seen = []
    resumed = collect_stats(model, word_tokenizer(), [0, 2], docs, cache_dir=tmp_path / "b",
                            on_batch=lambda done, consumed: seen.append(consumed), **kw)
    assert seen and seen[0] > 0  # it started after the checkpoint, not from document 0
    for l in (0, 2):
        assert resumed[l].count == full[l].count
        assert torch.equal(resumed[l].sum, full[l].sum)
    assert not (tmp_path / "b" / "tiny" / "python" / ".checkpoint").exists()
    again = collect_stats(model, word_tokenizer(), [2, 0], docs, cache_dir=tmp_path / "b",
                          on_batch=_stop_at(1), **kw)  # fully cached: no batch runs
    assert torch.equal(again[2].sum, full[2].sum)


def test_mismatched_or_partial_cache_is_refused(tmp_path, gen):
    model = tiny_model("llama")
    docs = random_docs(gen, 25)
    kw = dict(max_length=20, token_budget=40, checkpoint_every=2, model_name="tiny", progress=False,
              cache_dir=tmp_path)
    collect_stats(model, word_tokenizer(), [1], docs, seed=0, num_samples=20, **kw)
    with pytest.raises(CacheMismatchError, match="seed"):
        collect_stats(model, word_tokenizer(), [1], docs, seed=1, num_samples=20, **kw)
    with pytest.raises(CacheMismatchError, match="max_length"):
        collect_stats(model, word_tokenizer(), [1], docs, seed=0, num_samples=20, **{**kw, "max_length": 19})
    with pytest.raises(CacheMismatchError, match="num_samples"):
        load_stats(tmp_path, "tiny", [1], "python", num_samples=21)
    redone = collect_stats(model, word_tokenizer(), [1], docs, seed=1, num_samples=20, overwrite=True, **kw)
    assert load_stats(tmp_path, "tiny", 1, "python", seed=1)[1].count == redone[1].count
    # An interrupted run for layer 2 leaves a partial file; renamed as a finished one it is refused.
    with pytest.raises(Interrupt):
        collect_stats(model, word_tokenizer(), [2], docs, on_batch=_stop_at(3), **kw)
    (partial,) = (tmp_path / "tiny" / "python" / ".checkpoint").rglob("layer_2.partial-*.safetensors")
    partial.rename(tmp_path / "tiny" / "python" / "layer_2.safetensors")
    with pytest.raises(CacheMismatchError, match="complete"):
        load_stats(tmp_path, "tiny", [2], "python")
    # Resuming the interrupted run with another seed is refused too, naming the seed.
    (tmp_path / "tiny" / "python" / "layer_2.safetensors").unlink()
    with pytest.raises(CacheMismatchError, match="seed"):
        collect_stats(model, word_tokenizer(), [2], docs, seed=7, **kw)


def test_reference_npz_reader(tmp_path, gen):
    k = torch.randn(57, 13, generator=gen)
    mom2 = (k.T @ k).numpy().astype(np.float32)
    path = tmp_path / "transformer.h.3.mlp.c_proj_float32_mom2_100000.npz"
    np.savez(path, **{"mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                      "mom2.count": np.array(57), "mom2.mom2": mom2, "sample_size": np.array(100000)})
    total, count = read_reference_npz(path)
    assert count == 57 and total.dtype == torch.float64
    assert torch.equal(total, torch.from_numpy(mom2).double())
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(InputError, match="mom2.mom2"):
        read_reference_npz(tmp_path / "other.npz")
    with pytest.raises(InputError, match="does not exist"):
        read_reference_npz(tmp_path / "missing.npz")


def test_file_corpora_and_errors(tmp_path, gen):
    docs = random_docs(gen, 9, max_words=6)
    docs = [d or "w1" for d in docs]
    (tmp_path / "c.txt").write_text("\n".join(docs[:4]) + "\n\n" + "\n".join(docs[4:]) + "\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    for name in ("c.txt", "c.jsonl"):
        corpus = open_corpus(tmp_path / name)
        assert len(corpus) == 9 and [corpus[i] for i in range(9)] == docs
        assert list(corpus.documents([7, 2])) == [docs[7], docs[2]]
    model = tiny_model("gpt2")
    from_file = collect_stats(model, word_tokenizer(), [1], str(tmp_path / "c.jsonl"), max_length=8, progress=False)
    from_list = collect_stats(model, word_tokenizer(), [1], docs, max_length=8, progress=False)
    assert torch.equal(from_file[1].sum, from_list[1].sum)
    from_stream = collect_stats(model, word_tokenizer(), [1], iter(docs), max_length=8, progress=False,
                                num_samples=5)
    assert from_stream[1].count == collect_stats(model, word_tokenizer(), [1], docs[:5], max_length=8,
                                                 progress=False)[1].count
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "w1"}) + "\n")
    with pytest.raises(InputError, match="text_field"):
        collect_stats(model, word_tokenizer(), [1], str(tmp_path / "bad.jsonl"), max_length=8, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        open_corpus(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="out of range"):
        collect_stats(model, word_tokenizer(), [4], docs, progress=False)
    with pytest.raises(InputError, match="token_budget"):
        collect_stats(model, word_tokenizer(), [1], docs, max_length=64, token_budget=32, progress=False)
    with pytest.raises(InputError, match="context length"):
        collect_stats(model, word_tokenizer(), [1], docs, max_length=1000, progress=False)
    with pytest.raises(InputError, match="model_name"):
        collect_stats(model, word_tokenizer(), [1], docs, cache_dir=tmp_path, max_length=8, progress=False)


def test_missing_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(InputError, match="pip install datasets"):
        open_corpus("wikipedia")


def test_cli_collects_into_the_cache_and_reports_errors(tmp_path, gen, capsys):
    from fastedit.cli import main

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    docs = random_docs(gen, 12)
    (tmp_path / "wiki.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    name = str(tmp_path / "model")
    argv = ["stats", "--model", name, "--layers", "1,3", "--corpus", str(tmp_path / "wiki.jsonl"),
            "--max-length", "24", "--token-budget", "96", "--cache-dir", str(tmp_path / "cache"),
            "--num-samples", "10", "--device", "cpu"]
    assert main(argv) == 0
    assert "layer 3:" in capsys.readouterr().out
    got = load_stats(tmp_path / "cache", name, [1, 3], "wiki.jsonl", num_samples=10, dtype="float32")
    picked = [docs[i] for i in select_documents(12, 10, seed=0)]
    ref, count = reference_stats(model, word_tokenizer(), [1, 3], picked, max_length=24)
    for l in (1, 3):
        assert got[l].count == count
        assert_close(got[l].sum, ref[l], 1e-5)
    assert main([*argv[:4], "7", *argv[5:]]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main([*argv, "--seed", "3"]) == 2
    assert "seed" in capsys.readouterr().err


_WORKER = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    from fastedit.models import tiny_model
    from fastedit.stats import collect_stats
    dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2)
    docs = [[(7 * i + 3 * j) % 97 for j in range(1 + (5 * i) % 19)] for i in range(29)]
    stats = collect_stats(tiny_model("llama", dtype=torch.float64), None, [0, 2], docs, max_length=16,
                          token_budget=32, num_samples=23, seed=2, progress=False,
                          cache_dir=sys.argv[2], model_name="tiny", checkpoint_every=2)
    torch.save({l: (a.sum, a.count) for l, a in stats.items()}, os.path.join(sys.argv[2], f"rank{sys.argv[1]}.pt"))
    dist.destroy_process_group()
""")


def test_two_gloo_ranks_equal_one_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(pathlib.Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    docs = [[(7 * i + 3 * j) % 97 for j in range(1 + (5 * i) % 19)] for i in range(29)]
    single = collect_stats(tiny_model("llama", dtype=torch.float64), None, [0, 2], docs, max_length=16,
                           token_budget=32, num_samples=23, seed=2, progress=False)
    cached = load_stats(tmp_path, "tiny", [0, 2], "python", num_samples=23, seed=2)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for l in (0, 2):
            assert got[l][1] == single[l].count == cached[l].count
            assert_close(got[l][0], single[l].sum, 1e-12, f"rank {r} layer {l}")
            assert torch.equal(cached[l].sum, got[l][0])
