"""Command line: `python -m engine generate "PROMPT" -o out.png [...]`, `python -m engine export MODEL... --out DIR`,
`python -m engine bench [--model NAME...] [...]` and `python -m engine serve [--model ...] [--port 8000]`.

Defaults come from `engine.options.GenerateRequest` and `engine.bench.BenchOptions` (the same dataclasses the
Python API uses); errors print one line and exit non-zero. Every command takes -v / --log-level for the
engine's log lines (which weight files were read, cache hits, ...); `--version` says what is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import ipaddress
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from engine.backends import BACKENDS
from engine.bench import BenchOptions, run
from engine.bench.components import COMPILE_MODES, DEFAULT_COMPARE, VARIANTS
from engine.bench.plot import svg as plot_svg
from engine.bench.real_size import NAMES, real_size_parts
from engine.bench.report import DEFAULT_REGRESSION, command_line, compare_to_baseline, save_json, table
from engine import offline
from engine.demo import evaluate as quality_gate
from engine.errors import EngineError
from engine.loading import DTYPES, load

from engine.model_dir import DEFAULT_MODEL, read_stages, stage_dirs
from engine.offload import OFFLOAD_MODES
from engine.plan import memory_plan, parse_memory, parts_of
from engine.options import DEFAULT_MAX_BATCH, STAGE_DEFAULTS, GenerateRequest, request_defaults
from engine.ray_batch import RayOptions
from engine.samplers import SAMPLERS
from engine.schedules import NAMED_SCHEDULES
from engine.serve import defaults as serve_defaults  # the service's defaults, without web imports
from engine.version import __version__

DEFAULTS = request_defaults()
FAST_HELP = ("the fast path (static buffers, text constants, compiled U-Nets, CUDA graphs): on by default on CUDA, "
             "off on CPU, where compiling costs about a minute per shape, once (cached); a server or batch job "
             "compiles (and captures) its row buckets before it starts")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _steps_value(text: str):
    """A step count or a named schedule ("smart27")."""
    if text.isdigit():
        return int(text)
    if text in NAMED_SCHEDULES:
        return text
    raise ValueError(f"not a step count or a schedule name ({', '.join(NAMED_SCHEDULES)}): {text!r}")


# Options taking one value per stage. argparse gives them every word that follows, the prompt too
# (`--steps 20 20 "a cat"`); they are read as strings and converted after parsing, so a trailing word that is
# not a value of the option is handed back as the prompt (`_take_back_prompt`).
def _interval_value(text: str):
    """LO:HI, a guidance interval (guidance at timesteps LO <= t < HI), or "default" (the stage's own)."""
    if text == "default":
        return None
    lo, colon, hi = text.partition(":")
    if not (colon and lo.isdigit() and hi.isdigit()):
        raise ValueError(f"not LO:HI (e.g. 0:600) or 'default': {text!r}")
    return int(lo), int(hi)


def _refresh_value(text: str):
    """S,S,...: a stage's full steps under feature caching (counted from 0, the first), or "none"."""
    if text == "none":
        return None
    steps = text.split(",")
    if not all(step.strip().isdigit() for step in steps):
        raise ValueError(f"not S,S,... (full steps, e.g. 0,4,9) or 'none': {text!r}")
    return {"refresh": [int(step) for step in steps]}


PER_STAGE = {"steps": _steps_value, "guidance": float, "noise_level": int, "guidance_interval": _interval_value,
             "strength": float, "cache": int, "cache_steps": _refresh_value}


def _stage_defaults(name: str) -> str:
    """A setting's default per stage kind, for help texts: "smart27 (base), smart27 (super_resolution), ..."."""

    values = [(kind, getattr(d, name)) for kind, d in STAGE_DEFAULTS.items() if getattr(d, name) is not None]
    return ", ".join(f"{value:g} ({kind})" if isinstance(value, float) else f"{value} ({kind})"
                     for kind, value in values) + "; or the model's own"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "diffusers", "transformers", "onnxruntime", "triton"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return f"cascade-engine {__version__} ({', '.join(found)}; python {sys.version.split()[0]})"


def _logging_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="show the engine's log lines (-v info, -vv debug)")
    common.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                        help="level of the engine's log lines (default: warning; -v is info)")
    return common


def _load_options() -> argparse.ArgumentParser:
    """How a model is loaded, the same flags on every command that loads one (generate, eval, serve, batch)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--backend", choices=BACKENDS, default=None,
                       help="torch (default for model directories), onnxruntime or tensorrt (the defaults for their "
                            "exports; for a model directory they export or build into the cache on first use)")
    flags.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    flags.add_argument("--dtype", choices=list(DTYPES), default=None,
                       help="float32 (CPU default), float16 (CUDA default) or bfloat16")
    flags.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None, help=FAST_HELP)
    flags.add_argument("--offload", choices=OFFLOAD_MODES, default=None,
                       help="torch: each model in host memory, on the GPU only while it runs (model), or layer by "
                            "layer (sequential), for GPUs the cascade does not fit (see `plan`)")
    flags.add_argument("--text-encoder-device", default=None, metavar="DEVICE",
                       help="torch: where T5 runs, e.g. cpu beside a GPU (default: --device)")
    return flags


def _ray_options(what: str) -> argparse.ArgumentParser:
    """The Ray flags of serve and batch (each adds its own count: --replicas, --workers)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--ray", action="store_true", help=f"{what} (a local Ray cluster unless --ray-address)")
    flags.add_argument("--ray-address", default=None,
                       help="an existing Ray cluster, e.g. ray://head:10001 (default: RAY_ADDRESS, else local)")
    flags.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="with --ray: autoscaling bounds")
    flags.add_argument("--num-gpus", type=float, default=0.0, help="with --ray: GPUs per replica or worker")
    return flags


