"""Export a cascade's components to ONNX: one graph per component, checked against PyTorch, with a manifest.

    python -m engine export MODEL... --format onnx --out DIR [--dtype float32|float16]

The exported directory is self-contained (it runs with ONNX Runtime and no PyTorch weights):

    manifest.json                  every file's SHA-256, each component's contract and export check, versions
    tokenizer/                     copied from stage I
    text_encoder/model.onnx        input_ids, attention_mask (batch, 77) int64 -> last_hidden_state (batch, 77, D)
    stage_I/unet/model.onnx        sample, timestep (batch,), encoder_hidden_states [, class_labels] -> out, kept
    stage_I/unet/shallow.onnx      the same inputs and kept -> out: feature caching's shallow call (below)
    stage_I/unet/config.json, stage_I/scheduler/, stage_II/image_noising_scheduler/, ...
    stage_III/                     an x4 upscaler's own graphs and configs, when the cascade has one:
      text_encoder/model.onnx      CLIP: input_ids (batch, 77) int64 -> last_hidden_state (batch, 77, D)
      unet/model.onnx              sample (batch, 7, height, width), timestep, encoder_hidden_states, class_labels
      vae_decoder/model.onnx       latents (batch, 4, height, width) -> image (batch, 3, 4 height, 4 width)
      tokenizer/, scheduler/, low_res_scheduler/, model_index.json

Feature caching (DeepCache, engine/options.py `Caching`) at depth 1: a U-Net graph also returns `kept`, the input
of its last up-block (batch, block_out_channels[1], H, W), and `unet/shallow.onnx` (component
"stage_I/unet_shallow") computes a shallow step from it: the embeddings, conv_in, the first down-block, the last
up-block and the head, so it holds only their weights. A full call on the graph's own inputs and a shallow call
on its `kept` give the same `out` (torch_backend.TorchUNet.full and .shallow, traced).

Each component's contract (names, shapes with the dynamic batch axis, dtypes, example inputs) is stated once,
in `Contract`; export, the export check, the manifest and the ONNX Runtime backend all read it. Every graph is
run with ONNX Runtime on random inputs at export time and compared with the PyTorch module; an export whose
error is over the tolerance of its precision fails. float16 exports keep the text encoder in float32 (T5
overflows in float16). Graphs over 2 GB keep their weights in external data files beside them.

The TorchScript-based exporter (`dynamo=False`) is used: on these U-Nets it gives the same graphs' numerics as
the dynamo exporter (both checked to 3e-6 on the packaged model) in a twentieth of the time, which keeps CI's
export tests fast, and it needs no onnxscript.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import uuid
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engine.assemble import build_pipeline
from engine.backends.onnxruntime_backend import require_onnx
from engine.backends.torch_backend import TorchComponents, TorchVAEDecoder
from engine.errors import EngineError
from engine.exported import manifest as manifest_io
from engine.exported.contract import Contract
from engine.exported.manifest import source_hash  # noqa: F401 (export.cache takes it from here too)
from engine.model_dir import is_x4_upscaler, read_stages, stage_dirs, text_width
from engine.stage import LatentUpscaleStage
from engine.text import MAX_TOKENS as TEXT_TOKENS
from engine.version import __version__

log = logging.getLogger(__name__)

OPSET = 17
PRECISIONS = ("float32", "float16")
# Export check: max |onnx - torch| <= ATOL + RTOL * max |torch|, per precision.
TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2)}
EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's limit: bigger graphs keep weights in a side file
CACHE_DEPTH = 1  # the feature-caching depth exports carry (module docstring): kept is at the sample's size


class _TextEncoderGraph(torch.nn.Module):
    def __init__(self, t5):
        super().__init__()
        self.t5 = t5

    def forward(self, input_ids, attention_mask):
        return self.t5(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _ClipTextGraph(torch.nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids):
        return self.clip(input_ids=input_ids).last_hidden_state


class _VAEDecoderGraph(torch.nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.vae = decoder.vae
        self.decoder = decoder  # the torch backend's decoder: the graph computes exactly what it computes

    def forward(self, latents):
        return self.decoder(latents)


class _UNetGraph(torch.nn.Module):
    """A U-Net's full call: out, and with `depth` what a shallow call at that depth reuses (TorchUNet.full)."""

    def __init__(self, unet, depth: int = 0):
        super().__init__()
        self.model, self.unet, self.depth = unet.model, unet, depth

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None):
        if self.depth:
            return self.unet.full(sample, timestep, encoder_hidden_states, class_labels, self.depth)
        return self.unet(sample, timestep, encoder_hidden_states, class_labels)


