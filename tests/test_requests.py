"""Bad requests fail with a clear InvalidRequestError before any model work."""

import math

import pytest

import engine
from engine import GenerateRequest, InvalidRequestError
from engine.options import STAGE_DEFAULTS, StageDefaults


@pytest.mark.parametrize("options,message", [
    ({"prompt": None}, "give a prompt"),
    ({"prompt": 42}, "prompt must be a string"),
    ({"prompt": ["ok", 3]}, "prompt must be a string"),
    ({"prompt": []}, "prompt is an empty list"),
    ({"negative_prompt": ["a", "b"], "prompt": ["x", "y", "z"]}, "negative_prompt has 2 entries but prompt has 3"),
    ({"steps": 0}, "steps must be 1..1000, got 0"),
    ({"steps": 1001}, "steps must be 1..1000, got 1001"),
    ({"steps": (10, -1)}, "steps must be 1..1000, got -1"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"steps": True}, "steps must be an integer"),
    ({"steps": "smart3"}, "unknown schedule 'smart3'"),
    ({"steps": [10, 20]}, "strictly descending"),
    ({"guidance": math.nan}, "guidance must be a finite number >= 0"),
    ({"guidance": math.inf}, "guidance must be a finite number >= 0"),
    ({"guidance": -1.0}, "guidance must be a finite number >= 0"),
    ({"guidance": (7.0, "4")}, "guidance must be a finite number >= 0"),
    ({"seed": -1}, r"seed must be 0..9223372036854775807, got -1"),
    ({"seed": 2**63}, "seed must be 0..9223372036854775807"),
    ({"seed": 1.0}, "seed must be an integer"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be >= 1, got 0"),
    ({"noise_level": 1000}, "noise_level must be 0..999"),
    ({"scheduler": "euler"}, "unknown scheduler 'euler'"),
    ({"output_type": "latent"}, "output_type must be one of pil, np, pt"),
])
def test_bad_requests_are_refused(options, message):
    options = {"prompt": "a red circle", **options}
    with pytest.raises(InvalidRequestError, match=message):
        GenerateRequest(**options)


def test_per_stage_values_must_match_the_number_of_stages():
    request = GenerateRequest("a red circle", steps=(10, 10, 10))
    with pytest.raises(InvalidRequestError, match="steps has 3 values but the cascade has 2 stages"):
        request.per_stage([STAGE_DEFAULTS["base"], STAGE_DEFAULTS["super_resolution"]])


def test_defaults_resolve_per_stage_kind():
    base, sr = GenerateRequest("x").per_stage([StageDefaults.for_stage("base"),
                                               StageDefaults.for_stage("super_resolution")])
    assert (base.guidance, sr.guidance, base.noise_level, sr.noise_level) == (7.0, 4.0, None, 250)
    assert len(base.timesteps) == 27 and base.timesteps[0] == 999 and base.timesteps[-1] == 0


def test_a_models_own_defaults_override_its_kinds_and_the_request_overrides_both():
    sr = StageDefaults.for_stage("super_resolution", {"steps": 12, "guidance": 1.0})
    assert (sr.steps, sr.guidance, sr.noise_level) == (12, 1.0, 250)  # noise level: the kind's
    _, second = GenerateRequest("x", guidance=3.0).per_stage([STAGE_DEFAULTS["base"], sr])
    assert (second.timesteps, second.guidance, second.noise_level) == (12, 3.0, 250)


@pytest.mark.parametrize("kind, overrides, message", [
    ("super_resolution", {"step": 12}, "unknown defaults \\['step'\\]"),
    ("base", {"noise_level": 100}, "unknown defaults \\['noise_level'\\]"),  # a base stage takes none
    ("base", {"steps": 0}, "steps must be 1..1000"),
    ("base", {"guidance": float("nan")}, "guidance must be a finite number"),
    ("super_resolution", {"noise_level": 1000}, "noise_level must be 0..999"),
    ("base", [12], "must be a mapping"),
])
def test_bad_model_defaults_are_named(kind, overrides, message):
    with pytest.raises(InvalidRequestError, match=message):
        StageDefaults.for_stage(kind, overrides)


def test_engine_generate_rejects_bad_input_before_loading(monkeypatch):
    # engine.generate must validate before touching the default model.
    monkeypatch.setattr(engine, "default_pipeline", lambda: pytest.fail("model loaded for a bad request"))
    with pytest.raises(InvalidRequestError):
        engine.generate(None)
    with pytest.raises(InvalidRequestError):
        engine.generate("a red circle", steps=-3)