def _autoscale(args) -> tuple[int, int] | None:
    """--autoscale MIN:MAX as two integers."""
    if args.autoscale is None:
        return None
    low, colon, high = args.autoscale.partition(":")
    if not (colon and low.isdigit() and high.isdigit()):
        raise EngineError(f"--autoscale takes MIN:MAX, e.g. 1:4, got {args.autoscale!r}")
    return int(low), int(high)


def load_options(args) -> dict:
    """engine.load's keyword arguments from the load flags (_load_options)."""
    return {"backend": args.backend, "device": args.device, "dtype": args.dtype, "fast": args.fast,
            "offload": args.offload, "text_encoder_device": args.text_encoder_device}


def configure_logging(args) -> str:
    """Route the engine's log lines to stderr at the level asked for; returns the level's name."""
    level = args.log_level or {0: "warning", 1: "info"}.get(args.verbose, "debug")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("engine", "export", "cascade_kernels"):
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        logger.handlers[:] = [handler]
        logger.propagate = False
    return level


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_versions())
    commands = parser.add_subparsers(dest="command", required=True)
    common = [_logging_options()]  # -v / --log-level on every command
    loads = [*common, _load_options()]  # and the load flags on every command that loads a model
    gen = commands.add_parser("generate", parents=loads, help="generate images for a prompt")
    gen.add_argument("prompt", nargs="?", default=None, help="the text prompt")
    gen.add_argument("-o", "--output", default="out.png",
                     help="PNG path; with several images, -0, -1, ... are added before .png (default: out.png)")
    gen.add_argument("--model", nargs="+", default=[DEFAULT_MODEL], metavar="PATH",
                     help=f"stage directories in cascade order, a directory with cascade.json, or a packaged "
                          f"model name (default: {DEFAULT_MODEL})")
    gen.add_argument("--negative-prompt", default=DEFAULTS["negative_prompt"])
    gen.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                     help="seed of the random draws (default: a fresh one, printed, so the picture can be drawn again)")
    gen.add_argument("-n", "--num-images", type=int, default=DEFAULTS["num_images_per_prompt"],
                     help="images per prompt")
    gen.add_argument("--steps", nargs="+", default=None, metavar="N|NAME",
                     help="steps per stage (one value for all, or one per stage): a count or a named schedule "
                          f"such as smart27, smart50, smart100 (default: {_stage_defaults('steps')})")
    gen.add_argument("--guidance", nargs="+", default=None, metavar="G",
                     help=f"guidance per stage, one value for all or one per stage (default: {_stage_defaults('guidance')})")
    gen.add_argument("--noise-level", nargs="+", default=DEFAULTS["noise_level"], metavar="N",
                     help="noise augmentation of the stages after the first: one value for all or one per stage "
                          f"(default: {_stage_defaults('noise_level')})")
    gen.add_argument("--scheduler", choices=SAMPLERS, default=DEFAULTS["scheduler"],
                     help="sampler for every stage (default: each stage's own scheduler config)")
    _add_speed_options(gen)
    gen.add_argument("--image", default=None, metavar="PNG",
                     help="the picture to edit (image-to-image; with --mask, inpainting), or to upscale for a "
                          "model that starts with an upscaler")
    gen.add_argument("--mask", default=None, metavar="PNG",
                     help="inpainting: white where the --image is redrawn, black where it is kept; its size")
    gen.add_argument("--strength", nargs="+", default=None, metavar="S",
                     help="edits: how much of the schedule redraws the picture, in (0, 1]; one value for the "
                          "stages that edit, or one per such stage (default: 0.7 base, 1.0 base inpainting, "
                          "0.8 super-resolution, as diffusers' IF edit pipelines)")
    gen.add_argument("--quiet", action="store_true", help="no progress bars or timing lines")


    srv = commands.add_parser("serve", parents=[*loads, _ray_options("serve as a Ray Serve deployment")],
                              help="serve the model over HTTP: OpenAI-style images API, step-level batching")
    srv.add_argument("--model", nargs="+", default=[DEFAULT_MODEL], metavar="PATH",
                     help=f"as for generate (default: {DEFAULT_MODEL})")
    srv.add_argument("--host", default=serve_defaults.DEFAULT_HOST,
                     help="address to listen on (default: loopback only; 0.0.0.0 for every interface)")
    srv.add_argument("--port", type=int, default=serve_defaults.DEFAULT_PORT)
    srv.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                     help="images per U-Net call per stage, and so per request (prompts x n; more is a 400)")
    srv.add_argument("--max-queue", type=int, default=serve_defaults.DEFAULT_MAX_QUEUE,
                     help="requests waiting for admission before new ones get 503")
    srv.add_argument("--timeout", type=float, default=serve_defaults.DEFAULT_TIMEOUT_S,
                     help="longest life of a request in seconds, queue time included (then 504)")
    limits = serve_defaults.Limits()
    srv.add_argument("--max-body-bytes", type=int, default=None,
                     help=f"largest request body, else 413 (default: $CASCADE_ENGINE_MAX_BODY_BYTES or "
                          f"{limits.max_body_bytes})")
    srv.add_argument("--max-upload-bytes", type=int, default=None,
                     help=f"largest edit body (/v1/images/edits: picture and mask files), else 413 (default: "
                          f"$CASCADE_ENGINE_MAX_UPLOAD_BYTES or {limits.max_upload_bytes})")
    srv.add_argument("--max-prompt-chars", type=int, default=None,
                     help=f"longest prompt or negative prompt in characters, else 400 (default: "
                          f"$CASCADE_ENGINE_MAX_PROMPT_CHARS or {limits.max_prompt_chars})")
    srv.add_argument("--max-steps", type=int, default=None,
                     help="most denoising steps a request may ask of any one stage, else 400 (default: "
                          f"$CASCADE_ENGINE_MAX_STEPS, else {serve_defaults.MAX_STEPS_FACTOR}x the most any stage "
                          f"takes by default, at least {serve_defaults.MIN_MAX_STEPS})")
    srv.add_argument("--max-images", type=int, default=None,
                     help="most images per request (prompts x n), else 400 (default: $CASCADE_ENGINE_MAX_IMAGES, "
                          "else --max-batch)")
    srv.add_argument("--max-pixels-per-request", type=int, default=None,
                     help="most output pixels per request (images x width x height), else 400 (default: "
                          "$CASCADE_ENGINE_MAX_PIXELS_PER_REQUEST, else --max-images at the model's size)")
    srv.add_argument("--served-model-name", default=None, metavar="NAME",
                     help="the model's name in /v1/models and the one a request's 'model' may name (default: the "
                          "first --model's folder name; its path with --show-model-path)")
    srv.add_argument("--show-model-path", action="store_true",
                     help="let clients see the model's path as given (/v1/models, /health/ready, load failures); "
                          "default: its folder name only")
    srv.add_argument("--api-key", action="append", default=None, metavar="KEY",
                     help="require 'Authorization: Bearer KEY' on every route but /health/* (repeat for several "
                          "keys; also $CASCADE_ENGINE_API_KEYS, comma-separated); an empty key is refused")
    srv.add_argument("--api-key-file", type=Path, default=None, metavar="FILE", help="API keys, one per line")
    srv.add_argument("--metrics-open", action="store_true",
                     help="with API keys, leave /metrics open (for a scraper that cannot send a bearer token)")
    srv.add_argument("--metrics-auth", action="store_true", help=argparse.SUPPRESS)  # the default now
    srv.add_argument("--drain-timeout", type=float, default=serve_defaults.DEFAULT_DRAIN_TIMEOUT_S, metavar="S",
                     help="after SIGTERM: seconds the requests in flight get to finish (readiness is 503 at once; "
                          "what is left then gets 503)")
    srv.add_argument("--max-connections", type=int, default=serve_defaults.DEFAULT_MAX_CONNECTIONS,
                     help="open connections before new requests get 503")
    srv.add_argument("--keep-alive-timeout", type=float, default=serve_defaults.DEFAULT_KEEP_ALIVE_S, metavar="S",
                     help="seconds an idle keep-alive connection stays open")
    srv.add_argument("--header-timeout", type=float, default=serve_defaults.DEFAULT_HEADER_TIMEOUT_S, metavar="S",
                     help="seconds a connection gets to send a request's headers whole, else 408 and closed")
    srv.add_argument("--batching", choices=serve_defaults.POLICIES, default=serve_defaults.DEFAULT_POLICY,
                     help="step: requests join the running batch at every U-Net step (default); request: batches "
                          "form when the cascade is idle and run to the end; none: one request at a time")
    srv.add_argument("--preset", default=None, metavar="NAME",
                     help="the model's preset for requests that name neither a preset nor a cache (e.g. turbo)")
    _add_cache_options(srv, " for requests that name neither a preset nor a cache")
    srv.add_argument("--replicas", type=int, default=1, help="with --ray: Ray Serve replicas (each loads the model)")


    ev = commands.add_parser("eval", parents=loads, help="prompt adherence on held-out shape captions (the quality gate)")
    ev.add_argument("--model", nargs="+", default=[DEFAULT_MODEL], metavar="PATH")
    ev.add_argument("--count", type=int, default=quality_gate.EvalOptions.count, help="held-out captions, one picture each")
    ev.add_argument("--batch", type=int, default=quality_gate.EvalOptions.batch, help="captions per generate call")
    ev.add_argument("--seed", type=int, default=quality_gate.EvalOptions.seed)
    ev.add_argument("--steps", nargs="+", type=_steps_value, default=None, metavar="N|NAME")
    ev.add_argument("--guidance", nargs="+", type=float, default=None, metavar="G")
    ev.add_argument("--noise-level", nargs="+", type=int, default=None, metavar="N")
    ev.add_argument("--scheduler", choices=SAMPLERS, default=None)
    _add_speed_options(ev, convert=True)
    ev.add_argument("--json", type=Path, default=None, help="write the report here too")
    ev.add_argument("--sheet", type=Path, default=None, metavar="PNG",
                    help="write a contact sheet of the pictures, captioned, the wrong ones framed in red")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    pln = commands.add_parser("plan", parents=common,
                              help="the device memory a model needs, per phase, before any weights are read")
    pln.add_argument("model", nargs="*", default=[DEFAULT_MODEL], metavar="MODEL",
                     help=f"stage directories, a directory with cascade.json, hub ids or a packaged name (default: "
                          f"{DEFAULT_MODEL})")
    pln.add_argument("--real-size", choices=("if", "if+x4"), default=None,
                     help="plan DeepFloyd's published cascade instead (T5-XXL, IF-I-XL, IF-II-L, and the x4 "
                          "upscaler with if+x4) from its configs: no weights needed")
    pln.add_argument("--dtype", choices=list(DTYPES), default="float16", help="the U-Nets' precision (default float16)")
    pln.add_argument("--offload", choices=OFFLOAD_MODES, default=None)
    pln.add_argument("--text-encoder-device", choices=("cpu",), default=None, help="cpu: T5 off the device")
    pln.add_argument("--images", type=int, default=1, help="images per U-Net call (a server: its --max-batch)")
    pln.add_argument("--fast", action="store_true",
                     help="the U-Nets on the fast path: its static buffers per row bucket and its CUDA-graph pool "
                          "counted in every phase (what engine.load checks on CUDA, where fast is the default)")
    pln.add_argument("--gpu-memory", default=None, metavar="SIZE",
                     help="say whether it fits, e.g. 16GB or 24GiB (exit status 1 if not)")
    bat = commands.add_parser("batch", parents=[*loads, _ray_options("run on a Ray cluster's workers (Ray Data)")],
                              help="generate every row of a .txt/.csv/.jsonl file into a directory, batched per "
                                   "step, resumable")
    bat.add_argument("input", type=Path, help=".txt (a prompt a line), .csv (a prompt column, plus request fields) "
                                              "or .jsonl (one request a line, the HTTP API's fields)")
    bat.add_argument("--out", type=Path, required=True, help="the directory: images/ and manifest.jsonl")
    bat.add_argument("--model", nargs="+", default=[DEFAULT_MODEL], metavar="PATH")
    bat.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                     help="images per U-Net call (rows with different settings share calls)")
    bat.add_argument("--preset", default=None, metavar="NAME", help="the model's preset for rows that name none")
    _add_cache_options(bat, " for rows that name none")
    bat.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    bat.add_argument("--sheet", type=Path, default=None, metavar="PNG", help="a captioned contact sheet of every image")
    bat.add_argument("--quiet", action="store_true", help="no progress bar")
    bat.add_argument("--workers", type=int, default=None,
                     help="with --ray: workers, each loading the model (default: as many as the cluster's GPUs, with "
                          "--num-gpus, or CPUs allow)")
    bat.add_argument("--cpus-per-worker", type=float, default=None,
                     help=f"with --ray: CPUs each worker holds, and its torch threads (default: {RayOptions.num_cpus:g})")

    exp = commands.add_parser("export", parents=common, help="export a cascade's components to ONNX (checked against "
                              "PyTorch) or TensorRT engines (built from the ONNX export)")
    exp.add_argument("model", nargs="+", metavar="MODEL",
                     help="stage directories in cascade order, a directory with cascade.json, or a packaged name; "
                          "for --format tensorrt also an ONNX export directory")
    exp.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx",
                     help="onnx (default), or tensorrt: one engine per component, from the ONNX export (made "
                          "through the export cache when MODEL is not one); builds on a machine without a GPU")
    exp.add_argument("--out", required=True, help="directory to write (new, empty, or an earlier export)")
    exp.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                     help="precision of the U-Net graphs (the text encoder stays float32); float16 is for GPUs")
    exp.add_argument("--targets", nargs="+", default=None, metavar="SM",
                     help="tensorrt: compute capabilities to build for, e.g. sm80 sm86 sm89 sm120, or current "
                          "(this machine's GPU); default: current where a GPU is, else sm80 sm86 sm89 sm120")
    exp.add_argument("--max-batch", type=int, default=None, metavar="N",
                     help=f"tensorrt: images per U-Net call the engines take at most (default {DEFAULT_MAX_BATCH}; "
                          "under guidance each image is two rows)")
    exp.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    _add_bench_parser(commands, common)
    return parser