class _ShallowUNetGraph(torch.nn.Module):
    """A U-Net's shallow call on a full call's kept features (TorchUNet.shallow); class_labels where the
    contract has them, kept last."""

    def __init__(self, unet, depth: int):
        super().__init__()
        self.model, self.unet, self.depth = unet.model, unet, depth

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        class_labels, kept = rest if len(rest) == 2 else (None, rest[0])
        return self.unet.shallow(sample, timestep, encoder_hidden_states, class_labels, kept, self.depth)


def text_encoder_contract(t5) -> Contract:
    tokens = ("batch", TEXT_TOKENS)
    return Contract("text_encoder", "text_encoder/model.onnx",
                    inputs={"input_ids": (tokens, "int64"), "attention_mask": (tokens, "int64")},
                    outputs={"last_hidden_state": (("batch", TEXT_TOKENS, t5.config.d_model), "float32")},
                    precision="float32",  # always: T5 overflows in float16
                    value_ranges={"input_ids": (0, t5.config.vocab_size), "attention_mask": (1, 2)})


def clip_text_encoder_contract(stage_name: str, clip) -> Contract:
    return Contract(f"{stage_name}/text_encoder", f"{stage_name}/text_encoder/model.onnx",
                    inputs={"input_ids": (("batch", TEXT_TOKENS), "int64")},
                    outputs={"last_hidden_state": (("batch", TEXT_TOKENS, clip.config.hidden_size), "float32")},
                    precision="float32",  # text encoders export in float32, as T5 must
                    value_ranges={"input_ids": (0, clip.config.vocab_size)})


def vae_decoder_contract(stage_name: str, decoder, precision: str, latent_size: int) -> Contract:
    latents = ("batch", decoder.latent_channels, "height", "width")
    image = ("batch", 3, f"height*{decoder.scale}", f"width*{decoder.scale}")
    return Contract(f"{stage_name}/vae_decoder", f"{stage_name}/vae_decoder/model.onnx",
                    inputs={"latents": (latents, precision)}, outputs={"image": (image, precision)},
                    precision=precision, value_ranges={},
                    example_sizes={"height": latent_size, "width": latent_size})


def unet_contract(stage_name: str, unet, precision: str, latent_size: int | None = None) -> Contract:
    """An IF U-Net at its sample size; with latent_size, the x4 upscaler's, whose height and width are dynamic."""
    config = unet.config
    unsupported = {"time_cond_proj_dim": config.time_cond_proj_dim is not None,
                   "addition_embed_type": config.addition_embed_type not in (None, "text"),
                   "encoder_hid_dim_type": config.encoder_hid_dim_type not in (None, "text_proj")}
    for option, refused in unsupported.items():
        if refused:
            raise EngineError(f"cannot export {stage_name}/unet: {option}={getattr(config, option)!r} needs extra "
                              "U-Net inputs that the ONNX contract (sample, timestep, encoder_hidden_states, "
                              "class_labels) does not carry; only IF-style U-Nets are supported")
    height, width = (config.sample_size,) * 2 if latent_size is None else ("height", "width")
    text_dim = text_width(config)
    inputs = {"sample": (("batch", config.in_channels, height, width), precision),
              "timestep": (("batch",), "int64"),
              "encoder_hidden_states": (("batch", TEXT_TOKENS, text_dim), precision)}
    ranges = {"timestep": (0, 1000)}
    if config.class_embed_type is not None or config.num_class_embeds is not None:  # super-resolution stages
        inputs["class_labels"] = (("batch",), "int64")
        ranges["class_labels"] = (0, config.num_class_embeds or 1000)
    sizes = {} if latent_size is None else {"height": latent_size, "width": latent_size}
    outputs = {"out": (("batch", config.out_channels, height, width), precision)}
    if caches(unet):
        outputs["kept"] = (("batch", config.block_out_channels[CACHE_DEPTH], height, width), precision)
    return Contract(f"{stage_name}/unet", f"{stage_name}/unet/model.onnx", inputs=inputs, outputs=outputs,
                    precision=precision, value_ranges=ranges, example_sizes=sizes)


def caches(unet) -> bool:
    """Whether its export carries feature caching: a diffusers U-Net with an up-block past the first (depth 1
    keeps the input of the last)."""
    return len(unet.up_blocks) > CACHE_DEPTH


def shallow_contract(full: Contract) -> Contract:
    """The shallow call's contract, from its U-Net's: the same inputs and `kept` -> out."""
    stage = full.name.rsplit("/", 1)[0]
    return Contract(f"{stage}/unet_shallow", f"{stage}/unet/shallow.onnx",
                    inputs={**full.inputs, "kept": full.outputs["kept"]}, outputs={"out": full.outputs["out"]},
                    precision=full.precision, value_ranges=full.value_ranges, example_sizes=full.example_sizes)


