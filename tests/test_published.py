"""Snapshots laid out as DeepFloyd and Stability publish them (engine/testing/published_layouts.py) load as diffusers
loads them and give diffusers' images: diffusers 0.16 configs, sharded and fp16 weights, a sentencepiece
tokenizer, the folders the engine does not run, and hub ids from a local Hugging Face cache tree."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

import engine
from engine import ModelError
from engine.testing.published_layouts import publish_if_cascade, publish_x4_upscaler, write_hub_cache
from engine.testing.random_models import write_if_cascade, write_x4_upscaler
from engine.testing.reference import run_reference

TOLERANCE = 1e-4
IDS = ("DeepFloyd/IF-I-XL-v1.0", "DeepFloyd/IF-II-L-v1.0")
NOT_RUN = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Both variants (full and fp16) in every folder, as a full snapshot download has them."""
    root = write_if_cascade(tmp_path_factory.mktemp("published"), seed=3)
    publish_if_cascade(root)
    return root


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, published):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    commits = [write_hub_cache(cache, repo, published / stage) for repo, stage in zip(IDS, ("stage_I", "stage_II"))]
    return cache, commits


def diffusers_from_pretrained(stage_i, stage_ii, **kwargs):
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    first = IFPipeline.from_pretrained(stage_i, **NOT_RUN, **kwargs)
    second = IFSuperResolutionPipeline.from_pretrained(stage_ii, text_encoder=None, tokenizer=None, **NOT_RUN,
                                                       **kwargs)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
    return first, second


def test_the_fixture_is_what_deepfloyd_publishes(published):
    unet = json.loads((published / "stage_I" / "unet" / "config.json").read_text())
    assert "encoder_hid_dim_type" not in unet and unet["encoder_hid_dim"] != unet["cross_attention_dim"]
    assert "timestep_spacing" not in json.loads((published / "stage_I/scheduler/scheduler_config.json").read_text())
    names = {p.name for p in (published / "stage_I" / "text_encoder").iterdir()}
    assert {"model.safetensors.index.json", "model.safetensors.index.fp16.json", "pytorch_model.bin"} <= names
    assert any(n.startswith("model.fp16-00001-of-") for n in names)
    tokenizer = {p.name for p in (published / "stage_I" / "tokenizer").iterdir()}
    assert "spiece.model" in tokenizer and "tokenizer.json" not in tokenizer
    assert {"safety_checker", "watermarker", "feature_extractor"} <= {p.name for p in (published / "stage_I").iterdir()}


def test_published_layout_gives_diffusers_images(published):
    reference = diffusers_from_pretrained(published / "stage_I", published / "stage_II")
    pipe = engine.load(published / "stage_I", published / "stage_II", device="cpu")
    prompts = ["a large red circle on a blue background", "a small green square"]
    ours = pipe.generate(prompts, seed=11, steps=(3, 2), guidance=(6.0, 3.0), output_type="np")
    theirs = run_reference(reference, prompts, 11, (3, 2), (6.0, 3.0))
    assert ours.shape == theirs.shape == (2, 32, 32, 3)
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_sentencepiece_tokenizer_gives_diffusers_token_ids(published):
    from diffusers import IFPipeline

    theirs = IFPipeline.from_pretrained(published / "stage_I", unet=None, text_encoder=None, **NOT_RUN).tokenizer
    ours = engine.load(published / "stage_I", published / "stage_II", device="cpu").text.tokenizer
    for prompt in ["a red circle", "A Photo of a CORGI, at dusk!", ""]:
        assert ours(prompt).input_ids == theirs(prompt).input_ids


def test_hub_ids_resolve_from_the_local_cache(hub_cache, published, monkeypatch):
    from diffusers import IFPipeline

    cache, commits = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the engine never goes online whatever this says
    # The cache tree is real: diffusers itself finds the snapshot in it.
    IFPipeline.from_pretrained(IDS[0], cache_dir=cache, local_files_only=True, unet=None, text_encoder=None,
                               **NOT_RUN)
    by_id = engine.load(*IDS, device="cpu")
    by_dir = engine.load(published / "stage_I", published / "stage_II", device="cpu")
    args = dict(seed=2, steps=(2, 2), output_type="np")
    assert np.array_equal(by_id.generate("a cat", **args), by_dir.generate("a cat", **args))
    # A diffusers user's script, as written.
    pipe = engine.load("DeepFloyd/IF-I-XL-v1.0", "DeepFloyd/IF-II-L-v1.0", torch_dtype=torch.float32)
    images = pipe("a corgi", num_inference_steps=2, guidance_scale=7.0,
                  generator=torch.Generator("cpu").manual_seed(0)).images
    assert len(images) == 1 and images[0].size == (32, 32)
    assert engine.load(IDS[0], device="cpu", revision=commits[0]).image_size == 16  # a commit, as in snapshots/
    with pytest.raises(ModelError, match="at revision 'v9'"):
        engine.load(*IDS, device="cpu", revision="v9")


