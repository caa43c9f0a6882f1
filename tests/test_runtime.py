"""Runtime behaviour beyond parity: outputs, the cached empty prompt, NaN detection, the default model, CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

import engine
from engine import NumericalError
from engine.cli import build_parser, load_options, main


def test_output_types_agree(engine_pipe):
    options = dict(seed=4, steps=(2, 2))
    pil = engine_pipe.generate("a red circle", output_type="pil", **options)
    array = engine_pipe.generate("a red circle", output_type="np", **options)
    tensor = engine_pipe.generate("a red circle", output_type="pt", **options)
    assert isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    assert array.dtype == np.float32 and array.shape == (1, 32, 32, 3) and 0 <= array.min() and array.max() <= 1
    assert tensor.shape == (1, 3, 32, 32)
    assert np.allclose(tensor.permute(0, 2, 3, 1).numpy(), array)
    assert np.abs(np.asarray(pil[0], dtype=np.float32) / 255 - array[0]).max() <= 0.5 / 255 + 1e-6


def test_empty_prompt_is_encoded_once(engine_pipe):
    engine_pipe.text._empty = None
    calls = []
    encode = engine_pipe.text.encode
    engine_pipe.text.encode = lambda prompts: (calls.append(list(prompts)), encode(prompts))[1]
    try:
        for seed in range(3):
            engine_pipe.generate("a red circle", seed=seed, steps=(1, 1))
    finally:
        engine_pipe.text.encode = encode
    assert calls.count([""]) == 1 and calls.count(["a red circle"]) == 3


def test_nan_in_a_stage_is_a_clear_error(engine_pipe):
    stage = engine_pipe.stages[1]
    unet = stage.unet
    stage.unet = lambda sample, *a, **k: torch.full_like(unet(sample, *a, **k), float("nan"))
    stage.unet.sample_size, stage.unet.out_channels = unet.sample_size, unet.out_channels
    try:
        with pytest.raises(NumericalError, match="stage_II produced NaN or inf values.*float16 overflow"):
            engine_pipe.generate("a red circle", steps=(1, 1))
    finally:
        stage.unet = unet


def test_default_model_generates_offline_and_is_reused():
    images = engine.generate("a red circle on a blue background", seed=0, steps=(2, 2))
    assert len(images) == 1 and images[0].size == (128, 128)
    assert engine.default_pipeline() is engine.default_pipeline()
    assert "grammar" in engine.default_pipeline().notice  # a demo model: it says what it can draw


def test_cli_writes_a_png_of_the_final_size(cascade_dir, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(["generate", "a red circle", "-o", str(out), "--model", str(cascade_dir), "--seed", "0",
                 "--steps", "2", "--guidance", "5", "3"])
    assert code == 0
    assert Image.open(out).size == (32, 32)
    assert "stage_I" in capsys.readouterr().out  # the timing line


def test_cli_writes_numbered_files_for_several_images(cascade_dir, tmp_path):
    code = main(["generate", "a red circle", "-o", str(tmp_path / "img.png"), "--model", str(cascade_dir),
                 "-n", "2", "--steps", "1", "--quiet"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-0.png", "img-1.png"]


@pytest.mark.parametrize("argv,message", [
    (["generate", "x", "--steps", "0"], "error: steps must be 1..1000"),
    (["generate", "x", "--model", "/missing"], "error: /missing: no such model directory"),
    (["generate", "x", "--seed", "-5"], "error: seed must be"),
    (["generate", "x", "-o", "out.jpg"], "error: output must be a .png path"),
])
def test_cli_bad_input_is_one_line_and_nonzero(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("command", [["generate", "a cat"], ["eval"], ["serve"], ["batch", "rows.txt", "--out", "d"]])
def test_every_command_that_loads_takes_the_same_load_flags(command):
    """--fast, --device, --dtype, --backend, --offload and --text-encoder-device come from one parent parser, on
    every command that loads."""
    args = build_parser().parse_args(command + ["--fast", "--device", "cpu", "--dtype", "float32",
                                                "--backend", "torch", "--offload", "model",
                                                "--text-encoder-device", "cpu"])
    assert load_options(args) == {"backend": "torch", "device": "cpu", "dtype": "float32", "fast": True,
                                  "offload": "model", "text_encoder_device": "cpu"}
    assert load_options(build_parser().parse_args(command + ["--no-fast"]))["fast"] is False