def unet_graphs(stage_name: str, unet, precision: str, latent_size: int | None = None) -> list:
    """(contract, module) of a stage's U-Net graphs: the full call, and where it caches, the shallow call.
    unet: the stage's TorchUNet, its model already in the export's precision."""
    contract = unet_contract(stage_name, unet.model, precision, latent_size)
    if not caches(unet.model):
        return [(contract, _UNetGraph(unet))]
    return [(contract, _UNetGraph(unet, CACHE_DEPTH)), (shallow_contract(contract), _ShallowUNetGraph(unet, CACHE_DEPTH))]


def _export_graph(module: torch.nn.Module, contract: Contract, root: Path, device: torch.device | None = None) -> None:
    """Trace `module` (on `device`, CPU by default) into the contract's graph file under `root`."""
    path = root / contract.file
    path.parent.mkdir(parents=True, exist_ok=True)
    example = tuple(t.to(device) for t in contract.example_inputs(2, torch.Generator().manual_seed(0)))
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side size checks that hold for any batch
        try:
            torch.onnx.export(module.eval(), example, str(path), input_names=list(contract.inputs),
                              output_names=list(contract.outputs), dynamic_axes=contract.dynamic_axes(),
                              opset_version=OPSET, dynamo=False)
        except Exception as exc:  # the exporter raises many types; name the component and pass the reason on
            raise EngineError(f"cannot export {contract.name} to ONNX: {type(exc).__name__}: {exc}") from exc
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    if size >= EXTERNAL_DATA_BYTES:
        import onnx

        graph = onnx.load(str(path))
        onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")


def as_traced(contract: Contract, root: Path) -> Contract:
    """The contract with the inputs its traced graph kept: the exporter drops an input that nothing reads (the
    x4 upscaler's shallow call reads no text), and the backends feed a graph what its contract lists."""
    import onnx

    graph = onnx.load(str(root / contract.file), load_external_data=False).graph
    taken = {i.name for i in graph.input}
    return dataclasses.replace(contract, inputs={n: v for n, v in contract.inputs.items() if n in taken})


