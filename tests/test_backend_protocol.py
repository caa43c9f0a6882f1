"""A backend is one file and one registration: a minimal third backend (the torch U-Net behind the protocol,
nothing more) registered here runs the cascade through engine.load, giving the torch backend's images."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.backends import BACKENDS, Backend
from engine.exported.manifest import write as write_manifest
from engine.model_dir import read_stages, stage_dirs
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
    monkeypatch.setitem(BACKENDS, "counting", Backend(f"{__name__}:CountingComponents",
                                                      options=("attention", "variant", "fast")))  # the one entry


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


class FakeExportComponents:
    """A fourth backend, exported: it runs "fake" exports, which its prepare hook (below) makes; each is a
    directory naming the model it stands for, run here by the torch backend's components."""

    backend = "fake"

    def __init__(self, root, device):
        self.root = root
        model = (root / "model.txt").read_text()
        self.torch = CountingComponents(device, torch.float32, "sdpa")
        self.specs = read_stages(stage_dirs([model], None))
        self.device, self.dtype = device, torch.float32
        self.manifest = {"presets": {}}

    @classmethod
    def for_load(cls, root, device):
        return cls(root, device)

    def stages(self):
        return self.specs

    def text_encoder(self, stage):
        return self.torch.text_encoder(stage)

    def unet(self, stage):
        return self.torch.unet(stage)

    def vae_decoder(self, stage):
        return self.torch.vae_decoder(stage)

    def run_context(self):
        return None


PREPARED = []


def prepare_fake(paths, precision):
    """The fake backend's prepare hook: a "fake" export of the model at `paths`, in a directory of its own."""
    root = Path(tempfile.mkdtemp(prefix="fake-export-"))
    (root / "model.txt").write_text(str(paths[0]))
    write_manifest(root, {}, kind="fake")
    PREPARED.append((root, precision))
    return root


def test_an_exported_backend_is_a_file_an_export_and_one_entry(monkeypatch, cascade_dir, engine_pipe):
    monkeypatch.setitem(BACKENDS, "fake", Backend(f"{__name__}:FakeExportComponents", export_kind="fake",
                                                  prepare=f"{__name__}:prepare_fake"))  # the one entry
    pipe = engine.load(cascade_dir, backend="fake", device="cpu")
    root, precision = PREPARED[-1]
    assert precision == "float32" and pipe.backend == "fake" and pipe.source == str(root)
    args = dict(seed=3, steps=(3, 2), output_type="np")
    assert np.array_equal(pipe.generate("a red circle", **args), engine_pipe.generate("a red circle", **args))
    again = engine.load(root)  # the export itself: its kind names its backend
    assert again.backend == "fake"
    with pytest.raises(engine.InvalidRequestError, match="fast= applies to the torch backend only; the fake "
                                                         "backend runs what the export holds"):
        engine.load(cascade_dir, backend="fake", fast=True)
    with pytest.raises(engine.InvalidRequestError, match="load it with backend='fake'"):
        engine.load(root, backend="onnxruntime")