def _variants(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _add_bench_parser(commands, common) -> None:
    b = BenchOptions()
    bench = commands.add_parser(
        "bench", parents=common, help="latency benchmark: text encoder, U-Net step per stage, stages, whole cascade; or a "
                      "real-size random model, side by side with diffusers eager and torch.compile")
    bench.add_argument("--model", nargs="+", default=list(b.models), metavar="NAME",
                       help=f"a packaged model name or model directories (one cascade, timed through our "
                            f"Pipeline), and/or real-size random models timed component by component: "
                            f"{', '.join(n for n in NAMES if n.endswith(':random'))} (NAME:tiny: the same "
                            f"architecture scaled down, for tests) (default: {' '.join(b.models)})")
    bench.add_argument("--device", default=b.device, help="cpu, cuda or cuda:N (default: cuda if available)")
    bench.add_argument("--dtype", choices=list(DTYPES), default=b.dtype,
                       help="float32 (CPU default) or float16 (CUDA default); T5 runs bfloat16 instead of float16")
    bench.add_argument("--batch", type=int, default=b.batch,
                       help=f"images per call; a guided U-Net step runs twice as many (default: {b.batch})")
    bench.add_argument("--steps", nargs="+", type=_steps_value, default=b.steps, metavar="N|NAME",
                       help="steps per stage for the stage and cascade rows, as in generate (default: smart27)")
    bench.add_argument("--iters", type=int, default=b.iters, help=f"timed calls per variant (default: {b.iters})")
    bench.add_argument("--whole-iters", type=int, default=b.whole_iters,
                       help="timed whole-cascade requests per variant, one warm-up (default: --iters)")
    bench.add_argument("--warmup", type=int, default=b.warmup,
                       help=f"untimed calls per variant after the first one, which is timed apart "
                            f"(compilation) (default: {b.warmup})")
    bench.add_argument("--compare", type=_variants, default=b.compare, metavar="V[,V...]",
                       help=f"variants, from {','.join(VARIANTS)} (default: {','.join(DEFAULT_COMPARE['cuda'])} "
                            f"on CUDA, {','.join(DEFAULT_COMPARE['cpu'])} on CPU, where compiling takes minutes)")
    bench.add_argument("--compile-mode", choices=COMPILE_MODES, default=b.compile_mode,
                       help=f"torch.compile's mode for the compile variant (default: {b.compile_mode}; max-autotune "
                            "tunes every GEMM and convolution, minutes per real-size U-Net)")
    bench.add_argument("--prompt", default=b.prompt, help="prompt of the cascade requests")
    bench.add_argument("--fast", action=argparse.BooleanOptionalAction, default=b.fast,
                       help="'ours' on the fast path (" + FAST_HELP + ")")
    _add_cache_options(bench, " in one more row, the whole cascade cached (ours; diffusers has none)")
    bench.add_argument("--threads", type=int, default=b.threads,
                       help="torch CPU threads (default: torch's choice, one per core); on a shared machine 1 "
                            "avoids threads waiting on a busy core")
    bench.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the report here")
    bench.add_argument("--plot", type=Path, default=None, metavar="FILE.svg",
                       help="also draw the report: each row's latency spread beside its floor (SVG)")
    bench.add_argument("--plot-from", type=Path, default=None, metavar="REPORT.json",
                       help="with --plot: draw a saved --json report instead of running (nothing is timed)")
    bench.add_argument("--baseline", type=Path, default=None, metavar="OLD.json",
                       help="an earlier --json report: print each row's p50 ratio to it, and exit 1 if any row is "
                            "slower than --threshold times its baseline (a regression check)")
    bench.add_argument("--threshold", type=float, default=DEFAULT_REGRESSION,
                       help=f"with --baseline: the p50 ratio above which a row is a regression (default {DEFAULT_REGRESSION})")
    bench.add_argument("--quiet", action="store_true", help="only the table")


def _add_speed_options(parser, convert: bool = False) -> None:
    """--guidance-interval and --preset (generate, eval, batch)."""
    parser.add_argument("--guidance-interval", nargs="+", default=None, metavar="LO:HI",
                        type=_interval_value if convert else None,
                        help="guidance only at timesteps LO <= t < HI (0..1000), one for all stages or one per "
                             "stage ('default': the stage's own); elsewhere a step costs half the U-Net rows")
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="one of the model's presets (e.g. fast, balanced; see the README), under the options "
                             "given here")
    _add_cache_options(parser, convert=convert)