def test_hub_id_not_in_the_cache_names_the_cache_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="not in the local Hugging Face cache") as info:
        engine.load("DeepFloyd/IF-I-XL-v1.0")
    assert str(tmp_path / "empty") in str(info.value)
    assert "hf download DeepFloyd/IF-I-XL-v1.0" in str(info.value) and "never downloads" in str(info.value)


def test_local_dir_download_loads_as_a_plain_directory(published, tmp_path):
    local = shutil.copytree(published, tmp_path / "local")
    meta = local / "stage_I" / ".cache" / "huggingface" / "download" / "unet"
    meta.mkdir(parents=True)
    (meta / "config.json.metadata").write_text("0123\nabcd\n1700000000.0\n")
    pipe = engine.load(local / "stage_I", local / "stage_II", device="cpu")
    assert pipe.generate("a cat", seed=0, steps=1, output_type="np").shape == (1, 32, 32, 3)


def _weight_log(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "engine.model_dir" and "weight files" in r.getMessage()]


@pytest.mark.filterwarnings("ignore:bfloat16 on CPU")
def test_the_dtype_picks_the_weight_files_of_every_component_and_says_so(published, caplog):
    dirs = (published / "stage_I", published / "stage_II")
    with caplog.at_level(logging.INFO, logger="engine.model_dir"):
        engine.load(*dirs, device="cpu", dtype="bfloat16")
    half = _weight_log(caplog)
    assert len(half) == 3 and all("fp16 weight files" in m for m in half)  # T5, both U-Nets
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engine.model_dir"):
        engine.load(*dirs, device="cpu", dtype="float32")
    full = _weight_log(caplog)
    assert len(full) == 3 and all("full-precision" in m for m in full)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engine.model_dir"):
        engine.load(*dirs, device="cpu", torch_dtype=torch.float32, variant="fp16")
    assert len(_weight_log(caplog)) == 3 and all("variant='fp16'" in m for m in _weight_log(caplog))
    with pytest.raises(ModelError, match="no 'ema' variant weight files"):
        engine.load(*dirs, device="cpu", variant="ema")


def test_fp16_only_snapshot_loads_and_matches_diffusers(tmp_path):
    root = write_if_cascade(tmp_path / "fp16", seed=4)
    publish_if_cascade(root, full=False)  # what a variant="fp16" download holds
    reference = diffusers_from_pretrained(root / "stage_I", root / "stage_II", variant="fp16",
                                          torch_dtype=torch.float32)
    pipe = engine.load(root / "stage_I", root / "stage_II", device="cpu")
    ours = pipe.generate("a blue square", seed=1, steps=(2, 2), guidance=(5.0, 2.0), output_type="np")
    theirs = run_reference(reference, "a blue square", 1, (2, 2), (5.0, 2.0))
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_x4_upscaler_snapshot_with_its_extra_files(tmp_path):
    from diffusers import StableDiffusionUpscalePipeline
    from PIL import Image

    stage = write_x4_upscaler(tmp_path / "x4", seed=2)
    publish_x4_upscaler(stage)
    reference = StableDiffusionUpscalePipeline.from_pretrained(stage)
    reference.set_progress_bar_config(disable=True)
    pipe = engine.load(stage, device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    ours = pipe.generate("a cat", image=image, seed=3, steps=3, guidance=5.0, noise_level=20, output_type="np")
    theirs = reference(prompt="a cat", image=image, generator=torch.Generator("cpu").manual_seed(3),
                       num_inference_steps=3, guidance_scale=5.0, noise_level=20, output_type="np").images
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_the_offline_guard_refuses_the_network():
    import socket

    with socket.socket() as s, pytest.raises(ConnectionRefusedError, match="must not use the network"):
        s.connect(("203.0.113.7", 443))  # TEST-NET-3: never reachable, refused before any packet
