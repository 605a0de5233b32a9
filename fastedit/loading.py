"""Loading a model for the command line: one place for the rules every subcommand shares.

``load_model("testbed")`` / ``"testbed:gpt2"`` gives the bundled testbed model; anything else
goes to Hugging Face ``from_pretrained`` (a local directory, or a hub name when the network
allows). The default dtype is bfloat16 on CUDA and float32 on CPU.
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