def _add_cache_options(parser, what: str = "", convert: bool = True) -> None:
    """--cache and --cache-steps: feature caching across steps, one value for all stages or one per stage."""
    parser.add_argument("--cache", nargs="+", default=None, metavar="N", type=int if convert else None,
                        help=f"feature caching{what}: a full U-Net step every N steps, the others shallow (one for "
                             "all stages or one per stage; 1: none)")
    parser.add_argument("--cache-steps", nargs="+", default=None, metavar="S,S,...",
                        type=_refresh_value if convert else None,
                        help=f"feature caching{what}: full U-Net steps at these steps (from 0), the others shallow "
                             "(one list for all stages or one per stage; 'none': no caching there)")


def _speed_defaults(args) -> dict:
    """--preset and --cache/--cache-steps as the API's fields, for a service's or a job's requests that name none."""
    cache = _cache_option(args)
    cache = list(cache) if isinstance(cache, tuple) else cache  # as a JSON field
    return {name: value for name, value in (("preset", args.preset), ("cache", cache)) if value is not None}


def _cache_option(args):
    """The request's cache from --cache or --cache-steps (a value for every stage, or a tuple, one per stage)."""
    if args.cache is not None and args.cache_steps is not None:
        raise EngineError("give --cache N (a full step every N) or --cache-steps S,S,... (the full steps), not both")
    return _one_or_tuple(args.cache if args.cache_steps is None else args.cache_steps)


