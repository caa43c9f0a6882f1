"""Fused attention forward (FlashAttention-style) in Triton for the cascade's U-Nets.

    cascade_kernels.attention(q, k, v, *, scale=None, key_padding_mask=None) -> o
    q (B, H, Lq, D); k, v (B, H, Lk, D); key_padding_mask (B, Lk) bool, True = attend; o (B, H, Lq, D) in q's dtype

One program computes a BLOCK_M x D tile of the output, streaming K and V in BLOCK_N blocks with an online
softmax kept in float32: the Lq x Lk score matrix is never materialised. Any Lq, Lk >= 1; head dims up to 512
(padded internally to a power of two); float16, bfloat16, float32. Above 256 (the x4 upscaler's VAE has one
512-wide head over 65,536 tokens at 1024 px) a tile's output columns are split over programs of 256 each, and
each computes the full-width scores in 128-wide chunks of D: 1.5x the minimal FLOPs, but the tile fits. A query row whose keys are all masked
gives zeros (SDPA gives NaN there). IF's joint attention (queries = image tokens, keys = 77 text tokens + image
tokens, head dim 64) is the case it is tuned for.

On CUDA the custom op first tries libcascade_kernels (native.py: this kernel compiled ahead of time for sm_80
and sm_90 by CMakeLists.txt), which skips the JIT compile and autotune at first use; calls it does not cover,
and every call when it is not built or CASCADE_KERNELS_NATIVE=0, take the JIT path below.

Tested with Triton 3.6 (GPU, and CPU under TRITON_INTERPRET=1). Layout follows Triton's fused-attention
tutorial: reference -> autotune configs -> kernel -> launcher -> torch.library custom op.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from cascade_kernels import native

try:
    import triton
    import triton.language as tl
except ImportError:  # the engine falls back to SDPA; calling the kernel says what to install
    triton = None

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 512
SPLIT_HEAD_DIM = 256  # wider heads split their output columns over programs (see above)
SCORE_CHUNK = 128  # ... and compute their scores in chunks of this many head dims


def reference_attention(q, k, v, scale=None, key_padding_mask=None):
    """The same function in plain PyTorch (computed in q's dtype unless given float64): the tests' oracle."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores.float() if q.dtype != torch.float64 else scores, dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0).to(v.dtype)  # fully masked rows -> zeros
    return weights @ v


def _configs():
    if INTERPRETING:  # the interpreter is slow: one small config, no autotuning sweep
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                               (64, 32, 4, 4), (32, 32, 4, 2)]]


