"""CUDA checks: float16 on the GPU against float32 on the CPU, same seed. Skipped on machines without CUDA."""

import numpy as np
import pytest
import torch

import engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_precision_tracks_cpu_float32(cascade_dir, engine_pipe, dtype):
    gpu = engine.load(cascade_dir, device="cuda", dtype=dtype)
    assert gpu.text.model.dtype in (torch.bfloat16, torch.float32)  # T5 never in float16
    options = dict(seed=0, steps=(4, 3), guidance=(7.0, 4.0), output_type="np")
    ours = gpu.generate("a red circle", **options)
    reference = engine_pipe.generate("a red circle", **options)
    # Random tiny U-Nets amplify half-precision rounding little over a few steps; 2% of the range is the bound.
    assert np.abs(ours - reference).max() < 0.02