def _one_or_tuple(values):
    if values is None:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _take_back_prompt(args, parser) -> None:
    """Convert the per-stage options' words (PER_STAGE); where the prompt is missing and the last word of one
    of them is not a value of it, that word was the prompt: give it back (`--steps 20 20 "a cat"` works)."""
    for dest, convert in PER_STAGE.items():
        words = getattr(args, dest, None)
        if words is None:
            continue
        values = []
        for k, word in enumerate(words):
            try:
                values.append(convert(word))
            except ValueError as exc:
                if args.prompt is None and k == len(words) - 1 and values:
                    args.prompt = word
                    break
                parser.error(f"argument --{dest.replace('_', '-')}: invalid value {word!r}: {exc}")
        setattr(args, dest, values)
    if args.prompt is None:
        swallowed = ""
        if len(args.model) > 1 and not Path(args.model[-1]).exists():
            swallowed = (f" (--model took {args.model[-1]!r} as a model path: put the prompt first, or end "
                         "--model's values with --)")
        parser.error(f"the prompt is missing{swallowed}: python -m engine generate \"PROMPT\" [options]")


def _check_output(output: Path) -> None:
    """Refuse an -o that cannot be written now, before any model work (not after the whole generation)."""
    if output.suffix.lower() != ".png":
        raise EngineError(f"output must be a .png path, got {str(output)!r}")
    if output.is_dir():
        raise EngineError(f"output {str(output)!r} is a directory: give a file name ending in .png")
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineError(f"cannot create the output's directory {str(parent)!r}: {exc.strerror}") from exc
    try:  # a real write, not os.access: root passes permission checks on read-only file systems too
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise EngineError(f"cannot write into {str(parent)!r} ({exc.strerror}): choose another -o") from exc


