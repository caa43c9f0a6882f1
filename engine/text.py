"""Prompt encoding: tokenizer + text encoder, run once per request; the empty prompt's embedding is cached.

For IF's T5 it matches diffusers' IF `encode_prompt` with clean_caption=False: prompts lower-cased and stripped,
padded to 77 tokens with the attention mask passed to the encoder, and all 77 positions handed to the U-Nets.
T5 never runs in float16 (its activations overflow): bfloat16 or float32. For the x4 upscaler's CLIP it
matches StableDiffusionUpscalePipeline's: prompts as given (CLIP's tokenizer normalises them itself), padded to
77 tokens, and no attention mask (CLIP attends to the padding, causally).
"""

from __future__ import annotations

import logging

import torch

from engine.errors import InvalidRequestError

log = logging.getLogger(__name__)

MAX_TOKENS = 77


class TextEncoder:
    def __init__(self, tokenizer, model, device: torch.device, output_dtype: torch.dtype, dim: int,
                 clip: bool = False, output_device: torch.device | None = None):
        self.tokenizer = tokenizer
        self.clip = clip  # CLIP's conventions (see above) instead of IF's T5
        self.model = model  # model(input_ids, attention_mask=...) -> (hidden (B, 77, dim), ...): T5 or a backend's
        self.device = device  # where it runs
        self.output_device = output_device or device  # the U-Nets' device (T5 may run on the CPU beside a GPU)
        self.output_dtype = output_dtype  # the U-Nets' dtype: embeddings are cast once, here
        self.dim = dim
        self._empty: torch.Tensor | None = None

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77, D) embeddings of B prompts, in the U-Nets' dtype."""
        if not self.clip:
            prompts = [p.lower().strip() for p in prompts]
        tokens = self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        full_lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True).input_ids]
        for prompt, length in zip(prompts, full_lengths):
            if length > MAX_TOKENS:
                log.warning("prompt is %d tokens, truncated to %d: %r", length, MAX_TOKENS, prompt[:200])
        mask = None if self.clip else tokens.attention_mask.to(self.device)
        hidden = self.model(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.to(device=self.output_device, dtype=self.output_dtype)

    def modules(self):
        """(module, its entry modules) for offload (engine/offload.py), or None where the model is not a torch
        module (an export's graph)."""
        return (self.model, [self.model]) if isinstance(self.model, torch.nn.Module) else None

    def empty(self) -> torch.Tensor:
        """(1, 77, D) embedding of the empty prompt: the default unconditional input, computed once."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty


class NoTextEncoder:
    """A pipeline's text encoder where it was loaded without one: an IF super-resolution stage alone, as diffusers
    loads IF-II with text_encoder=None. It encodes nothing: requests give prompt_embeds (and, where a stage
    guides, negative_prompt_embeds), as stage I's encode_prompt returns them."""

    clip = False
    tokenizer = model = None

    def __init__(self, device: torch.device, output_dtype: torch.dtype, dim: int):
        self.device, self.output_dtype, self.dim = device, output_dtype, dim

    def encode(self, prompts: list[str]) -> torch.Tensor:
        raise InvalidRequestError("this pipeline was loaded without a text encoder (a super-resolution stage "
                                  "alone): give prompt_embeds= and negative_prompt_embeds= instead of prompts, "
                                  "e.g. from stage I's pipe.encode_prompt(prompt)")

    def empty(self) -> torch.Tensor:
        raise InvalidRequestError("this pipeline was loaded without a text encoder (a super-resolution stage "
                                  "alone): under guidance give negative_prompt_embeds= with prompt_embeds=, e.g. "
                                  "both from stage I's pipe.encode_prompt(prompt)")
