"""A small model that really knows a synthetic world, shipped with the package.

Pretrained weights are not needed to measure editing quality: :func:`load` returns a tiny
Llama (or GPT-2) trained on the world of :func:`world`, and :func:`records` returns
CounterFact- or zsRE-shaped records of facts that the shipped model completes correctly, so
every edit starts from a known true fact. Everything loads offline from
``fastedit/testbed/assets/<arch>/``.

    model, tok = fastedit.testbed.load("llama")
    recs = fastedit.testbed.records(100, format="counterfact")
"""
from __future__ import annotations

import json
import pathlib
import random
from functools import lru_cache
from typing import Iterator

from fastedit.errors import InputError
from fastedit.testbed.world import RELATIONS, World, filler_sentence, make_world

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
#: ``llama`` and ``gpt2``: 400 subjects (2400 facts); ``llama-2k``: the same Llama shape trained on a
#: world of 2000 subjects (12000 facts), long enough for sequential editing to reach collapse.
ARCHS = ("llama", "gpt2", "llama-2k")

#: What the editing methods rewrite in the testbed models: the MLP output projection of the
#: middle layers (the testbed analogue of MEMIT's critical layers).
EDIT_MODULES = {"llama": "model.layers.{}.mlp.down_proj", "gpt2": "transformer.h.{}.mlp.c_proj",
                "llama-2k": "model.layers.{}.mlp.down_proj"}

__all__ = ["load", "world", "records", "generic_corpus", "stats", "stats_cached", "training_info", "edit_layers", "shipped",
           "EDIT_MODULES", "World", "RELATIONS"]


def shipped() -> tuple[str, ...]:
    """The architectures whose trained weights are in this installation."""
    return tuple(a for a in ARCHS if (ASSETS / a / "config.json").is_file())


def _asset_dir(arch: str) -> pathlib.Path:
    if arch not in ARCHS:
        raise InputError(f"testbed arch must be one of {ARCHS}, got {arch!r}")
    path = ASSETS / arch
    if not (path / "config.json").is_file():
        raise InputError(f"the testbed model {arch!r} is not in this installation ({path} is missing); "
                         f"reinstall fastedit or run `fastedit testbed train --arch {arch} --out DIR`")
    return path


def load(arch: str = "llama", *, device=None, dtype=None):
    """The shipped testbed model and its tokenizer: ``(model, tokenizer)``, in eval mode.

    ``dtype`` defaults to float32 (the weights are stored in float16). Loads offline.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _asset_dir(arch)
    # Cast after loading (float16 -> float32 is exact) rather than through from_pretrained's
    # dtype argument, whose name and default differ between transformers 4 and 5.
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    model = model.to(device=device, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


@lru_cache(maxsize=4)
def training_info(arch: str = "llama") -> dict:
    """The shipped model's training record (seed, steps, measured top-1 accuracies)."""
    return json.loads((_asset_dir(arch) / "training.json").read_text())


def edit_layers(arch: str = "llama") -> list[int]:
    """The layers whose MLP output projection the editing methods rewrite in the testbed."""
    return list(json.loads((_asset_dir(arch) / "config.json").read_text())["fastedit_testbed"]["edit_layers"])


def world(seed: int | None = None, n_subjects: int | None = None, *, arch: str = "llama") -> World:
    """The synthetic world. Without ``seed`` and ``n_subjects``: the world the shipped ``arch``
    model was trained on (400 subjects for ``llama`` and ``gpt2``, 2000 for ``llama-2k``)."""
    if seed is None or n_subjects is None:
        info = training_info(arch)
        seed = info["seed"] if seed is None else seed
        n_subjects = info["n_subjects"] if n_subjects is None else n_subjects
    return make_world(seed, n_subjects=n_subjects)


def generic_corpus(n: int = 10_000, seed: int = 1, *, arch: str = "llama") -> Iterator[str]:
    """``n`` generic texts (world sentences mixed with filler) of ``arch``'s world, for
    covariance statistics."""
    return world(arch=arch).generic_texts(n, seed=seed)


