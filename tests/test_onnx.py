"""ONNX export and the ONNX Runtime backend: same images as torch, verified artifacts, the content-keyed cache."""

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

import engine  # noqa: E402
from engine.errors import EngineError, InvalidRequestError, ModelError  # noqa: E402
from export import cache  # noqa: E402
from export.onnx import OPSET, export_onnx, unet_contract  # noqa: E402

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def exported(cascade_dir, tmp_path_factory):
    return export_onnx(cascade_dir, out=tmp_path_factory.mktemp("onnx") / "tiny", progress=False)


@pytest.fixture(scope="module")
def ort_pipe(exported):
    return engine.load(exported)


@pytest.mark.parametrize("options", [
    dict(seed=0, steps=(3, 2), guidance=(7.0, 4.0)),
    dict(seed=5, steps=(2, 2), guidance=(1.0, 1.0), num_images_per_prompt=2),  # no guidance: uncond half dropped
    dict(seed=9, steps=(3, 2), guidance=(5.0, 3.0), scheduler="ddim", negative_prompt="blurry", noise_level=100),
    dict(seed=3, steps=(4, 3), guidance=(7.0, 4.0), guidance_interval=((500, 1000), (0, 400))),  # rows vary per step
])
def test_onnxruntime_matches_torch(ort_pipe, engine_pipe, options):
    ours = ort_pipe.generate([PROMPT, "a small yellow triangle"], output_type="np", **options)
    torch_images = engine_pipe.generate([PROMPT, "a small yellow triangle"], output_type="np", **options)
    assert ours.shape == torch_images.shape
    assert np.abs(ours - torch_images).max() <= 1e-3


def test_exported_pipeline_runs_onnxruntime(ort_pipe):
    from engine.backends.exported import GraphTextModel, GraphUNet

    assert isinstance(ort_pipe.text.model, GraphTextModel)
    assert all(isinstance(stage.unet, GraphUNet) for stage in ort_pipe.stages)
    assert [s.kind for s in ort_pipe.stages] == ["base", "super_resolution"]


def test_manifest_states_the_contract_checks_and_hashes(exported, cascade_dir):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["versions"]["opset"] == OPSET >= 17 and manifest["versions"]["engine"] == engine.__version__
    assert manifest["precision"] == "float32" and len(manifest["source"]["sha256"]) == 64
    assert set(manifest["components"]) == {"text_encoder", "stage_I/unet", "stage_I/unet_shallow", "stage_II/unet",
                                           "stage_II/unet_shallow"}
    sr = manifest["components"]["stage_II/unet"]
    assert sr["inputs"]["sample"]["shape"][0] == "batch" and "class_labels" in sr["inputs"]
    assert "class_labels" not in manifest["components"]["stage_I/unet"]["inputs"]
    for component in manifest["components"].values():
        assert component["check"]["max_abs_error"] <= component["check"]["tolerance"]
        assert component["file"] in manifest["files"]
    for needed in ("tokenizer/tokenizer.json", "stage_II/image_noising_scheduler/scheduler_config.json",
                   "stage_I/scheduler/scheduler_config.json"):
        assert needed in manifest["files"]
    # self-contained: runs with the source model gone
    import onnx

    for component in manifest["components"].values():
        graph = onnx.load(str(exported / component["file"]))
        assert graph.opset_import[0].version == OPSET
        assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("graph", ["stage_II/unet/model.onnx", "stage_I/unet/shallow.onnx"])
def test_a_flipped_byte_in_a_graph_is_reported_not_run(exported, tmp_path, graph):
    copy = shutil.copytree(exported, tmp_path / "copy")
    data = bytearray((copy / graph).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / graph).write_bytes(bytes(data))
    with pytest.raises(ModelError, match=f"{graph}.*SHA-256"):
        engine.load(copy)


def test_a_missing_file_is_reported(exported, tmp_path):
    copy = shutil.copytree(exported, tmp_path / "copy")
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer.json.*missing"):
        engine.load(copy)


