"""Issue 42, items 4, 5 and 8: no code runs from a model folder (auto_map, custom classes; "y" on stdin or
not), model configs are bounded (sizes, nesting), cascade.json stages stay under its root, prompts refuse C1
controls, and the API key guards every route but health, with an empty key refused at start."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engine
from engine.errors import EngineError, InvalidRequestError, ModelError
from engine.model_dir import CONFIG_BOUNDS, MAX_CONFIG_DEPTH, read_stages, stage_dirs

REPO = Path(__file__).resolve().parents[1]

# Python that a model folder would run if anyone imported it: it leaves a marker file beside itself.
EVIL = """from pathlib import Path
Path(__file__).with_name("MARKER").write_text("code from the model folder ran")
"""


def _edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _generate(model: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m engine generate --model DIR`, answering "y" to any trust_remote_code question."""
    return subprocess.run([sys.executable, "-m", "engine", "generate", "a red circle", "--model", str(model),
                           "--steps", "2", "--output", str(tmp_path / "out.png")],
                          input="y\ny\n", capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


# -- item 5: no code from model folders -----------------------------------------------------------------------

@pytest.mark.parametrize("component, config, auto_map", [
    ("text_encoder", "config.json", {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}),
    ("tokenizer", "tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]}),
])
def test_auto_map_is_refused_and_runs_nothing_even_when_stdin_says_yes(cascade_copy, tmp_path, component, config,
                                                                       auto_map):
    folder = cascade_copy / "stage_I" / component
    (folder / "evil.py").write_text(EVIL)
    _edit_json(folder / config, auto_map=auto_map)
    done = _generate(cascade_copy, tmp_path)
    assert not (folder / "MARKER").exists(), "code from the model folder ran"
    assert done.returncode != 0 and not (tmp_path / "out.png").exists()
    assert "auto_map" in done.stderr and config in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("component, config, change, field", [
    (".", "model_index.json", {"_class_name": "EvilPipeline"}, "_class_name"),
    ("text_encoder", "config.json", {"architectures": ["EvilEncoderModel"]}, "architectures"),
    ("tokenizer", "tokenizer_config.json", {"tokenizer_class": "EvilTokenizer"}, "tokenizer_class"),
    (".", "model_index.json", {"unet": ["evil", "EvilUNet"]}, "unet"),
    (".", "model_index.json", {"custom_pipeline": "evil"}, "custom_pipeline"),
])
def test_a_class_that_transformers_or_diffusers_do_not_ship_is_a_model_error(cascade_copy, component, config,
                                                                             change, field):
    _edit_json(cascade_copy / "stage_I" / component / config, **change)
    with pytest.raises(ModelError) as info:
        engine.load(cascade_copy, device="cpu")
    assert config in str(info.value) and f'"{field}"' in str(info.value)


def test_every_loading_call_turns_remote_code_off():
    """The engine's own loaders of transformers' Auto classes say trust_remote_code=False (they would ask on a tty)."""
    for path in (REPO / "engine").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "AutoConfig.from_pretrained(" in line or "AutoTokenizer.from_pretrained(" in line:
                assert "trust_remote_code=False" in line, f"{path}:{number}: {line.strip()}"


# -- item 8: bounded configs, stages under the root, C1 controls ----------------------------------------------

@pytest.mark.parametrize("component, key, value", [
    ("unet", "layers_per_block", 10**6),
    ("unet", "block_out_channels", [16] * 1000),
    ("unet", "block_out_channels", [16, 10**7]),
    ("text_encoder", "num_layers", 10**6),
    ("text_encoder", "d_model", 10**7),
])
def test_a_config_past_any_published_model_is_refused_before_anything_is_built(cascade_copy, component, key,
                                                                              value):
    _edit_json(cascade_copy / "stage_I" / component / "config.json", **{key: value})
    started = time.monotonic()
    with pytest.raises(ModelError) as info:
        read_stages(stage_dirs([cascade_copy]))
    assert time.monotonic() - started < 10
    assert f'"{key}"' in str(info.value) and "config.json" in str(info.value)


def test_the_bounds_hold_every_published_if_model():
    real = json.loads((REPO / "engine" / "configs" / "real_size.json").read_text())
    for model, parts in real.items():
        for part, config in (parts.items() if isinstance(parts, dict) else ()):
            for key, bound in CONFIG_BOUNDS.items():
                value = config.get(key) if isinstance(config, dict) else None
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, int) and not isinstance(v, bool):
                        assert v * 4 <= bound, (model, part, key, v)


@pytest.mark.parametrize("depth", [MAX_CONFIG_DEPTH + 1, 200_000])
def test_deeply_nested_json_in_a_config_is_a_model_error_not_a_recursion_error(cascade_copy, depth):
    file = cascade_copy / "stage_I" / "unet" / "config.json"
    text = file.read_text().rstrip()
    file.write_text(text[:-1] + ', "nested": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ModelError) as info:
        read_stages(stage_dirs([cascade_copy]))
    assert "nested deeper" in str(info.value) and "config.json" in str(info.value)


def test_cascade_stages_must_stay_under_its_root(cascade_copy, tmp_path):
    outside = tmp_path / "outside"
    (cascade_copy / "stage_II").rename(outside)
    cascade = cascade_copy / "cascade.json"
    _edit_json(cascade, stages=["stage_I", "../outside"])
    with pytest.raises(ModelError) as info:
        stage_dirs([cascade_copy])
    assert "outside the cascade's folder" in str(info.value)
    (cascade_copy / "stage_II").symlink_to(outside)  # a symlink out of the root is outside too
    _edit_json(cascade, stages=["stage_I", "stage_II"])
    with pytest.raises(ModelError) as info:
        stage_dirs([cascade_copy])
    assert "outside the cascade's folder" in str(info.value)


@pytest.mark.parametrize("char", ["\u0085", "\u009b", "\u0080", "\u009f", "\x1b", "\x00"])
def test_prompts_refuse_c1_as_well_as_c0_controls(char):
    with pytest.raises(InvalidRequestError) as info:
        engine.GenerateRequest(f"a red{char}circle")
    assert f"U+{ord(char):04X}" in str(info.value)


def test_prompts_keep_tab_and_newlines():
    assert engine.GenerateRequest("a red\tcircle\non blue\r\n").prompt == "a red\tcircle\non blue\r\n"


# -- item 4: authentication without holes ---------------------------------------------------------------------

GUARDED = ("/v1/models", "/v1/limits", "/v1/presets", "/openapi.json", "/docs", "/redoc", "/metrics")
HEALTH = ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready")


def _serve(argv, monkeypatch, capsys):
    """`python -m engine serve ARGV` up to the point where uvicorn would take the app: (exit status, stderr,
    the app or None)."""
    pytest.importorskip("uvicorn")
    from engine.cli import main
    from engine.serve import http

    served = {}
    monkeypatch.setattr(http, "run", lambda app, *args, **kwargs: served.update(app=app))  # no socket
    status = main(["serve", *argv])
    return status, capsys.readouterr().err, served.get("app")


def _ready(client, limit_s=120):
    deadline = time.monotonic() + limit_s
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health/ready").text
        time.sleep(0.05)


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_api_key_is_refused_at_start(key, monkeypatch, capsys):
    monkeypatch.delenv("CASCADE_ENGINE_API_KEYS", raising=False)
    status, err, app = _serve(["--api-key", key, "--host", "0.0.0.0"], monkeypatch, capsys)
    assert status != 0 and app is None
    assert "--api-key is empty: was $KEY set?" in err


def test_an_empty_key_file_or_environment_variable_is_refused_too(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CASCADE_ENGINE_API_KEYS", " , ")
    status, err, app = _serve([], monkeypatch, capsys)
    assert status != 0 and app is None and "CASCADE_ENGINE_API_KEYS" in err
    monkeypatch.delenv("CASCADE_ENGINE_API_KEYS")
    (tmp_path / "keys").write_text("\n  \n")
    status, err, app = _serve(["--api-key-file", str(tmp_path / "keys")], monkeypatch, capsys)
    assert status != 0 and app is None and "holds no key" in err


def test_create_app_refuses_an_empty_key(engine_pipe):
    pytest.importorskip("fastapi")
    from engine.serve.http import create_app

    for keys in ([""], ["good", " "]):
        with pytest.raises(InvalidRequestError, match="API key is empty"):
            create_app(engine_pipe, warmup=False, api_keys=keys)


def test_with_a_key_every_route_but_health_needs_it(engine_pipe):
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from engine.serve.http import create_app

    with TestClient(create_app(engine_pipe, warmup=False, api_keys=["k-one"])) as client:
        _ready(client)
        for path in HEALTH:
            assert client.get(path).status_code == 200, path
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"}, {"Authorization": "k-one"},
                        {"Authorization": "Bearer k-on"}):
            for path in GUARDED:
                response = client.get(path, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["type"] == "authentication_error"
            response = client.post("/v1/images/generations", json={"prompt": "a cat"}, headers=headers)
            assert response.status_code == 401, headers
        good = {"Authorization": "Bearer k-one"}
        for path in GUARDED:
            assert client.get(path, headers=good).status_code == 200, path
        assert "/v1/images/generations" in client.get("/openapi.json", headers=good).json()["paths"]


def test_metrics_open_leaves_only_metrics_open_and_it_names_no_path(engine_pipe):
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from engine.serve.http import create_app

    with TestClient(create_app(engine_pipe, warmup=False, api_keys=["k"], metrics_open=True)) as client:
        _ready(client)
        response = client.get("/metrics")
        assert response.status_code == 200 and engine_pipe.source not in response.text
        assert Path(engine_pipe.source).name not in response.text
        assert client.get("/v1/models").status_code == 401


def test_clients_see_the_models_name_not_its_path_unless_the_operator_asks(engine_pipe, tmp_path):
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from engine.serve.http import create_app

    path, name = engine_pipe.source, Path(engine_pipe.source).name
    with TestClient(create_app(engine_pipe, warmup=False)) as client:
        _ready(client)
        assert client.get("/v1/models").json()["data"][0]["id"] == name
        assert client.get(f"/v1/models/{name}").status_code == 200
        for route in ("/v1/models", "/health/ready", f"/v1/models/{name}"):
            assert path not in client.get(route).text, route
    with TestClient(create_app(engine_pipe, warmup=False, show_model_path=True)) as client:
        _ready(client)
        assert client.get("/v1/models").json()["data"][0]["id"] == path
    missing = tmp_path / "secret-place" / "model"  # a load failure, reported on the open health routes
    with TestClient(create_app(lambda: engine.load(missing, device="cpu"), warmup=False)) as client:
        deadline = time.monotonic() + 30
        while client.get("/health/live").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        for route in ("/health/live", "/health/ready"):
            text = client.get(route).text
            assert "no such model directory" in text and "secret-place" not in text, text


def test_the_cli_names_the_model_by_its_folder_and_warns_beyond_loopback_without_a_key(cascade_dir, monkeypatch,
                                                                                       capsys):
    from starlette.testclient import TestClient

    monkeypatch.delenv("CASCADE_ENGINE_API_KEYS", raising=False)
    status, err, _ = _serve(["--model", str(cascade_dir), "--host", "127.0.0.2"], monkeypatch, capsys)
    assert status == 0 and "beyond loopback" not in err
    for host in ("0.0.0.0", "::", "192.168.1.7"):
        status, err, _ = _serve(["--model", str(cascade_dir), "--host", host], monkeypatch, capsys)
        assert status == 0 and "beyond loopback, with no API key" in err, host
    status, err, app = _serve(["--model", str(cascade_dir), "--host", "0.0.0.0", "--api-key", "k", "--max-batch",
                               "1"], monkeypatch, capsys)
    assert status == 0 and "beyond loopback" not in err
    with TestClient(app) as client:
        _ready(client)
        models = client.get("/v1/models", headers={"Authorization": "Bearer k"})
        assert models.json()["data"][0]["id"] == cascade_dir.name and str(cascade_dir) not in models.text
