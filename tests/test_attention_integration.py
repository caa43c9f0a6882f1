"""The torch backend with attention="triton" gives diffusers' images (kernel under TRITON_INTERPRET=1 on CPU)."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
# These run the kernel on CPU tensors, which only the interpreter can read; on a GPU machine run this file with
# TRITON_INTERPRET=1 (bench/gpu_checks.sh does). The kernel on the GPU itself: test_attention_kernel, test_gpu.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tensors through the kernel need TRITON_INTERPRET=1")

import engine  # noqa: E402
from engine.backends.attention import AddedKVProcessor  # noqa: E402
from tests.conftest import diffusers_cascade  # noqa: E402


def test_triton_attention_cascade_matches_diffusers(cascade_dir, reference):
    pipe = engine.load(cascade_dir, device="cpu", attention="triton")
    processors = [m.processor for s in pipe.stages for m in s.unet.model.modules() if hasattr(m, "processor")]
    assert processors and all(isinstance(p, AddedKVProcessor) for p in processors)
    ours = pipe.generate("a red circle on a blue background", seed=0, steps=(2, 1), guidance=(7.0, 4.0),
                         output_type="np")
    theirs = diffusers_cascade(reference, "a red circle on a blue background", 0, (2, 1), (7.0, 4.0))
    assert np.abs(ours - theirs).max() <= 1e-4


def test_triton_attention_three_stage_cascade_matches_diffusers(tmp_path):
    from engine.backends.attention import TritonAttnProcessor
    from engine.testing.random_models import TinyCascadeSpec, write_three_stage_cascade
    from engine.testing.reference import reference_cascade, run_reference

    # Small sizes (8 -> 16 -> 64 px): the interpreter runs every attention program in numpy.
    three_stage_dir = write_three_stage_cascade(tmp_path, TinyCascadeSpec(base_size=8, sr_size=16))
    pipe = engine.load(three_stage_dir, device="cpu", attention="triton")
    x4 = pipe.stages[2]
    for model in (x4.unet.model, x4.decoder.vae):
        processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
        assert processors and all(isinstance(p, TritonAttnProcessor) for p in processors)
    steps, guidance = (1, 1, 2), (7.0, 4.0, 9.0)
    ours = pipe.generate("a red circle", seed=1, steps=steps, guidance=guidance, output_type="np")
    theirs = run_reference(reference_cascade(three_stage_dir), "a red circle", 1, steps, guidance,
                           noise_level=(250, 20))
    assert np.abs(ours - theirs).max() <= 1e-4


def test_unknown_attention_is_refused(cascade_dir):
    with pytest.raises(engine.InvalidRequestError, match="unknown attention 'flash'"):
        engine.load(cascade_dir, attention="flash")


def _plain_models(seed):
    """A tiny x4-upscaler-like U-Net (transformer self- and cross-attention) and a VAE with a mid-block attention."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8, num_class_embeds=1000)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8)
    return unet.eval(), vae.eval()


def test_plain_attention_processor_matches_sdpa():
    from engine.backends.attention import TritonAttnProcessor, install

    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    unet, vae = _plain_models(seed)
    sample, text = torch.randn(2, 7, 9, 9), torch.randn(2, 11, 24)  # odd sizes: 81 and 11 tokens
    latents = torch.randn(1, 4, 5, 7)
    with torch.no_grad():
        expected = unet(sample, 20, encoder_hidden_states=text, class_labels=torch.tensor([20, 20])).sample
        expected_image = vae.decode(latents).sample
        # 4 transformers (down 1, mid 1, up 2) x (self, cross); encoder and decoder mid-blocks
        assert install(unet, "triton") == 8 and install(vae, "triton") == 2
        assert isinstance(vae.decoder.mid_block.attentions[0].processor, TritonAttnProcessor)
        got = unet(sample, 20, encoder_hidden_states=text, class_labels=torch.tensor([20, 20])).sample
        got_image = vae.decode(latents).sample
    assert torch.isfinite(got).all() and torch.isfinite(got_image).all()
    assert (got - expected).abs().max() <= 1e-4, f"seed {seed}"
    assert (got_image - expected_image).abs().max() <= 1e-4, f"seed {seed}"


def test_vae_mid_block_attention_runs_through_the_kernel():
    """The x4 VAE's mid-block attention: one 512-wide head over the image tokens, 4-D input, residual."""
    from diffusers.models.attention_processor import Attention

    from engine.backends.attention import TritonAttnProcessor

    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)
    block = Attention(query_dim=512, heads=1, dim_head=512, norm_num_groups=32, residual_connection=True,
                      bias=True, upcast_softmax=True, _from_deprecated_attn_block=True, eps=1e-6).eval()
    x = torch.randn(2, 512, 6, 5)  # (B, C, H, W): 30 tokens
    processor = TritonAttnProcessor()
    calls = []
    kernel = processor._attention
    processor._attention = lambda *args, **kwargs: (calls.append(args[0].shape), kernel(*args, **kwargs))[1]
    with torch.no_grad():
        expected = block(x)
        block.set_processor(processor)
        got = block(x)
    assert calls == [(2, 1, 30, 512)]
    assert (got - expected).abs().max() <= 1e-4, f"seed {seed}"


def test_plain_processor_falls_back_for_masks_and_heads_past_the_kernel():
    """Heads wider than the kernel's 512 and attention masks go to diffusers' own processor, unchanged."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from engine.backends.attention import TritonAttnProcessor

    torch.manual_seed(0)
    wide = Attention(query_dim=1024, heads=1, dim_head=1024).eval()
    narrow = Attention(query_dim=32, heads=2, dim_head=16).eval()
    x_wide, x_narrow = torch.randn(1, 5, 1024), torch.randn(2, 6, 32)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])  # (B, Lk) key padding as diffusers takes it
    with torch.no_grad():
        expected = wide(x_wide), narrow(x_narrow, attention_mask=mask)
        wide.set_processor(TritonAttnProcessor())
        narrow.set_processor(TritonAttnProcessor())
        got = wide(x_wide), narrow(x_narrow, attention_mask=mask)
    assert isinstance(AttnProcessor2_0(), type(wide.processor._fallback))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_auto_attention_times_both_and_keeps_the_faster(engine_pipe):
    """attention="auto" (by_timing) on a real U-Net: both processors run and are timed, the faster one stays
    installed. On CPU the interpreted kernel is far slower, so diffusers' own processors come back, unchanged."""
    from engine.backends.attention import by_timing, resolve_attention, timer_for
    from engine.backends.torch_backend import example_call

    model = engine_pipe.stages[0].unet.model
    before = {name: type(p) for name, p in model.attn_processors.items()}
    cpu = torch.device("cpu")
    best, seconds = by_timing(model, lambda: example_call(model, cpu), timer_for(cpu), calls=1)
    assert set(seconds) == {"sdpa", "triton"} and all(s > 0 for s in seconds.values())
    assert best == "sdpa" and seconds["triton"] > seconds["sdpa"]
    assert {name: type(p) for name, p in model.attn_processors.items()} == before
    assert resolve_attention("auto", torch.device("cpu")) == "sdpa"  # where Triton runs interpreted only
