"""The covariance pass: C0 = E[k kᵀ] at the input of the rewrite module of several layers.

One forward pass over the corpus serves every requested layer: a pre-hook on each layer's
rewrite module adds its input keys k (b, L, d_k) to that layer's
:class:`~fastedit.linalg.CovarianceAccumulator` (padding masked out), and the forward stops
right after the rewrite module of the last requested layer, so nothing above it runs. The
references instead run one float32 pass per layer (ALGORITHMS.md, section 1).
"""
from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from typing import Callable

import torch

from fastedit import _io
from fastedit._hf import context_length, pad_id
from fastedit._version import __version__
from fastedit.errors import InputError
from fastedit.linalg import CovarianceAccumulator
from fastedit.models import forward_until, get_adapter
from fastedit.stats import batching, cache, distributed
from fastedit.stats.corpus import StreamCorpus, open_corpus, select_documents, selection_digest

#: Padded tokens per forward batch by default.
DEFAULT_TOKEN_BUDGET = 16384
#: Batches between checkpoints by default (only with a cache directory).
DEFAULT_CHECKPOINT_EVERY = 1000
#: Most seconds between checkpoints by default: a slow pass of few batches loses at most this.
DEFAULT_CHECKPOINT_SECONDS = 300.0


@contextlib.contextmanager
def _accumulate_inputs(adapter, modules: dict, accs: dict, mask_ref: list) -> None:
    """Pre-hooks adding each module's first input to its accumulator with the current mask.

    Updating inside the forward (rather than capturing and updating after it) frees each
    layer's keys as soon as they are counted, so memory holds one layer's keys at a time.
    """
    handles = []

    def make(layer):
        def hook(module, args):
            mask = mask_ref[0]
            accs[layer].update(adapter.as_tokens(args[0], mask.shape), mask.to(args[0].device))
        return hook

    try:
        for layer, module in modules.items():
            handles.append(module.register_forward_pre_hook(make(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


def _accepts(model, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _model_name(model, model_name):
    if model_name:
        return str(model_name)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return str(name)


class _Progress:
    """tqdm over documents, with tokens/s in the postfix; silent when disabled."""

    def __init__(self, enabled: bool, total: int | None, initial: int, desc: str):
        self.bar = None
        self.tokens = 0
        self.t0 = time.perf_counter()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="doc", dynamic_ncols=True)

    def step(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            self.bar.update(docs)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def collect_stats(model, tokenizer, layers, corpus, *, cache_dir=None, model_name: str | None = None,
                  revision: str | None = None, max_length: int | None = None,
                  token_budget: int = DEFAULT_TOKEN_BUDGET, num_samples: int | None = None, seed: int = 0,
                  checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                  checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS, overwrite: bool = False,
                  progress: bool = True, rewrite: str | None = None, layout=None, text_field: str = "text",
                  split: str = "train",
                  padding_side: str | None = None, backend: str | None = None,
                  on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Collect Σ k kᵀ and the token count at the rewrite-module input of each layer in ``layers``.

    For each layer l, the result's ``sum`` is S_l = Σ_t k_t k_tᵀ over every real (non-pad)
    token t of the selected documents, each truncated to ``max_length`` tokens (BOS included
    when the tokenizer adds one), ``count`` is the number of those tokens and ``mean()`` is
    C0_l = S_l / count, (d_k, d_k) float64. Keys are taken in the model's own dtype and
    device; the accumulator sums in float64.

    Args:
        model: a Hugging Face causal LM (the families of :data:`fastedit.models.LAYOUTS` are
            detected; otherwise pass ``layout`` or ``rewrite``, the rewrite-module name template,
            e.g. ``"model.layers.{}.mlp.down_proj"``). A model split over devices
            (``device_map``) keeps each layer's statistics on that layer's weight device.
        tokenizer: its tokenizer (``padding_side`` is taken from it), or None when the corpus
            holds token ids.
        layers: layer indices (an int or an iterable of ints).
        corpus: a local .txt/.jsonl file, a dataset name (``"wikipedia"``, ``"wikitext"``,
            ``"name:config"``; needs ``datasets``), a :class:`~fastedit.stats.corpus.Corpus`
            or any sequence/iterable of strings or token-id lists (see
            :func:`~fastedit.stats.corpus.open_corpus`).
        cache_dir: where finished statistics and checkpoints live (see
            :mod:`fastedit.stats.cache`); None computes without caching. With a cache, layers
            already collected for the same request (model identity and corpus content
            included) are loaded, the others computed in one pass, and an interrupted pass
            resumes from its last checkpoint. The directory is created before the pass.
        model_name, revision: recorded in (and checked against) the cache; ``model_name``
            defaults to ``config._name_or_path`` and is required with a cache; the revision
            recorded is ``config._commit_hash`` when the model has one, else ``revision``.
        max_length: truncation length; default the model's context length.
        token_budget: most padded tokens per forward batch (rows × longest row).
        num_samples, seed: read ``num_samples`` documents drawn with ``seed``
            (:func:`~fastedit.stats.corpus.select_documents`); None reads all.
        checkpoint_every, checkpoint_seconds: with a cache, a checkpoint is written after every
            ``checkpoint_every`` batches and whenever ``checkpoint_seconds`` have passed since
            the last one, so an interruption loses at most that much work. A resumed run is
            bit-identical to an uninterrupted one with the same ``token_budget`` (batches never
            cut a document, so they are the same wherever the pass restarts).
        overwrite: ignore (and replace) existing statistics and checkpoints.
        layout: the module layout (:func:`fastedit.models.get_adapter`: a Layout, a dict, a JSON
            file or ``"field=template,..."``), over the built-in one; ``rewrite`` over both.
        text_field, split: the text field of .jsonl/dataset records, and the dataset split.
        padding_side: "left" or "right" (default the tokenizer's); the result is the same.
        progress: show a tqdm bar (documents, ETA and tokens/s) on rank 0.
        backend: passed to CovarianceAccumulator (None picks the fastest).
        on_batch: called as ``on_batch(batches_done, documents_done)`` after each batch.

    Returns:
        dict layer -> CovarianceAccumulator (on that layer's weight device). Under torch.distributed
        each rank reads its shard and every rank returns the all-reduced totals.

    Raises:
        InputError: bad layers, corpus, lengths, budget or cache directory.
        CacheMismatchError: a cache or checkpoint exists for a different request (the field
            is named); use another ``cache_dir`` or ``overwrite=True``.
    """
    adapter = get_adapter(model, layout, rewrite=rewrite)
    layers = _check_layers(adapter, layers)
    max_length = _check_lengths(model, max_length, token_budget)
    _check_checkpointing(checkpoint_every, checkpoint_seconds)
    source = open_corpus(corpus, text_field=text_field, split=split)
    selection = _select(source, num_samples, seed)
    rank, world_size = distributed.world()
    request, layer_meta = _request(model, adapter, layers, source, selection, model_name=model_name,
                                   revision=revision, num_samples=num_samples, seed=seed, max_length=max_length,
                                   cached=cache_dir is not None)

    result, todo, directory, checkpoint = {}, list(layers), None, None
    if cache_dir is not None:
        if not str(cache_dir).strip():
            raise InputError("cache_dir is an empty string (which would write into the working directory); pass "
                             "a directory, or None to compute without caching")
        directory = cache.stats_dir(cache_dir, request["model"], source.name)
        _io.ensure_directory(directory, "the statistics cache directory")
        _io.remove_stale_temporaries(directory)
        if not overwrite:
            result = _load_cached(directory, layers, layer_meta, adapter)
            todo = [l for l in layers if l not in result]
        if not todo:
            return {l: result[l] for l in layers}
        checkpoint = cache.Checkpoint(directory, rank, world_size)
        if overwrite:
            checkpoint.clear()

    accs, consumed = _resume(checkpoint, todo, request, adapter, backend)
    docs, total = _shard(source, selection, consumed, num_samples, rank, world_size)
    consumed = _Pass(model, tokenizer, adapter, todo, token_budget=token_budget, max_length=max_length,
          padding_side=padding_side, progress=progress and rank == 0,
          desc=f"stats {request['model'] or 'model'}").run(
        accs, docs, consumed, total, checkpoint=checkpoint, request=request, layer_meta=layer_meta,
        checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds, on_batch=on_batch)
    accs = distributed.all_reduce(accs)
    if any(acc.count == 0 for acc in accs.values()):
        raise InputError(f"the documents read from {source.name!r} hold no tokens (all empty after tokenization); "
                         "check the corpus and its text field")
    if directory is not None:
        _save(directory, accs, layer_meta, selection, seed=seed, num_samples=num_samples, rank=rank,
              world_size=world_size, documents=len(selection) if selection is not None else consumed)
        checkpoint.clear()
    result.update(accs)
    return {l: result[l] for l in layers}


def _check_lengths(model, max_length, token_budget) -> int:
    """The truncation length (default the context length), checked with the token budget."""
    ctx = context_length(model)
    if max_length is None:
        if ctx is None:
            raise InputError("the model's config states no context length; pass max_length (--max-length)")
        max_length = ctx
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise InputError(f"max_length must be a positive int, got {max_length!r}")
    if ctx is not None and max_length > ctx:
        raise InputError(f"max_length={max_length} exceeds the model's context length {ctx}; lower it")
    if not isinstance(token_budget, int) or isinstance(token_budget, bool) or token_budget < max_length:
        raise InputError(f"token_budget={token_budget!r} must be an int no smaller than max_length={max_length}; "
                         "raise --token-budget or lower --max-length")
    return max_length


def _check_checkpointing(every, seconds) -> None:
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise InputError(f"checkpoint_every must be a positive int, got {every!r}")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not seconds > 0:
        raise InputError(f"checkpoint_seconds must be a positive number, got {seconds!r}")


def _select(source, num_samples, seed):
    """The selected document indices, or None for a corpus without a length (read in order)."""
    if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool)):
        raise InputError(f"num_samples must be a positive int or None, got {num_samples!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"seed must be an int, got {seed!r}")
    if isinstance(source, StreamCorpus):
        return None
    selection = select_documents(len(source), num_samples, seed)
    if not selection:
        raise InputError(f"the corpus {source.name!r} has no documents")
    return selection


def _request(model, adapter, layers, source, selection, *, model_name, revision, num_samples, seed, max_length,
             cached: bool):
    """The metadata that keys the cache: the request shared by all layers, and per layer."""
    request = {
        "format": cache.FORMAT,
        "model": _model_name(model, model_name),
        # The resolved commit when the model came from the Hub, so "main" today and the same
        # commit named explicitly key the same cache.
        "revision": getattr(getattr(model, "config", None), "_commit_hash", None) or revision or "",
        "d_k": adapter.d_k,
        "dataset": source.name,
        "corpus_size": "unknown" if selection is None else len(source),
        "num_samples": "all" if num_samples is None else num_samples,
        "seed": seed,
        "max_length": max_length,
        "dtype": str(adapter.dtype).removeprefix("torch."),
    }
    if cached:
        if not request["model"]:
            raise InputError("the model has no name (config._name_or_path is empty); pass model_name= "
                             "to key the statistics cache")
        request["weights"] = cache.weights_fingerprint(model, adapter)
        request["content"] = source.fingerprint(num_samples if selection is None else selection)
    layer_meta = {l: {**request, "layer": l, "module": adapter.rewrite_name(l)} for l in layers}
    return request, layer_meta


def _load_cached(directory, layers, layer_meta, adapter) -> dict:
    """The layers already finished for this request; a file of an older format is recomputed."""
    found = {}
    for l in layers:
        path = cache.layer_path(directory, l)
        if not path.is_file():
            continue
        if cache.file_format(path) != cache.FORMAT:
            warnings.warn(f"{path} was written by another fastedit version (format {cache.file_format(path)!r}); "
                          "recomputing it", stacklevel=3)
            continue
        found[l] = cache.load_checked(path, layer_meta[l], device=adapter.layer_device(l))
    return found


def _resume(checkpoint, todo, request, adapter, backend):
    """(accumulators, documents consumed): from the last checkpoint, else empty at 0."""
    if checkpoint is not None:
        resumed = checkpoint.load(todo, request, device=adapter.device, backend=backend)
        if resumed is not None:
            return resumed
    return {l: CovarianceAccumulator(adapter.d_k, device=adapter.layer_device(l), backend=backend) for l in todo}, 0


def _shard(source, selection, consumed, num_samples, rank, world_size):
    """(this rank's documents from position ``consumed``, their total for the progress bar)."""
    if selection is None:
        if world_size > 1:
            raise InputError("a corpus without a length cannot be sharded over ranks; pass a list, a file or "
                             "a dataset")
        return source.documents(consumed, num_samples), num_samples
    mine = distributed.shard(selection, rank, world_size)
    return source.documents(mine[consumed:]), len(mine)


class _Pass:
    """The forward pass: tokenize, pack and prefetch documents, hook the rewrite modules, stop
    after the last requested one, checkpoint on schedule."""

    def __init__(self, model, tokenizer, adapter, layers, *, token_budget, max_length, padding_side, progress, desc):
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.modules = {l: adapter.rewrite_module(l) for l in layers}
        self.token_budget, self.max_length = token_budget, max_length
        self.side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
        self.progress, self.desc = progress, desc
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab = getattr(emb, "num_embeddings", None)
        self.extra = {"use_cache": False} if _accepts(model, "use_cache") else {}
        self.pass_positions = _accepts(model, "position_ids")

    def run(self, accs, docs, consumed, total, *, checkpoint, request, layer_meta, checkpoint_every,
            checkpoint_seconds, on_batch) -> int:
        """Add every batch's keys to ``accs``; returns the documents consumed."""
        device = self.adapter.device
        tokens = batching.tokenize(docs, self.tokenizer, self.max_length)
        batches = batching.prefetch(batching.pack(tokens, self.token_budget, pad_id=pad_id(self.tokenizer),
                                                  padding_side=self.side, start=consumed))
        stop = self.modules[max(self.modules)]
        mask_ref: list = [None]
        bar = _Progress(self.progress, total, consumed, self.desc)
        done_batches, last_save = 0, time.monotonic()
        was_training = self.model.training
        self.model.eval()  # dropout off: the statistics are those of the deployed model
        try:
            with torch.inference_mode(), _accumulate_inputs(self.adapter, self.modules, accs, mask_ref):
                for batch in batches:
                    self._check_ids(batch)
                    ids = batch.input_ids.to(device, non_blocking=True)
                    mask = batch.attention_mask.to(device, non_blocking=True)
                    mask_ref[0] = mask.bool()
                    kwargs = dict(input_ids=ids, attention_mask=mask, **self.extra)
                    if self.pass_positions:
                        kwargs["position_ids"] = batch.position_ids.to(device, non_blocking=True)
                    forward_until(self.model, stop, **kwargs)
                    done_batches += 1
                    bar.step(batch.end - consumed, batch.num_tokens)
                    consumed = batch.end
                    due = (done_batches % checkpoint_every == 0
                           or time.monotonic() - last_save >= checkpoint_seconds)
                    if checkpoint is not None and due:
                        checkpoint.save(accs, consumed, request, layer_meta)
                        last_save = time.monotonic()
                    if on_batch is not None:
                        on_batch(done_batches, consumed)
        finally:
            bar.close()
            batches.close()
            self.model.train(was_training)
        return consumed

    def _check_ids(self, batch) -> None:
        # Out-of-range token ids would index past the embedding (a raw IndexError on CPU, a
        # device-side assert on CUDA); checked on the host before the batch moves.
        real = batch.input_ids[batch.attention_mask.bool()]
        if real.numel() and (int(real.min()) < 0 or (self.vocab is not None and int(real.max()) >= self.vocab)):
            raise InputError(f"a document before position {batch.end} of the selection holds token id "
                             f"{int(real.min()) if int(real.min()) < 0 else int(real.max())}, outside the model's "
                             f"vocabulary 0..{self.vocab - 1 if self.vocab else '?'}; token-id corpora must come from "
                             "this model's tokenizer")


def _save(directory, accs, layer_meta, selection, *, seed, num_samples, rank, world_size, documents) -> None:
    """Rank 0 writes the selection record and every layer's finished file; all ranks wait."""
    if rank == 0:
        extra = {}
        if selection is not None:
            digest = selection_digest(selection)
            extra["documents_sha256"] = digest
            # The selection's record: all documents, or the sampled indices.
            _io.write_json(directory / f"documents-{digest[:16]}.json",
                           {"seed": seed, "num_samples": num_samples, "corpus_size": layer_meta[next(iter(accs))]
                            ["corpus_size"], "indices": "all" if isinstance(selection, range) else selection})
        for l, acc in accs.items():
            cache.save_layer(cache.layer_path(directory, l), acc,
                             {**layer_meta[l], **extra, "tokens": acc.count,
                              "documents": documents,
                              "fastedit_version": __version__})
    if world_size > 1:
        torch.distributed.barrier()


def _check_layers(adapter, layers) -> list[int]:
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise InputError(f"layers must be an int or an iterable of ints, got {type(layers).__name__}") from None
    if not layers:
        raise InputError("layers is empty; name at least one layer")
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, int):
            raise InputError(f"layers must be ints, got {l!r} ({type(l).__name__}) in {layers}")
        adapter.check_layer(l)
    if len(set(layers)) != len(layers):
        raise InputError(f"layers {layers} lists a layer twice")
    return layers


def layer_covariance(model, tokenizer, layer: int, corpus, **kwargs) -> torch.Tensor:
    """C0 = E[k kᵀ] (d_k, d_k) float64 of one layer: ``collect_stats(...)[layer].mean()``."""
    return collect_stats(model, tokenizer, [layer], corpus, **kwargs)[layer].mean()


def load_stats(cache_dir, model_name: str, layers, dataset: str, *, device=None, **expect) -> dict:
    """Finished statistics from a cache without a model: dict layer -> CovarianceAccumulator.

    ``dataset`` is the corpus name recorded by :func:`collect_stats` (a file's name, e.g.
    ``"wiki.jsonl"``, or ``"wikipedia/20220301.en/train"``). Any other metadata field given in
    ``expect`` (``num_samples=``, ``seed=``, ``max_length=``, ``dtype=`` ...) must match, else
    CacheMismatchError names it. C0 of layer l is ``load_stats(...)[l].mean()``. Statistics
    files of the reference implementations are read by
    :func:`fastedit.stats.cache.read_reference_npz`.
    """
    if isinstance(layers, int):
        layers = [layers]
    unknown = sorted(set(expect) - set(cache.MATCH_FIELDS))
    if unknown:
        raise InputError(f"unknown metadata field(s) {unknown}; known: {', '.join(cache.MATCH_FIELDS)}")
    directory = cache.stats_dir(cache_dir, model_name, dataset)
    out = {}
    for l in layers:
        path = cache.layer_path(directory, l)
        if not path.is_file():
            raise InputError(f"no statistics for layer {l} of {model_name!r} on {dataset!r} in {directory}; "
                             "collect them with `fastedit stats` or collect_stats(...)")
        out[l] = cache.load_checked(path, {"format": cache.FORMAT, "model": model_name, "layer": l, **expect},
                                    device=device)
    return out
