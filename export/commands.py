"""`python -m engine export`: the CLI's export command, here beside the exporters (engine/cli.py parses the
flags and calls `run` by name, so the engine does not import export/ at module level)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import InvalidRequestError
from engine.exported.manifest import export_kind
from engine.options import DEFAULT_MAX_BATCH
from export.cache import cached_export, timing_cache_file
from export.onnx import export_onnx
from export.tensorrt import build_engines
from export.tensorrt import describe as describe_engines


def run(args) -> None:
    if args.format == "tensorrt":
        return export_engines(args)
    if args.targets is not None or args.max_batch is not None:
        raise InvalidRequestError("--targets and --max-batch apply to --format tensorrt only")
    out = export_onnx(*args.model, out=args.out, dtype=args.dtype, progress=not args.quiet)
    if not args.quiet:
        manifest = json.loads((out / "manifest.json").read_text())
        for name, component in manifest["components"].items():
            check = component["check"]
            print(f"{name}: {component['file']} ({component['precision']}), ONNX Runtime vs PyTorch max abs "
                  f"{check['max_abs_error']:.2e}, max rel {check['max_rel_error']:.2e}")
        print(f"exported to {out}; run it with: python -m engine generate \"PROMPT\" --model {out}")


def export_engines(args) -> None:
    max_images = DEFAULT_MAX_BATCH if args.max_batch is None else args.max_batch
    if max_images < 1:
        raise InvalidRequestError(f"--max-batch must be at least 1, got {max_images}")
    if len(args.model) == 1 and export_kind(Path(args.model[0]).expanduser()) == "onnx":
        onnx_dir = Path(args.model[0]).expanduser()  # an ONNX export: its own precision
    else:
        onnx_dir = cached_export(*args.model, dtype=args.dtype, progress=not args.quiet)
    out = build_engines(onnx_dir, args.out, targets=args.targets, max_images=max_images, progress=not args.quiet,
                        timing_cache=timing_cache_file())
    if not args.quiet:
        print(describe_engines(out))
        print(f"built into {out}; run it on a GPU with: python -m engine generate \"PROMPT\" --model {out}")
