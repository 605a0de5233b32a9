"""fastedit.compat: the reference repositories' and EasyEdit's files, statistics, requests and
call shapes, checked against the values of the published files and against the Editor path."""
import json
import pathlib
import warnings

import numpy as np
import pytest
import torch
import yaml

import _editing_world as W
from fastedit import presets
from fastedit.compat import (AlphaEditState, ReferenceStats, apply_AlphaEdit_to_model, apply_memit_to_model,
                             easyedit_records, export_reference_stats, load_hparams, to_request)
from fastedit.editing import Editor, context_templates
from fastedit.errors import InputError
from fastedit.linalg import CovarianceAccumulator

DATA = pathlib.Path(__file__).parent / "data" / "compat"
FILES = sorted(p for p in DATA.rglob("*") if p.suffix in (".json", ".yaml"))
MAPPED = {"layers": "layers", "v_num_grad_steps": "v_num_grad_steps", "v_lr": "v_lr",
          "clamp_norm_factor": "clamp_norm_factor", "kl_factor": "kl_factor", "v_weight_decay": "v_weight_decay",
          "mom2_update_weight": "lam", "nullspace_threshold": "nullspace_threshold", "L2": "L2"}


def _raw(path):
    return yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.name}")
def test_published_files_load_with_every_value(path):
    raw = _raw(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_hparams(path)
    assert ("P_loc" in raw) == any("P_loc" in str(w.message) for w in caught)
    assert cfg.method == path.parent.name.lower() and cfg.strategy == "distribute" and not cfg.unknown
    for key, name in MAPPED.items():
        if key in raw:
            want = tuple(raw[key]) if key == "layers" else float(raw[key])
            assert getattr(cfg.params, name) == want, key
    assert cfg.v_loss_layer == raw["v_loss_layer"]
    assert cfg.modules["rewrite_module_tmp"] == raw["rewrite_module_tmp"]
    assert cfg.stats["n_samples"] == raw["mom2_n_samples"] and cfg.stats["dtype"] == raw["mom2_dtype"]


@pytest.mark.parametrize("preset,path", [("gpt2-xl", "alphaedit/AlphaEdit/gpt2-xl.json"),
                                         ("gpt-j-6b", "memit/MEMIT/EleutherAI_gpt-j-6B.json"),
                                         ("llama3-8b-instruct", "alphaedit/AlphaEdit/Llama3-8B.json"),
                                         ("llama3.1-8b-instruct", "easyedit/AlphaEdit/llama3-8b.yaml"),
                                         ("qwen2.5-7b", "easyedit/MEMIT/qwen2.5-7b.yaml")])
def test_presets_hold_the_published_values(preset, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_hparams(DATA / path)
    got, want = presets.get(preset), cfg.params
    fields = ["layers", "lam", "v_num_grad_steps", "v_lr", "clamp_norm_factor", "kl_factor", "v_weight_decay",
              "nullspace_threshold"] + (["L2"] if "L2" in _raw(DATA / path) else [])
    assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}
    assert presets.source(preset)


def test_fastedit_presets_is_the_editing_module():
    import fastedit.editing.presets as inner

    assert presets is inner
    presets.register("compat-test", presets.get("tiny"), source="test")
    try:
        assert "compat-test" in inner.names() and inner.source("compat-test") == "test"
    finally:
        del inner.PRESETS["compat-test"], inner.SOURCES["compat-test"]


def _tiny_file(**changes) -> dict:
    d = {"layers": [1, 2], "clamp_norm_factor": 2.5, "layer_selection": "all", "fact_token": "subject_last",
         "v_num_grad_steps": 6, "v_lr": 0.5, "v_loss_layer": 3, "v_weight_decay": 0.01, "kl_factor": 0.0625,
         "mom2_adjustment": True, "mom2_update_weight": 200, "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj",
         "layer_module_tmp": "transformer.h.{}", "mlp_module_tmp": "transformer.h.{}.mlp",
         "attn_module_tmp": "transformer.h.{}.attn", "ln_f_module": "transformer.ln_f", "lm_head_module": "lm_head",
         "mom2_dataset": "wikipedia", "mom2_n_samples": 100000, "mom2_dtype": "float32",
         "nullspace_threshold": 2e-2, "L2": 1.0, "context_template_length_params": [[4, 2]]}
    d.update(changes)
    return {k: v for k, v in d.items() if v is not None}


def test_unknown_keys_are_refused_or_warned_by_name():
    with pytest.raises(InputError, match="mom2_sample_size"):
        load_hparams(_tiny_file(mom2_sample_size=5), alg_name="MEMIT")
    with pytest.warns(UserWarning, match="mom2_sample_size"):
        cfg = load_hparams(_tiny_file(mom2_sample_size=5), alg_name="MEMIT", strict=False)
    assert cfg.unknown == {"mom2_sample_size": 5}


def test_fastedit_fields_that_are_no_numbers_pass_through():
    cfg = load_hparams(_tiny_file(vstar_checkpoint=True, vstar_autocast="bfloat16", max_chunk_tokens=4096),
                       alg_name="MEMIT")
    hp = cfg.params
    assert (hp.vstar_checkpoint, hp.vstar_autocast, hp.max_chunk_tokens) == (True, "bfloat16", 4096)
    for key, bad in (("vstar_checkpoint", "yes"), ("vstar_autocast", "float16"), ("max_chunk_tokens", 0)):
        with pytest.raises(InputError, match=key):
            load_hparams(_tiny_file(**{key: bad}), alg_name="MEMIT")


@pytest.mark.parametrize("key,value", [("fact_token", "last"), ("layer_selection", "random"),
                                       ("mom2_adjustment", False), ("context_template_length_params", [[5, 10], [10, 10]]),
                                       ("v_lr", "fast")])
def test_values_fastedit_cannot_honour_are_refused(key, value):
    with pytest.raises(InputError, match=key):
        load_hparams(_tiny_file(**{key: value}), alg_name="MEMIT")


@pytest.mark.parametrize("alg,want", [("MEMIT", ("memit", "distribute", False, None)),
                                      ("AlphaEdit_BLUE", ("alphaedit", "blue", False, None)),
                                      ("MEMIT_rect", ("memit", "distribute", False, "rect")),
                                      ("NAS_AlphaEdit", ("alphaedit", "distribute", True, None)),
                                      ("MEMIT_seq-BLUE-prune", ("memit_seq", "blue", False, "prune"))])
def test_alg_names_pick_method_and_variant(alg, want):
    cfg = load_hparams(_tiny_file(), alg_name=alg)
    assert (cfg.method, cfg.strategy, cfg.nas, cfg.regularizer) == want
    assert (cfg.params.context_length, cfg.params.context_n) == (4, 2)
    assert cfg.editor_kwargs()["hparams"] is cfg.params


@pytest.mark.parametrize("alg", ["ROME", "NSE", "MEMIT_rect_prune", None])
def test_alg_names_fastedit_does_not_run_are_refused(alg):
    with pytest.raises(InputError, match="alg_name"):
        load_hparams(_tiny_file(), alg_name=alg)


def test_check_model_refuses_a_file_for_another_model():
    model = W.model("gpt2")
    load_hparams(_tiny_file(), alg_name="MEMIT").check_model(model)
    with pytest.raises(InputError, match="v_loss_layer"):
        load_hparams(_tiny_file(v_loss_layer=47), alg_name="MEMIT").check_model(model)
    with pytest.raises(InputError, match="rewrite_module_tmp"):
        load_hparams(_tiny_file(rewrite_module_tmp="transformer.h.{}.mlp.c_fc"), alg_name="MEMIT").check_model(model)
    with pytest.raises(InputError, match="ln_f_module"):
        load_hparams(_tiny_file(ln_f_module="model.norm"), alg_name="MEMIT").check_model(model)


# ------------------------------------------------------------------ statistics
def _write_reference_npz(root, model_name, module, mom2_f32: np.ndarray, count: int, n_samples=100000):
    """A file as the reference's layer_stats leaves it: runningstats' CombinedStat(mom2=SecondMoment())
    state_dict (keys pushed under the "mom2." prefix) plus tally's sample_size, saved with np.savez."""
    folder = pathlib.Path(root) / model_name / "wikipedia_stats"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}_float32_mom2_{n_samples}.npz"
    np.savez(path, **{"mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                      "mom2.count": np.array(count), "mom2.mom2": mom2_f32, "sample_size": np.array(n_samples)})
    return path


def _reference_stats(root, model, layers, count=4093):
    """Reference files for ``layers`` (float32 sums of count · C0) and the C0 the reference derives
    from them: SecondMoment.moment() = mom2 / count in float32, then .double()."""
    ad = W.get_adapter(model)
    C = W.fresh_covariances("gpt2", layers)
    out = {}
    for l in layers:
        mom2 = (C[l] * count).to(torch.float32).numpy()
        _write_reference_npz(root, "gpt2-tiny", ad.rewrite_name(l), mom2, count)
        out[l] = (torch.from_numpy(mom2) / count).double()
    return out


def test_reference_stats_directory_gives_the_references_C0_exactly(tmp_path):
    model, tok = W.model("gpt2"), W.tokenizer()
    want = _reference_stats(tmp_path / "stats", model, [1, 2])
    ad = W.get_adapter(model)
    rs = ReferenceStats(tmp_path / "stats", dataset="wikipedia", n_samples=100000, dtype="float32")
    ed = Editor(model, tok, method="memit", hparams=presets.get("tiny"), stats=str(tmp_path / "stats"), progress=False)
    for l in (1, 2):
        assert torch.equal(rs.covariance(l, ad), want[l])
        assert torch.equal(ed.covariance(l), want[l])
        # the float32 division is what the reference does: a float64 one differs in the last bits
        mom2, count = torch.from_numpy(np.load(rs.path(ad.rewrite_name(l)))["mom2.mom2"]).double(), 4093
        assert not torch.equal(mom2 / count, want[l])
    with pytest.raises(InputError, match="no reference statistics"):
        ReferenceStats(tmp_path / "stats", n_samples=5).covariance(1, ad)


def test_export_writes_what_the_reference_reads(tmp_path):
    model = W.model("gpt2")
    ad = W.get_adapter(model)
    keys = torch.randn(2, 37, ad.d_k, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    acc = CovarianceAccumulator(ad.d_k)
    acc.update(keys)
    paths = export_reference_stats({1: acc}, tmp_path, model, model_name="gpt2-tiny", n_samples=1000)
    with np.load(paths[1]) as f:
        assert sorted(f.files) == ["mom2.constructor", "mom2.count", "mom2.mom2", "sample_size"]
        assert f["mom2.mom2"].dtype == np.float32 and int(f["mom2.count"]) == 74 and int(f["sample_size"]) == 1000
    got = ReferenceStats(tmp_path).covariance(1, ad)
    assert torch.equal(got, (acc.sum.float() / acc.count).double())


# ------------------------------------------------------------------ requests
def test_easyedit_requests_put_the_subject_slot_in_the_prompt():
    r = to_request({"prompt": "the city of Alice Smith", "subject": "Alice Smith", "target_new": "Tokyo",
                    "ground_truth": "Paris"})
    assert (r.prompt, r.subject, r.target_new, r.target_true) == ("the city of {}", "Alice Smith", "Tokyo", "Paris")
    assert to_request({"prompt": "the city of {}", "subject": "Alice Smith", "target_new": {"str": " Tokyo"}}) == \
        W.Request("the city of {}", "Alice Smith", "Tokyo")
    with pytest.raises(InputError, match="does not occur"):
        to_request({"prompt": "the city of Bob", "subject": "Alice", "target_new": "Tokyo"})
    recs = easyedit_records(prompts=["the city of Alice Smith", "music of Bob Jones"], target_new=["Tokyo", "violin"],
                            subject=["Alice Smith", "Bob Jones"], rephrase_prompts=["Alice Smith lives in", "Bob plays"],
                            locality_inputs={"neighborhood": {"prompt": ["the sun is", "a small house"],
                                                              "ground_truth": ["red", "blue"]}})
    assert recs[1]["requested_rewrite"]["prompt"] == "music of {}"
    assert recs[0]["neighborhood_prompts"] == [{"prompt": "the sun is", "target": "red", "locality": "neighborhood"}]
    with pytest.raises(InputError, match="target_new has 1"):
        easyedit_records(prompts=["a", "b"], target_new=["x"], subject=["a", "b"])


# ------------------------------------------------------------------ the reference call shapes
def _reference_memit_driver(apply_memit_to_model, model, tok, hparams_path, records):
    """A driver written against kmeng01/memit (experiments/evaluate.py's call shape)."""
    requests = [{"case_id": rec["case_id"], **rec["requested_rewrite"]} for rec in records]
    edited_model, weights_copy = apply_memit_to_model(model, tok, requests, hparams_path, copy=False,
                                                      return_orig_weights=True)
    return edited_model, weights_copy


def _reference_alphaedit_driver(apply_AlphaEdit_to_model, model, tok, hparams_path, batches):
    """A driver written against jianghoucheng/AlphaEdit: sequential batches, cache_c carried."""
    cache_c, P = None, None
    for batch in batches:
        model, cache_c = apply_AlphaEdit_to_model(model, tok, batch, hparams_path, cache_template=None,
                                                  cache_c=cache_c, P=P)
    return model, cache_c


def _records(requests):
    return [{"case_id": r.case_id, "requested_rewrite": {"prompt": r.prompt, "subject": r.subject,
                                                         "target_new": {"str": r.target_new},
                                                         "target_true": {"str": "Paris"}}} for r in requests]


def _setup(tmp_path, folder, **changes):
    d = tmp_path / "hparams" / folder
    d.mkdir(parents=True)
    path = d / "gpt2-tiny.json"
    path.write_text(json.dumps(_tiny_file(stats_dir=str(tmp_path / "stats"), **changes)))
    return path


def _hand_params(**changes):
    # the tiny file's values typed in by hand, so the Editor path does not go through the loader
    values = dict(layers=(1, 2), lam=200.0, v_num_grad_steps=6, v_lr=0.5, clamp_norm_factor=2.5, v_weight_decay=0.01,
                  kl_factor=0.0625, L2=1.0, nullspace_threshold=2e-2, context_length=4, context_n=2)
    return presets.get("tiny").replace(**{**values, **changes})


def test_a_memit_driver_gets_the_editor_delta(tmp_path):
    tok = W.tokenizer()
    path = _setup(tmp_path, "MEMIT")
    model = W.model("gpt2")
    C0 = _reference_stats(tmp_path / "stats", model, [1, 2])
    before = W.weights(model)
    edited, weights_copy = _reference_memit_driver(apply_memit_to_model, model, tok, path, _records(W.REQUESTS))
    assert edited is model
    assert set(weights_copy) == {f"transformer.h.{l}.mlp.c_proj.weight" for l in (1, 2)}
    for name, w in weights_copy.items():
        assert torch.equal(w, before[name])

    ref = W.model("gpt2")
    templates = context_templates(ref, tok, n=2, length=4, seed=0)
    editor = Editor(ref, tok, method="memit", hparams=_hand_params(), stats=C0, progress=False,
                    context_templates=templates, record_deltas=True)
    report = editor.edit(W.REQUESTS, batch_size=len(W.REQUESTS))
    for l in (1, 2):
        name = f"transformer.h.{l}.mlp.c_proj.weight"
        got = model.get_parameter(name).detach() - before[name]
        want = ref.get_parameter(name).detach() - before[name]
        assert got.abs().max() > 0 and torch.equal(got, want)
        assert torch.equal(editor.original_weights[l], before[name])
        assert torch.equal(report.batches[0].deltas[l], editor.delta(l)) and torch.equal(editor.delta(l), want.T)
    # a second call reuses what the reference keeps in globals (templates, factored λC0): one Editor
    from fastedit.compat.reference import _SESSIONS

    apply_memit_to_model(model, tok, _records(W.MORE_REQUESTS[:1]), path)
    assert len(_SESSIONS[model]) == 1 and _SESSIONS[model][0][2].batches_done == 2


def test_an_alphaedit_driver_carries_cache_c_like_the_editor(tmp_path):
    tok = W.tokenizer()
    path = _setup(tmp_path, "AlphaEdit", nullspace_threshold=0.5)
    model = W.model("gpt2")
    C0 = _reference_stats(tmp_path / "stats", model, [1, 2])
    before = W.weights(model)
    batches = [_records(W.REQUESTS[:2]), _records(W.REQUESTS[2:])]
    # EasyEdit-shaped requests in the second batch: the subject inside the prompt
    batches[1] = [{"prompt": r.text, "subject": r.subject, "target_new": r.target_new} for r in W.REQUESTS[2:]]
    model, state = _reference_alphaedit_driver(apply_AlphaEdit_to_model, model, tok, path, batches)
    assert isinstance(state, AlphaEditState) and state.calls == 2

    ref = W.model("gpt2")
    editor = Editor(ref, tok, method="alphaedit", hparams=_hand_params(nullspace_threshold=0.5), stats=C0,
                    progress=False)
    editor.edit(W.REQUESTS, batch_size=2)
    for l in (1, 2):
        name = f"transformer.h.{l}.mlp.c_proj.weight"
        got = model.get_parameter(name).detach() - before[name]
        assert got.abs().max() > 0 and torch.equal(got, ref.get_parameter(name).detach() - before[name])

    # the reference's dense P and a zero cache_c, as its driver builds them, give the same edit
    dense = W.model("gpt2")
    P = torch.stack([editor._solvers[l].impl.projector() for l in (1, 2)])
    dense, state = apply_AlphaEdit_to_model(dense, tok, batches[0], path, cache_c=torch.zeros_like(P), P=P)
    dense, state = apply_AlphaEdit_to_model(dense, tok, batches[1], path, cache_c=state, P=state)
    for l in (1, 2):
        name = f"transformer.h.{l}.mlp.c_proj.weight"
        torch.testing.assert_close(dense.get_parameter(name).detach(), model.get_parameter(name).detach(),
                                   rtol=1e-5, atol=1e-6)


def test_bad_context_templates_are_refused():
    with pytest.raises(InputError, match="exactly once"):
        Editor(W.model("gpt2"), W.tokenizer(), method="memit", hparams=presets.get("tiny"), stats={},
               context_templates=[["{}"], ["no slot"]], progress=False)


def test_an_easyedit_script_gets_the_editor_delta():
    from fastedit.compat.easyedit import BaseEditor, MEMITHyperParams

    tok = W.tokenizer()
    model = W.model("gpt2")
    C0 = W.fresh_covariances("gpt2", [1, 2])
    before = W.weights(model)
    reqs = W.REQUESTS[:2]
    kwargs = dict(prompts=[r.text for r in reqs], target_new=[r.target_new for r in reqs],
                  subject=[r.subject for r in reqs], ground_truth=["Paris"] * 2,
                  rephrase_prompts=[f"a {r.text}" for r in reqs],
                  locality_inputs={"neighborhood": {"prompt": W.HELD[:2], "ground_truth": ["red", "blue"]}})
    hp = load_hparams({**_tiny_file(), "alg_name": "MEMIT"})
    editor = BaseEditor.from_hparams(hp, model=model, tok=tok, stats=C0)
    metrics, edited, weights_copy = editor.edit(**kwargs, sequential_edit=False)
    W.assert_unchanged(model, before)  # each request edited alone, then restored, as EasyEdit does
    assert [m["case_id"] for m in metrics] == [0, 1]
    assert set(metrics[0]["post"]) == {"rewrite_acc", "rephrase_acc", "locality"}
    assert list(metrics[0]["post"]["locality"]) == ["neighborhood_acc"]
    metrics, edited, _ = editor.edit(**kwargs, sequential_edit=True)
    assert edited is model and sum(m["post"]["rewrite_acc"][0] for m in metrics) > \
        sum(m["pre"]["rewrite_acc"][0] for m in metrics)

    ref = W.model("gpt2")
    Editor(ref, tok, method="memit", hparams=_hand_params(), stats=C0, progress=False).edit(reqs, batch_size=1)
    for l in (1, 2):
        name = f"transformer.h.{l}.mlp.c_proj.weight"
        assert torch.equal(model.get_parameter(name), ref.get_parameter(name))
    with pytest.raises(InputError, match="not AlphaEdit"):
        from fastedit.compat.easyedit import AlphaEditHyperParams

        AlphaEditHyperParams.from_hparams(DATA / "easyedit" / "MEMIT" / "gpt2-xl.yaml")
    assert MEMITHyperParams.from_hparams(DATA / "easyedit" / "MEMIT" / "gpt2-xl.yaml").params.lam == 20000.0
