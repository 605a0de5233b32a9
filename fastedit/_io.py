"""Files fastedit writes: the cache root, atomic writes, checksummed tensor files, JSON records.

The one home of these rules, low enough that every layer may import it (it imports only
:mod:`fastedit.errors`):

- :func:`cache_root`: ``$FASTEDIT_CACHE_DIR``, else ``~/.cache/fastedit``.
- :func:`atomic_write`: a file appears under its final name only complete (temporary file in
  the same folder, fsync, rename), with the permissions of an ordinary new file
  (0666 minus the umask, so a shared cache stays readable), and no temporary file is left
  behind by an exception. A temporary file left by a killed process is named after the host
  and the process, so :func:`remove_stale_temporaries` can delete it once that process is gone
  without touching a live writer's file.
- :func:`save_tensors` / :func:`load_tensors`: safetensors files whose metadata holds the
  SHA-256 of every tensor, verified on load, so a flipped bit is an error, never a result.
- :func:`write_json` / :func:`read_json`: small records, atomically written; a damaged one is
  an :class:`~fastedit.errors.InputError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import secrets
import socket
from typing import Callable

import torch

from fastedit.errors import InputError

_TMP_SUFFIX = ".tmp"
_CHECKSUM_PREFIX = "sha256."


def cache_root() -> pathlib.Path:
    """``$FASTEDIT_CACHE_DIR`` (``~`` expanded), else ``~/.cache/fastedit``."""
    root = os.environ.get("FASTEDIT_CACHE_DIR")
    return pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "fastedit"


def ensure_directory(path, what: str) -> pathlib.Path:
    """Create the directory ``path`` (and its parents), or raise InputError naming ``what``
    when something that is not a directory stands in the way."""
    path = pathlib.Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(f"{what} {str(path)!r} cannot be created: {str(p)!r} is a file, not a "
                                 "directory; pass another directory or remove that file")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{what} {str(path)!r} cannot be created ({exc.strerror or exc}); pass a writable "
                         "directory") from None
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to fill a temporary file beside ``path``, then fsync it, give it
    mode 0666 & ~umask and rename it over ``path``. On any exception (KeyboardInterrupt
    included) the temporary file is removed and the exception propagates."""
    path = pathlib.Path(path)
    tmp = path.parent / f".{path.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(directory) -> list[pathlib.Path]:
    """Delete the temporary files of :func:`atomic_write` in ``directory`` whose writer was a
    process of this host that no longer runs (killed mid-write); returns what was removed."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    host, removed = _host(), []
    for tmp in directory.glob(f".*{_TMP_SUFFIX}"):
        parts = tmp.name[: -len(_TMP_SUFFIX)].rsplit(".", 3)
        if len(parts) != 4 or parts[1] != host or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
            continue  # the writer is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def write_json(path, payload) -> None:
    """``payload`` as JSON at ``path``, atomically (parents created)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f)

    atomic_write(path, write)


def read_json(path, what: str):
    """The JSON value in ``path``; InputError naming ``what`` and the file when it is not
    UTF-8 JSON (a damaged or foreign file)."""
    path = pathlib.Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{what} {str(path)!r} is damaged (not UTF-8 JSON: {exc}); delete it and "
                         "rerun") from None


def tensor_digest(tensor) -> str:
    """SHA-256 of a tensor's bytes (CPU, contiguous, its own dtype), with dtype and shape."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_tensors(path, tensors: dict, metadata: dict) -> None:
    """Write ``tensors`` (name -> tensor) and string ``metadata`` to a safetensors file at
    ``path`` atomically, adding ``sha256.<name>`` = :func:`tensor_digest` for each tensor."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta = {**{k: str(v) for k, v in metadata.items() if not k.startswith(_CHECKSUM_PREFIX)},
            **{_CHECKSUM_PREFIX + name: tensor_digest(t) for name, t in tensors.items()}}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_tensors(path, *, require_checksums: bool = True) -> tuple[dict, dict]:
    """(tensors, metadata) of a file written by :func:`save_tensors`, every tensor checked
    against its stored SHA-256 (the ``sha256.*`` entries are taken out of the metadata;
    :func:`read_metadata` shows them).
    InputError naming the file for an unreadable file, a missing checksum (unless
    ``require_checksums`` is False) or a tensor whose bytes changed."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError(f"{str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise InputError(f"{str(path)!r} is not a readable safetensors file ({exc}); delete it and "
                         "recompute it") from None
    for name, t in tensors.items():
        want = meta.pop(_CHECKSUM_PREFIX + name, None)
        if want is None:
            if require_checksums:
                raise InputError(f"{str(path)!r} stores no checksum for its tensor {name!r} (written by an "
                                 "older fastedit?); recompute it")
            continue
        if tensor_digest(t) != want:
            raise InputError(f"{str(path)!r}: the tensor {name!r} does not match its stored checksum (the file "
                             "is damaged); delete it and recompute it")
    for key in [k for k in meta if k.startswith(_CHECKSUM_PREFIX)]:
        raise InputError(f"{str(path)!r} has a checksum for {key[len(_CHECKSUM_PREFIX):]!r} but no such tensor "
                         "(the file is damaged); delete it and recompute it")
    return tensors, meta


def read_metadata(path) -> dict:
    """The metadata of a safetensors file (checksums included), read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise InputError(f"{str(path)!r} is not a readable safetensors file ({exc}); delete it and "
                         "recompute it") from None


def checksum(metadata: dict, name: str) -> str | None:
    """The stored SHA-256 of tensor ``name`` in a :func:`read_metadata` result, if any."""
    return metadata.get(_CHECKSUM_PREFIX + name)
