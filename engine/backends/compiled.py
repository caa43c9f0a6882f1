"""Compiled U-Net calls for the fast path, cached across processes beside the export cache.

One compiled graph per static shape (rows, channels, height, width) and per call: the U-Net call kind (plain,
or feature caching's full or shallow call at a depth; fast_unet.py) and whether it takes the request's text
constants (text_constants.py). How, by device, chosen by measurement (bench/RESULTS.md, "The
fast path on CPU"):
- CPU: an AOTInductor package (torch.export, then inductor ahead of time) with freezing: the weights are
  folded in as constants and the convolution and linear weights prepacked for oneDNN, 1.7-2.1x the eager
  U-Net where torch.compile without freezing gave 1.3x. A package is a file, so a second process loads it in
  about a second instead of compiling for a minute. It holds the weights, so its key holds their hash.
- CUDA: torch.compile (inductor, default mode, no freezing: the weights stay inputs and are not copied),
  with inductor's own graph cache kept under the same directory; the fast path captures the compiled call in
  a CUDA graph itself. Not yet measured on a GPU.

Location: cache_dir.cache_dir("compiled"), owner-only, refused if it is a symlink, another user's or writable
by others (engine/cache_dir.py says why): a package is native code this process runs. A package's name is the
SHA-256 of its key: the U-Net's source hash (every file of its directory), the call kind, the call's shapes and
dtypes, the device kind, the compile options and the torch and engine versions. Beside it, NAME.json holds that
key, the package's own SHA-256 and the cache's seal over both (an HMAC only this account can compute). A package
is loaded only when both files are ours and written by no one else, the key and the hash match and the seal is
valid (else it is reported, set aside and rebuilt); one that fails to load is rebuilt too. Written to temporary
names and renamed, so never half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
import uuid
from pathlib import Path
from typing import Callable

import torch

from engine.cache_dir import cache_dir, owner_only, seal, sealed, set_aside, untrusted
from engine.errors import EngineError
from engine.version import __version__

log = logging.getLogger(__name__)

# Inductor options per device; CPU's freezing is what makes compiling pay there (module docstring).
COMPILE_OPTIONS = {"cpu": {"freezing": True}, "cuda": {}}
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
GRAPH_CODE = ("fast_unet.py", "text_constants.py", "attention.py", "torch_backend.py")  # beside this file, under engine/backends/


def compiled_dir() -> Path:
    """The packages' directory, made if need be, owner-only (module docstring)."""
    return cache_dir("compiled")


def _graph_code_hash() -> str:
    """The SHA-256 of our modules that shape the compiled graph (the call, the text constants, the attention
    processors): an edit to them makes new packages even under the same engine version."""
    digest = hashlib.sha256()
    for name in GRAPH_CODE:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def describe(value):
    """What a compiled graph is specialised to of one argument: a tensor's shape, dtype and strides (a
    graph compiled for a contiguous (rows,) timestep must never read an expanded one), a dict's items."""
    if isinstance(value, torch.Tensor):
        return [list(value.shape), str(value.dtype), list(value.stride())]
    if isinstance(value, dict):
        return {name: describe(v) for name, v in sorted(value.items())}
    return repr(value)


def signature(args: tuple) -> str:
    """The arguments' description as one hashable key: calls with the same one share a compiled graph."""
    return json.dumps([describe(a) for a in args], sort_keys=True)


def package_key(source: str, example_args: tuple, device: torch.device, call: str = "unet:0") -> dict:
    """The cache key of one compiled call: what it computes (source hash, call kind), on what, with what."""
    return {"source": source, "call": call, "args": [describe(a) for a in example_args], "device": device.type,
            "options": COMPILE_OPTIONS[device.type], "torch": torch.__version__, "engine": __version__,
            "code": _graph_code_hash()}


