"""`fastedit demo` end to end on the shipped testbed Llama, with a few facts."""
import json

import pytest
import torch

from fastedit import testbed
from fastedit.cli import main

pytestmark = pytest.mark.skipif("llama" not in testbed.shipped(), reason="testbed Llama not installed")


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the demo sets them; later tests get theirs back


def test_demo_prints_table_and_metrics_and_edits(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTEDIT_CACHE_DIR", str(tmp_path / "cache"))
    out_json = tmp_path / "demo.json"
    assert main(["demo", "--n", "10", "--batch-size", "5", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "computing the covariance statistics" in out  # empty cache: the first run says so
    for word in ("prompt", "top-1 before", "top-1 after", "efficacy", "generalization", "specificity", "score",
                 "seconds per stage", "fastedit edit --help", "harmonic mean", "weight norm", "[eval after]"):
        assert word in out
    res = json.loads(out_json.read_text())
    # every fact is either listed as not flipped or flipped
    assert ("did not flip" in out) == bool(res["not_flipped"]) and ("every one" in out) != bool(res["not_flipped"])
    growth = res["report"]["weight_norms"]
    assert set(growth) == {"0", "1"} and all(f"x{g['growth']:.3f}" in out for g in growth.values())
    # the NAS anchors are cached for the next run
    assert list((tmp_path / "cache" / "nas_anchors").glob("nas_anchor_*.json"))
    assert res["after"]["efficacy"] > res["before"]["efficacy"]
    assert len(res["examples"]) == 5 and res["report"]["n_requests"] == 10
    # The second run loads the cached statistics instead of computing them.
    assert main(["demo", "--n", "2", "--batch-size", "2", "--no-nas", "--method", "memit"]) == 0
    assert "computing the covariance statistics" not in capsys.readouterr().out


def test_demo_bad_input_is_one_line_error(capsys):
    assert main(["demo", "--arch", "bert"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--arch" in err
