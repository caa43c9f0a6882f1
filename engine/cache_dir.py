"""Where the engine keeps what it builds once and reuses: ONNX exports, TensorRT engines, compiled U-Nets.

$CASCADE_ENGINE_CACHE, else $XDG_CACHE_HOME/cascade-engine, else ~/.cache/cascade-engine; one subdirectory
per kind (onnx/, tensorrt/, compiled/).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "CASCADE_ENGINE_CACHE"


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cascade-engine"
