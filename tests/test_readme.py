"""README.md's code runs as written: every ```python block, and every command of the testbed
walk-through (```bash block), with fewer facts so the test stays a few seconds. The ```py blocks
of the switching section show a user's own files (their hyper-parameter files and statistics):
tests/test_compat.py runs those calls on fixture files instead."""
import pathlib
import re
import shlex

import pytest
import torch

from fastedit import testbed
from fastedit.cli import main

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
N_FACTS = 3  # the facts testbed.records returns here, whatever the README asks for

pytestmark = pytest.mark.skipif("llama" not in testbed.shipped(), reason="testbed Llama not installed")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


@pytest.fixture
def few_facts(monkeypatch, tmp_path_factory):
    """Fewer facts, and one statistics cache for this module's tests (the pass runs once)."""
    real = testbed.records
    monkeypatch.setattr(testbed, "records", lambda n=None, *a, **k: real(min(n or N_FACTS, N_FACTS), *a, **k))
    monkeypatch.setenv("FASTEDIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fastedit-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI picks on a busy machine; the test's time does not hang on the load
    yield
    torch.set_num_threads(threads)  # the CLI sets them; later tests get theirs back


def test_readme_python_blocks_run(few_facts):
    blocks = _blocks("python")
    assert blocks, "README.md has no python block"
    scope: dict = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), scope)
    report = scope["report"]
    assert report.n_edited == N_FACTS and report.prepare_seconds > 0
    C, K, R, lam = scope["C"], scope["K"], scope["R"], 15000.0
    A = lam * C + K @ K.T
    assert torch.allclose(scope["adj"], torch.linalg.solve(A, K), rtol=1e-8, atol=1e-12)
    assert torch.allclose(scope["dW"], R @ K.T @ torch.linalg.inv(A), rtol=1e-6, atol=1e-12)


def test_readme_walkthrough_commands_run(few_facts, tmp_path, monkeypatch, capsys):
    commands = [line.split("#")[0].strip() for block in _blocks("bash") for line in block.splitlines()]
    commands = [c for c in commands if c.startswith("fastedit ")]
    assert [c.split()[1] for c in commands] == ["testbed", "stats", "edit", "eval", "ask"]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "edited/" in out
    assert (tmp_path / "edited" / "edit_report.json").is_file() and (tmp_path / "eval.json").is_file()
