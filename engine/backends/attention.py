"""Attention processors that run diffusers' U-Net attention through our Triton kernel.

Two kinds of attention module occur in the cascades:
- IF's SimpleCrossAttn blocks use diffusers' "added KV" attention: queries from the (group-normed) image tokens,
  keys and values from the projected text tokens followed by the image tokens ("joint" attention, no mask).
  `AddedKVProcessor` computes what diffusers' AttnAddedKVProcessor2_0 computes.
- The x4 upscaler's transformer blocks (self- and cross-attention) and VAE mid-blocks use plain attention.
  `TritonAttnProcessor` computes what diffusers' AttnProcessor2_0 computes.
Both put cascade_kernels.attention where diffusers calls SDPA, the x4 VAE's single 512-wide head included (the kernel
never forms its 65,536 x 65,536 score matrix at 1024 px). Calls with an attention mask (the cascades pass none)
and head dims above the kernel's maximum go to diffusers' own processor.
"""

from __future__ import annotations

import torch

from engine.errors import InvalidRequestError

ATTENTION_CHOICES = ("sdpa", "triton", "auto")  # auto: each U-Net takes whichever is faster on it (`by_timing`)
TIMED_CALLS = 3  # per processor, after a warm call (Triton compiles there), when attention="auto" times them


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, L, heads * Dh) -> (B, heads, L, Dh)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).flatten(2)  # (B, heads, L, Dh) -> (B, L, heads * Dh)


class AddedKVProcessor:
    """diffusers' added-KV (joint) attention, through SDPA as AttnAddedKVProcessor2_0 calls it or through our
    kernel; with `given` (text_constants.py), the text keys and values of the call come precomputed."""

    def __init__(self, attention: str = "triton", given=None, name: str = ""):
        from diffusers.models.attention_processor import AttnAddedKVProcessor2_0

        if attention == "triton":
            from cascade_kernels import attention as kernel  # optional: Triton (the [triton] extra) comes with it
            self._attention = lambda q, k, v, attn: kernel(q, k, v, scale=attn.scale)
        else:  # SDPA with its default scale Dh ** -0.5, as AttnAddedKVProcessor2_0 calls it
            self._attention = lambda q, k, v, attn: torch.nn.functional.scaled_dot_product_attention(q, k, v)
        self._fallback = AttnAddedKVProcessor2_0()
        self._given, self._name = given, name

    @staticmethod
    def text_key_value(attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, 77, C) text tokens -> their keys and values, (rows, heads, 77, Dh) each."""
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        return _split_heads(attn.add_k_proj(context), attn.heads), _split_heads(attn.add_v_proj(context), attn.heads)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if attention_mask is not None:
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask)
        residual = hidden_states  # (B, C, H, W)
        batch, channels = hidden_states.shape[:2]
        tokens = hidden_states.view(batch, channels, -1).transpose(1, 2)  # (B, HW, C)
        given = None if self._given is None else self._given.values
        if given is not None:  # this request's text keys and values, for the last `batch` rows
            key, value = given[f"{self._name}.key"][-batch:], given[f"{self._name}.value"][-batch:]
        elif encoder_hidden_states is None:  # self-attention only: the image tokens take the text's place
            key, value = _split_heads(attn.add_k_proj(tokens), attn.heads), _split_heads(attn.add_v_proj(tokens), attn.heads)
        else:
            key, value = self.text_key_value(attn, encoder_hidden_states)
        tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)

        query = _split_heads(attn.to_q(tokens), attn.heads)
        if not attn.only_cross_attention:  # joint: text keys first, then the image tokens
            key = torch.cat([key, _split_heads(attn.to_k(tokens), attn.heads)], dim=2)
            value = torch.cat([value, _split_heads(attn.to_v(tokens), attn.heads)], dim=2)
        out = self._attention(query, key, value, attn)  # (B, heads, HW, Dh)
        out = attn.to_out[1](attn.to_out[0](_merge_heads(out)))
        return out.transpose(-1, -2).reshape(residual.shape) + residual


class TritonAttnProcessor:
    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        from cascade_kernels import attention  # optional: Triton (the [triton] extra) is imported with it
        from cascade_kernels.attention import MAX_HEAD_DIM

        self._attention = attention
        self._max_head_dim = MAX_HEAD_DIM
        self._fallback = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        head_dim = attn.to_k.out_features // attn.heads
        if attention_mask is not None or head_dim > self._max_head_dim:
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states  # (B, L, C), or (B, C, H, W) in the VAE
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # (B, Lk, Ck)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = _split_heads(attn.to_q(hidden_states), attn.heads)  # (B, heads, Lq, Dh)
        key = _split_heads(attn.to_k(context), attn.heads)  # (B, heads, Lk, Dh)
        value = _split_heads(attn.to_v(context), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # AttnProcessor2_0 calls SDPA with its default scale Dh ** -0.5, not attn.scale; so do we, for parity.
        out = self._attention(query, key, value)
        out = attn.to_out[1](attn.to_out[0](_merge_heads(out)))
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def install(model, attention: str) -> int:
    """Give every attention module of `model` our processor when attention == "triton"; return how many.

    Only diffusers' default processors are replaced; a module with any other processor keeps it."""
    if attention == "sdpa":
        return 0
    from diffusers.models import attention_processor as ap

    ours = {ap.AttnAddedKVProcessor: AddedKVProcessor, ap.AttnAddedKVProcessor2_0: AddedKVProcessor,
            ap.AttnProcessor: TritonAttnProcessor, ap.AttnProcessor2_0: TritonAttnProcessor}
    count = 0
    for module in model.modules():
        replacement = ours.get(type(getattr(module, "processor", None)))
        if replacement is not None:
            module.set_processor(replacement())
            count += 1
    return count


