"""ctypes binding to libcascade_kernels.so: the attention kernel compiled ahead of time (see CMakeLists.txt).

    from cascade_kernels import native
    native.available() -> bool                     # the library loaded; native.load_error() says why not
    native.attention(q, k, v, scale, key_padding_mask, out=None) -> out, or None where no variant covers it

With it, a CUDA call of cascade_kernels.attention launches an embedded cubin on the current stream instead of
JIT-compiling and autotuning Triton at first use. It covers float16 and bfloat16, the head dims it was built
for (native.variants()), with or without key_padding_mask, on GPUs of compute capability 8.x (sm_80 cubins)
and 9.0 (sm_90a), for contiguous head dims with 16-aligned strides; anything else returns None and the JIT path
runs. Found at $CASCADE_KERNELS_LIB, else build/libcascade_kernels.so beside this checkout (the README's cmake
build). CASCADE_KERNELS_NATIVE=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

ABI_VERSION = 1  # CASCADE_KERNELS_ABI_VERSION in native/include/cascade_kernels.h
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "build" / "libcascade_kernels.so"
OK, INVALID_ARGUMENT, NOT_COVERED, NO_DRIVER, CUDA_ERROR = range(5)  # cascade_status
DTYPES = {torch.float16: 0, torch.bfloat16: 1}  # cascade_dtype


class NativeError(RuntimeError):
    """The library is missing, refused a launch it covers, or the driver failed; the message is the library's."""


@dataclass(frozen=True)
class Variant:
    name: str
    arch_name: str  # "sm_80", "sm_90a": read from the cubin when the library was built
    arch: int
    dtype: torch.dtype
    head_dim: int
    has_mask: bool
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    shared_bytes: int
    cubin_size: int


class _Variant(ctypes.Structure):  # cascade_variant, field for field
    _fields_ = [("name", ctypes.c_char_p), ("arch_name", ctypes.c_char_p)] + [
        (f, ctypes.c_int32) for f in ("arch", "dtype", "head_dim", "has_mask", "block_m", "block_n", "num_warps",
                                      "num_stages", "shared_bytes")] + [("cubin_size", ctypes.c_uint64)]


_I64P = ctypes.POINTER(ctypes.c_int64)
_SIGNATURES = {  # name -> (restype, argtypes), as in cascade_kernels.h
    "cascade_abi_version": (ctypes.c_int, []),
    "cascade_triton_version": (ctypes.c_char_p, []),
    "cascade_kernel_key": (ctypes.c_char_p, []),
    "cascade_architectures": (ctypes.c_char_p, []),
    "cascade_variant_count": (ctypes.c_int, []),
    "cascade_variant_get": (ctypes.c_int, [ctypes.c_int, ctypes.POINTER(_Variant)]),
    "cascade_covers": (ctypes.c_int, [ctypes.c_int] * 5),
    "cascade_driver_status": (ctypes.c_int, []),
    "cascade_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "cascade_last_error": (ctypes.c_char_p, []),
    "cascade_attention": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 5 + [ctypes.c_float]
                          + [ctypes.c_void_p, _I64P] * 5),  # q, k, v, out, mask: pointer and strides each
}


