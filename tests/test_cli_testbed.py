"""The subcommands check their inputs before a model loads, take their choices from the method
registry, and `fastedit eval` writes valid JSON when a metric cannot be computed."""
import json

import pytest
import torch

from fastedit import testbed
from fastedit.cli import main
from fastedit.editing import methods

pytestmark = pytest.mark.skipif("llama" not in testbed.shipped(), reason="testbed Llama not installed")


@pytest.fixture
def records_file(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps(testbed.records(2)))
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    for module in ("fastedit.editing.cli", "fastedit.stats.cli", "fastedit.eval.cli", "fastedit.eval.ask"):
        monkeypatch.setattr(f"{module}.load_model", refuse)


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for w in words:
        assert w in err, err


def test_edit_checks_requests_and_stats_before_loading(tmp_path, records_file, no_model_load, capsys):
    assert main(["edit", "--model", "testbed", "--requests", str(tmp_path / "nope.json"), "--out", "o"]) == 2
    _one_line_error(capsys, "--requests")
    (tmp_path / "stats").mkdir()
    assert main(["edit", "--model", "testbed", "--requests", str(records_file), "--stats", str(tmp_path / "stats"),
                 "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "layer(s) 0, 1", "fastedit stats --layers 0,1")
    assert main(["edit", "--model", str(tmp_path / "missing-model/"), "--requests", str(records_file),
                 "--corpus", "testbed", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--model", "not a directory")


def test_edit_chunk_budget_and_checkpoint_flags_reach_the_edit_params(tmp_path, records_file, monkeypatch, capsys):
    from fastedit.errors import InputError

    seen = {}

    class Stop:
        def __init__(self, model, tok, *, hparams, **kwargs):
            seen["hparams"] = hparams
            raise InputError("stopped before editing")

    monkeypatch.setattr("fastedit.editing.cli.load_model", lambda *a, **k: (object(), object()))
    monkeypatch.setattr("fastedit.stats.collect_stats", lambda *a, **k: {})
    monkeypatch.setattr("fastedit.editing.editor.Editor", Stop)
    base = ["edit", "--model", "testbed", "--requests", str(records_file), "--out", str(tmp_path / "o")]
    assert main(base + ["--max-chunk-tokens", "4096", "--vstar-checkpoint"]) == 2
    assert (seen["hparams"].max_chunk_tokens, seen["hparams"].vstar_checkpoint) == (4096, True)
    assert main(base) == 2
    assert (seen["hparams"].max_chunk_tokens, seen["hparams"].vstar_checkpoint) == (None, False)
    capsys.readouterr()
    monkeypatch.setattr("fastedit.editing.cli.load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    assert main(base + ["--max-chunk-tokens", "0"]) == 2
    _one_line_error(capsys, "--max-chunk-tokens", "positive")
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--max-chunk-tokens N" in out and "--vstar-checkpoint" in out


def test_stats_checks_corpus_before_loading(tmp_path, no_model_load, capsys):
    assert main(["stats", "--model", "testbed", "--corpus", str(tmp_path / "docs.txt")]) == 2
    _one_line_error(capsys, "does not exist")
    assert main(["stats", "--model", "some-org/unknown-model", "--corpus", "testbed"]) == 2
    _one_line_error(capsys, "--layers")


def test_method_and_strategy_choices_come_from_the_registry(monkeypatch, capsys):
    monkeypatch.setattr(methods, "METHODS", (*methods.METHODS, "newmethod"))
    import importlib

    import fastedit.editing.cli as edit_cli

    edit_cli = importlib.reload(edit_cli)
    try:
        with pytest.raises(SystemExit):
            main(["edit", "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "newmethod" in out and "alphaedit (default):" in out and "blue (default):" in out
        assert "--no-nas" in out
    finally:
        monkeypatch.undo()
        importlib.reload(edit_cli)


def test_eval_fluency_without_generation_prompts_warns_and_writes_json(tmp_path, capsys):
    recs = testbed.records(2)
    for r in recs:
        del r["generation_prompts"]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(recs))
    threads = torch.get_num_threads()
    try:
        assert main(["eval", "--model", "testbed", "--base", "testbed", "--records", str(path), "--fluency",
                     "--out", str(tmp_path / "eval.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert "warning" in captured.err and "generation_prompts" in captured.err
    assert "before" in captured.out and "0 -> 0" in captured.out  # the unedited model twice: nothing flips

    def no_nan(name):
        raise AssertionError(f"eval.json holds {name}")

    report = json.loads((tmp_path / "eval.json").read_text(), parse_constant=no_nan)
    assert report["fluency"] is None and "generation_prompts" in report["missing"]["fluency"]
    assert report["before"]["efficacy"] == report["efficacy"] == 0.0
    assert len(report["cases"]) == 2


def test_edit_vstar_autocast_reaches_the_editor(tmp_path, records_file, monkeypatch, capsys):
    """--vstar-autocast bfloat16 sets EditParams.vstar_autocast (off without it); other values are
    refused by the parser."""
    import fastedit.editing.editor as editor_mod

    seen = []

    class Stop(Exception):
        pass

    def fake_editor(*args, hparams, **kwargs):
        seen.append(hparams.vstar_autocast)
        raise Stop

    monkeypatch.setattr(editor_mod, "Editor", fake_editor)
    monkeypatch.setattr("fastedit.editing.cli.load_model", lambda *a, **k: testbed.load("llama"))
    base = ["edit", "--model", "testbed", "--requests", str(records_file), "--out", str(tmp_path / "o"),
            "--threads", "1", "--no-progress"]
    for extra in ([], ["--vstar-autocast", "bfloat16"]):
        with pytest.raises(Stop):
            main(base + extra)
    assert seen == [None, "bfloat16"]
    with pytest.raises(SystemExit):
        main(base + ["--vstar-autocast", "float16"])
    assert "--vstar-autocast" in capsys.readouterr().err