def added_kv_modules(model) -> dict[str, torch.nn.Module]:
    """model's joint (added key/value) attention modules by name, whichever of diffusers' or our processors
    they hold."""
    from diffusers.models import attention_processor as ap

    kinds = (ap.AttnAddedKVProcessor, ap.AttnAddedKVProcessor2_0, AddedKVProcessor)
    return {name: module for name, module in model.named_modules()
            if isinstance(getattr(module, "processor", None), kinds)}


def resolve_attention(attention: str | None, device: torch.device) -> str:
    """The attention a load asked for, checked; None: triton on CUDA where Triton is installed, else sdpa.
    "auto" stays "auto" on CUDA with Triton (each U-Net is timed with both when it loads, `by_timing`); elsewhere
    it is sdpa, the only one that runs compiled there (Triton reads CPU tensors only in its interpreter)."""
    if attention is None:
        return "triton" if device.type == "cuda" and triton_available() else "sdpa"
    if attention not in ATTENTION_CHOICES:
        raise InvalidRequestError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
    if attention == "triton" and not triton_available():
        raise InvalidRequestError("attention='triton' needs Triton: pip install 'cascade-engine[triton]'")
    if attention == "auto" and not (device.type == "cuda" and triton_available()):
        return "sdpa"
    return attention


def by_timing(model, make_call, timer, calls: int = TIMED_CALLS) -> tuple[str, dict[str, float]]:
    """attention="auto" for one model: "sdpa" or "triton", whichever runs its call faster, and the median
    seconds of each. Each is installed in turn, then `make_call()` gives the call to time in the form it will
    run (made after the choice is installed: a compiled call is compiled with it), warmed by one untimed call
    (Triton and the compiler compile there), then timed `calls` times by `timer(call) -> seconds`
    (`timer_for`). The model keeps the winner's processors (diffusers' own for sdpa)."""
    import statistics

    original = dict(model.attn_processors)  # diffusers' processors, by module name
    seconds = {}
    with torch.inference_mode():
        for choice in ("sdpa", "triton"):
            if choice == "sdpa":
                model.set_attn_processor(dict(original))  # a copy: diffusers pops from the mapping it is given
            else:
                install(model, "triton")
            call = make_call()
            call()
            seconds[choice] = statistics.median(timer(call) for _ in range(calls))
    best = min(seconds, key=seconds.get)
    if best == "sdpa":
        model.set_attn_processor(dict(original))
    return best, seconds


def timer_for(device: torch.device):
    """timer(call) -> the seconds one call takes on `device`: between two CUDA events on CUDA (the GPU's own
    timeline, launch gaps included: no host clock around an asynchronous launch), perf_counter elsewhere."""
    if device.type != "cuda":
        import time

        def host(call) -> float:
            start = time.perf_counter()
            call()
            return time.perf_counter() - start

        return host

    def events(call) -> float:
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        call()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # ms -> s

    return events