def package_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def distrust(package: Path, key: dict) -> str | None:
    """Why the package must not be loaded, or None: it and its key file (NAME.json) must be regular files of ours
    that no one else can write, the key file must hold `key` and the package's own SHA-256, sealed by this cache."""
    record = package.with_suffix(".json")
    for path, what in ((package, "it"), (record, "its key file")):
        try:
            status = path.lstat()
        except FileNotFoundError:
            return "it has no key file" if path == record else "it is not there"
        why = untrusted(status) or (None if stat.S_ISREG(status.st_mode) else "it is not a regular file")
        if why is not None:
            return f"{what}: {why}"
    try:
        kept = json.loads(record.read_text())
    except (OSError, ValueError) as exc:
        return f"its key file cannot be read ({exc})"
    if not isinstance(kept, dict) or kept.get("key") != key:
        return "its key file holds another key"
    if kept.get("sha256") != _sha256(package):
        return "its bytes do not match the hash in its key file"
    if not sealed(_sealed_part(key, kept["sha256"]), kept.get("seal")):
        return "its key file was not sealed by this cache (written by someone else, or by another cache's secret)"
    return None


def keep_record(package: Path, record: Path, key: dict) -> None:
    """Write the key file of `package` (at `record`): its key, its SHA-256 and the cache's seal over both."""
    owner_only(package)
    digest = _sha256(package)
    record.write_text(json.dumps({"key": key, "sha256": digest, "seal": seal(_sealed_part(key, digest))},
                                 sort_keys=True))
    owner_only(record)


def _sealed_part(key: dict, digest: str) -> bytes:
    return json.dumps({"key": key, "sha256": digest}, sort_keys=True).encode()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CompiledCall:
    """`module(*args)` for args shaped like `example_args`, compiled as the module docstring says.

    `seconds` is what making it cost (compiling, or loading a cached package); `cached` whether a package
    was loaded from the cache."""

    def __init__(self, module: torch.nn.Module, example_args: tuple, device: torch.device, source: Callable[[], str],
                 call: str = "unet:0"):
        """source: gives the hash of the U-Net's files (asked only where a package is keyed by it, on CPU);
        call: which call of the U-Net it is (fast_unet._Call's kind:depth), part of the key."""
        start = time.perf_counter()
        self.cached = False
        if device.type == "cpu":
            self._call = self._package(module, example_args, device, package_key(source(), example_args, device, call))
        else:
            os.environ.setdefault(INDUCTOR_CACHE_ENV, str(compiled_dir() / "inductor"))
            # One graph per shape and call kind, every stage's through the same forward: more than dynamo's 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._call = torch.compile(module, dynamic=False, options=dict(COMPILE_OPTIONS[device.type]))
            with torch.inference_mode():
                self._call(*example_args)  # compiles now, not at the first step
        self.seconds = time.perf_counter() - start

    def __call__(self, *args):
        return self._call(*args)

    def _package(self, module, example_args: tuple, device: torch.device, key: dict):
        path = compiled_dir() / f"{package_name(key)}.pt2"
        if os.path.lexists(path):
            why = distrust(path, key)
            if why is None:
                try:
                    loaded = torch._inductor.aoti_load_package(str(path))
                    self.cached = True
                    return loaded
                except Exception as exc:  # a truncated or foreign file: say so, then build it again
                    why = f"it cannot be loaded ({type(exc).__name__}: {exc})"
            log.warning("compiled U-Net %s is not loaded: %s; compiling it again", path, why)
            for stale in (path, path.with_suffix(".json")):
                if os.path.lexists(stale):
                    set_aside(stale)  # never followed, never run
        log.info("compiling a U-Net call for %s into %s (once per shape; about a minute on a small CPU)",
                 [tuple(a.shape) for a in example_args if isinstance(a, torch.Tensor)], path)
        with torch.no_grad():
            program = torch.export.export(module, example_args, strict=False)
        partial = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.pt2")
        record = partial.with_suffix(".json")
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial),
                                                     inductor_configs=dict(COMPILE_OPTIONS[device.type]))  # a copy: it adds to the dict
            keep_record(partial, record, key)
            os.replace(record, path.with_suffix(".json"))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
            record.unlink(missing_ok=True)
        return torch._inductor.aoti_load_package(str(path))
