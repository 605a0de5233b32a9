import subprocess
import sys


def test_import_does_not_initialise_cuda_or_load_heavy_modules():
    code = (
        "import sys, torch, fastedit\n"
        "assert not torch.cuda.is_initialized(), 'import fastedit initialised CUDA'\n"
        "heavy = [m for m in ('transformers', 'triton', 'fastedit._C') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "fastedit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout
