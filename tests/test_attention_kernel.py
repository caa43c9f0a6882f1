"""cascade_kernels.attention against an fp64 reference, with tolerance relative to PyTorch SDPA's own error.

Runs on CPU under TRITON_INTERPRET=1 (set here when no GPU is present) and on a GPU where one exists.
Inputs are drawn fresh per test; outputs are poisoned with NaN first so unwritten elements show.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import cascade_kernels  # noqa: E402
from cascade_kernels.attention import _launch, reference_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(b, h, lq, lk, d, dtype, mask=None, scale=None):
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype, device=DEVICE) for n in (lq, lk, lk))
    exact = reference_attention(q.double(), k.double(), v.double(), scale=scale, key_padding_mask=mask)
    out = torch.full_like(q, float("nan"))
    _launch(q, k, v, d**-0.5 if scale is None else scale, mask, out=out)
    assert not out.isnan().any(), "unwritten or NaN output elements"
    sdpa_mask = None if mask is None else mask[:, None, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, scale=scale)
    ours_error = (out.double() - exact).abs().max().item()
    sdpa_error = (sdpa.double() - exact).nan_to_num().abs().max().item()
    assert ours_error <= 2 * sdpa_error + 4 * torch.finfo(dtype).eps, (ours_error, sdpa_error)
    assert torch.allclose(cascade_kernels.attention(q, k, v, scale=scale, key_padding_mask=mask), out)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [8, 16, 32, 40, 64, 80, 96, 128])  # 8: the tiny test cascades' heads
def test_head_dims_and_dtypes(d, dtype):
    check(2, 2, 19, 45, d, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [192, 256, 320, 512])
def test_wide_heads(d, dtype):
    # 320 and 512 take the split path: output columns over two programs, scores summed over 128-wide chunks.
    check(1, 1, 37, 70, d, dtype)


def test_vae_mid_block_shape_with_mask():
    # The x4 VAE's mid-block: one 512-wide head, image tokens attending to themselves.
    mask = torch.rand(2, 64, device=DEVICE) > 0.3
    mask[:, 0] = True
    check(2, 1, 64, 64, 512, torch.float16, mask=mask)


@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 77), (77, 1), (3, 5), (17, 93), (64, 77 + 64), (40, 16)])
def test_odd_lengths(lq, lk):
    check(1, 3, lq, lk, 64, torch.float16)


def test_if_joint_attention_shape_with_scale():
    # IF's joint attention: 8x8 image tokens attend to 77 text tokens + themselves.
    check(2, 4, 64, 77 + 64, 64, torch.float32, scale=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_padding_mask(dtype):
    mask = torch.rand(3, 50, device=DEVICE) > 0.4
    mask[:, 0] = True
    check(3, 2, 21, 50, 64, dtype, mask=mask)


def test_fully_masked_rows_give_zeros():
    mask = torch.ones(2, 30, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    q, k, v = (torch.randn(2, 2, n, 32, device=DEVICE) for n in (9, 30, 30))
    out = cascade_kernels.attention(q, k, v, key_padding_mask=mask)
    assert torch.all(out[1] == 0)
    assert torch.allclose(out[0], reference_attention(q, k, v, key_padding_mask=mask)[0], atol=1e-5)


def test_non_contiguous_inputs():
    # (B, L, H, D) memory viewed as (B, H, L, D), as attention processors produce.
    q, k, v = (torch.randn(2, n, 3, 64, device=DEVICE).transpose(1, 2) for n in (10, 30, 30))
    assert torch.allclose(cascade_kernels.attention(q, k, v), reference_attention(q, k, v), atol=1e-5)


@pytest.mark.parametrize("args,error,message", [
    (((2, 3, 4), (2, 3, 4), (2, 3, 4)), ValueError, "must be a 4-D tensor"),
    (((1, 2, 4, 64), (1, 2, 5, 32), (1, 2, 5, 32)), ValueError, "shapes do not fit"),
    (((1, 2, 4, 64), (1, 2, 5, 64), (1, 2, 6, 64)), ValueError, "shapes do not fit"),
    (((1, 2, 4, 1024), (1, 2, 5, 1024), (1, 2, 5, 1024)), ValueError, "head dim 1024 is larger"),
    (((1, 2, 0, 64), (1, 2, 5, 64), (1, 2, 5, 64)), ValueError, "need Lq >= 1"),
])
def test_shape_errors_are_python_errors(args, error, message):
    q, k, v = (torch.randn(*s, device=DEVICE) for s in args)
    with pytest.raises(error, match=message):
        cascade_kernels.attention(q, k, v)


def test_dtype_and_mask_errors():
    q = torch.randn(1, 2, 4, 64, device=DEVICE)
    with pytest.raises(TypeError, match="dtype torch.int32"):
        cascade_kernels.attention(q.int(), q.int(), q.int())
    with pytest.raises(TypeError, match="share one dtype"):
        cascade_kernels.attention(q, q.half(), q)
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        cascade_kernels.attention(q, q, q, key_padding_mask=torch.ones(1, 4, device=DEVICE))


def test_the_attention_op_compiles_whole_without_graph_breaks():
    """torch.compile(fullgraph=True) raises on any graph break: the op, with a projection on each side as in a
    U-Net's attention block, must trace as one graph (a torch.library custom op with a fake implementation),
    and the compiled block gives the eager block's output. A first step of the fast path's compiled step."""
    torch._dynamo.reset()
    proj_in, proj_out = torch.nn.Linear(32, 96).to(DEVICE), torch.nn.Linear(32, 32).to(DEVICE)

    def block(x, mask):  # x (B, L, 32) -> (B, L, 32): 2 heads of 16
        q, k, v = proj_in(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)  # 3 x (B, 2, L, 16)
        out = cascade_kernels.attention(q, k, v, key_padding_mask=mask)
        return proj_out(out.transpose(1, 2).flatten(2))

    x = torch.randn(2, 40, 32, device=DEVICE)
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    mask[1, 30:] = False
    with torch.no_grad():
        eager = block(x, mask)
        compiled = torch.compile(block, fullgraph=True, dynamic=False)(x, mask)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