def _picture(path: str | None, flag: str, mode: str):
    """The PIL image at `path` in `mode` ("RGB", or "L" for a mask), or None; EngineError naming the flag."""
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            return picture.convert(mode)
    except (OSError, UnidentifiedImageError) as exc:
        raise EngineError(f"cannot read {flag} {path!r}: {exc}") from exc


def generate(args) -> None:
    request = GenerateRequest(  # validates before anything is loaded; draws a seed if none is given
        args.prompt, image=_picture(args.image, "--image", "RGB"), mask_image=_picture(args.mask, "--mask", "L"),
        strength=_one_or_tuple(args.strength), negative_prompt=args.negative_prompt, seed=args.seed,
        num_images_per_prompt=args.num_images, steps=_one_or_tuple(args.steps), guidance=_one_or_tuple(args.guidance),
        noise_level=_one_or_tuple(args.noise_level), guidance_interval=_one_or_tuple(args.guidance_interval),
        scheduler=args.scheduler, preset=args.preset, cache=_cache_option(args))
    output = Path(args.output)
    _check_output(output)
    if args.quiet:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    pipe = load(*args.model, **load_options(args))
    if pipe.notice and not args.quiet:
        print(f"note: {pipe.notice}", file=sys.stderr)
    result = pipe.run(request, progress=not args.quiet)
    images = result.images
    paths = [output] if len(images) == 1 else [output.with_name(f"{output.stem}-{i}.png") for i in range(len(images))]
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()  # what draws the picture again, in the file itself
    info.add_text("prompt", args.prompt)
    info.add_text("seed", str(request.seed))
    for flag, value in (("image", args.image), ("mask", args.mask), ("strength", args.strength)):
        if value is not None:  # an edit is drawn again from its picture too
            info.add_text(flag, value if isinstance(value, str) else " ".join(map(str, value)))
    for image, path in zip(images, paths):
        image.save(path, pnginfo=info)
    if not args.quiet:
        times = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in result.timings.items())
        width, height = images[0].size
        print(f"{len(images)} image(s) {width}x{height} -> {', '.join(map(str, paths))} (seed {request.seed}; "
              f"--seed {request.seed} draws them again)")
        print(f"time: {times} (total {sum(result.timings.values()):.2f}s, {pipe.device}, {str(pipe.dtype)[6:]})")


