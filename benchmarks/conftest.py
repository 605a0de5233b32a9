"""Shared set-up of the benchmark suites (benchmarks/bench_<stem>.py).

Fixtures
- ``bench_size``: ``"small"`` (CI smoke: tiny CPU shapes), ``"full"`` (the real CPU shapes of
  ARCHITECTURE.md's targets) or ``"gpu"`` (the real GPU shapes). From ``FASTEDIT_BENCH_SIZE``;
  unset, it is ``"gpu"`` when the benchmarks run on CUDA and ``"small"`` otherwise.
  ``bench_size.pick(small=..., full=..., gpu=...)`` returns the value for the current size.
- ``device``: ``cuda`` when available, else ``cpu``; ``FASTEDIT_BENCH_DEVICE=cpu|cuda`` forces it.
- ``cuda_sync``: a no-argument function that waits for the device (a no-op on CPU).
- ``timed``: ``timed(fn)`` returns ``fn`` followed by ``cuda_sync()``. pytest-benchmark reads a
  host clock, so on CUDA the timed callable must wait for the kernels it queued; ``timed`` also
  waits once when called, so set-up work queued before it stays out of the first round.

Parametrising by size: a bench function that takes an argument named ``size`` in a module that
defines ``SIZES = {"small": [...], "full": [...], "gpu": [...]}`` is parametrised over the list of
the current bench size (dict entries get ids like ``d_k=4096-n=100``). A size missing from
``SIZES`` yields one skipped case, not an error.

Result metadata: the benchmark JSON gets ``machine_info["fastedit"]`` (device name and kind,
torch/triton/CUDA versions, bench size, whether Triton ran interpreted), the commit from
``FASTEDIT_COMMIT`` when set (the GPU machine's copy of the tree has no git history), and
``output_json["fastedit"]`` (date, the pytest command line, the driver script). benchmarks/record.py
reads them; benchmarks/README.md gives the ``extra_info`` keys (role, op, size, flops, ...).

Interrupted runs: a run stopped by SIGINT (a time limit, Ctrl-C) still writes its JSON with
every benchmark whose test finished; the interrupted one is dropped (pytest-benchmark would
otherwise fail on its empty timings and write nothing) and named in
``output_json["fastedit"]["unfinished"]``.

Without CUDA, Triton kernels run under the interpreter (set here before anything imports
triton), as in tests/conftest.py: the smoke run then exercises every code path on CPU.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex

import pytest
import torch

import fastedit

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SIZES = ("small", "full", "gpu")
DEVICE_ENV = "FASTEDIT_BENCH_DEVICE"
SIZE_ENV = "FASTEDIT_BENCH_SIZE"


def _device() -> torch.device:
    forced = os.environ.get(DEVICE_ENV, "").strip().lower()
    if forced not in ("", "cpu", "cuda"):
        raise pytest.UsageError(f"{DEVICE_ENV}={forced!r}: use 'cpu' or 'cuda', or leave it unset")
    if forced == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"{DEVICE_ENV}=cuda but torch sees no CUDA device; unset it to run on CPU")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class BenchSize(str):
    """The bench size name (a str: compare it with "small", "full", "gpu") with a chooser."""

    def pick(self, **by_size):
        """The value given for this size: ``bench_size.pick(small=64, full=4096, gpu=14336)``."""
        unknown = set(by_size) - set(SIZES)
        if unknown:
            raise TypeError(f"pick() got unknown sizes {sorted(unknown)}; the sizes are {SIZES}")
        if str(self) not in by_size:
            raise TypeError(f"pick() has no value for bench size {str(self)!r}; give {str(self)}=...")
        return by_size[str(self)]


def _bench_size(device: torch.device) -> BenchSize:
    name = os.environ.get(SIZE_ENV, "").strip().lower()
    if not name:
        name = "gpu" if device.type == "cuda" else "small"
    if name not in SIZES:
        raise pytest.UsageError(f"{SIZE_ENV}={name!r}: use one of {', '.join(SIZES)}, or leave it unset")
    return BenchSize(name)


def pytest_configure(config):
    # Fail at start-up, not in the middle of a run, on a mistyped environment variable.
    config._fastedit_bench = {"device": _device()}
    config._fastedit_bench["size"] = _bench_size(config._fastedit_bench["device"])


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # /proc/cpuinfo rather than py-cpuinfo, which takes seconds to probe the processor.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _triton_version() -> str:
    # From the package metadata: importing triton here would fix TRITON_INTERPRET too early.
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def pytest_report_header(config):
    info = config._fastedit_bench
    lines = [f"fastedit benchmarks: size={info['size']} device={info['device']} ({_device_name(info['device'])})"]
    if info["device"].type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        lines.append("WARNING: TRITON_INTERPRET=1 on a CUDA machine: Triton kernels run interpreted, "
                     "their timings mean nothing (set FASTEDIT_TEST_GPU=1 or unset TRITON_INTERPRET)")
    return lines


def pytest_collection_modifyitems(config, items):
    # tests/conftest.py skips `cuda` items only when it is loaded; `pytest benchmarks` alone does not load it.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not any(m.name == "skip" for m in item.iter_markers()):
            item.add_marker(skip)


def _size_id(value) -> str:
    if isinstance(value, dict):
        return "-".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def pytest_generate_tests(metafunc):
    table = getattr(metafunc.module, "SIZES", None)
    if "size" not in metafunc.fixturenames or table is None:
        return
    size = metafunc.config._fastedit_bench["size"]
    if size not in table:
        params = [pytest.param(None, marks=pytest.mark.skip(reason=f"no {size!r} entry in SIZES"), id=f"no-{size}")]
    else:
        params = [pytest.param(v, id=_size_id(v)) for v in table[size]]
    metafunc.parametrize("size", params)


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return pytestconfig._fastedit_bench["device"]


@pytest.fixture(scope="session")
def bench_size(pytestconfig) -> BenchSize:
    return pytestconfig._fastedit_bench["size"]


@pytest.fixture(scope="session")
def cuda_sync(device):
    if device.type != "cuda":
        return lambda: None
    return lambda: torch.cuda.synchronize(device)


@pytest.fixture(scope="session")
def timed(cuda_sync):
    def wrap(fn):
        cuda_sync()

        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            cuda_sync()
            return out

        call.__name__ = getattr(fn, "__name__", "timed")
        return call

    return wrap


def pytest_benchmark_update_machine_info(config, machine_info):
    info = config._fastedit_bench
    dev = info["device"]
    machine_info["fastedit"] = {
        "device": _device_name(dev),
        "device_kind": "gpu" if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "fastedit": fastedit.__version__,
        "cuda": torch.version.cuda or "none",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))) if dev.type == "cuda" else "",
        "bench_size": str(info["size"]),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "cpu_threads": torch.get_num_threads(),
    }


def pytest_benchmark_update_commit_info(config, commit_info):
    forced = os.environ.get("FASTEDIT_COMMIT", "").strip()
    if forced:
        commit_info["id"] = forced


def pytest_benchmark_update_json(config, benchmarks, output_json):
    info = config._fastedit_bench
    args = shlex.join(config.invocation_params.args)
    output_json["fastedit"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": f"{SIZE_ENV}={info['size']} python -m pytest {args}",
        "driver": os.environ.get("FASTEDIT_BENCH_DRIVER", ""),
        "unfinished": info.get("unfinished", []),
    }


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        _FINISHED.add(report.nodeid)


_FINISHED: set[str] = set()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # Runs before pytest-benchmark's own sessionfinish writes the JSON. pytest-benchmark lists a
    # benchmark when its first round starts: one interrupted before a round ended has no
    # timings, and writing the JSON then fails, losing every finished entry with it.
    bench = getattr(session.config, "_benchmarksession", None)
    if bench is not None and bench.benchmarks:
        kept = [b for b in bench.benchmarks if b.fullname in _FINISHED and b]
        session.config._fastedit_bench["unfinished"] = [b.fullname for b in bench.benchmarks if b not in kept]
        bench.benchmarks[:] = kept
    yield
