"""The command line's small traps, each closed: an unwritable -o fails before any model work, per-stage options
before the prompt hand it back, --version, -v/--log-level, relative paths, seeds printed and stored, eval's
progress and contact sheet."""

import json
import logging
import os
import shutil

import pytest
from PIL import Image

import engine
from engine import ModelError
from engine.cli import main


def test_unwritable_output_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import engine.loading

    monkeypatch.setattr(engine.loading, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["generate", "a cat", "-o", str(blocker / "out.png")]) == 2  # a file where a directory must be
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot create the output's directory")
    (tmp_path / "d.png").mkdir()
    assert main(["generate", "a cat", "-o", str(tmp_path / "d.png")]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_per_stage_values_before_the_prompt_give_it_back(cascade_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", "--model", str(cascade_dir), "-o", str(out), "--guidance", "5", "3",
                 "--steps", "2", "1", "a red circle"]) == 0
    assert Image.open(out).text["prompt"] == "a red circle"


def test_a_prompt_swallowed_by_model_is_said(cascade_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(cascade_dir), "a red circle"])
    assert exit_info.value.code == 2
    assert "--model took 'a red circle' as a model path" in capsys.readouterr().err


def test_no_seed_is_a_fresh_one_printed_and_stored(cascade_dir, tmp_path, capsys):
    seeds = []
    for name in ("a.png", "b.png"):
        assert main(["generate", "a red circle", "--model", str(cascade_dir), "-o", str(tmp_path / name),
                     "--steps", "1"]) == 0
        seeds.append(Image.open(tmp_path / name).text["seed"])
        assert f"--seed {seeds[-1]} draws them again" in capsys.readouterr().out
    assert seeds[0] != seeds[1]
    assert main(["generate", "a red circle", "--model", str(cascade_dir), "-o", str(tmp_path / "c.png"),
                 "--steps", "1", "--seed", seeds[0], "--quiet"]) == 0
    assert Image.open(tmp_path / "c.png").tobytes() == Image.open(tmp_path / "a.png").tobytes()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"cascade-engine {engine.__version__} (torch ")


def test_verbose_shows_the_engines_log_lines(cascade_dir, tmp_path, capsys):
    try:
        assert main(["generate", "a cat", "--model", str(cascade_dir), "-o", str(tmp_path / "a.png"),
                     "--steps", "1", "--quiet", "-v"]) == 0
        err = capsys.readouterr().err
        assert "INFO engine.model_dir:" in err and "full-precision weight files" in err
        assert main(["generate", "a cat", "--model", str(cascade_dir), "-o", str(tmp_path / "b.png"),
                     "--steps", "1", "--quiet", "--log-level", "warning"]) == 0
        assert "INFO" not in capsys.readouterr().err
    finally:  # leave logging as pytest's caplog expects it
        for name in ("engine", "export", "cascade_kernels"):
            logger = logging.getLogger(name)
            logger.handlers[:], logger.propagate = [], True
            logger.setLevel(logging.NOTSET)


def test_relative_paths_work_everywhere(cascade_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from export.onnx import export_onnx

    shutil.copytree(cascade_dir, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    export_onnx("model", out="exported", progress=False)
    pipe = engine.load("exported")  # the root was joined twice here
    assert pipe.generate("a cat", seed=0, steps=1, output_type="np").shape == (1, 32, 32, 3)
    assert engine.load("model/stage_I", "model/stage_II").image_size == 32
    os.remove("exported/manifest.json")
    with pytest.raises(ModelError, match="no manifest.json: an interrupted export"):
        engine.load("exported")


def test_eval_shows_progress_and_writes_a_marked_contact_sheet(tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    report = tmp_path / "report.json"
    assert main(["eval", "--count", "4", "--batch", "2", "--steps", "2", "--sheet", str(sheet),
                 "--json", str(report)]) == 0
    err = capsys.readouterr().err
    assert "eval:" in err and "4/4" in err  # the progress bar
    picture = Image.open(sheet)
    assert picture.size[0] == 8 * 128 and picture.size[1] > 128  # a row of pictures above their captions
    wrong = round((1 - json.loads(report.read_text())["adherence"]) * 4)
    red = [picture.getpixel((i * 128 + 1, 1)) == (255, 0, 0) for i in range(4)]
    assert sum(red) == wrong  # the wrong ones, and only those, framed in red


@pytest.mark.parametrize("flag", ["--header-timeout", "--keep-alive-timeout", "--drain-timeout"])
def test_serve_refuses_timeouts_that_are_not_positive(flag, capsys):
    assert main(["serve", flag, "0"]) == 2  # before any model loads or port opens
    assert f"{flag} must be a positive number of seconds" in capsys.readouterr().err