def export(args) -> None:
    """`python -m engine export`: export/commands.py's, reached by name (export/ imports the engine; the
    engine never imports it at module level, so the two packages have no cycle)."""
    importlib.import_module("export.commands").run(args)


def bench(args, argv: list[str] | None) -> int:
    if args.plot_from is not None:
        if args.plot is None:
            raise EngineError("--plot-from draws a saved report: give --plot FILE.svg too")
        _write_plot(_read_report(args.plot_from), args.plot)
        return 0
    baseline = None
    if args.baseline is not None:
        baseline = _read_report(args.baseline)
    if args.threshold <= 1.0:
        raise EngineError(f"--threshold must be above 1.0 (a p50 ratio), got {args.threshold}")
    options = BenchOptions(models=tuple(args.model), device=args.device, dtype=args.dtype, batch=args.batch,
                           steps=_one_or_tuple(args.steps), iters=args.iters, warmup=args.warmup,
                           whole_iters=args.whole_iters,
                           compare=args.compare, prompt=args.prompt, threads=args.threads, fast=args.fast,
                           cache=_cache_option(args), compile_mode=args.compile_mode)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    # --json is rewritten after each component: a run stopped by a time box keeps what it timed
    on_report = None if args.json is None else (lambda partial: save_json(partial, args.json))
    report = run(options, command_line(argv), progress=progress, on_report=on_report)
    print(table(report))
    save_json(report, args.json)
    if args.plot is not None:
        _write_plot(report, args.plot)
    if args.json is not None and not args.quiet:
        print(f"report written to {args.json}", file=sys.stderr)
    if baseline is None:
        return 0
    comparison, regressions = compare_to_baseline(report, baseline, args.threshold)
    print("\n" + comparison)
    for line in regressions:
        print(f"regression: {line}", file=sys.stderr)
    return 1 if regressions else 0


def _read_report(path: Path) -> dict:
    """A saved `python -m engine bench --json` report; EngineError naming the file otherwise."""
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EngineError(f"cannot read the report {path}: {exc}") from exc
    if not isinstance(report, dict) or "rows" not in report:
        raise EngineError(f"{path} is not a `python -m engine bench --json` report")
    return report


