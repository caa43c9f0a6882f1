"""TensorRT engines built from our ONNX exports on this machine (no GPU needed to build), their manifest, the
cache, and the tensorrt backend's checks before it runs anything. Running engines needs a GPU
(tests/test_gpu.py)."""

import json
import logging
import platform
import shutil
import sys

import pytest
import torch

import engine
from engine.cli import build_parser, export, main
from engine.errors import EngineError, InvalidRequestError, ModelError
from engine.exported import manifest as manifest_io
from export.tensorrt import attention_summary, build_engines

# The [test] extra installs TensorRT for RTX where its wheels exist; there the tests must run, not skip.
WHEELS = sys.platform == "linux" and platform.machine() == "x86_64" and sys.version_info[:2] in ((3, 11), (3, 12))
if not WHEELS:
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT for RTX has no wheel for this platform")

TARGET = "sm80"  # one target keeps the builds short
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a GPU")


def dynamic_axes(description: dict) -> dict:
    return {(name, i): d for name, spec in description["inputs"].items() for i, d in enumerate(spec["shape"])
            if isinstance(d, str)}


@pytest.fixture(scope="module")
def shapes_engines(tmp_path_factory):
    """The packaged model's engines in float16, through the command line (from the cached ONNX export)."""
    root = tmp_path_factory.mktemp("trt")
    mp = pytest.MonkeyPatch()
    mp.setenv("CASCADE_ENGINE_CACHE", str(root / "cache"))
    try:
        assert main(["export", "shapes", "--format", "tensorrt", "--dtype", "float16", "--targets", TARGET,
                     "--max-batch", "2", "--out", str(root / "engines"), "--quiet"]) == 0
    finally:
        mp.undo()
    return root / "engines"


def test_the_packaged_model_builds_engines_with_a_full_manifest(shapes_engines):
    manifest = manifest_io.read_manifest(shapes_engines, kind="tensorrt")  # every hash checked
    assert manifest["format"] == "cascade-engine-tensorrt" and manifest["precision"] == "float16"
    assert manifest["tensorrt"] == {"flavour": "rtx", "version": manifest["tensorrt"]["version"],
                                    "targets": [TARGET], "max_images": 2}
    assert manifest["versions"]["tensorrt"] == manifest["tensorrt"]["version"]
    assert len(manifest["source"]["sha256"]) == 64 and len(manifest["source"]["onnx_manifest_sha256"]) == 64
    assert set(manifest["components"]) == {"text_encoder", "stage_I/unet", "stage_II/unet",  # and the shallow
                                           "stage_I/unet_shallow", "stage_II/unet_shallow"}  # calls' (caching)
    assert not list(shapes_engines.rglob("*.onnx"))  # engines only, beside the copied configs
    assert (shapes_engines / "tokenizer" / "tokenizer.json").is_file()
    for name, component in manifest["components"].items():
        assert component["file"].endswith(".engine") and component["file"] in manifest["files"]
        assert component["build"]["bytes"] == (shapes_engines / component["file"]).stat().st_size > 0
        profile = component["profile"]
        for (tensor, i), axis in dynamic_axes(component).items():  # every dynamic axis has a range
            low, best, high = (profile[tensor][k][i] for k in ("min", "opt", "max"))
            assert axis == "batch" and (low, best, high) == (1, 2, 4)  # 2 images under guidance: 4 rows
        if name.endswith("unet"):  # float16 U-Nets: the parser fused the exported attention by itself
            assert component["build"]["fused_attention"] >= 1, component["build"]
            assert all("mha" in layer.lower() for layer in component["build"]["attention_layers"])


def test_the_engine_directory_loads_as_an_export_and_says_what_it_needs(shapes_engines):
    with pytest.raises(InvalidRequestError, match="is a TensorRT export; load it with backend='tensorrt'"):
        engine.load(shapes_engines, backend="onnxruntime")
    with pytest.raises(InvalidRequestError, match="dtype= cannot change it"):
        engine.load(shapes_engines, dtype="float32")
    with pytest.raises(InvalidRequestError, match="runs on a CUDA GPU"):
        engine.load(shapes_engines, device="cpu")


@NO_GPU
def test_loading_engines_without_a_gpu_is_a_clear_error(shapes_engines):
    with pytest.raises(EngineError, match="TensorRT engines run on an NVIDIA GPU, and PyTorch sees none here; "
                                          "load the model with backend='torch' or backend='onnxruntime'"):
        engine.load(shapes_engines)


def test_a_flipped_byte_or_a_missing_engine_is_reported_not_run(shapes_engines, tmp_path):
    copy = shutil.copytree(shapes_engines, tmp_path / "copy")
    engine_file = copy / "stage_I" / "unet" / "model.engine"
    data = bytearray(engine_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    engine_file.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="model.engine: does not match its SHA-256"):
        engine.load(copy)
    engine_file.unlink()
    with pytest.raises(ModelError, match="model.engine: missing from the exported directory"):
        engine.load(copy)


