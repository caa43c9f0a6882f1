"""Loading: wrong or missing pieces raise ModelError naming the path and the problem; pickle is never read."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import engine
from engine import InvalidRequestError, ModelError
from engine.options import STAGE_DEFAULTS
from engine.testing.random_models import TinyCascadeSpec, write_if_cascade


def test_a_base_stage_after_a_super_resolution_stage_is_refused(cascade_dir):
    # (A super-resolution stage alone, or first, upscales the images given to it: test_diffusers_door.py.)
    with pytest.raises(ModelError, match="a base stage comes first in a cascade") as info:
        engine.load(cascade_dir / "stage_II", cascade_dir / "stage_I")
    assert info.value.path.endswith("stage_I")


def test_base_stage_second_is_refused(cascade_dir):
    with pytest.raises(ModelError, match="stages after the first must be super-resolution"):
        engine.load(cascade_dir / "stage_I", cascade_dir / "stage_I")


def test_missing_unet_config(cascade_copy):
    (cascade_copy / "stage_II" / "unet" / "config.json").unlink()
    with pytest.raises(ModelError, match="missing config.json \\(U-Net config\\)") as info:
        engine.load(cascade_copy)
    assert info.value.path.endswith("stage_II/unet")


def test_corrupt_config(cascade_copy):
    (cascade_copy / "stage_I" / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt scheduler config"):
        engine.load(cascade_copy)


def test_corrupt_weights(cascade_copy):
    weights = cascade_copy / "stage_II" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot load the U-Net weights") as info:
        engine.load(cascade_copy)
    assert info.value.path.endswith("stage_II/unet")


def test_pickle_only_weights_are_refused_with_a_conversion_hint(cascade_copy):
    unet_dir = cascade_copy / "stage_I" / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"not": "loaded"}, unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match="only pickle weights.*never pickle.*save_pretrained"):
        engine.load(cascade_copy)


@pytest.mark.parametrize("component, stem, shard", [
    ("stage_II/unet", "diffusion_pytorch_model", "diffusion_pytorch_model-00001-of-00001.bin"),
    ("stage_I/text_encoder", "model", "model-00001-of-00001.bin"),
    ("stage_I/unet", "diffusion_pytorch_model", "../../stage_II/unet/diffusion_pytorch_model.safetensors")])
def test_a_safetensors_index_naming_pickle_or_outside_shards_is_refused_before_any_weights_are_read(
        cascade_copy, monkeypatch, component, stem, shard):
    """diffusers and transformers open the shards an index names: a `.bin` behind a safetensors index would be
    torch.load-ed (pickle), a path would reach outside the folder."""
    from safetensors.torch import load_file

    folder = cascade_copy / component
    weights = folder / f"{stem}.safetensors"
    tensors = load_file(weights)
    if shard.endswith(".bin"):
        torch.save(tensors, folder / shard)  # a harmless pickle: without the check, it loads and generates
    weights.unlink()
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: shard for name in tensors}}))

    def no_weights_read(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(torch, "load", no_weights_read)
    monkeypatch.setattr("safetensors.torch.load_file", no_weights_read)
    with pytest.raises(ModelError, match="not .safetensors files beside it.*never pickle") as info:
        engine.load(cascade_copy)
    assert info.value.path.endswith(f"{component}/{stem}.safetensors.index.json")


def test_unet_channels_that_do_not_fit(cascade_copy):
    config_file = cascade_copy / "stage_II" / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["in_channels"] = 4
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="6-channel U-Net input .* this U-Net takes 4"):
        engine.load(cascade_copy)


def test_text_width_mismatch_between_stages(tmp_path, cascade_dir):
    other = write_if_cascade(tmp_path / "other", TinyCascadeSpec(text_dim=48), seed=1)
    with pytest.raises(ModelError, match="expects text embeddings of width 48 but the text encoder produces 32"):
        engine.load(cascade_dir / "stage_I", other / "stage_II")


def test_missing_image_noising_scheduler(cascade_copy):
    shutil.rmtree(cascade_copy / "stage_II" / "image_noising_scheduler")
    with pytest.raises(ModelError, match="image-noising scheduler"):
        engine.load(cascade_copy)


def test_bad_cascade_json(cascade_copy):
    (cascade_copy / "cascade.json").write_text(json.dumps({"stages": "stage_I"}))
    with pytest.raises(ModelError, match='cascade.json must hold {"stages"'):
        engine.load(cascade_copy)
    (cascade_copy / "cascade.json").write_text(json.dumps({"stages": ["stage_I", "stage_X"]}))
    with pytest.raises(ModelError, match="listed in cascade.json does not exist"):
        engine.load(cascade_copy)


def test_unknown_path_names_the_packaged_models():
    with pytest.raises(ModelError, match="no such model directory \\(packaged models: shapes;"):
        engine.load("/no/such/model")


@pytest.mark.filterwarnings("ignore:bfloat16 on CPU")
def test_fp16_variant_is_used_when_asked_for(cascade_copy):
    # An fp16 variant holding different weights must be the one loaded for float16/bfloat16, not for float32.
    unet_dir = cascade_copy / "stage_I" / "unet"
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(unet_dir)
    with torch.no_grad():
        model.conv_out.bias.fill_(0.25)
    model.half().save_pretrained(unet_dir, variant="fp16", safe_serialization=True)
    bf16 = engine.load(cascade_copy, dtype="bfloat16")
    fp32 = engine.load(cascade_copy, dtype="float32")
    assert torch.all(bf16.stages[0].unet.model.conv_out.bias == 0.25)
    assert not torch.all(fp32.stages[0].unet.model.conv_out.bias == 0.25)
    assert bf16.text.model.dtype == torch.bfloat16  # T5 runs in bf16, never float16


@pytest.mark.parametrize("kwargs,message", [
    ({"backend": "tensorflow"}, "unknown backend 'tensorflow'"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"device": "tpu"}, "device 'tpu' is not supported|unknown device"),
])
def test_bad_load_options(cascade_dir, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.load(cascade_dir, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(cascade_dir):
    with pytest.raises(InvalidRequestError, match="PyTorch sees no CUDA GPU"):
        engine.load(cascade_dir, device="cuda")


def test_text_encoder_under_float16_runs_in_bfloat16():
    from engine.backends.torch_backend import text_dtype

    assert text_dtype(torch.float16) == torch.bfloat16
    assert text_dtype(torch.float32) == torch.float32


def _set_defaults(cascade: Path, defaults) -> None:
    spec = json.loads((cascade / "cascade.json").read_text())
    (cascade / "cascade.json").write_text(json.dumps({**spec, "defaults": defaults}))


def test_cascade_json_defaults_become_the_models_defaults(cascade_copy):
    _set_defaults(cascade_copy, {"stage_II": {"steps": 3, "guidance": 1.0, "noise_level": 100}})
    pipe = engine.load(cascade_copy)
    base, sr = pipe.settings(engine.GenerateRequest("a red circle"))
    assert (sr.timesteps, sr.guidance, sr.noise_level) == (3, 1.0, 100)
    assert pipe.stages[0].defaults == STAGE_DEFAULTS["base"]  # a stage it does not name keeps its kind's
    assert len(base.timesteps) == 27


@pytest.mark.parametrize("defaults, message", [
    ({"stage_III": {"steps": 3}}, 'cascade.json "defaults" must map stage directories \\(stage_I, stage_II\\)'),
    ({"stage_II": {"steps": -1}}, "stage_II's defaults: steps must be 1..1000, got -1"),
    ({"stage_I": {"noise_level": 10}}, "stage_I's defaults: unknown defaults \\['noise_level'\\]"),
])
def test_bad_cascade_json_defaults_are_named(cascade_copy, defaults, message):
    _set_defaults(cascade_copy, defaults)
    with pytest.raises(ModelError, match=message):
        engine.load(cascade_copy)