if triton is not None:

    @triton.autotune(configs=_configs(), key=["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "HAS_MASK"])
    @triton.jit
    def _attention_kernel(
        Q, K, V, O, MASK, scale,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_mb, stride_mn,
        H, LQ, LK, LQ_BUCKET, LK_BUCKET,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, QK_CHUNKS: tl.constexpr,
        HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows of this tile
        offs_n = tl.arange(0, BLOCK_N)
        offs_dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)  # (BLOCK_DV,) this program's output columns
        row_ok = offs_m < LQ
        dv_ok = offs_dv < HEAD_DIM
        q_base = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        if QK_CHUNKS == 1:  # the whole (padded) head in one tile: q stays in registers for every key block
            offs_d = tl.arange(0, BLOCK_D)
            d_ok = offs_d < HEAD_DIM
            q = tl.load(q_base + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)  # (BLOCK_M, BLOCK_D)
        qk_scale = scale * 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running row max (base-2 units)
        l_i = tl.zeros((BLOCK_M,), tl.float32)  # running row sum of exp2
        acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
        for start_n in range(0, LK, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < LK
            if QK_CHUNKS == 1:
                k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                            mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
                if DOT_FP32:
                    k = k.to(tl.float32)
                s = tl.dot(q, k, input_precision=DOT_PRECISION).to(tl.float32)  # (BLOCK_M, BLOCK_N)
            else:  # a wide head: sum the scores over chunks of D, reloading q's chunks (L1/L2-resident)
                s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                for c in tl.static_range(QK_CHUNKS):
                    offs_c = c * (BLOCK_D // QK_CHUNKS) + tl.arange(0, BLOCK_D // QK_CHUNKS)
                    c_ok = offs_c < HEAD_DIM
                    qc = tl.load(q_base + offs_c[None, :] * stride_qd, mask=row_ok[:, None] & c_ok[None, :],
                                 other=0.0)
                    kc = tl.load(k_base + cols[None, :] * stride_kn + offs_c[:, None] * stride_kd,
                                 mask=col_ok[None, :] & c_ok[:, None], other=0.0)
                    if DOT_FP32:
                        qc, kc = qc.to(tl.float32), kc.to(tl.float32)
                    s += tl.dot(qc, kc, input_precision=DOT_PRECISION).to(tl.float32)
            s = s * qk_scale
            keep = col_ok
            if HAS_MASK:
                attend = tl.load(MASK + b * stride_mb + cols * stride_mn, mask=col_ok, other=0)
                keep = keep & (attend != 0)
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing to attend to yet
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=col_ok[:, None] & dv_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_DV)
            if DOT_FP32:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(tl.float32)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # fully masked rows -> 0
        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()  # next power of two: autotune keys by size class, not exact length


def _check(q, k, v, key_padding_mask):
    if triton is None:
        raise RuntimeError("cascade_kernels.attention needs Triton: pip install triton (or use attention='sdpa')")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, L, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    (b, h, lq, d), (bk, hk, lk, dk) = q.shape, k.shape
    if (bk, hk, dk) != (b, h, d) or v.shape != k.shape:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "k and v must be (B, H, Lk, D) with q's B, H and D")
    if lq < 1 or lk < 1:
        raise ValueError(f"need Lq >= 1 and Lk >= 1, got Lq={lq}, Lk={lk}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is larger than the supported {MAX_HEAD_DIM}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, lk):
            raise ValueError(f"key_padding_mask must be bool (B, Lk) = ({b}, {lk}), got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def _launch(q, k, v, scale, key_padding_mask, out=None):
    b, h, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty_like(q) if out is None else out  # tests pass a NaN-poisoned buffer
    mask = key_padding_mask if key_padding_mask is not None else q.new_empty((1, 1), dtype=torch.bool)
    mask = mask.view(torch.uint8)

    block_d = max(16, _bucket(d))
    block_dv = min(block_d, SPLIT_HEAD_DIM)  # output columns per program
    qk_chunks = 1 if block_d <= SPLIT_HEAD_DIM else block_d // SCORE_CHUNK

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), b * h, block_d // block_dv)

    _attention_kernel[grid](
        q, k, v, out, mask, scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask.stride(),
        h, lq, lk, _bucket(lq), _bucket(lk),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_DV=block_dv, QK_CHUNKS=qk_chunks, HAS_MASK=key_padding_mask is not None,
        # Triton 3.6's interpreter computes tl.dot on bfloat16 operands wrongly (off by ~1e10 in a plain
        # 16x16 product); on CPU only, bfloat16 tiles are multiplied in float32. GPUs use bf16 MMA.
        DOT_FP32=INTERPRETING and q.dtype == torch.bfloat16,
        # float32 inputs get float32 products: Triton's default for a float32 dot is TF32 (10-bit mantissa),
        # which put the kernel 2e-3 from an fp64 reference on an H100, where SDPA stays at 1e-6.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out


_native_ok: bool | None = None  # decided once per process: the library loaded and holds this kernel


def _native_ready() -> bool:
    """Whether CUDA calls may go to libcascade_kernels (native.py) before the JIT path."""
    global _native_ok
    if _native_ok is None:
        if not native.available():
            if os.environ.get("CASCADE_KERNELS_LIB"):  # asked for by name: not finding it is an error
                raise RuntimeError(f"CASCADE_KERNELS_LIB is set but the library does not load: {native.load_error()}")
            _native_ok = False  # not built: the JIT path, as before the library existed
        elif native.library().kernel_key() != _attention_kernel.fn.cache_key:
            warnings.warn(f"{native.library_path()} was built from another version of _attention_kernel; "
                          "using the JIT path. Rebuild it: cmake --build build", stacklevel=3)
            _native_ok = False
        else:
            _native_ok = True
    return _native_ok


@torch.library.custom_op("cascade_kernels::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    # On CUDA, the ahead-of-time cubins where they cover the call (dtype, head dim, mask, GPU, layout): no
    # Triton compile or autotune at first use. CASCADE_KERNELS_NATIVE=0 forces the JIT path.
    if q.is_cuda and native.enabled() and _native_ready():
        out = native.attention(q, k, v, scale, key_padding_mask)
        if out is not None:
            return out
    return _launch(q, k, v, scale, key_padding_mask)


@_attention_op.register_fake
def _(q, k, v, scale, key_padding_mask):
    return torch.empty_like(q)


def attention(q, k, v, *, scale: float | None = None, key_padding_mask: torch.Tensor | None = None):
    """softmax(q k^T * scale, masked) v; see the module docstring for shapes. Forward only."""
    _check(q, k, v, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return _attention_op(q, k, v, scale, key_padding_mask)
