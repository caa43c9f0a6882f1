"""Named presets from cascade.json: applied under what a request gives itself, refused when unknown or
malformed, carried through an ONNX export, listed by the service."""

import json

import numpy as np
import pytest

import engine
from engine import InvalidRequestError, ModelError

PRESET = {"stages": {"stage_I": {"steps": 3, "scheduler": "dpm++2m", "guidance_interval": [0, 600]},
                     "stage_II": {"steps": 2}},
          "certified": {"adherence": 0.9, "captions": 4, "floor": 0.5}}


@pytest.fixture
def preset_dir(cascade_copy):
    spec = json.loads((cascade_copy / "cascade.json").read_text())
    spec["presets"] = {"quick": PRESET}
    (cascade_copy / "cascade.json").write_text(json.dumps(spec))
    return cascade_copy


def test_a_preset_is_its_settings_under_the_requests_own(preset_dir):
    pipe = engine.load(preset_dir, device="cpu")
    assert pipe.presets["quick"].certified == PRESET["certified"]
    stage_i, stage_ii = pipe.settings(engine.GenerateRequest("x", preset="quick"))
    assert stage_i.sampler == "dpm++2m" and stage_i.timesteps == 3 and stage_i.guidance_interval == (0, 600)
    assert stage_i.guidance == pipe.stages[0].defaults.guidance  # what the preset leaves, the model's default
    assert stage_ii.timesteps == 2 and stage_ii.sampler is None
    same = pipe.generate("a red circle", seed=1, preset="quick", output_type="np")
    spelled_out = pipe.generate("a red circle", seed=1, steps=(3, 2), scheduler=None, output_type="np",
                                guidance_interval=((0, 600), None))
    assert np.abs(same - spelled_out).max() > 0  # stage I's sampler differs: the preset's dpm++2m
    explicit = pipe.settings(engine.GenerateRequest("x", preset="quick", steps=(5, 4), scheduler="ddim"))
    assert [s.timesteps for s in explicit] == [5, 4] and explicit[0].sampler == "ddim"  # the request wins


def test_an_unknown_preset_names_the_known_ones(preset_dir):
    pipe = engine.load(preset_dir, device="cpu")
    with pytest.raises(InvalidRequestError, match="preset 'fastest' is not one of this model's presets: quick"):
        pipe.generate("x", preset="fastest")


@pytest.mark.parametrize("presets, message", [
    ({"quick": {"stages": {"stage_IX": {}}}}, "stage directories among"),
    ({"quick": {"stage_I": {"steps": 3}}}, "stage directories among"),
    ({"quick": {"stages": {"stage_I": {"steps": -3}}}}, "preset 'quick' for stage_I"),
    ({"quick": {"stages": {"stage_I": {"colour": "red"}}}}, "unknown defaults"),
    ([], '"presets" must map names'),
])
def test_a_malformed_preset_is_a_model_error(cascade_copy, presets, message):
    spec = json.loads((cascade_copy / "cascade.json").read_text())
    spec["presets"] = presets
    (cascade_copy / "cascade.json").write_text(json.dumps(spec))
    with pytest.raises(ModelError, match=message):
        engine.load(cascade_copy, device="cpu")


def test_presets_survive_an_onnx_export(preset_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from export.onnx import export_onnx

    exported = export_onnx(preset_dir, out=tmp_path / "onnx", progress=False)
    ort = engine.load(exported)
    torch_pipe = engine.load(preset_dir, device="cpu")
    assert ort.presets["quick"].certified == PRESET["certified"]
    assert ort.settings(engine.GenerateRequest("x", preset="quick")) == \
        torch_pipe.settings(engine.GenerateRequest("x", preset="quick"))


def test_the_service_lists_presets_and_takes_one(preset_dir):
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from engine.serve.http import create_app

    with TestClient(create_app(engine.load(preset_dir, device="cpu"), warmup=False)) as client:
        assert client.get("/v1/presets").json() == {"presets": {"quick": PRESET["certified"]}}
        ok = client.post("/v1/images/generations", json={"prompt": "a red circle", "preset": "quick"})
        assert ok.status_code == 200, ok.text
        bad = client.post("/v1/images/generations", json={"prompt": "a red circle", "preset": "nope"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "preset"


def test_add_preset_is_the_cascade_json_preset_made_in_code(preset_dir, cascade_dir):
    from_file = engine.load(preset_dir, device="cpu")
    in_code = engine.load(cascade_dir, device="cpu")
    in_code.add_preset("quick", [PRESET["stages"]["stage_I"], PRESET["stages"]["stage_II"]], PRESET["certified"])
    assert in_code.presets["quick"] == from_file.presets["quick"]
    assert in_code.settings(engine.GenerateRequest("x", preset="quick")) == \
        from_file.settings(engine.GenerateRequest("x", preset="quick"))


@pytest.mark.parametrize("stages, message", [
    ([{"steps": 3}], "gives settings for 1 stage"),
    ([{"steps": 3}, {"steps": -2}], "preset 'bad' for stage_II"),
    ([{"colour": "red"}, None], "unknown defaults"),
])
def test_add_preset_refuses_what_a_stage_cannot_take_and_changes_nothing(cascade_dir, stages, message):
    pipe = engine.load(cascade_dir, device="cpu")
    with pytest.raises(InvalidRequestError, match=message):
        pipe.add_preset("bad", stages)
    assert "bad" not in pipe.presets and all("bad" not in stage.presets for stage in pipe.stages)
