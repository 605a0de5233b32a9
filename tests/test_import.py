import subprocess
import sys


def test_import_does_not_initialise_cuda_or_load_heavy_modules():
    # The compiled extension is a shared library loaded by torch.ops.load_library, not a Python
    # module: torch.ops.loaded_libraries and the process's memory maps are where it would show.
    code = (
        "import sys, torch, fastedit, fastedit.linalg\n"
        "assert not torch.cuda.is_initialized(), 'import fastedit initialised CUDA'\n"
        "heavy = [m for m in ('transformers', 'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "loaded = [p for p in torch.ops.loaded_libraries if 'fastedit' in p]\n"
        "with open('/proc/self/maps') as f:\n"
        "    loaded += [line.split()[-1] for line in f if 'fastedit_ext' in line]\n"
        "assert not loaded, f'import fastedit loaded the extension: {loaded}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "fastedit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout
