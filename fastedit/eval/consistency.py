"""Consistency of generated text: TF-IDF cosine with reference snippets about the new object.

The references ship two data files (from the ROME release):
- ``attribute_snippets.json``: a list of ``{"relation_id", "target_id", "samples": [{"text": ...}, ...]}``,
  Wikipedia snippets about each (relation, object) pair;
- ``idf.npy`` (float array, one idf per term) and ``tfidf_vocab.json`` (term -> index).

For a case with new object o (id ``target_new.id``) under relation r, with g the generations
joined by spaces and s the snippets of (r, o) joined by spaces,
    consistency = cos(tfidf(g), tfidf(s)),   tfidf(x)_t = count_t(x) · idf_t
over the vocabulary terms, where text is lowercased and split into runs of two or more word
characters (scikit-learn's default TfidfVectorizer analyser, which the references use).
"""
from __future__ import annotations

import json
import math
import pathlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from fastedit.errors import InputError

_TERM = re.compile(r"(?u)\b\w\w+\b")


@dataclass
class Snippets:
    """Reference snippets by relation and object id, and the TF-IDF weights to compare with."""

    texts: dict[str, dict[str, list[str]]]
    idf: list[float]
    vocab: dict[str, int]

    def tfidf(self, text: str) -> dict[int, float]:
        """Sparse tf-idf vector of ``text``: {term index: count · idf}."""
        counts = Counter(self.vocab[t] for t in _TERM.findall(text.lower()) if t in self.vocab)
        return {i: c * self.idf[i] for i, c in counts.items()}

    def similarity(self, text_a: str, text_b: str) -> float:
        """Cosine of the tf-idf vectors of two texts (0.0 when either has no known term)."""
        a, b = self.tfidf(text_a), self.tfidf(text_b)
        na = math.sqrt(sum(v * v for v in a.values()))
        nb = math.sqrt(sum(v * v for v in b.values()))
        if na == 0 or nb == 0:
            return 0.0
        return sum(v * b.get(i, 0.0) for i, v in a.items()) / (na * nb)

    def consistency(self, generations: list[str], relation_id: str, target_id: str) -> float | None:
        """TF-IDF cosine between the joined generations and the joined snippets of
        (relation_id, target_id); None when there are no snippets for that pair."""
        ref = self.texts.get(relation_id, {}).get(target_id)
        if not ref:
            return None
        return self.similarity(" ".join(generations), " ".join(ref))


def load_snippets(directory=None, *, snippets_file=None, idf_file=None, vocab_file=None) -> Snippets:
    """Read ``attribute_snippets.json``, ``idf.npy`` and ``tfidf_vocab.json`` from ``directory``
    (or from the three explicit paths). Raises InputError naming a missing or malformed file."""
    import numpy as np

    d = pathlib.Path(directory) if directory is not None else None
    paths = {
        "attribute snippets": pathlib.Path(snippets_file) if snippets_file else (d / "attribute_snippets.json" if d else None),
        "idf": pathlib.Path(idf_file) if idf_file else (d / "idf.npy" if d else None),
        "tf-idf vocabulary": pathlib.Path(vocab_file) if vocab_file else (d / "tfidf_vocab.json" if d else None),
    }
    for what, p in paths.items():
        if p is None or not p.is_file():
            raise InputError(f"{what} file {str(p)!r} not found; consistency needs attribute_snippets.json, "
                             "idf.npy and tfidf_vocab.json (the ROME release's data files)")
    try:
        raw = json.loads(paths["attribute snippets"].read_text(encoding="utf-8"))
        texts: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for el in raw:
            for sample in el["samples"]:
                texts[el["relation_id"]][el["target_id"]].append(sample["text"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{paths['attribute snippets']}: not an attribute snippets file (expected a list of "
                         f"{{relation_id, target_id, samples: [{{text}}]}}): {exc!r}") from None
    try:
        vocab = json.loads(paths["tf-idf vocabulary"].read_text(encoding="utf-8"))
        if not isinstance(vocab, dict):
            raise TypeError("expected a JSON object term -> index")
        vocab = {str(k): int(v) for k, v in vocab.items()}
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise InputError(f"{paths['tf-idf vocabulary']}: not a tf-idf vocabulary: {exc}") from None
    try:
        idf = np.load(paths["idf"]).astype(float).ravel().tolist()
    except (ValueError, OSError) as exc:
        raise InputError(f"{paths['idf']}: not a numpy idf array: {exc}") from None
    if vocab and max(vocab.values()) >= len(idf):
        raise InputError(f"tf-idf vocabulary has index {max(vocab.values())} but idf has only {len(idf)} "
                         "entries; the two files do not belong together")
    return Snippets({k: dict(v) for k, v in texts.items()}, idf, vocab)
