"""Peak memory and edits/s against the number of edits in ONE batch (issue 10): with v*, the key
pass and the residual reads chunked by a token budget, peak memory stays flat once the batch is
larger than a chunk; only K and R per layer (and the result) grow with the batch.

Each case runs ``Editor.edit`` (AlphaEdit_BLUE) in a fresh child process, which reports the
process's peak resident set size (``ru_maxrss``) before and after the edit, the edit's seconds
and how many v* chunks ran; a child per case keeps one case's peak out of the next. On Linux
the child also restarts the kernel's peak counter (VmHWM) right before the edit, so
``peak_rss_mb_edit`` is the edit's own peak (``peak_rss_mb`` may be the statistics pass's), and
``result_mb`` is what the edit keeps of n edits (K, R and v*'s outputs per edited layer).

- ``mid``: a random Llama (hidden 256, d_k 1024, 8 layers, float32), BLUE layers 1 and 3,
  random C0 with a null space; 10 / 100 / 1000 edits at the ``full`` size (CPU), 10000 more
  at the ``gpu`` size (Llama3-8B shape, bf16, all 32 layers, layers 4 and 8).
- ``testbed``: the shipped testbed Llama and its facts with its preset (100 vs 2400 facts at
  ``full``).

    FASTEDIT_BENCH_SIZE=full python -m pytest benchmarks/bench_memory.py --benchmark-enable
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys


SIZES = {
    "small": [dict(model="mid", n=7, d=48, d_k=112, layers=4, blue=(1, 2), steps=3, vocab=97),
              dict(model="testbed", n=6, steps=3)],
    "full": [dict(model="mid", n=n, d=256, d_k=1024, layers=8, blue=(1, 3), steps=25, vocab=4096)
             for n in (10, 100, 1000)] + [dict(model="testbed", n=n) for n in (100, 2400)],
    "gpu": [dict(model="mid", n=n, d=4096, d_k=14336, layers=32, blue=(4, 8), steps=25, vocab=128256, heads=32,
                 kv_heads=8) for n in (100, 1000, 10000)],
}


def _child(cfg: dict) -> dict:
    """Run one case in this process and return its measurements."""
    import resource
    import time

    import torch

    from fastedit import presets, testbed
    from fastedit.editing import Editor, requests_from_records

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def status_mb(field):
        """VmRSS / VmHWM of /proc/self/status in MB (None off Linux)."""
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) / 1024 for l in f if l.startswith(field + ":"))
        except (OSError, StopIteration):
            return None

    def reset_hwm():
        """Restart VmHWM (the kernel's peak RSS) at the current RSS, so the edit's own peak is
        read, not the statistics pass's or the model load's; False where that is not possible."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg["model"] == "testbed":
        model, tok = testbed.load("llama", device=device)
        hp = presets.get("testbed-llama", method="alphaedit", strategy="blue")
        if "steps" in cfg:
            hp = hp.replace(v_num_grad_steps=cfg["steps"])
        stats = testbed.stats("llama", model=model, tokenizer=tok, layers=list(hp.boundary_layers),
                              cache_dir=os.environ.get("FASTEDIT_CACHE_DIR"))
        covariances = {l: acc.mean() for l, acc in stats.items()}
        records = testbed.records(cfg["n"])
    else:
        from fastedit.models import tiny_model
        from fastedit.models.tiny import tiny_tokenizer

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with device:
            model = tiny_model("llama", vocab_size=cfg["vocab"], dtype=dtype, hidden_size=cfg["d"],
                               intermediate_size=cfg["d_k"], num_hidden_layers=cfg["layers"],
                               num_attention_heads=cfg.get("heads", 4), num_key_value_heads=cfg.get("kv_heads", 2),
                               initializer_range=0.2)
        tok = tiny_tokenizer() if cfg["vocab"] == 97 else testbed.load("llama")[1]
        hp = presets.get("llama3-8b", method="alphaedit", strategy="blue").replace(
            layers=tuple(cfg["blue"]), v_num_grad_steps=cfg["steps"])
        covariances = {l: null_space_covariance(cfg["d_k"], seed=l, device=device) for l in hp.layers}
        records = (testbed.records() * (cfg["n"] // len(testbed.records()) + 1))[:cfg["n"]]
    requests = requests_from_records(records)
    editor = Editor(model, tok, method="alphaedit", strategy="blue", hparams=hp, stats=covariances, progress=False)
    before = peak_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = status_mb("VmRSS")
    hwm = reset_hwm()
    t0 = time.perf_counter()
    report = editor.edit(requests, batch_size=len(requests)).to_dict()
    seconds = time.perf_counter() - t0
    ad = editor.adapter
    n_layers = len(editor.edit_layers)
    out = {"seconds": seconds, "peak_rss_mb_before": before, "peak_rss_mb": peak_mb(),
           "rss_mb_before_edit": rss_before, "peak_rss_mb_edit": status_mb("VmHWM") if hwm else None,
           # what the edit keeps of n edits: per edited layer K (float32 and float64), R (float64)
           # and v*'s z, h_init, δ, v0 (float32)
           "result_mb": len(requests) * n_layers * (12 * ad.d_k + 8 * ad.d + 16 * ad.d) / 2 ** 20,
           "chunks": {l: v["chunks"] for l, v in report["batches"][0]["vstar"].items()},
           "path": {l: v["path"] for l, v in report["batches"][0]["vstar"].items()},
           "times": report["times"], "n_edited": report["n_edited"]}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def null_space_covariance(d_k: int, *, seed: int, device=None, null_share: float = 0.7, threshold: float = 2e-2):
    """A random SPD C0 (d_k, d_k) float64 whose eigenvalues below the AlphaEdit threshold (2e-2)
    make up ``null_share`` of the spectrum, as the reference reports for Llama3-8B (~70 %):
    eigenvalues log-uniform in [1e-4, threshold/2] for that share and in [2·threshold, 10] for
    the rest, in a random orthonormal basis. No corpus pass is needed, so the GPU case's set-up
    costs one QR of d_k²."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n_null = int(round(null_share * d_k))
    low = torch.empty(n_null, dtype=torch.float64).uniform_(-4, float(torch.log10(torch.tensor(threshold / 2))),
                                                            generator=g)
    high = torch.empty(d_k - n_null, dtype=torch.float64).uniform_(
        float(torch.log10(torch.tensor(2 * threshold))), 1.0, generator=g)
    eig = 10 ** torch.cat([low, high])
    Q, _ = torch.linalg.qr(torch.randn(d_k, d_k, dtype=torch.float64, generator=g).to(device))
    return (Q * eig.to(Q.device)) @ Q.T


def _run_case(size: dict) -> dict:
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "benchmarks"),
                                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(size)], capture_output=True, text=True,
                          env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peak_memory_against_batch_size(benchmark, bench_size, size):
    results = []
    benchmark.group = f"one batch, peak memory ({size['model']})"
    benchmark.extra_info.update(role="fastedit", op=f"AlphaEdit_BLUE one batch ({size['model']})", size=f"n={size['n']}",
                                edits=size["n"])
    benchmark.pedantic(lambda: results.append(_run_case(size)), rounds=1, iterations=1, warmup_rounds=0)
    r = results[-1]
    assert r["n_edited"] == size["n"]
    for key in ("rss_mb_before_edit", "peak_rss_mb_edit", "result_mb"):
        if r.get(key) is not None:
            benchmark.extra_info[key] = round(r[key], 1)
    benchmark.extra_info.update(peak_rss_mb=round(r["peak_rss_mb"], 1), peak_rss_mb_before=round(r["peak_rss_mb_before"], 1),
                                edit_seconds=round(r["seconds"], 2), edits_per_s=round(size["n"] / r["seconds"], 2),
                                chunks=r["chunks"], path=r["path"],
                                stage_seconds={k: round(v, 2) for k, v in r["times"].items()})
    if "peak_cuda_mb" in r:
        benchmark.extra_info["peak_cuda_mb"] = round(r["peak_cuda_mb"], 1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
    else:
        raise SystemExit("usage: pytest benchmarks/bench_memory.py (the --child mode is internal)")
