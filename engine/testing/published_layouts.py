"""Tiny random cascades laid out exactly as DeepFloyd and Stability publish theirs, for the loading tests.

Starting from `random_models`' tiny cascade, this rewrites it the way the published snapshots are:

- configs with only the keys diffusers 0.16 wrote (DeepFloyd's repositories were written by it);
- a sentencepiece tokenizer (spiece.model + tokenizer_config.json, no tokenizer.json), trained here;
- a T5 encoder in shards with their index, in full precision and as the fp16 variant
  (model-00001-of-00002.safetensors, model.fp16-00001-of-00002.safetensors, model.safetensors.index.fp16.json),
  U-Nets as one file per variant, and pickle files beside them (which the engine must never read);
- the folders diffusers' IF pipelines name but the engine does not run (safety_checker/, feature_extractor/,
  watermarker/) and DeepFloyd's model_index.json entries for them;
- a Hugging Face cache tree (blobs/, snapshots/<commit>/ of relative symlinks, refs/main) holding them.

Every file is written by the library that owns its format (save_pretrained, sentencepiece), so diffusers'
own from_pretrained loads each fixture; the tests check that it does.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path

import torch

from engine.testing.random_models import VOCABULARY

# Keys of today's configs that diffusers 0.16 did not write: DeepFloyd's published configs lack them.
NEWER_UNET_KEYS = ("encoder_hid_dim_type", "addition_time_embed_dim", "transformer_layers_per_block",
                   "reverse_transformer_layers_per_block", "num_attention_heads", "attention_type", "dropout",
                   "mid_block_only_cross_attention", "projection_class_embeddings_input_dim")
NEWER_SCHEDULER_KEYS = ("timestep_spacing", "steps_offset", "rescale_betas_zero_snr")
SHARD_SIZE = "20KB"  # small enough that the tiny T5 is written in several shards
UNUSED_FOLDERS = {  # folder -> its model_index.json entry, as DeepFloyd's IF-I-XL names them
    "safety_checker": ["deepfloyd_if", "IFSafetyChecker"],
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "watermarker": ["deepfloyd_if", "IFWatermarker"],
}


def _rewrite_json(file: Path, edit) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data, indent=2) + "\n")


def strip_to_diffusers_016(stage_dir: Path) -> None:
    """Remove from a stage's U-Net and scheduler configs the keys diffusers 0.16 did not write."""
    def unet(config):
        for key in NEWER_UNET_KEYS:
            config.pop(key, None)
        config["_diffusers_version"] = "0.16.0.dev0"

    def scheduler(config):
        for key in NEWER_SCHEDULER_KEYS:
            config.pop(key, None)
        config["_diffusers_version"] = "0.16.0.dev0"

    _rewrite_json(stage_dir / "unet" / "config.json", unet)
    for sub in ("scheduler", "image_noising_scheduler"):
        if (stage_dir / sub).is_dir():
            _rewrite_json(stage_dir / sub / "scheduler_config.json", scheduler)


def write_sentencepiece_tokenizer(folder: Path, vocab_size: int = 100, seed: int = 0) -> None:
    """A T5 tokenizer as DeepFloyd ships it: spiece.model (trained here on a generated corpus of VOCABULARY
    words), tokenizer_config.json and special_tokens_map.json with T5's 100 extra ids; no tokenizer.json."""
    import sentencepiece

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(VOCABULARY) for _ in range(8)) for _ in range(2000)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    extra = [f"<extra_id_{i}>" for i in range(100)]
    special = {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "extra_ids": 100, "model_max_length": 512, "sp_model_kwargs": {},
         "tokenizer_class": "T5Tokenizer"}, indent=2))


def write_variants(folder: Path, cls, fp16: bool = True, full: bool = True, shard: bool = False,
                   pickle: bool = True) -> None:
    """Rewrite a model folder's weights as published: full precision and/or the fp16 variant, sharded with an
    index where `shard`, and (where `pickle`) a pickle file beside them that must never be read."""
    model = cls.from_pretrained(folder)
    config = (folder / "config.json").read_text()
    shutil.rmtree(folder)
    size = {"max_shard_size": SHARD_SIZE} if shard else {}
    if full:
        model.save_pretrained(folder, safe_serialization=True, **size)
    if fp16:
        model.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16", **size)
    (folder / "config.json").write_text(config)  # the saved config, not one rewritten by this library version
    if pickle:
        name = "pytorch_model.bin" if cls.__module__.startswith("transformers") else "diffusion_pytorch_model.bin"
        torch.save({"never": "read"}, folder / name)


def publish_if_cascade(cascade_dir: Path, fp16: bool = True, full: bool = True) -> None:
    """Turn random_models.write_if_cascade's output into DeepFloyd's published layout, in place."""
    from diffusers import UNet2DConditionModel
    from transformers import T5EncoderModel

    stage_i, stage_ii = cascade_dir / "stage_I", cascade_dir / "stage_II"
    write_sentencepiece_tokenizer(stage_i / "tokenizer")
    write_variants(stage_i / "text_encoder", T5EncoderModel, fp16=fp16, full=full, shard=True)
    for stage in (stage_i, stage_ii):
        write_variants(stage / "unet", UNet2DConditionModel, fp16=fp16, full=full)
        strip_to_diffusers_016(stage)
    for name, entry in UNUSED_FOLDERS.items():  # configs only: diffusers is told not to load them
        (stage_i / name).mkdir(exist_ok=True)
        (stage_i / name / "config.json").write_text(json.dumps({"_class_name": entry[1]}))

    def index(data):
        data.update({name: entry for name, entry in UNUSED_FOLDERS.items()}, requires_safety_checker=True,
                    _diffusers_version="0.16.0.dev0")

    _rewrite_json(stage_i / "model_index.json", index)


def publish_x4_upscaler(stage_dir: Path) -> None:
    """Give a random_models.write_x4_upscaler stage the published snapshot's extras: fp16 variants beside the
    full weights, pickles, and the original checkpoint as top-level x4-upscaler-ema.{safetensors,ckpt}."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        write_variants(stage_dir / sub, cls)
    save_file({"never": torch.zeros(2)}, stage_dir / "x4-upscaler-ema.safetensors")
    torch.save({"never": "read"}, stage_dir / "x4-upscaler-ema.ckpt")


def write_hub_cache(cache: Path, repo_id: str, source: Path, commit: str | None = None) -> str:
    """Put the files of `source` into a Hugging Face cache tree as huggingface_hub lays one out: content in
    blobs/, snapshots/<commit>/ of relative symlinks to them, refs/main naming the commit. Returns the commit."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    commit = commit or hashlib.sha1(b"".join(str(p.relative_to(source)).encode() for p in files)).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for file in files:
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit
