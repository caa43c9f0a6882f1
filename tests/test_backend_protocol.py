"""A backend is one file and one registration: a minimal third backend (the torch U-Net behind the protocol,
nothing more) registered here runs the cascade through engine.load, giving the torch backend's images."""

import numpy as np
import pytest

import engine
from engine.backends import BACKENDS
from engine.backends.protocol import Components, TextModel, UNet, VAEDecoder
from engine.backends.torch_backend import TorchComponents


class CountingUNet:
    """The protocol's U-Net, wrapping another: its attributes, and a call that counts."""

    def __init__(self, inner: UNet):
        self.inner = inner
        self.in_channels, self.out_channels = inner.in_channels, inner.out_channels
        self.sample_size, self.downsampling, self.dtype = inner.sample_size, inner.downsampling, inner.dtype
        self.calls = 0

    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None):
        self.calls += 1
        return self.inner(sample, timestep, encoder_hidden_states, class_labels)


class CountingComponents(TorchComponents):
    """The third backend: the torch backend's components, its U-Nets wrapped."""

    def unet(self, stage):
        return CountingUNet(super().unet(stage))


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(BACKENDS, "counting", f"{__name__}:CountingComponents")  # the one line


def test_a_registered_backend_runs_the_cascade(registered, cascade_dir, engine_pipe):
    pipe = engine.load(cascade_dir, backend="counting", device="cpu")
    assert all(isinstance(stage.unet, CountingUNet) for stage in pipe.stages)
    args = dict(seed=3, steps=(3, 2), output_type="np")
    assert np.array_equal(pipe.generate("a red circle", **args), engine_pipe.generate("a red circle", **args))
    assert [stage.unet.calls for stage in pipe.stages] == [3, 2]


def test_both_backends_conform_to_the_protocol(cascade_dir, three_stage_pipe, tmp_path, monkeypatch):
    assert isinstance(TorchComponents(None, None, "sdpa"), Components)
    for stage in three_stage_pipe.stages:
        assert isinstance(stage.unet, UNet)
    assert isinstance(three_stage_pipe.stages[-1].decoder, VAEDecoder)
    assert isinstance(three_stage_pipe.text.model, TextModel)
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("CASCADE_ENGINE_CACHE", str(tmp_path / "cache"))
    exported = engine.load(cascade_dir, backend="onnxruntime")  # exported into the cache, then run by ORT
    assert all(isinstance(stage.unet, UNet) for stage in exported.stages)
    assert isinstance(exported.text.model, TextModel)


def test_an_unknown_backend_names_the_known_ones(cascade_dir):
    with pytest.raises(engine.InvalidRequestError, match="unknown backend 'openvino'; available: torch, onnxruntime, tensorrt"):
        engine.load(cascade_dir, backend="openvino")
