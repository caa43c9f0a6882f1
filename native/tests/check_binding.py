"""ctest: cascade_kernels/native.py loads the library this build made ($CASCADE_KERNELS_LIB) and reads it."""

import os
import sys
from pathlib import Path

import torch

from cascade_kernels import native

path = os.environ["CASCADE_KERNELS_LIB"]
if not native.available():
    sys.exit(f"not available: {native.load_error()}")
lib = native.library()
assert lib.path == Path(path), (lib.path, path)
archs = lib.architectures()
assert any(a.startswith("sm_80") for a in archs) and any(a.startswith("sm_90") for a in archs), archs
kinds = {(v.dtype, v.head_dim, v.has_mask) for v in lib.variants()}
assert {(torch.float16, 64, False), (torch.float16, 64, True), (torch.bfloat16, 64, False)} <= kinds, kinds
assert lib.covers(torch.float16, 64, False, (9, 0)) and not lib.covers(torch.float32, 64, False, (9, 0))
status, why = lib.driver_status()
print(f"{path}: {archs}, {len(lib.variants())} variants, Triton {lib.triton_version()}; driver: "
      f"{'ok' if status == native.OK else why}")