def check_graph(module: torch.nn.Module, contract: Contract, root: Path, seed: int = 1) -> dict:
    """Run the graph with ONNX Runtime (CPU) and the module on fresh random inputs at batch 3; the errors."""
    _, ort = require_onnx()
    session = ort.InferenceSession(str(root / contract.file), providers=["CPUExecutionProvider"])
    inputs = contract.example_inputs(3, torch.Generator().manual_seed(seed))  # not the export's batch
    with torch.no_grad():
        expected = module(*inputs)
    expected = [t.float().numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    taken = {i.name for i in session.get_inputs()}  # the exporter drops inputs nothing reads (`as_traced`)
    feed = {name: t.numpy() for name, t in zip(contract.inputs, inputs) if name in taken}
    got = [g.astype(np.float32) for g in session.run(None, feed)]
    atol, rtol = TOLERANCE[contract.precision]
    errors = [(float(np.abs(g - e).max()), float(np.abs(e).max())) for g, e in zip(got, expected)]
    max_abs, scale = max(errors, key=lambda e: e[0] / (atol + rtol * e[1]))  # each output against its own scale
    result = {"max_abs_error": max_abs, "max_rel_error": max_abs / max(scale, 1e-12),
              "tolerance": atol + rtol * scale, "batch": 3, "provider": "CPUExecutionProvider"}
    if not all(np.isfinite(g).all() for g in got) or max_abs > result["tolerance"]:
        raise EngineError(f"export check failed for {contract.name}: ONNX Runtime differs from PyTorch by "
                          f"{max_abs:.3g} (tolerance {result['tolerance']:.3g} for {contract.precision}); "
                          "the graph was not written")
    return result


def _copy_configs(dirs: list[Path], names: list[str], root: Path) -> None:
    first = dirs[0]
    shutil.copytree(first / "tokenizer", root / "tokenizer")
    (root / "text_encoder").mkdir()
    shutil.copy2(first / "text_encoder" / "config.json", root / "text_encoder" / "config.json")
    for stage_dir, name in zip(dirs, names):
        for sub in ("scheduler", "image_noising_scheduler", "low_res_scheduler"):
            if (stage_dir / sub).is_dir():
                shutil.copytree(stage_dir / sub, root / name / sub)
        configs = ["unet/config.json"]
        if is_x4_upscaler(stage_dir):
            shutil.copytree(stage_dir / "tokenizer", root / name / "tokenizer")
            configs += ["text_encoder/config.json", "vae/config.json", "model_index.json"]
        for config in configs:
            (root / name / config).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(stage_dir / config, root / name / config)


# Which graphs an export holds: 2 added the U-Nets' `kept` output and shallow graphs. Part of the export cache's
# key (export/cache.py), so a cached export without them is made again.
EXPORT_FORMAT = 2


def versions() -> dict:
    onnx, ort = require_onnx()
    return {"engine": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "opset": OPSET, "format": EXPORT_FORMAT}


def export_onnx(*paths, out: str | Path, dtype: str = "float32", progress: bool = True,
                source_sha256: str | None = None, finish: Callable[[Path, Path], None] | None = None) -> Path:
    """Export the cascade at `paths` (as engine.load takes them) into the directory `out`; returns it.

    Built in a temporary directory beside `out` and renamed into place, so `out` is never half-written.
    `out` may be a previous export (it is replaced); any other existing non-empty directory is refused.
    source_sha256: `source_hash` of the model when the caller has it already (the cache does), so a
    multi-GB model is not read twice. finish: called with (the finished directory, `out`) before the rename
    (the cache seals its entries there).
    """
    from tqdm.auto import tqdm

    require_onnx()
    if dtype not in PRECISIONS:
        raise EngineError(f"unknown export dtype {dtype!r}; choose one of {', '.join(PRECISIONS)}")
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not manifest_io.is_exported(out):
        raise EngineError(f"{out} exists and is not an earlier export; choose an empty or new directory")
    cascade = stage_dirs(paths)
    dirs, notice, source = cascade.dirs, cascade.notice, cascade.source
    pipe = build_pipeline(read_stages(cascade), TorchComponents(torch.device("cpu"), torch.float32, "sdpa"),
                          source=source, notice=notice, presets=cascade.presets)  # presets checked here
    if isinstance(pipe.stages[0], LatentUpscaleStage):
        raise EngineError("exporting an x4 upscaler on its own is not supported yet: export it as the last stage "
                          "of an IF cascade, or run it with the torch backend")
    names = [stage.name for stage in pipe.stages]

    work = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"  # unique: exports may run concurrently
    work.mkdir(parents=True)
    try:
        _copy_configs(dirs, names, work)
        components = [(text_encoder_contract(pipe.text.model), _TextEncoderGraph(pipe.text.model))]
        stages, size = [], None
        for stage in pipe.stages:
            entry = {"name": stage.name, "kind": stage.kind, "unet": f"{stage.name}/unet/model.onnx",
                     "defaults": {k: v for k, v in asdict(stage.defaults).items() if v is not None}}
            if dtype != "float32":
                stage.unet.model.half()  # in place: the U-Net graphs trace the stage's TorchUNet
            if isinstance(stage, LatentUpscaleStage):  # its latents take the size of the image it receives
                vae_dtype = "float32" if dtype == "float32" or stage.decoder.vae.config.force_upcast else dtype
                decoder = stage.decoder if vae_dtype == "float32" else _half_decoder(stage.decoder)
                clip = stage.text.model
                components += [(clip_text_encoder_contract(stage.name, clip), _ClipTextGraph(clip)),
                               *unet_graphs(stage.name, stage.unet, dtype, latent_size=size),
                               (vae_decoder_contract(stage.name, decoder, vae_dtype, size), _VAEDecoderGraph(decoder))]
                entry |= {"text_encoder": f"{stage.name}/text_encoder", "vae_decoder": f"{stage.name}/vae_decoder",
                          "max_noise_level": stage.max_noise_level}
            else:
                components += unet_graphs(stage.name, stage.unet, dtype)
            stages.append(entry)
            size = stage.output_size(size)
        described = {}
        for contract, module in tqdm(components, desc="export onnx", disable=not progress):
            _export_graph(module, contract, work)
            described[contract.name] = {**as_traced(contract, work).describe(),
                                        "check": check_graph(module, contract, work)}
            log.info("exported %s: %s", contract.name, described[contract.name]["check"])
        manifest_io.write(work, {
            "precision": dtype, "source": {"model": source, "sha256": source_sha256 or source_hash(dirs)}, "notice": notice,
            "versions": versions(), "components": described,
            "stages": stages,
            "presets": {name: preset.to_json(names) for name, preset in cascade.presets.items()},
        })
        if finish is not None:
            finish(work, out)
        replace_directory(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _half_decoder(decoder):
    return TorchVAEDecoder(decoder.vae.half())


def replace_directory(work: Path, out: Path) -> None:
    """Move a finished export into place; an earlier export at `out` is swapped out first, then removed."""
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)