#: Generic documents of the testbed statistics pass. C0 from 1000 documents (~16k tokens, d_k = 512)
#: differs from C0 from 5000 by a few percent (relative Frobenius), and the edits made with either
#: score the same, so the demo takes the smaller pass (a few seconds on a CPU).
STATS_DOCS = 1000


def _stats_request(arch: str, cache_dir, n_docs: int):
    from fastedit.stats.cache import default_cache_dir, layer_path, stats_dir

    if not isinstance(n_docs, int) or n_docs < 1:
        raise InputError(f"n_docs must be a positive int, got {n_docs!r}")
    cache_dir = default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir)
    name, corpus = f"fastedit-testbed-{arch}", f"testbed-generic-{n_docs}"
    return cache_dir, name, corpus, (lambda l: layer_path(stats_dir(cache_dir, name, corpus), l))


def stats_cached(arch: str = "llama", *, layers=None, cache_dir=None, n_docs: int = STATS_DOCS) -> bool:
    """Whether :func:`stats` would load every layer from the cache instead of computing it: a
    finished file of the current format for each layer (from the headers; a file of an older
    format, or a checkpoint, is recomputed by :func:`stats`, so it does not count)."""
    from fastedit.errors import CacheMismatchError
    from fastedit.stats.cache import check_directory

    _, _, _, path = _stats_request(arch, cache_dir, n_docs)
    layers = list(layers) if layers is not None else _stats_layers(arch)
    try:
        check_directory(path(layers[0]).parent, layers)
    except (InputError, CacheMismatchError, OSError, ValueError):
        return False
    return True


def _stats_layers(arch: str) -> list[int]:
    import json as _json

    n = _json.loads((_asset_dir(arch) / "config.json").read_text())
    n = n.get("num_hidden_layers", n.get("n_layer"))
    return list(range(n))


def stats(arch: str = "llama", *, model=None, tokenizer=None, layers=None, cache_dir=None,
          n_docs: int = STATS_DOCS, progress: bool = False) -> dict:
    """C0 of the testbed model: ``{layer: CovarianceAccumulator}`` for ``layers`` (default every
    layer, so any preset's layers are covered), from the real statistics pass
    (:func:`fastedit.stats.collect_stats`) over the first ``n_docs`` texts of
    :func:`generic_corpus`; ``.mean()`` is C0_l = Σ_t k_t k_tᵀ / #tokens, (d_k, d_k) float64.

    Cached on disk under ``cache_dir`` (default ``$FASTEDIT_CACHE_DIR/stats`` or
    ``~/.cache/fastedit/stats``), so the pass runs once per ``arch`` and ``n_docs``. ``model`` and
    ``tokenizer`` default to :func:`load` ``(arch)``; pass them to save loading twice.
    """
    from fastedit.stats import collect_stats
    from fastedit.stats.corpus import SequenceCorpus

    cache_dir, name, corpus, _ = _stats_request(arch, cache_dir, n_docs)
    if model is None or tokenizer is None:
        model, tokenizer = load(arch)
    layers = list(layers) if layers is not None else _stats_layers(arch)
    docs = SequenceCorpus(list(generic_corpus(n_docs, arch=arch)), name=corpus)
    return collect_stats(model, tokenizer, layers, docs, cache_dir=cache_dir, model_name=name, progress=progress)


def _known_by_object(w: World, known: set) -> dict:
    """(relation, object) -> the indices, in order, of the subjects whose known fact it is."""
    out: dict = {}
    for i, s in enumerate(w.subjects):
        for r in w.relations:
            if (i, r) in known:
                out.setdefault((r, w.facts[s][r]), []).append(i)
    return out