class Library:
    """One loaded libcascade_kernels; raises OSError if the file does not load or speaks another ABI."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lib = ctypes.CDLL(str(self.path))
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self._lib, name, None)
            if fn is None:
                raise OSError(f"{self.path} has no {name}: not a cascade_kernels library, or a stale one")
            fn.restype, fn.argtypes = restype, argtypes
        if self._lib.cascade_abi_version() != ABI_VERSION:
            raise OSError(f"{self.path} has ABI version {self._lib.cascade_abi_version()}, this binding speaks "
                          f"{ABI_VERSION}: rebuild it (cmake --build build)")

    def architectures(self) -> list[str]:
        return self._lib.cascade_architectures().decode().split()

    def triton_version(self) -> str:
        return self._lib.cascade_triton_version().decode()

    def kernel_key(self) -> str:
        """Triton's cache key of the kernel source the library was compiled from."""
        return self._lib.cascade_kernel_key().decode()

    def variants(self) -> list[Variant]:
        found, by_code = [], {code: t for t, code in DTYPES.items()}
        for i in range(self._lib.cascade_variant_count()):
            v = _Variant()
            self._check(self._lib.cascade_variant_get(i, ctypes.byref(v)), "cascade_variant_get")
            found.append(Variant(v.name.decode(), v.arch_name.decode(), v.arch, by_code[v.dtype], v.head_dim,
                                 bool(v.has_mask), v.block_m, v.block_n, v.num_warps, v.num_stages, v.shared_bytes,
                                 v.cubin_size))
        return found

    def covers(self, dtype: torch.dtype, head_dim: int, has_mask: bool, capability: tuple[int, int]) -> bool:
        """Whether a variant runs (dtype, head_dim, mask) on a GPU of this compute capability; needs no GPU."""
        return dtype in DTYPES and bool(self._lib.cascade_covers(capability[0], capability[1], DTYPES[dtype],
                                                                 head_dim, int(has_mask)))

    def driver_status(self) -> tuple[int, str]:
        """(OK, "") where the driver loads and initialises, else (NO_DRIVER, why)."""
        status = self._lib.cascade_driver_status()
        return status, self._lib.cascade_last_error().decode() if status else ""

    def launch(self, stream: int, dtype: torch.dtype, shape: tuple[int, int, int, int, int], scale: float,
               q: tuple[int, tuple], k: tuple[int, tuple], v: tuple[int, tuple], out: tuple[int, tuple],
               mask: tuple[int, tuple] | None) -> int:
        """cascade_attention on raw (address, strides) pairs; shape = (B, H, Lq, Lk, D). Returns the status:
        OK or NOT_COVERED; any other raises NativeError with the library's message."""
        args = []
        for address, strides in (q, k, v, out, mask or (None, None)):
            args += [address, None if strides is None else (ctypes.c_int64 * len(strides))(*strides)]
        status = self._lib.cascade_attention(stream or None, DTYPES[dtype], *shape, scale, *args)
        if status not in (OK, NOT_COVERED):
            self._check(status, "cascade_attention")
        return status

    def attention(self, q, k, v, scale: float, key_padding_mask=None, out=None):
        """Launch on q's device's current stream; return out, or None where no variant covers the call.

        q (B, H, Lq, D); k, v (B, H, Lk, D); key_padding_mask (B, Lk) bool or None; out like q (allocated if
        None). Shapes are the caller's to check (cascade_kernels.attention does)."""
        if q.dtype not in DTYPES or not q.is_cuda:
            return None
        b, h, lq, d = q.shape
        out = torch.empty_like(q) if out is None else out
        mask = None if key_padding_mask is None else key_padding_mask.view(torch.uint8)
        with torch.cuda.device(q.device):  # the runtime makes q's device's context current on this thread
            status = self.launch(
                torch.cuda.current_stream(q.device).cuda_stream, q.dtype, (b, h, lq, k.shape[2], d), scale,
                *((t.data_ptr(), t.stride()) for t in (q, k, v, out)),
                None if mask is None else (mask.data_ptr(), mask.stride()))
        return out if status == OK else None

    def _check(self, status: int, call: str) -> None:
        if status != OK:
            raise NativeError(f"{call}: {self._lib.cascade_status_string(status).decode()}: "
                              f"{self._lib.cascade_last_error().decode()}")


# ---- the process's library: $CASCADE_KERNELS_LIB or build/libcascade_kernels.so, loaded once on first use ----

_lock = threading.Lock()
_loaded: tuple[Library | None, str | None] | None = None  # (library, why not)


def library_path() -> Path:
    return Path(os.environ.get("CASCADE_KERNELS_LIB") or DEFAULT_PATH)


def enabled() -> bool:
    """False when CASCADE_KERNELS_NATIVE=0 forces the JIT path."""
    return os.environ.get("CASCADE_KERNELS_NATIVE", "1") != "0"


def library() -> Library | None:
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                _loaded = (Library(library_path()), None)
            except OSError as e:
                _loaded = (None, str(e))
    return _loaded[0]


def available() -> bool:
    """The library loaded (whether or not this machine has a GPU to launch on)."""
    return library() is not None


def load_error() -> str | None:
    """Why available() is False; None when it is True."""
    library()
    return _loaded[1]


def attention(q, k, v, scale: float, key_padding_mask=None, out=None):
    """Library.attention on the process's library; raises NativeError if it is not available."""
    lib = library()
    if lib is None:
        raise NativeError(f"libcascade_kernels is not available: {load_error()}")
    return lib.attention(q, k, v, scale, key_padding_mask, out)
