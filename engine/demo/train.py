"""`python -m engine.demo.train OUT`: train the packaged shapes cascade (engine/demo/shapes.py) from a seed, on CPU or GPU.

The cascade is DeepFloyd IF's at small size (engine/testing/random_models.py builds it): a frozen, seeded random T5
encoder; a base U-Net at 32 px and a super-resolution U-Net 32 -> 128 px, both predicting v plus a
learned-range variance. What training does, and why:

- data: every scene of the shapes grammar except the quality gate's held-out captions (engine/demo/evaluate.py),
  rendered once; each caption's T5 embedding computed once, exactly as the runtime computes it (TextEncoder);
- loss: Improved DDPM's hybrid loss, MSE on the prediction plus the variational bound for the variance channels
  (with the mean held fixed), so that few-step ancestral sampling with the learned variance works;
- prediction: v for both U-Nets (SHAPES_SPEC; IF predicts eps). At high noise an eps model's loss hardly
  depends on x0, so it learns late what the caption says of colour and place (after 2000 steps it drew clean
  shapes in random colours at random places), and its x0 = (x_t - sigma eps) / alpha magnifies every error by
  sigma / alpha (the eps super-resolution drew blotches over flat backgrounds); v at high noise is nearly -x0;
- caption dropout: 10% of captions are replaced by the empty prompt, which is the runtime's unconditional
  input, so classifier-free guidance has something to guide against;
- super-resolution: the 32 px render, bilinearly upsampled and noise-augmented at a random level through the
  image-noising schedule, as the runtime conditions it (engine/stage.py); trained on random 64 px crops of the
  128 px pictures (the U-Net is convolutional; a crop costs a quarter);
- an exponential moving average of the weights is what gets saved.

Stages train one after the other, or one per process (`--stage I`, `--stage II`) to use two cores at once.
Reproducible from `--seed` (same torch build, same thread count).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.demo.evaluate import held_out_scenes
from engine.demo.shapes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, caption, render
from engine.loading import load
from engine.samplers import build_sampler
from engine.schedules import NoiseSchedule
from engine.testing.random_models import SHAPES_SPEC, write_if_cascade

# The packaged model's generation defaults, written into its cascade.json; why these: bench/RESULTS.md
# ("Quality gate"). Stage II copies its input more than it reads the caption: no guidance (half the batch), 15 steps.
SHAPES_DEFAULTS = {"stage_I": {"steps": "smart27", "guidance": 7.0},
                   "stage_II": {"steps": 15, "guidance": 1.0, "noise_level": 100}}
# What users must know about the packaged model: what it can draw, and how well (bench/RESULTS.md).
SHAPES_NOTICE = ("shapes is a small demo model that knows one grammar of captions (engine/demo/shapes.py): "
                 "'a small|large <colour> circle|square|triangle [at the top left|on the right|...] on a <colour> "
                 "background', in nine colours; it draws those right about 95% of the time (python -m engine eval) "
                 "and anything else poorly. Load your own IF model for other prompts.")
CROP = 64  # super-resolution training crop (px of the 128 px picture)
CAPTION_DROPOUT = 0.1
TIMING_STEPS = (20, 60)  # with --minutes: the steps between these are timed to fit the schedule to the budget
# With --minutes, a stage past this many times its budget stops there (the EMA is saved): processes sharing a
# GPU slowed down by about 25% after their timing, and a stage stopped from outside loses what it did since its
# last checkpoint.
OVERRUN = 1.15
MAX_AUGMENTATION = 500  # noise-augmentation levels are drawn from 0..MAX_AUGMENTATION (runtime default: 250)


@dataclass(frozen=True)
class TrainOptions:
    """One source of the training defaults."""

    seed: int = 0
    steps: tuple[int, int] = (4000, 3800)  # optimiser steps for stage I and stage II
    batch: tuple[int, int] = (32, 24)
    lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.999
    threads: int = 1
    held_out: int = 256  # the first N held-out eval scenes never appear in training
    device: str = "cpu"
    minutes: float | None = None  # per stage: fewer steps if `steps` would not fit (the schedule is fitted to them)


def all_scenes() -> list[Scene]:
    return [Scene(shape, colour, background, size, position)
            for shape in SHAPES for colour in COLOURS for background in COLOURS if background != colour
            for size in SIZES for position in POSITIONS]


def training_scenes(held_out: int) -> list[Scene]:
    excluded = set(held_out_scenes(held_out))
    return [s for s in all_scenes() if s not in excluded]


class ShapesData:
    """Every training scene rendered at both sizes and its caption embedded, in memory; random batches."""

    def __init__(self, scenes: list[Scene], text_encoder, sizes: tuple[int, int], device="cpu"):
        self.scenes = scenes
        self.low_res = sizes[0]  # the base stage's size: super-resolution's input
        self.images = {size: torch.from_numpy(np.stack([np.asarray(render(s, size)) for s in scenes]))
                       .permute(0, 3, 1, 2).contiguous().to(device) for size in sizes}  # uint8 (N, 3, size, size)
        captions = [caption(s) for s in scenes]
        chunks = [text_encoder.encode(captions[k:k + 256]) for k in range(0, len(captions), 256)]
        self.embeddings = torch.cat(chunks).float().to(device)  # (N, 77, D)
        self.empty = text_encoder.empty().float().to(device)  # (1, 77, D)

    def batch(self, size: int, count: int, generator: torch.Generator):
        """(images (count, 3, size, size) in [-1, 1], embeddings (count, 77, D), indices) with caption dropout."""
        device = generator.device
        index = torch.randint(len(self.scenes), (count,), generator=generator, device=device)
        images = self.images[size][index].float() / 127.5 - 1
        drop = torch.rand(count, generator=generator, device=device) < CAPTION_DROPOUT
        embeddings = torch.where(drop[:, None, None], self.empty, self.embeddings[index])
        return images, embeddings, index


class HybridLoss:
    """Improved DDPM's L_simple + L_vlb for an eps + learned-range-variance U-Net on one noise schedule."""

    def __init__(self, scheduler_config: Mapping[str, Any], device="cpu"):
        # The runtime's DDPM sampler over every training timestep: its posterior coefficients and its
        # learned-range bounds (log clamped posterior variance .. log beta), so training and sampling agree.
        sampler = build_sampler("ddpm", scheduler_config, list(range(
            scheduler_config["num_train_timesteps"] - 1, -1, -1)))
        self.prediction_type = sampler.config["prediction_type"]  # "epsilon" or "v_prediction" (v = alpha eps - sigma x0)
        self.steps = len(sampler)
        by_t = {name: getattr(sampler, name).flip(0).to(device) for name in  # the sampler's tables run from t = T-1 down
                ("sqrt_alpha", "sqrt_one_minus_alpha", "coef_x0", "coef_xt", "min_log", "max_log")}
        self.sqrt_acp, self.sqrt_one_minus = by_t["sqrt_alpha"], by_t["sqrt_one_minus_alpha"]
        self.coef_x0, self.coef_xt = by_t["coef_x0"], by_t["coef_xt"]
        self.min_log, self.max_log = by_t["min_log"], by_t["max_log"]

    def __call__(self, unet, x0, embeddings, generator, low_res=None, class_labels=None) -> torch.Tensor:
        b = x0.shape[0]
        t = torch.randint(self.steps, (b,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        view = (b, 1, 1, 1)
        xt = self.sqrt_acp[t].view(view) * x0 + self.sqrt_one_minus[t].view(view) * noise
        model_in = xt if low_res is None else torch.cat([xt, low_res], dim=1)
        out = unet(model_in, t, encoder_hidden_states=embeddings, class_labels=class_labels).sample
        pred, v = out[:, :3], out[:, 3:]
        alpha, sigma = self.sqrt_acp[t].view(view), self.sqrt_one_minus[t].view(view)
        if self.prediction_type == "v_prediction":
            mse = F.mse_loss(pred, alpha * noise - sigma * x0)
            x0_pred = alpha * xt - sigma * pred.detach()
        else:
            mse = F.mse_loss(pred, noise)
            x0_pred = (xt - sigma * pred.detach()) / alpha
        # The variational bound trains the variance only: the mean comes from the detached prediction.
        mean_true = self.coef_x0[t].view(view) * x0 + self.coef_xt[t].view(view) * xt
        mean_pred = self.coef_x0[t].view(view) * x0_pred + self.coef_xt[t].view(view) * xt
        frac = (v + 1) / 2
        log_pred = frac * self.max_log[t].view(view) + (1 - frac) * self.min_log[t].view(view)
        log_true = self.min_log[t].view(view)
        kl = 0.5 * (-1 + log_pred - log_true + (log_true - log_pred).exp()
                     + (mean_true - mean_pred) ** 2 * (-log_pred).exp())
        kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)  # bits per dimension
        vlb = torch.where(t > 0, kl, torch.zeros_like(kl)).mean()  # t = 0 (the decoder term) is left out
        return mse + vlb * self.steps / 1000


def _lr_factor(step: int, options: TrainOptions, total: int) -> float:
    if step < options.warmup:
        return (step + 1) / options.warmup
    return 0.5 * (1 + math.cos(math.pi * (step - options.warmup) / max(total - options.warmup, 1)))


def train_stage(root: Path, stage: str, data: ShapesData, options: TrainOptions, log=print) -> dict:
    """Train stage "I" or "II" of the cascade under `root` in place (its unet/ is overwritten with the EMA)."""
    from diffusers import UNet2DConditionModel

    index = 0 if stage == "I" else 1
    folder = root / ("stage_I" if stage == "I" else "stage_II") / "unet"
    device = torch.device(options.device)
    unet = UNet2DConditionModel.from_pretrained(folder).to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    params, ema_params = list(unet.parameters()), list(ema.parameters())
    scheduler = json.loads((folder.parent / "scheduler" / "scheduler_config.json").read_text())
    loss_fn = HybridLoss(scheduler, device)
    noising = None
    if stage == "II":
        noising_config = json.loads((folder.parent / "image_noising_scheduler" / "scheduler_config.json").read_text())
        noising = NoiseSchedule.from_config(noising_config).alphas_cumprod.float().to(device)
    generator = torch.Generator(device).manual_seed(options.seed * 2 + index)
    optimiser = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0, fused=device.type == "cuda")
    total, batch = options.steps[index], options.batch[index]
    size = unet.config.sample_size
    running, start = None, time.perf_counter()
    step = 0
    while step < total:
        if options.minutes is not None and step == TIMING_STEPS[1]:  # still in warm-up: the schedule can change
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            per_step = (time.perf_counter() - timed_from) / (TIMING_STEPS[1] - TIMING_STEPS[0])
            left = options.minutes * 60 - (time.perf_counter() - start)
            total = min(total, step + max(int(left / per_step), 0))
            log(f"stage {stage}: {per_step * 1000:.1f} ms/step, {total} steps fit in {options.minutes} min")
        if step == TIMING_STEPS[0]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timed_from = time.perf_counter()
        for group in optimiser.param_groups:
            group["lr"] = options.lr * _lr_factor(step, options, total)
        if stage == "I":
            x0, embeddings, _ = data.batch(size, batch, generator)
            loss = loss_fn(unet, x0, embeddings, generator)
        else:
            x0, embeddings, idx = data.batch(size, batch, generator)
            low = data.images[data.low_res][idx].float() / 127.5 - 1
            up = F.interpolate(low, (size, size), mode="bilinear", align_corners=True)
            level = torch.randint(MAX_AUGMENTATION + 1, (batch,), generator=generator, device=device)
            acp = noising[level].view(batch, 1, 1, 1)
            up = acp.sqrt() * up + (1 - acp).sqrt() * torch.randn(up.shape, generator=generator, device=device)
            side = min(CROP, size)
            y, x = torch.randint(size - side + 1, (2,), generator=generator, device=device).tolist()
            crop = (slice(None), slice(None), slice(y, y + side), slice(x, x + side))
            loss = loss_fn(unet, x0[crop], embeddings, generator, low_res=up[crop], class_labels=level)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        decay = min(options.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        # On the device, so that a GPU is not made to wait for the host every step.
        running = loss.detach() if running is None else 0.98 * running + 0.02 * loss.detach()
        if options.minutes is not None and time.perf_counter() - start > options.minutes * 60 * OVERRUN:
            log(f"stage {stage}: past {OVERRUN} x its {options.minutes} min at step {step + 1} of {total}: stopping")
            total = step + 1
        if step % 100 == 0 or step == total - 1:
            elapsed = time.perf_counter() - start
            log(f"stage {stage} step {step + 1}/{total} loss {running.item():.4f} "
                f"({elapsed / (step + 1):.3f} s/step, {elapsed / 60:.1f} min)")
        if step % 1000 == 999:
            ema.save_pretrained(folder, safe_serialization=True)  # a usable checkpoint if stopped early
        step += 1
    ema.save_pretrained(folder, safe_serialization=True)
    return {"stage": stage, "steps": total, "batch": batch, "final_loss": running.item(),
            "seconds": time.perf_counter() - start, "device": str(device)}


def prepare(root: Path, options: TrainOptions, spec=SHAPES_SPEC, scenes: list[Scene] | None = None) -> ShapesData:
    """Write the untrained cascade under `root` (if not there yet) and build the data from its text encoder."""

    if not (root / "cascade.json").is_file():  # written aside and renamed: `--stage I` and `II` may race here
        partial = root.with_name(f".{root.name}.{os.getpid()}")
        write_if_cascade(partial, spec, seed=options.seed)
        try:
            partial.rename(root)
        except OSError:  # the other stage's process was first: same seed, same cascade
            shutil.rmtree(partial)
    pipe = load(root, device="cpu", dtype="float32")
    sizes = (pipe.stages[0].size, pipe.stages[1].size)
    return ShapesData(training_scenes(options.held_out) if scenes is None else scenes, pipe.text, sizes,
                      options.device)


def main(argv=None) -> int:
    defaults = TrainOptions()
    parser = argparse.ArgumentParser(prog="python -m engine.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="directory of the cascade (created untrained if missing)")
    parser.add_argument("--stage", choices=("I", "II", "both"), default="both")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, nargs=2, default=defaults.steps, metavar=("I", "II"))
    parser.add_argument("--batch", type=int, nargs=2, default=defaults.batch, metavar=("I", "II"))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda or cuda:N")
    parser.add_argument("--minutes", type=float, default=defaults.minutes,
                        help="time budget per stage: fewer steps than --steps if those would not fit")
    args = parser.parse_args(argv)
    if args.minutes is not None and args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes}")
    options = TrainOptions(seed=args.seed, steps=tuple(args.steps), batch=tuple(args.batch), lr=args.lr,
                           threads=args.threads, device=args.device, minutes=args.minutes)
    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    data = prepare(args.out, options)
    print(f"{len(data.scenes)} training scenes; options {asdict(options)}", flush=True)
    stages = ("I", "II") if args.stage == "both" else (args.stage,)
    for stage in stages:
        report = train_stage(args.out, stage, data, options, log=lambda m: print(m, flush=True))
        (args.out / f"train_stage_{stage}.json").write_text(json.dumps({**report, "options": asdict(options)},
                                                                       indent=2) + "\n")
    write_cascade_json(args.out)
    return 0


def write_cascade_json(root: Path, notice: str | None = SHAPES_NOTICE) -> None:
    """The trained cascade's cascade.json: its stages, its own generation defaults and what users must know."""
    spec = {"stages": ["stage_I", "stage_II"], "defaults": SHAPES_DEFAULTS} | ({"notice": notice} if notice else {})
    (root / "cascade.json").write_text(json.dumps(spec, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