def _case(w: World, case_id: int, by_object: dict) -> dict:
    """The CounterFact record of one fact; everything in it is a function of the case id.
    ``by_object`` is :func:`_known_by_object` of the world and the known facts."""
    rels = list(w.relations)
    si, ri = divmod(case_id, len(rels))
    subject, relation = w.subjects[si], rels[ri]
    rel = w.relations[relation]
    true = w.facts[subject][relation]
    rng = random.Random(f"{w.seed}:{case_id}")
    new = rng.choice([o for o in rel["objects"] if o != true])
    same_true = [w.subjects[i] for i in by_object.get((relation, true), []) if i != si]
    same_new = [w.subjects[i] for i in by_object.get((relation, new), []) if i != si]
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": rel["rewrite"],
            "relation_id": relation,
            "subject": subject,
            "target_new": {"str": new, "id": f"{relation}:{new}"},
            "target_true": {"str": true, "id": f"{relation}:{true}"},
        },
        # As in CounterFact: an unrelated sentence, then the fact in another wording. The
        # wordings are the relation's held-out templates, never seen in training.
        "paraphrase_prompts": [filler_sentence(rng) + " " + t.format(subject)
                               for t in rng.sample(rel["heldout"], 2)],
        "neighborhood_prompts": [rng.choice(rel["train"]).format(s)
                                 for s in rng.sample(same_true, min(10, len(same_true)))],
        "attribute_prompts": [rng.choice(rel["train"]).format(s)
                              for s in rng.sample(same_new, min(10, len(same_new)))],
        "generation_prompts": [t.format(subject) for t in rel["generation"]]
                              + [rng.choice(r["generation"]).format(subject)
                                 for r in w.relations.values() if r is not rel][:3],
    }


def _zsre(w: World, rec: dict, known: list) -> dict:
    rr = rec["requested_rewrite"]
    rng = random.Random(f"{w.seed}:{rec['case_id']}:zsre")
    rel = w.relations[rr["relation_id"]]
    si, r = rng.choice([k for k in known if w.subjects[k[0]] != rr["subject"]])
    other = w.subjects[si]
    return {
        "case_id": rec["case_id"],
        "subject": rr["subject"],
        "src": rr["prompt"].format(rr["subject"]),
        "pred": rr["target_true"]["str"],
        "alt": rr["target_new"]["str"],
        "answers": [rr["target_new"]["str"]],
        "rephrase": rng.choice(rel["heldout"]).format(rr["subject"]),
        "loc": rng.choice(w.relations[r]["train"]).format(other),
        "loc_ans": w.facts[other][r],
        "cond": f"{rr['target_true']['str']} >> {rr['target_new']['str']} || {rr['prompt'].format(rr['subject'])}",
    }


def records(n: int | None = None, format: str = "counterfact", *, seed: int = 0,
            arch: str = "llama") -> list[dict]:
    """``n`` raw records (all known facts when ``n`` is None) of facts the shipped ``arch``
    model completes correctly on the rewrite prompt, drawn with ``seed``.

    ``format``: "counterfact" (ROME's fields) or "zsre" (MEND's fields). Case id
    ``subject_index * n_relations + relation_index`` fixes the record's content, so the same
    id means the same fact, target and prompts whatever ``n`` and ``seed`` are. Pass the
    result to :func:`fastedit.editing.requests.load_records` to normalise it.
    """
    if format not in ("counterfact", "zsre"):
        raise InputError(f"format must be 'counterfact' or 'zsre', got {format!r}")
    w = world(arch=arch)
    known_list = [(int(i), r) for i, r in json.loads((_asset_dir(arch) / "known.json").read_text())]
    known = set(known_list)
    rels = list(w.relations)
    ids = sorted(i * len(rels) + rels.index(r) for i, r in known_list)
    if n is not None:
        if not 0 < n <= len(ids):
            raise InputError(f"n must be between 1 and {len(ids)} (the facts the testbed model knows), got {n}")
        ids = sorted(random.Random(seed).sample(ids, n))
    by_object = _known_by_object(w, known)
    out = [_case(w, cid, by_object) for cid in ids]
    if format == "zsre":
        out = [_zsre(w, rec, known_list) for rec in out]
    return out
