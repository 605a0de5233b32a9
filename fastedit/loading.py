"""Loading a model for the command line: one place for the rules every subcommand shares.

``load_model("testbed")`` / ``"testbed:gpt2"`` gives the bundled testbed model; anything else
goes to Hugging Face ``from_pretrained`` (a local directory, or a hub name when the network
allows). The default dtype is bfloat16 on CUDA and float32 on CPU. Also here: ``--corpus
testbed``, the checks of ``--model`` / ``--corpus`` that run before a model loads, and the CPU
thread count every subcommand sets (:func:`set_threads`).
"""
from __future__ import annotations

import argparse
import pathlib

import torch

from fastedit.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def layer_list(text: str) -> list[int]:
    """argparse type for ``--layers 4,5,6``."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers such as 4,5,6; got {text!r}")


def layout_arg(text: str) -> dict:
    """argparse type for ``--layout``: a JSON file or ``field=template`` pairs separated by commas
    (:func:`fastedit.models.adapters.load_layout`)."""
    from fastedit.models.adapters import load_layout

    try:
        return load_layout(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def add_layout_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--layout`` option every subcommand that edits or reads a model's modules shares."""
    parser.add_argument("--layout", type=layout_arg, default=None,
                        help="module layout for a family without a built-in one, or to override it: a JSON file "
                             "or comma-separated field=template pairs, e.g. "
                             "rewrite=model.layers.{}.mlp.down_proj,final_norm=model.norm (fields: rewrite, "
                             "final_norm, block, lm_head, embed, post_mlp_norm)")


def default_device(device=None) -> torch.device:
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype_kwarg() -> str:
    """transformers >= 4.56 names from_pretrained's dtype argument ``dtype``; older ``torch_dtype``."""
    import transformers

    major, minor = (int("".join(c for c in p if c.isdigit()) or 0) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_model(name: str, *, device=None, dtype: str | torch.dtype | None = None, revision: str | None = None):
    """(model in eval mode on ``device``, tokenizer) for a local path, a hub name or 'testbed[:arch]'."""
    device = default_device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if name == "testbed" or name.startswith("testbed:"):
        from fastedit import testbed

        return testbed.load(name.partition(":")[2] or "llama", device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = pathlib.Path(name).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, local_files_only=local,
                                                     **{_dtype_kwarg(): dtype})
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load model {name!r}: {first}") from None
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------- the testbed and the arguments every subcommand shares
TESTBED = "testbed"
_TORCH_THREADS = torch.get_num_threads()  # torch's default, before set_threads lowers it


def testbed_arch(name: str) -> str | None:
    """``"llama"`` for ``--model testbed``, ``"gpt2"`` for ``testbed:gpt2``, None for any other model."""
    if name != TESTBED and not name.startswith(TESTBED + ":"):
        return None
    from fastedit import testbed

    arch = name.partition(":")[2] or "llama"
    if arch not in testbed.ARCHS:
        raise InputError(f"--model {name!r}: the testbed models are {', '.join(TESTBED + ':' + a for a in testbed.ARCHS)}")
    return arch


def check_model(name: str) -> None:
    """Fail before anything loads when ``--model`` names a local path that is not there (a name
    that is not a path is left to the Hugging Face hub)."""
    if testbed_arch(name) is not None:
        return
    path = pathlib.Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.endswith(("/", "\\")) or name.count("/") > 1
    if looks_local and not path.is_dir():
        raise InputError(f"--model {name!r}: cannot load model: it is not a directory (a local model is the "
                         "directory that save_pretrained wrote; a hub name looks like org/name)")


def check_corpus(corpus: str) -> None:
    """Fail before the model loads when ``--corpus`` cannot be read: a missing file, or a dataset
    name without the optional ``datasets`` package. ``testbed`` is the testbed's generic corpus."""
    import importlib.util

    if corpus == TESTBED:
        return
    from fastedit.stats.corpus import is_saved_dataset

    path = pathlib.Path(corpus).expanduser()
    if path.is_dir() and not is_saved_dataset(path):
        raise InputError(f"--corpus {corpus!r} is a directory but not a saved dataset (save_to_disk); pass one "
                         ".txt or .jsonl file or a dataset directory")
    if path.is_file() or path.is_dir():
        return
    if path.suffix.lower() in (".txt", ".jsonl", ".json", ".ndjson"):
        raise InputError(f"--corpus file {corpus!r} does not exist")
    if importlib.util.find_spec("datasets") is None:
        raise InputError(f"--corpus {corpus!r} is a Hugging Face dataset name, which needs the optional package "
                         "`datasets` (pip install \"fastedit[datasets]\"); or pass a local .txt/.jsonl file, "
                         "or `--corpus testbed` for the testbed model")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch (default: the cores idle now, at least 1; a busy shared "
                             "machine gets 1, since spinning threads then cost far more than they give)")


def idle_cores(interval: float = 0.1) -> float | None:
    """Cores idle over the next ``interval`` seconds (from /proc/stat), None where unknown."""
    import os
    import time

    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, total (without guest time)

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def set_threads(requested: int | None, device=None) -> int:
    """Set torch's intra-op CPU threads and return the number: ``requested``, else the cores idle
    now (at least 1, at most torch's default of ``_TORCH_THREADS``). On a busy machine torch's OpenMP threads spin
    waiting for cores they do not get: measured on the testbed, 2 threads on a 2-core machine
    under load 8 took 8x the CPU time of 1 thread and 5-7x the wall time."""
    if requested is not None:
        if requested < 1:
            raise InputError(f"--threads must be >= 1, got {requested}")
        torch.set_num_threads(requested)
        return requested
    if device is not None and torch.device(device).type != "cpu":
        return torch.get_num_threads()
    idle = idle_cores()
    n = _TORCH_THREADS if idle is None else max(1, min(_TORCH_THREADS, int(idle + 0.5)))
    torch.set_num_threads(n)
    return n


def resolve_corpus(corpus: str, model: str, num_samples: int | None):
    """(corpus for :func:`fastedit.stats.collect_stats`, model name for its cache, num_samples).

    ``--corpus testbed`` is the first ``num_samples`` (default ``testbed.STATS_DOCS``) texts of
    :func:`fastedit.testbed.generic_corpus`, named as :func:`fastedit.testbed.stats` names it, so
    the command line and the demo share one cache entry for the testbed models."""
    if corpus != TESTBED:
        return corpus, model, num_samples
    from fastedit import testbed
    from fastedit.stats.corpus import SequenceCorpus

    n = testbed.STATS_DOCS if num_samples is None else num_samples
    if n < 1:
        raise InputError(f"--num-samples must be positive, got {n}")
    arch = testbed_arch(model)
    return (SequenceCorpus(list(testbed.generic_corpus(n, arch=arch or "llama")), name=f"testbed-generic-{n}"),
            f"fastedit-testbed-{arch}" if arch else model, None)
