"""Corpora for the statistics pass, and the seeded choice of which documents to read.

A corpus is a sized, indexable sequence of documents (``len`` and ``corpus[i]``) with a
``name`` recorded in the cache metadata. A document is a string, or an already tokenized
sequence of token ids. Sources:

- a Hugging Face ``datasets`` dataset: by name (``"wikipedia"`` -> ``("wikimedia/wikipedia",
  "20231101.en")`` and ``"wikitext"`` -> ``("Salesforce/wikitext", "wikitext-103-raw-v1")``, the
  hub's current homes of the references' corpora, or ``"name:config"``); a directory written by
  ``save_to_disk``; or a ``Dataset`` / ``DatasetDict`` (its ``split``) / ``IterableDataset``
  (``streaming=True``: read once, in order) object. ``datasets`` is imported only here;
- a local file: ``.jsonl`` (one JSON object per line, its ``text`` field) or any other
  extension read as text, one document per non-empty line. Only the line offsets are held
  in memory, so a corpus of any size streams;
- any Python sequence of documents (list, tuple, an already loaded dataset), or an iterable
  without a length (read once, in order: no random selection is possible there).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
from array import array
from typing import Iterable, Iterator, Sequence

import torch

from fastedit.errors import InputError

#: Dataset names the references use, with the hub dataset and configuration that hold them today. The
#: references loaded ("wikipedia", "20220301.en"), a loading script the hub no longer runs; the
#: wikimedia/wikipedia dump of 2023-11-01 is the nearest one (pass "name:config" for another dump).
KNOWN_DATASETS = {
    "wikipedia": ("wikimedia/wikipedia", "20231101.en"),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
}


class Corpus:
    """A sized, indexable corpus; ``corpus[i]`` is document ``i`` (a string or token ids)."""

    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int):
        raise NotImplementedError

    def documents(self, indices: Iterable[int]) -> Iterator:
        """Yield the documents at ``indices`` in that order, reading lazily."""
        for i in indices:
            yield self[i]

    def fingerprint(self, indices: Sequence[int]) -> str:
        """What the statistics cache keys the corpus content by: here the SHA-256 of the
        documents at ``indices`` (:func:`documents_digest`); subclasses use a cheaper identity
        of the whole content where they have one."""
        return "documents-sha256:" + documents_digest(self.documents(indices))


class SequenceCorpus(Corpus):
    """Documents held by any object with ``len`` and integer indexing (list, HF dataset)."""

    def __init__(self, docs: Sequence, name: str, text_field: str = "text"):
        self._docs = docs
        self.name = name
        self.text_field = text_field

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index: int):
        doc = self._docs[int(index)]
        if isinstance(doc, dict):
            if self.text_field not in doc:
                raise InputError(f"document {index} of corpus {self.name!r} has no field {self.text_field!r} "
                                 f"(fields: {', '.join(doc)}); pass text_field= to name the text field")
            doc = doc[self.text_field]
        return doc

    def fingerprint(self, indices: Sequence[int]) -> str:
        # A Hugging Face dataset's own fingerprint changes with its content and every transform.
        own = getattr(self._docs, "_fingerprint", None)
        if isinstance(own, str) and own:
            return f"datasets-fingerprint:{own}:{self.text_field}"
        return super().fingerprint(indices)


class FileCorpus(Corpus):
    """A local text or JSONL file, one document per non-empty line, read on demand."""

    def __init__(self, path: str | os.PathLike, *, text_field: str = "text", name: str | None = None):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise InputError(f"corpus file {str(self.path)!r} does not exist")
        self.jsonl = self.path.suffix.lower() in (".jsonl", ".ndjson")
        self.text_field = text_field
        self.name = name or self.path.name
        offsets = array("q")
        pos = 0
        content = hashlib.sha256()
        with open(self.path, "rb") as f:
            for line in f:
                content.update(line)
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        self._offsets = offsets
        self._sha256 = content.hexdigest()

    def fingerprint(self, indices: Sequence[int]) -> str:
        """The SHA-256 of the whole file (hashed while indexing its lines) and the text field."""
        return f"file-sha256:{self._sha256}" + (f":{self.text_field}" if self.jsonl else "")

    def __len__(self) -> int:
        return len(self._offsets)

    def _decode(self, line: bytes, index: int):
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise InputError(f"{self.path}: document {index} (at byte {self._offsets[int(index)] + exc.start}) is "
                             f"not UTF-8 text ({exc.reason}); convert the file to UTF-8, e.g. with iconv") from None
        if not self.jsonl:
            return text
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{self.path}: document {index} is not valid JSON ({exc}); a .jsonl corpus "
                             "holds one JSON object per line") from None
        if not isinstance(record, dict) or self.text_field not in record:
            raise InputError(f"{self.path}: document {index} has no field {self.text_field!r}; pass "
                             "text_field= (--text-field) to name the field that holds the text")
        text = record[self.text_field]
        if not isinstance(text, str):
            raise InputError(f"{self.path}: document {index} has a {type(text).__name__} in field "
                             f"{self.text_field!r}, not text; fix the record or pass text_field= for the text field")
        return text

    def __getitem__(self, index: int):
        with open(self.path, "rb") as f:
            f.seek(self._offsets[int(index)])
            return self._decode(f.readline(), index)

    def documents(self, indices: Iterable[int]) -> Iterator:
        with open(self.path, "rb") as f:
            for i in indices:
                f.seek(self._offsets[int(i)])
                yield self._decode(f.readline(), i)


_END = object()


class StreamCorpus:
    """An iterable without a length: read in order, with no random selection.

    ``fingerprint`` (e.g. a streamed dataset's name, revision and split) keys the statistics
    cache; without one the cache reads the documents twice (once to hash them), which needs an
    iterable that starts afresh on each ``iter()`` (a list, a dataset), not a one-shot iterator.
    """

    def __init__(self, docs: Iterable, name: str, *, fingerprint: str | None = None):
        self._docs = docs
        self.name = name
        self._fingerprint = fingerprint

    def fingerprint(self, take: int | None) -> str:
        """The cache key of the first ``take`` documents (None: all)."""
        if self._fingerprint is not None:
            return self._fingerprint
        if iter(self._docs) is self._docs:
            raise InputError(f"the corpus {self.name!r} is a one-shot iterator: its content cannot be checked "
                             "against the statistics cache without consuming it; pass a list, a file or a "
                             "dataset, or collect without cache_dir")
        return "documents-sha256:" + documents_digest(self.documents(0, take))

    def documents(self, skip: int = 0, take: int | None = None) -> Iterator:
        """Documents ``skip`` to ``take`` (exclusive; None: to the end) of a fresh iteration."""
        it = iter(self._docs)
        for _ in range(skip):
            if next(it, _END) is _END:
                return
        for n, doc in enumerate(it, start=skip):
            if take is not None and n >= take:
                return
            yield doc


class _Texts:
    """The text field of each row of an iterable dataset, re-iterable (a fresh pass per iter)."""

    def __init__(self, rows, text_field: str):
        self._rows, self._field = rows, text_field

    def __iter__(self):
        for i, row in enumerate(self._rows):
            if self._field not in row:
                raise InputError(f"row {i} has no field {self._field!r} (fields: {', '.join(row)}); pass text_field=")
            yield row[self._field]


def _is_hf(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets"


def hf_corpus(ds, *, split: str = "train", text_field: str = "text", name: str | None = None):
    """A corpus from a ``datasets`` object: ``Dataset`` -> sized corpus, ``DatasetDict`` /
    ``IterableDatasetDict`` -> its ``split``, ``IterableDataset`` -> a stream (read once, in order)."""
    if type(ds).__name__.endswith("DatasetDict"):
        if split not in ds:
            raise InputError(f"the dataset has no split {split!r} (splits: {', '.join(ds)}); pass split= (--split)")
        ds = ds[split]
    info = getattr(ds, "info", None)
    label = name or "/".join(x for x in (getattr(info, "dataset_name", None), getattr(info, "config_name", None),
                                         getattr(ds, "split", None) and str(ds.split)) if x) or "python"
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_field not in columns:
        raise InputError(f"dataset {label!r} has no column {text_field!r} (columns: {', '.join(columns)}); "
                         "pass text_field= (--text-field)")
    if hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        return SequenceCorpus(ds, label, text_field)
    return StreamCorpus(_Texts(ds, text_field), label)


def load_hf_dataset(name: str, config: str | None = None, *, split: str = "train", text_field: str = "text",
                    streaming: bool = False):
    """A Hugging Face dataset as a corpus (``datasets`` is an optional dependency): a hub name
    (``KNOWN_DATASETS`` maps the references' short names), or a ``save_to_disk`` directory.
    ``streaming`` reads the hub dataset as it downloads (a stream: read once, in order)."""
    try:
        import datasets
    except ImportError:
        raise InputError(f"reading the dataset {name!r} needs the optional package `datasets`: "
                         "pip install datasets (or pip install fastedit[datasets]), or pass a local "
                         ".txt/.jsonl file as the corpus") from None
    path = pathlib.Path(name)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        label = f"{path.name}/{split}" if type(ds).__name__.endswith("DatasetDict") else path.name
        return hf_corpus(ds, split=split, text_field=text_field, name=label)
    if config is None and name in KNOWN_DATASETS:
        name, config = KNOWN_DATASETS[name]
    ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    return hf_corpus(ds, split=split, text_field=text_field,
                     name=f"{name}/{config}/{split}" if config else f"{name}/{split}")


def is_saved_dataset(path) -> bool:
    """Whether ``path`` is a directory that ``datasets``' ``save_to_disk`` wrote."""
    path = pathlib.Path(path)
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def open_corpus(source, *, name: str | None = None, text_field: str = "text", split: str = "train"):
    """The corpus for ``source``: a :class:`Corpus`, a local file path, a dataset name
    (``"wikipedia"``, ``"wikitext"``, ``"name:config"``), or a Python sequence/iterable of
    documents. ``name`` overrides the name recorded in the cache metadata (default: the file
    name, the dataset name, or ``"python"`` for Python objects, which you should name if you
    cache them)."""
    if isinstance(source, (Corpus, StreamCorpus)):
        return source
    if _is_hf(source):
        return hf_corpus(source, split=split, text_field=text_field, name=name)
    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        if path.is_file():
            return FileCorpus(path, text_field=text_field, name=name)
        if path.is_dir():
            if not is_saved_dataset(path):
                raise InputError(f"corpus {str(source)!r} is a directory but not a saved dataset (save_to_disk); "
                                 "pass one .txt or .jsonl file or a dataset directory")
            corpus = load_hf_dataset(str(path), split=split, text_field=text_field)
            if name:
                corpus.name = name
            return corpus
        if isinstance(source, os.PathLike) or path.suffix.lower() in (".txt", ".jsonl", ".json", ".ndjson"):
            raise InputError(f"corpus file {str(source)!r} does not exist")
        dataset, _, config = str(source).partition(":")
        corpus = load_hf_dataset(dataset, config or None, split=split, text_field=text_field)
        if name:
            corpus.name = name
        return corpus
    if isinstance(source, (dict, bytes, bytearray)):
        raise InputError(f"corpus must be a file path, a dataset name or a sequence of documents, got a "
                         f"{type(source).__name__} (for a dict of documents pass list(d.values()))")
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return SequenceCorpus(source, name or "python", text_field)
    if hasattr(source, "__iter__"):
        return StreamCorpus(source, name or "python")
    raise InputError(f"corpus must be a file path, a dataset name or an iterable of documents, "
                     f"got {type(source).__name__}")


def select_documents(corpus_size: int, num_samples: int | None, seed: int) -> Sequence[int]:
    """The indices of the documents a pass reads: ``range(corpus_size)`` when ``num_samples``
    is None or not smaller than the corpus (no list held, whatever the corpus size), else
    ``num_samples`` distinct indices drawn uniformly with ``torch.randperm(corpus_size,
    generator=seeded(seed))``, as a list in increasing order so that files are read front to
    back. The same (size, num_samples, seed) always gives the same indices."""
    if num_samples is not None and num_samples <= 0:
        raise InputError(f"num_samples must be positive, got {num_samples}")
    if num_samples is None or num_samples >= corpus_size:
        return range(corpus_size)
    gen = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(corpus_size, generator=gen)[:num_samples]
    return chosen.sort().values.tolist()


def selection_digest(indices: Sequence[int]) -> str:
    """SHA-256 of the selected document indices (as int64 in little-endian order)."""
    data = array("q", indices)
    if sys.byteorder != "little":
        data.byteswap()
    return hashlib.sha256(data.tobytes()).hexdigest()


def documents_digest(docs: Iterable) -> str:
    """SHA-256 of a sequence of documents: each a string (UTF-8) or token ids (int64), with its
    kind and length, so no two different sequences hash alike by concatenation."""
    h = hashlib.sha256()
    for doc in docs:
        if isinstance(doc, str):
            data = doc.encode("utf-8", "surrogatepass")
            h.update(b"s%d:" % len(data) + data)
        else:
            ids = doc.tolist() if isinstance(doc, torch.Tensor) else list(doc)
            try:
                data = array("q", ids)
            except TypeError:
                raise InputError(f"a document must be a string or a sequence of token ids, got "
                                 f"{type(doc).__name__}") from None
            if sys.byteorder != "little":
                data.byteswap()
            h.update(b"i%d:" % len(data) + data.tobytes())
    return h.hexdigest()
