"""What an IF U-Net computes from the text alone, computed once per request instead of at every step.

An IF U-Net (UNet2DConditionModel with `addition_embed_type="text"`, `encoder_hid_dim_type="text_proj"` and
SimpleCrossAttn blocks) repeats three pieces of work at every step that depend on the prompt embeddings only:
- `encoder_hid_proj`, the linear projection of the (rows, 77, D) T5 embeddings to the U-Net's width;
- `add_embedding`, the text time embedding (layer norm, attention pooling, projection) added to the time
  embedding;
- in each joint-attention layer, the key and value projections of those 77 projected text tokens (after the
  layer's cross group norm).

`TextConstants(model)` puts stand-ins in their places. `constants(embeddings)` computes them all with the
original modules, once; a call after `use(values)` then takes those values instead of computing them, and
one after `use(None)` computes as before. The caller says which before every call (FastUNet does), so values
can never outlive their request, even after a call that failed.
The values are tensors passed in, so a compiled U-Net takes them as graph inputs (never folded in as
constants) and a CUDA graph reads them from the static buffers they were copied into.

Rows: the values are computed for the rows of the guided call, [uncond; cond], and a call with fewer rows (an
unguided step under a guidance interval, which runs the cond half only) takes the last rows, the cond half.
"""

from __future__ import annotations

import torch

from engine.backends.attention import AddedKVProcessor, added_kv_modules


class _Given:
    """The values of the current call, or None: computed as usual."""

    values: dict[str, torch.Tensor] | None = None


def _take_given(module: torch.nn.Module, given: _Given, name: str):
    """Make `module` (a module of the text only) return the given value for its call's rows, else compute as
    before; returns its original forward. Its forward is replaced on the instance, so the model's parameters
    and state_dict keys stay as they were."""
    original = module.forward

    def forward(embeddings: torch.Tensor) -> torch.Tensor:
        values = given.values
        if values is None:
            return original(embeddings)
        return values[name][-embeddings.shape[0]:]

    module.forward = forward
    return original


class TextConstants:
    """The text-only work of one diffusers U-Net `model`, installed in place (see the module docstring)."""

    def __init__(self, model, attention: str = "sdpa"):
        self.given = _Given()
        config = model.config
        self.embedding = self._replace(model, "add_embedding", config.addition_embed_type == "text")
        self.projection = self._replace(model, "encoder_hid_proj", config.encoder_hid_dim_type == "text_proj")
        self.layers = added_kv_modules(model)  # name -> Attention module with added (text) key/value
        for name, module in self.layers.items():
            module.set_processor(AddedKVProcessor(attention, self.given, name))

    def _replace(self, model, attribute: str, applies: bool):
        """The module's original forward, once it takes given values; None where the model has no such module."""
        module = getattr(model, attribute, None)
        if not applies or module is None:
            return None
        return _take_given(module, self.given, attribute)

    @property
    def active(self) -> bool:
        """Whether this U-Net has any text-only work to take out of its steps."""
        return bool(self.layers) or self.embedding is not None or self.projection is not None

    @torch.inference_mode()
    def constants(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """The text-only values for (rows, 77, D) prompt embeddings, as the U-Net would compute them."""
        values = {}
        if self.embedding is not None:
            values["add_embedding"] = self.embedding(embeddings)  # (rows, time_embed_dim)
        context = embeddings
        if self.projection is not None:
            context = values["encoder_hid_proj"] = self.projection(embeddings)  # (rows, 77, width)
        for name, attn in self.layers.items():
            key, value = AddedKVProcessor.text_key_value(attn, context)  # (rows, heads, 77, Dh) each
            values[f"{name}.key"], values[f"{name}.value"] = key, value
        return values

    def use(self, values: dict[str, torch.Tensor] | None) -> None:
        """The next U-Net calls take `values` (from `constants`, or copies of them) instead of computing them;
        None: they compute. A plain attribute set, so it traces under torch.compile (no graph break)."""
        self.given.values = values
