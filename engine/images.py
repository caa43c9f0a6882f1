"""Images in and out of the cascade: the user's [0, 1] pictures <-> the models' [-1, 1] tensors.

Input (`image=` of a request, for a cascade that starts with an upscaler): a PIL image, a list of them, or a
float array/tensor in [0, 1], (H, W, 3) / (B, H, W, 3) for numpy as `output_type="np"` returns, (3, H, W) /
(B, 3, H, W) for torch as `output_type="pt"` returns. So an engine's output can be fed straight back in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from engine.errors import InvalidRequestError


@dataclass(frozen=True)
class ModelRange:
    """An image tensor (B, 3, H, W) already in the model's range (about [-1, 1], unclamped): an IF stage's
    output as diffusers' pipelines hand it to the next with output_type="pt". diffusers' door wraps such
    tensors (Pipeline.__call__); the engine's own calls take [0, 1]."""

    tensor: torch.Tensor


def to_model_range(image) -> torch.Tensor:
    """(B, 3, H, W) float32 in [-1, 1] from any accepted input form; InvalidRequestError otherwise."""
    if isinstance(image, ModelRange):
        tensor = image.tensor[None] if image.tensor.dim() == 3 else image.tensor
        if tensor.dim() != 4 or tensor.shape[1] != 3 or not torch.isfinite(tensor).all():
            raise InvalidRequestError(f"an image tensor must be (3, H, W) or (B, 3, H, W) and finite, got "
                                      f"{tuple(image.tensor.shape)}")
        return tensor.detach().float().cpu().contiguous()
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
        if len({i.size for i in image}) != 1:
            raise InvalidRequestError(f"images must share one size, got {sorted({i.size for i in image})}")
        array = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0 for i in image])  # (B, H, W, 3)
        tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    elif isinstance(image, np.ndarray):
        array = image[None] if image.ndim == 3 else image
        if array.ndim != 4 or array.shape[-1] != 3:
            raise InvalidRequestError(f"a numpy image must be (H, W, 3) or (B, H, W, 3), got {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        tensor = image[None] if image.dim() == 3 else image
        if tensor.dim() != 4 or tensor.shape[1] != 3:
            raise InvalidRequestError(f"a torch image must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        tensor = tensor.detach().float().cpu()
    else:
        raise InvalidRequestError(f"image must be a PIL image, a list of them, a numpy array or a torch tensor, "
                                  f"got {type(image).__name__}")
    if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
        raise InvalidRequestError("image values must be finite and in [0, 1] (as output_type 'np' and 'pt' give)")
    return tensor.contiguous() * 2 - 1


def from_model_range(image: torch.Tensor, output_type: str):
    """The cascade's (B, 3, H, W) output in about [-1, 1] as `output_type` asks: "pt", "np" or "pil"."""
    image = (image / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3)
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def contact_sheet(images, captions=None, wrong=None, columns: int = 8, caption_lines: int = 3) -> Image.Image:
    """One picture of many: `images` (PIL) in rows of `columns`, each above its caption (wrapped), and those
    whose `wrong` flag is set framed in red and marked WRONG."""
    from textwrap import wrap

    from PIL import ImageDraw

    side = max(max(image.size) for image in images)
    line = 11  # PIL's default bitmap font is 11 px high
    strip = line * caption_lines + 4 if captions else 0
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * side, rows * (side + strip)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        x, y = (i % columns) * side, (i // columns) * (side + strip)
        sheet.paste(image.convert("RGB"), (x, y))
        if wrong is not None and wrong[i]:
            draw.rectangle((x, y, x + side - 1, y + side - 1), outline="red", width=3)
            draw.text((x + 5, y + 4), "WRONG", fill="red")
        if captions:
            for k, text in enumerate(wrap(captions[i], width=max(side // 6, 8))[:caption_lines]):
                draw.text((x + 2, y + side + 2 + k * line), text, fill="black")
    return sheet