def _write_plot(report: dict, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(plot_svg(report))
    except OSError as exc:
        raise EngineError(f"cannot write the plot {path}: {exc.strerror}") from exc
    print(f"plot written to {path}", file=sys.stderr)


def serve(args) -> None:
    try:
        import uvicorn  # noqa: F401  (optional: the [serve] extra)
    except ImportError as exc:
        raise EngineError(f"serving needs {exc.name}: pip install 'cascade-engine[serve]'") from exc
    # The web stack is the [serve] extra's: imported only by the command that serves.
    from engine.serve import http, ray_app

    keys = _api_keys(args)
    if not keys and beyond_loopback(args.host):
        print(f"warning: listening on {args.host}, beyond loopback, with no API key: anyone who can reach it can "
              "use the model (--api-key)", file=sys.stderr)
    limits = serve_defaults.Limits.from_environment()
    given = {"max_body_bytes": args.max_body_bytes, "max_upload_bytes": args.max_upload_bytes,
             "max_prompt_chars": args.max_prompt_chars,
             "max_steps": args.max_steps, "max_images": args.max_images,
             "max_pixels_per_request": args.max_pixels_per_request}
    for name, value in given.items():
        if value is not None and value < 1:
            raise EngineError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    limits = dataclasses.replace(limits, **{k: v for k, v in given.items() if v is not None})
    for flag, seconds in (("--header-timeout", args.header_timeout), ("--keep-alive-timeout", args.keep_alive_timeout),
                          ("--drain-timeout", args.drain_timeout)):
        if not seconds > 0:
            raise EngineError(f"{flag} must be a positive number of seconds, got {seconds:g}")
    app_kwargs = {"max_batch": args.max_batch, "max_queue": args.max_queue, "timeout_s": args.timeout,
                  "policy": args.batching, "limits": limits, "api_keys": keys, "metrics_open": args.metrics_open,
                  "model_name": args.served_model_name, "show_model_path": args.show_model_path,
                  "request_defaults": _speed_defaults(args)}
    load_kwargs = {**load_options(args), "images_per_call": args.max_batch}  # the memory plan's batch
    if args.ray:
        app = ray_app.application(load_kwargs, args.model, app_kwargs, replicas=args.replicas,
                                  autoscale=_autoscale(args), num_gpus=args.num_gpus)
        ray_app.run(app, args.host, args.port, address=args.ray_address)
        return
    app = http.create_app(lambda: load(*args.model, **load_kwargs), **app_kwargs)  # warmed up before it is ready
    http.run(app, args.host, args.port, log_level=args.log_level or "info",
                       drain_timeout_s=args.drain_timeout, max_connections=args.max_connections,
                       keep_alive_s=args.keep_alive_timeout, header_timeout_s=args.header_timeout)


def _api_keys(args) -> list[str]:
    """The service's API keys: --api-key, --api-key-file, $CASCADE_ENGINE_API_KEYS (none given: no auth). A key
    source that is given but empty (`--api-key "$KEY"` with KEY unset) is refused: it would mean no auth, or a key
    that an empty bearer token matches."""
    keys = []
    for key in args.api_key or []:
        if not key.strip():
            raise EngineError("--api-key is empty: was $KEY set? (an empty key would let anyone in)")
        keys.append(key.strip())
    if "CASCADE_ENGINE_API_KEYS" in os.environ:
        given = [k.strip() for k in os.environ["CASCADE_ENGINE_API_KEYS"].split(",") if k.strip()]
        if not given:
            raise EngineError("$CASCADE_ENGINE_API_KEYS is set but holds no key: was it meant to be? Unset it "
                              "for no auth, or give comma-separated keys")
        keys += given
    if args.api_key_file is not None:
        try:
            given = [line.strip() for line in args.api_key_file.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise EngineError(f"cannot read --api-key-file {str(args.api_key_file)!r}: {exc.strerror}") from exc
        if not given:
            raise EngineError(f"--api-key-file {str(args.api_key_file)!r} holds no key (one per line)")
        keys += given
    if args.metrics_open and not keys:
        raise EngineError("--metrics-open only means something with an API key (without one, every route is open)")
    return keys


def beyond_loopback(host: str) -> bool:
    """Whether listening on `host` reaches beyond this machine: anything but a loopback address or localhost
    (0.0.0.0, ::, a LAN address, a name that may resolve anywhere)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return True


def run_batch(args) -> None:
    if args.max_batch < 1:
        raise EngineError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.sheet is not None:
        _check_output(args.sheet)
    ray = None
    if args.ray:
        ray = RayOptions(workers=args.workers, autoscale=_autoscale(args), num_gpus=args.num_gpus,
                         num_cpus=RayOptions.num_cpus if args.cpus_per_worker is None else args.cpus_per_worker,
                         address=args.ray_address)
    elif (args.workers, args.autoscale, args.ray_address, args.cpus_per_worker) != (None,) * 4 or args.num_gpus:
        raise EngineError("--workers, --autoscale, --num-gpus, --cpus-per-worker and --ray-address are for a job on "
                          "Ray: add --ray")
    summary = offline.batch(args.input, args.out, model=args.model, max_batch=args.max_batch, strict=args.strict,
                            progress=not args.quiet, sheet=args.sheet, defaults=_speed_defaults(args) or None, ray=ray,
                            **load_options(args))
    for bad in summary.bad_rows:
        print(f"line {bad.line} skipped: {bad.reason}", file=sys.stderr)
    for failed in summary.failed_rows:
        print(f"line {failed.line} failed: {failed.reason}", file=sys.stderr)
    print(summary)
    if args.sheet is not None and not summary.stopped:
        print(f"contact sheet written to {args.sheet}", file=sys.stderr)
    if summary.stopped:
        raise KeyboardInterrupt


def plan(args) -> int:
    """`python -m engine plan`: the memory plan's table (engine/plan.py); 1 where it does not fit --gpu-memory."""
    if args.images < 1:
        raise EngineError(f"--images must be >= 1, got {args.images}")
    memory = None if args.gpu_memory is None else parse_memory(args.gpu_memory)
    dtype = DTYPES[args.dtype]
    if args.real_size is not None:
        parts = real_size_parts(dtype, x4=args.real_size == "if+x4")
    else:
        parts = parts_of(read_stages(stage_dirs(args.model)), dtype)
    result = memory_plan(parts, args.offload, args.images, text_on_device=args.text_encoder_device is None,
                         fast=args.fast)
    print(result.table(memory))
    return 0 if memory is None or result.fits(memory) else 1


def evaluate(args) -> None:

    options = quality_gate.EvalOptions(count=args.count, batch=args.batch, seed=args.seed)
    given = (("steps", _one_or_tuple(args.steps)), ("guidance", _one_or_tuple(args.guidance)),
             ("noise_level", _one_or_tuple(args.noise_level)), ("scheduler", args.scheduler),
             ("guidance_interval", _one_or_tuple(args.guidance_interval)), ("preset", args.preset),
             ("cache", _cache_option(args)))
    generate_options = {k: v for k, v in given if v is not None}
    GenerateRequest("check", **generate_options)  # bad values are refused before the model loads
    if args.sheet is not None:
        _check_output(args.sheet)
    pipe = load(*args.model, **load_options(args))
    report = quality_gate.evaluate(pipe, options, progress=not args.quiet, sheet=args.sheet, **generate_options)
    print(quality_gate.format_report(report))
    if args.sheet is not None:
        print(f"contact sheet written to {args.sheet}", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args)
    if args.command == "generate":
        _take_back_prompt(args, parser)
    try:
        if args.command == "generate":
            generate(args)
        elif args.command == "export":
            export(args)
        elif args.command == "serve":
            serve(args)
        elif args.command == "eval":
            evaluate(args)
        elif args.command == "batch":
            run_batch(args)
        elif args.command == "plan":
            return plan(args)
        elif args.command == "bench":
            return bench(args, argv)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
