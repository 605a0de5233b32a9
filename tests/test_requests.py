import json

import pytest

from fastedit.editing.requests import (
    Request, load_records, requests_from_records, validate_requests, NO_TRUE_TARGET,
)
from fastedit.errors import InputError


def test_counterfact_sample_loads(shared_data):
    recs = load_records(shared_data / "counterfact_500.json")
    assert len(recs) == 500 and all(r["format"] == "counterfact" for r in recs)
    reqs = requests_from_records(recs)
    validate_requests(reqs)
    raw = json.loads((shared_data / "counterfact_500.json").read_text())
    for r, q in zip(raw, reqs):
        assert q.case_id == r["case_id"]
        assert q.text == r["requested_rewrite"]["prompt"].replace("{}", r["requested_rewrite"]["subject"])
        assert q.target_new == r["requested_rewrite"]["target_new"]["str"].lstrip(" ")


def test_zsre_sample_normalised(shared_data):
    recs = load_records(shared_data / "zsre_mend_eval_1037.json")
    raw = json.loads((shared_data / "zsre_mend_eval_1037.json").read_text())
    assert len(recs) == len(raw) == 1037
    for rec, r in zip(recs, raw):
        rr = rec["requested_rewrite"]
        assert rr["prompt"].replace("{}", r["subject"]) == r["src"]
        assert rr["target_new"]["str"] == r["answers"][0]
        assert rr["target_true"]["str"] == NO_TRUE_TARGET
        assert rec["neighborhood_prompts"] == [{"prompt": r["loc"], "target": r["loc_ans"]}]
    validate_requests(requests_from_records(recs))


def test_leading_space_target_is_stripped():
    r = Request("{} plays", "Messi", " football", " tennis")
    assert r.target_new == "football" and r.target_true == "tennis"


@pytest.mark.parametrize("bad, msg", [
    (Request("{} and {} play", "A", "x"), "exactly once"),
    (Request("plays", "A", "x"), "exactly once"),
    (Request("{} plays", " ", "x"), "empty subject"),
    (Request("{} plays", "A", " "), "empty target_new"),
])
def test_validation_names_the_request(bad, msg):
    good = Request("{} plays", "A", "x")
    with pytest.raises(InputError, match=rf"request 1\b.*{msg}"):
        validate_requests([good, bad])


def test_from_dict_reports_missing_fields():
    with pytest.raises(InputError, match="request 3: missing field.*target_new"):
        Request.from_dict({"prompt": "{} x", "subject": "s"}, index=3)


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_records(tmp_path / "nope.json")
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_records(p)
    p.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(InputError, match="cannot tell"):
        load_records(p)


def test_jsonl_and_limit(tmp_path):
    p = tmp_path / "r.jsonl"
    rows = [{"requested_rewrite": {"prompt": "{} is in", "subject": f"S{i}",
                                   "target_new": {"str": "X"}, "target_true": {"str": "Y"}}} for i in range(5)]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    recs = load_records(p, limit=3)
    assert [q.subject for q in requests_from_records(recs)] == ["S0", "S1", "S2"]


def test_from_dict_takes_a_whole_counterfact_record(shared_data):
    raw = json.loads((shared_data / "counterfact_500.json").read_text())[0]
    r = Request.from_dict(raw)
    assert r.case_id == raw["case_id"] and r.subject == raw["requested_rewrite"]["subject"]
    assert r == requests_from_records(load_records([raw]))[0]