def test_cache_exports_once_keys_by_content_and_rebuilds_corrupt_entries(cascade_dir, tmp_path, monkeypatch,
                                                                          caplog):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    first = engine.load(cascade_dir, backend="onnxruntime")
    entries = list((tmp_path / "cache" / "onnx").iterdir())
    assert len(entries) == 1 and first.source == str(entries[0])
    stamp = (entries[0] / "manifest.json").stat().st_mtime_ns

    moved = shutil.copytree(cascade_dir, tmp_path / "renamed-model")  # same content, another path: same entry
    again = engine.load(moved, backend="onnxruntime")
    assert again.source == str(entries[0]) and (entries[0] / "manifest.json").stat().st_mtime_ns == stamp

    graph = entries[0] / "stage_I" / "unet" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-10])  # a truncated graph
    with caplog.at_level(logging.WARNING, logger="export.cache"):
        rebuilt = engine.load(cascade_dir, backend="onnxruntime")
    assert "unusable" in caplog.text and "model.onnx" in caplog.text
    images = rebuilt.generate(PROMPT, seed=0, steps=(2, 1), output_type="np")
    assert np.isfinite(images).all()

    config = moved / "stage_II" / "scheduler" / "scheduler_config.json"  # one changed byte of content
    config.write_text(config.read_text().replace("}", ' }', 1))
    engine.load(moved, backend="onnxruntime")
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 2
    assert not [p for p in (tmp_path / "cache" / "onnx").iterdir() if p.name.startswith(".")]  # no leftovers


