"""The torch backend with attention="triton" gives diffusers' images (kernel under TRITON_INTERPRET=1 on CPU)."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import engine  # noqa: E402
from engine.backends.attention import AddedKVTritonProcessor  # noqa: E402
from tests.conftest import diffusers_cascade  # noqa: E402


def test_triton_attention_cascade_matches_diffusers(cascade_dir, reference):
    pipe = engine.load(cascade_dir, device="cpu", attention="triton")
    processors = [m.processor for s in pipe.stages for m in s.unet.model.modules() if hasattr(m, "processor")]
    assert processors and all(isinstance(p, AddedKVTritonProcessor) for p in processors)
    ours = pipe.generate("a red circle on a blue background", seed=0, steps=(2, 1), guidance=(7.0, 4.0),
                         output_type="np")
    theirs = diffusers_cascade(reference, "a red circle on a blue background", 0, (2, 1), (7.0, 4.0))
    assert np.abs(ours - theirs).max() <= 1e-4


def test_unknown_attention_is_refused(cascade_dir):
    with pytest.raises(engine.InvalidRequestError, match="unknown attention 'flash'"):
        engine.load(cascade_dir, attention="flash")
