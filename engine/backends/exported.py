"""What the backends that run exports share: the stages of an exported directory and the runtime's U-Net, text
encoder and VAE decoder calls over a component that takes named tensors.

A backend of exports (onnxruntime_backend.py, tensorrt_backend.py) subclasses `ExportedComponents` and
supplies `component(name)`: a callable component(**named torch tensors) -> its first output tensor, with
`component.run(**named)` -> every output in order, as the manifest's contract for `name` describes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.backends import TORCH_DTYPES
from engine.exported.contract import resolve_dim
from engine.exported.manifest import read_manifest
from engine.model_dir import StageSpec, downsampling, load_tokenizer, scheduler_config


def prepare_inputs(inputs: dict, tensors: dict, device: torch.device) -> tuple[dict, dict]:
    """({name: tensor in its contract's dtype, contiguous on `device`}, {dynamic axis name: this call's size})
    for a component whose manifest lists `inputs` (name -> {"shape", "dtype"})."""
    prepared, sizes = {}, {}
    for name, spec in inputs.items():
        t = tensors[name].to(device, TORCH_DTYPES[spec["dtype"]]).contiguous()
        prepared[name] = t
        sizes |= {d: n for d, n in zip(spec["shape"], t.shape) if isinstance(d, str)}
    return prepared, sizes


def output_buffer(output: dict, sizes: dict, device: torch.device) -> torch.Tensor:
    """An empty tensor for a component's output ({"shape", "dtype"} from the manifest) at this call's sizes."""
    return torch.empty([resolve_dim(d, sizes) for d in output["shape"]], dtype=TORCH_DTYPES[output["dtype"]],
                       device=device)


class GraphTextModel:
    """An exported text encoder, called like transformers' encoders: model(ids, attention_mask=m)[0].

    T5's graph takes the mask; CLIP's takes none (TextEncoder passes None for it)."""

    def __init__(self, component):
        self.component = component

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        named = {"input_ids": input_ids}
        if attention_mask is not None:
            named["attention_mask"] = attention_mask
        return (self.component(**named),)


class GraphVAEDecoder:
    """An exported VAE decoder behind the runtime's decoder call (same interface as TorchVAEDecoder)."""

    def __init__(self, component, vae_config: dict):
        self.component = component
        self.latent_channels = vae_config.get("latent_channels", 4)
        self.scale = downsampling(vae_config["block_out_channels"])

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.component(latents=latents)  # (B, 4, h, w) -> (B, 3, scale * h, scale * w)


class GraphUNet:
    """An exported U-Net behind the runtime's U-Net call (same interface as TorchUNet). With `shallow`, the
    export's shallow graph (export/onnx.py), it caches features at depth 1: `full` reads the U-Net graph's
    `kept` output, `shallow` runs the shallow graph on it."""

    def __init__(self, component, config: dict, dtype: torch.dtype, shallow=None):
        self.component = component
        self.shallow_component = shallow
        self.cache_depths = 1 if shallow is not None and "kept" in component.outputs else 0
        self.in_channels = config["in_channels"]
        self.out_channels = config["out_channels"]
        self.sample_size = config["sample_size"]
        self.downsampling = downsampling(config["block_out_channels"])
        self.dtype = dtype
        # (H, W) when the graph was exported for one sample size (IF's U-Nets), None when its sides are dynamic
        # (the x4 upscaler's): the contract's sample shape says which
        height, width = component.inputs["sample"]["shape"][2:]
        self.fixed_size = (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.component(**self._named(sample, timestep, encoder_hidden_states, class_labels))

    def full(self, sample, timestep, encoder_hidden_states, class_labels, depth: int):
        """(out, kept (B, C, H, W)): the U-Net graph's two outputs (depth is 1, the export's)."""
        return self.component.run(**self._named(sample, timestep, encoder_hidden_states, class_labels))

    def shallow(self, sample, timestep, encoder_hidden_states, class_labels, kept, depth: int):
        named = self._named(sample, timestep, encoder_hidden_states, class_labels)
        return self.shallow_component(**named, kept=kept)

    @staticmethod
    def _named(sample, timestep, encoder_hidden_states, class_labels) -> dict:
        # sample (B, C, H, W); timestep () or (B,) int64 -> the graph's (B,); encoder_hidden_states (B, 77, D)
        named = {"sample": sample, "timestep": timestep.reshape(-1).expand(sample.shape[0]),
                 "encoder_hidden_states": encoder_hidden_states}
        if class_labels is not None:
            named["class_labels"] = class_labels
        return named


class ExportedComponents:
    """Components (backends/protocol.py) of an exported directory of `kind` ("onnx", "tensorrt"), after
    verifying every file against its manifest. Subclasses set `device` and define `component(name)`."""

    kind = ""
    device: torch.device

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.manifest = read_manifest(self.root, kind=self.kind)  # hashes first: nothing unverified is loaded
        self.dtype = TORCH_DTYPES[self.manifest["precision"]]

    def component(self, name: str):
        raise NotImplementedError

    def stages(self) -> list[StageSpec]:
        """The exported cascade's stages, as the manifest and the copied configs describe them."""
        specs = []
        for entry in self.manifest["stages"]:
            name, kind = entry["name"], entry["kind"]
            noising = {"super_resolution": "image_noising_scheduler", "latent_upscaler": "low_res_scheduler"}.get(kind)
            specs.append(StageSpec(
                name, kind, self.root / name, scheduler_config(self.root / name / "scheduler"),
                None if noising is None else scheduler_config(self.root / name / noising), entry.get("defaults"),
                max_noise_level=entry.get("max_noise_level")))
        return specs

    def run_context(self):
        return None

    def text_encoder(self, stage: StageSpec):
        if stage.kind == "latent_upscaler":  # its own CLIP, in its stage's folder
            name, tokenizer = self._entry(stage)["text_encoder"], load_tokenizer(self.root / stage.name)
        else:  # the cascade's T5, at the top of the export
            name, tokenizer = "text_encoder", load_tokenizer(self.root)
        (output,) = self.manifest["components"][name]["outputs"].values()  # (batch, 77, D)
        return tokenizer, GraphTextModel(self.component(name)), output["shape"][-1]

    def unet(self, stage: StageSpec):
        shallow = f"{stage.name}/unet_shallow"  # feature caching's shallow graph; absent from earlier exports
        return GraphUNet(self.component(f"{stage.name}/unet"), self._json(stage.name, "unet", "config.json"),
                         self.dtype, self.component(shallow) if shallow in self.manifest["components"] else None)

    def vae_decoder(self, stage: StageSpec):
        return GraphVAEDecoder(self.component(self._entry(stage)["vae_decoder"]),
                               self._json(stage.name, "vae", "config.json"))

    def _entry(self, stage: StageSpec) -> dict:
        return next(e for e in self.manifest["stages"] if e["name"] == stage.name)

    def _json(self, *parts) -> dict:
        return json.loads(self.root.joinpath(*parts).read_text())