def test_export_refuses_to_overwrite_a_foreign_directory(cascade_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(EngineError, match="not an earlier export"):
        export_onnx(cascade_dir, out=tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_backend_options_that_do_not_fit_are_refused(exported, cascade_dir):
    with pytest.raises(InvalidRequestError, match="is an ONNX export"):
        engine.load(exported, backend="torch")
    with pytest.raises(InvalidRequestError, match="fixed precision"):
        engine.load(exported, dtype="float16")
    with pytest.raises(InvalidRequestError, match="torch backend only"):
        engine.load(exported, attention="triton")
    with pytest.raises(InvalidRequestError, match="onnxruntime backend only"):
        engine.load(cascade_dir, providers=["CPUExecutionProvider"])
    with pytest.raises(InvalidRequestError, match="not available here"):
        engine.load(exported, providers=["NoSuchExecutionProvider"])


def test_missing_onnxruntime_names_the_extra(cascade_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(EngineError, match=r"cascade-engine\[onnx\]"):
        export_onnx(cascade_dir, out=tmp_path / "x", progress=False)


def test_unsupported_unet_architecture_names_component_and_reason():
    from diffusers import UNet2DConditionModel

    lcm_style = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                     down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                     cross_attention_dim=8, layers_per_block=1, time_cond_proj_dim=4)
    with pytest.raises(EngineError, match="stage_I/unet: time_cond_proj_dim=4 needs extra U-Net inputs"):
        unet_contract("stage_I", lcm_style, "float32")


def test_export_cli_writes_a_loadable_directory(cascade_dir, tmp_path, capsys):
    from engine.cli import main

    assert main(["export", str(cascade_dir), "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert main(["generate", PROMPT, "--model", str(tmp_path / "cli"), "--steps", "2", "-o",
                 str(tmp_path / "a.png"), "--quiet"]) == 0
    assert (tmp_path / "a.png").is_file()
    assert main(["export", str(cascade_dir), "--out", str(tmp_path), "--quiet"]) == 2  # not empty, not an export
    assert "not an earlier export" in capsys.readouterr().err


def test_float16_export_keeps_the_text_encoder_in_float32(cascade_dir, tmp_path):
    out = export_onnx(cascade_dir, out=tmp_path / "fp16", dtype="float16", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "float16"
    assert manifest["components"]["text_encoder"]["precision"] == "float32"
    assert manifest["components"]["stage_II/unet"]["inputs"]["sample"]["dtype"] == "float16"
    torch_fp32 = engine.load(cascade_dir, device="cpu")
    images = engine.load(out).generate(PROMPT, seed=0, steps=(2, 1), output_type="np")
    reference = torch_fp32.generate(PROMPT, seed=0, steps=(2, 1), output_type="np")
    assert np.abs(images - reference).max() <= 0.05  # float16 graphs vs float32 torch


@pytest.fixture(scope="module")
def exported_three_stage(three_stage_dir, tmp_path_factory):
    return export_onnx(three_stage_dir, out=tmp_path_factory.mktemp("onnx3") / "x4", progress=False)


def test_three_stage_export_runs_the_x4_upscaler_on_onnxruntime(exported_three_stage, three_stage_pipe):
    from engine.backends.exported import GraphTextModel, GraphVAEDecoder

    ort_pipe = engine.load(exported_three_stage)
    x4 = ort_pipe.stages[2]
    assert x4.kind == "latent_upscaler" and isinstance(x4.decoder, GraphVAEDecoder)
    assert isinstance(x4.text.model, GraphTextModel) and x4.text.clip
    options = dict(seed=4, steps=(3, 2, 3), guidance=(7.0, 4.0, 9.0), noise_level=(250, 40), negative_prompt="blue")
    ours = ort_pipe.generate([PROMPT, "a cat"], output_type="np", **options)
    torch_images = three_stage_pipe.generate([PROMPT, "a cat"], output_type="np", **options)
    assert ours.shape == torch_images.shape == (2, 128, 128, 3)
    assert np.abs(ours - torch_images).max() <= 1e-3


def test_x4_graphs_take_latents_of_any_size(exported_three_stage, three_stage_pipe):
    # Exported at the 32px latents of this cascade; the contract makes height and width dynamic.
    import torch

    ort_x4, torch_x4 = engine.load(exported_three_stage).stages[2], three_stage_pipe.stages[2]
    manifest = json.loads((exported_three_stage / "manifest.json").read_text())
    assert manifest["components"]["stage_III/vae_decoder"]["outputs"]["image"]["shape"] == \
        ["batch", 3, "height*4", "width*4"]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 24, 40, generator=generator)
    with torch.no_grad():
        expected = torch_x4.decoder(latents)
        assert ort_x4.decoder(latents).shape == expected.shape == (1, 3, 96, 160)
        assert (ort_x4.decoder(latents) - expected).abs().max() <= 1e-4
        sample = torch.randn(2, 7, 24, 40, generator=generator)
        text = torch.randn(2, 77, 32, generator=generator)
        args = (sample, torch.tensor(500), text, torch.tensor([20, 20]))
        assert (ort_x4.unet(*args) - torch_x4.unet(*args)).abs().max() <= 1e-4


def test_onnxruntime_runs_keep_torch_single_threaded_and_restore_it(ort_pipe):
    # ORT's CPU threads spin between U-Net calls; the sampler's torch ops run on one thread meanwhile, and the
    # user's torch setting comes back afterwards, also when the run fails.
    import torch

    seen = []
    encode = ort_pipe.text.encode
    ort_pipe.text.encode = lambda prompts: (seen.append(torch.get_num_threads()), encode(prompts))[1]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ort_pipe.generate(PROMPT, steps=(1, 1))
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        with pytest.raises(InvalidRequestError):
            ort_pipe.generate(PROMPT, steps=(1, 1), noise_level=(250, 250))  # one stage takes a noise level
        assert torch.get_num_threads() == 2
    finally:
        ort_pipe.text.encode = encode
        torch.set_num_threads(before)


def test_a_models_own_defaults_travel_with_its_export(cascade_copy, tmp_path):
    spec = json.loads((cascade_copy / "cascade.json").read_text())
    spec["defaults"] = {"stage_II": {"steps": 4, "guidance": 1.0}}
    (cascade_copy / "cascade.json").write_text(json.dumps(spec))
    pipe = engine.load(export_onnx(cascade_copy, out=tmp_path / "x", progress=False))
    sr = pipe.settings(engine.GenerateRequest(PROMPT))[1]
    assert (sr.timesteps, sr.guidance, sr.noise_level) == (4, 1.0, 250)
    assert cache.cache_key("abc", "float32", [None, spec["defaults"]["stage_II"]]) != cache.cache_key("abc", "float32")


def test_provider_choice_and_its_errors():
    from engine.backends.onnxruntime_backend import check_session_providers, provider_options, resolve_providers

    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, both, cuda=True) == both
    assert resolve_providers(None, both, cuda=False) == ["CPUExecutionProvider"]  # torch sees no GPU
    assert resolve_providers(None, ["CPUExecutionProvider"], cuda=True) == ["CPUExecutionProvider"]
    assert resolve_providers("CPUExecutionProvider", both, cuda=True) == ["CPUExecutionProvider"]
    with pytest.raises(InvalidRequestError, match="not available here.*onnx-gpu"):
        resolve_providers(["CUDAExecutionProvider"], ["CPUExecutionProvider"], cuda=True)
    with pytest.raises(InvalidRequestError, match="PyTorch sees no CUDA GPU"):
        resolve_providers(["CUDAExecutionProvider"], both, cuda=False)
    with pytest.raises(InvalidRequestError, match="provider's name or a list"):
        resolve_providers([], both, cuda=True)
    assert provider_options(["CPUExecutionProvider"], torch.device("cpu")) == ["CPUExecutionProvider"]
    with pytest.raises(ModelError, match="could not start CUDAExecutionProvider.*fell back to CPUExecutionProvider"):
        check_session_providers(Path("unet.onnx"), both, ["CPUExecutionProvider"])
    check_session_providers(Path("unet.onnx"), both, both)  # running what was asked: nothing to say


def test_the_cpu_provider_is_what_sessions_run(ort_pipe):
    unet = ort_pipe.stages[0].unet.component
    assert unet.session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize("options", [
    dict(seed=2, steps=(6, 5), cache=2),
    dict(seed=7, steps=(6, 4), cache=({"interval": 3, "full_first": 2}, 2), guidance_interval=((200, 700), None)),
])
def test_onnxruntime_caches_features_as_torch_does(ort_pipe, engine_pipe, options):
    """The export's full graphs (their `kept` output) and shallow graphs give the torch backend's cached images."""
    ours = ort_pipe.generate([PROMPT, "a small yellow triangle"], output_type="np", **options)
    want = engine_pipe.generate([PROMPT, "a small yellow triangle"], output_type="np", **options)
    plain = engine_pipe.generate([PROMPT, "a small yellow triangle"], output_type="np",
                                 **{k: v for k, v in options.items() if k != "cache"})
    assert np.abs(ours - want).max() <= 1e-3 < np.abs(want - plain).max()


def test_the_shallow_graphs_are_in_the_manifest_checked_and_hashed(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    for stage in ("stage_I", "stage_II"):
        full, shallow = manifest["components"][f"{stage}/unet"], manifest["components"][f"{stage}/unet_shallow"]
        assert list(full["outputs"]) == ["out", "kept"] and shallow["inputs"]["kept"] == full["outputs"]["kept"]
        assert shallow["file"] == f"{stage}/unet/shallow.onnx" and shallow["file"] in manifest["files"]
        assert shallow["check"]["max_abs_error"] <= shallow["check"]["tolerance"]
        # the shallow graph holds only its blocks' weights
        assert (exported / shallow["file"]).stat().st_size < 0.8 * (exported / full["file"]).stat().st_size
    # a flipped byte in one: test_a_flipped_byte_in_a_graph_is_reported_not_run


def test_an_export_without_shallow_graphs_refuses_caching_and_says_so_at_load(exported, tmp_path, caplog):
    """An export made before shallow graphs: it loads and runs, a cached preset is named at load time, and a
    cached request is refused with the fix."""
    from engine.exported import manifest as manifest_io

    copy = shutil.copytree(exported, tmp_path / "old")
    manifest = json.loads((copy / "manifest.json").read_text())
    for stage in ("stage_I", "stage_II"):
        (copy / manifest["components"].pop(f"{stage}/unet_shallow")["file"]).unlink()
    manifest["presets"]["quick"] = {"stages": {"stage_I": {"steps": 6, "cache": 2}}}
    manifest.pop("files")
    manifest_io.write(copy, manifest)
    with caplog.at_level("WARNING", logger="engine.assemble"):
        old = engine.load(copy)
    assert "preset 'quick' caches features on stage_I" in caplog.text
    with pytest.raises(InvalidRequestError, match="needs a U-Net with a shallow call.*export the model again"):
        old.generate(PROMPT, preset="quick")
    assert old.generate(PROMPT, steps=(2, 2), output_type="np").shape == (1, 32, 32, 3)