def test_engines_of_another_tensorrt_version_or_a_missing_extra_are_refused(shapes_engines, tmp_path, monkeypatch):
    copy = shutil.copytree(shapes_engines, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tensorrt"]["version"] = "0.9.0"  # the manifest is outside its own hashes: the file still verifies
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=r"built by TensorRT rtx 0\.9\.0 and this machine has 1\.\d+.*rebuild"):
        engine.load(copy)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)  # as if the [tensorrt] extra were absent
    with pytest.raises(EngineError, match=r"which is not installed: pip install 'cascade-engine\[tensorrt\]'"):
        engine.load(shapes_engines)
    with pytest.raises(EngineError, match=r"need TensorRT, which is not installed: pip install 'cascade-engine\[tensorrt\]'"):
        build_engines(tmp_path / "any", tmp_path / "out")


def test_targets_are_checked_before_building(shapes_engines, tmp_path):
    onnx_dir = next((shapes_engines.parent / "cache" / "onnx").iterdir())
    with pytest.raises(EngineError, match="cannot build for sm90; it offers sm75, sm80"):
        build_engines(onnx_dir, tmp_path / "out", targets=("sm90",))
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="the target 'current' builds for this machine's GPU, and PyTorch sees none"):
            build_engines(onnx_dir, tmp_path / "out", targets=("current",))
    with pytest.raises(EngineError, match="exists and is not an earlier TensorRT export"):
        build_engines(onnx_dir, onnx_dir.parent, targets=(TARGET,))
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidRequestError, match="--targets and --max-batch apply to --format tensorrt only"):
        export(build_parser().parse_args(["export", "shapes", "--out", str(tmp_path / "o"), "--targets", TARGET]))


@NO_GPU
def test_load_builds_the_three_stage_cascade_into_the_cache_once(three_stage_dir, tmp_path, monkeypatch, caplog):
    """Built through engine.load (float32, the x4 upscaler's height and width profiled), then the GPU error;
    the second load reuses the entry, and a changed weight makes a new one."""
    monkeypatch.setenv("CASCADE_ENGINE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EngineError, match="PyTorch sees none here"):
        engine.load(three_stage_dir, backend="tensorrt", dtype="float32")
    (entry,) = (tmp_path / "cache" / "tensorrt").iterdir()
    manifest = manifest_io.read_manifest(entry, kind="tensorrt")
    assert manifest["precision"] == "float32"
    assert set(manifest["components"]) == {"text_encoder", "stage_I/unet", "stage_II/unet", "stage_III/text_encoder",
                                           "stage_III/unet", "stage_III/vae_decoder", "stage_I/unet_shallow",
                                           "stage_II/unet_shallow", "stage_III/unet_shallow"}
    x4 = manifest["components"]["stage_III/unet"]
    axes = dynamic_axes(x4)
    assert {a for a in axes.values()} == {"batch", "height", "width"}
    size = x4["sizes"]["height"]
    assert x4["profile"]["sample"]["opt"][2:] == [size, size]
    stamp = (entry / "stage_III" / "unet" / "model.engine").stat().st_mtime_ns

    caplog.set_level(logging.INFO, logger="export.cache")
    with pytest.raises(EngineError, match="PyTorch sees none here"):
        engine.load(three_stage_dir, backend="tensorrt", dtype="float32")
    assert "using the cached TensorRT engines" in caplog.text
    assert (entry / "stage_III" / "unet" / "model.engine").stat().st_mtime_ns == stamp

    (entry / "stage_I" / "unet" / "model.engine").write_bytes(b"partial")  # a damaged entry is rebuilt
    with pytest.raises(EngineError, match="PyTorch sees none here"):
        engine.load(three_stage_dir, backend="tensorrt", dtype="float32")
    assert "the cache entry of the TensorRT engines is unusable" in caplog.text
    manifest_io.read_manifest(entry, kind="tensorrt")

    copy = shutil.copytree(three_stage_dir, tmp_path / "changed")
    (weights,) = (copy / "stage_II" / "unet").glob("*.safetensors")
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one weight's low bits: a valid file, another model
    weights.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="PyTorch sees none here"):
        engine.load(copy, backend="tensorrt", dtype="float32")
    assert len(list((tmp_path / "cache" / "tensorrt").iterdir())) == 2


def test_only_tensorrt_s_fused_kernels_count_as_fused_attention():
    """Every layer inside an attention block carries "attentions" in its ONNX node name; only TensorRT's own
    fused MHA kernels count (the layer listing's format, as the detailed build log prints it)."""
    listing = ("Layers:\nName: /unet/down_blocks.1/attentions.0/Add_myl0_5, LayerType: kgen, Inputs: []\n"
               "Name: _gemm_mha_v2_myl0_62, LayerType: kgen, Inputs: []\n"
               "Name: /unet/down_blocks.1/attentions.0/to_q/MatMul_myl0_52, LayerType: gemm, Inputs: []")
    summary = attention_summary([(3, "Engine generation completed"), (4, listing)])
    assert summary == {"layers": 3, "fused_attention": 1, "attention_layers": ["_gemm_mha_v2_myl0_62"]}
    assert attention_summary([(3, "no listing")])["fused_attention"] is None
