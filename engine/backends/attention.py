"""Attention processors that run diffusers' U-Net attention through our Triton kernel.

IF's SimpleCrossAttn blocks use diffusers' "added KV" attention: queries from the (group-normed) image tokens,
keys and values from the projected text tokens followed by the image tokens ("joint" attention, no mask).
`AddedKVTritonProcessor` computes the same function as diffusers' AttnAddedKVProcessor2_0 with
kernels.attention in place of SDPA. Calls with an attention mask (IF passes none) go to diffusers' processor.
"""

from __future__ import annotations

import torch

ATTENTION_CHOICES = ("sdpa", "triton")


class AddedKVTritonProcessor:
    def __init__(self):
        from diffusers.models.attention_processor import AttnAddedKVProcessor2_0

        from kernels import attention

        self._attention = attention
        self._fallback = AttnAddedKVProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if attention_mask is not None:
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask)
        residual = hidden_states  # (B, C, H, W)
        batch, channels = hidden_states.shape[:2]
        tokens = hidden_states.view(batch, channels, -1).transpose(1, 2)  # (B, HW, C)
        context = tokens if encoder_hidden_states is None else encoder_hidden_states  # (B, 77, C) text
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)

        def heads(t):  # (B, L, heads * Dh) -> (B, heads, L, Dh)
            return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        query = heads(attn.to_q(tokens))
        key, value = heads(attn.add_k_proj(context)), heads(attn.add_v_proj(context))
        if not attn.only_cross_attention:  # joint: text keys first, then the image tokens
            key = torch.cat([key, heads(attn.to_k(tokens))], dim=2)
            value = torch.cat([value, heads(attn.to_v(tokens))], dim=2)
        out = self._attention(query, key, value, scale=attn.scale)  # (B, heads, HW, Dh)
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[3])
        out = attn.to_out[1](attn.to_out[0](out))
        return out.transpose(-1, -2).reshape(residual.shape) + residual


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def install(model, attention: str) -> int:
    """Give every added-KV attention module of `model` our processor when attention == "triton"; return how many."""
    if attention == "sdpa":
        return 0
    from diffusers.models.attention_processor import AttnAddedKVProcessor, AttnAddedKVProcessor2_0

    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "processor", None), (AttnAddedKVProcessor, AttnAddedKVProcessor2_0)):
            module.set_processor(AddedKVTritonProcessor())
            count += 1
    return count
