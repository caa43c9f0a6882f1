"""pytest-benchmark entry: the components `python -m engine bench` times, as pytest-benchmark tests.

    pytest bench/bench_components.py --benchmark-only                 # time them (pytest-benchmark's stats)
    pytest bench/bench_components.py --benchmark-disable -q           # CI: run each call once, time nothing
    BENCH_MODEL=if-i-xl:random BENCH_DEVICE=cuda pytest bench/bench_components.py --benchmark-only

BENCH_MODEL: a packaged model or model directory (U-Net step of every stage, whole cascade) or a real-size
random model name (each part); default: shapes and if-i-xl:tiny. The calls are those of engine.bench, so
both tools time the same thing; `python -m engine bench` adds the interleaving, CUDA events and the roofline.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import engine
from engine.bench import components, real_size
from engine.loading import resolve_device, resolve_dtype
from engine.model_dir import stage_dirs

MODELS = os.environ.get("BENCH_MODEL", f"{engine.DEFAULT_MODEL},if-i-xl:tiny").split(",")
DEVICE = resolve_device(os.environ.get("BENCH_DEVICE"))
DTYPE = resolve_dtype(None, DEVICE)
CASCADES = [m for m in MODELS if not real_size.is_real_size_name(m)]
REAL = [m for m in MODELS if real_size.is_real_size_name(m)]


def _sync_after(fn):
    def call():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
    return call


@functools.lru_cache(maxsize=None)
def pipeline(model: str):
    return engine.load(model, backend="torch", device=DEVICE, dtype=DTYPE)


# (model, stage index): known from the directories, before any model is loaded
STAGES = [(m, i) for m in CASCADES for i in range(len(stage_dirs([m]).dirs))]


@pytest.mark.parametrize("variant", ["eager", "ours"])
@pytest.mark.parametrize("model,index", STAGES)
def test_unet_step(benchmark, model, index, variant):
    stage = pipeline(model).stages[index]
    plain = components.fresh_copy(stage.unet.model)
    inputs = components.unet_inputs(plain.config, 2, stage.size, DEVICE, DTYPE)  # CFG batch of one image
    call = components.unet_variants(plain, inputs, DEVICE, (variant,), ours=stage.unet)[variant]
    with torch.inference_mode():
        benchmark(_sync_after(call))


@pytest.mark.parametrize("model", CASCADES)
def test_cascade(benchmark, model):
    request = engine.GenerateRequest("a red circle", seed=0, steps=2, output_type="pt")
    benchmark(_sync_after(lambda: pipeline(model).run(request)))


@pytest.mark.parametrize("name", REAL)
def test_real_size_part(benchmark, name):
    tiny = real_size.split_name(name)[1] == "tiny"
    part = real_size.parts(name)[0]
    config = real_size.part_config(part, tiny)
    model = real_size.build(part, DEVICE, DTYPE, tiny=tiny)
    calls, _ = components.part_calls(part, model, config, 1, real_size.input_size(part, config, tiny), DEVICE,
                                     DTYPE, ("eager", "ours"))
    with torch.inference_mode():
        benchmark(_sync_after(calls["ours"]))
