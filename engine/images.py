"""Images in and out of the cascade: the user's [0, 1] pictures <-> the models' [-1, 1] tensors.

Input (`image=` of a request: the picture to edit, or to upscale for a cascade that starts with an upscaler): a
PIL image, a list of them, or a float array/tensor in [0, 1], (H, W, 3) / (B, H, W, 3) for numpy as
`output_type="np"` returns, (3, H, W) / (B, 3, H, W) for torch as `output_type="pt"` returns. So an engine's
output can be fed straight back in.

Edits (image-to-image and inpainting, `EditInput`) size the picture and its mask for each stage as diffusers'
IF edit pipelines do: PIL images are resized with PIL's bicubic filter so that the short side is the stage's
size and the long side a multiple of 8 (`edit_size`), then scaled by `/ 127.5 - 1`; a mask (white = redraw) is
made grey, resized the same way and thresholded at 0.5. Arrays and tensors are resized with torch's
antialiased bicubic (masks bilinear) where they are not already that size: diffusers takes them only at the
size the stage runs at, and then the two agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
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
    if _pictures(image):
        check_image(image)
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


def check_image(image) -> None:
    """to_model_range's checks, without converting PIL pictures to float to make them (a request is checked long
    before it runs): one size for all of them. Arrays and tensors are converted, as their values are checked."""
    pictures = [image] if isinstance(image, Image.Image) else image
    if not _pictures(pictures):
        to_model_range(image)
    elif len({i.size for i in pictures}) != 1:
        raise InvalidRequestError(f"images must share one size, got {sorted({i.size for i in pictures})}")


def _pictures(image) -> bool:
    """Whether `image` is a non-empty list (or tuple) of PIL images."""
    return isinstance(image, (list, tuple)) and bool(image) and all(isinstance(i, Image.Image) for i in image)


def edit_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) diffusers' IF edit pipelines resize a picture to for a stage of `side` pixels: the short
    side becomes `side`, the long side keeps the aspect, rounded (half to even, Python's round) to a multiple of 8."""
    ratio = width / height
    if ratio >= 1:
        return int(round(side / 8 * ratio) * 8), side
    return side, int(round(side / 8 / ratio) * 8)


@dataclass(frozen=True)
class EditInput:
    """The picture(s) to edit and the mask(s), as the request gave them (1 or one per prompt), checked; sized
    for each stage by `at`."""

    images: list | torch.Tensor  # PIL images, or (B, 3, H, W) float32 in [-1, 1]
    masks: list | torch.Tensor | None  # PIL images, or (B, 1, H, W) float32 in [0, 1]; None: image-to-image

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the picture as given."""
        if isinstance(self.images, list):
            return self.images[0].size
        return self.images.shape[-1], self.images.shape[-2]

    def __len__(self) -> int:
        return len(self.images)

    def at(self, side: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pictures (B, 3, h, w) float32 in [-1, 1] and masks (B, 1, h, w) of 0. and 1. (or None) for a
        stage of `side` pixels (module docstring), (h, w) from edit_size."""
        width, height = edit_size(*self.size, side)
        if isinstance(self.images, list):
            image = torch.from_numpy(np.stack([
                np.asarray(_resized(i.convert("RGB"), width, height), dtype=np.float32) / 127.5 - 1
                for i in self.images])).permute(0, 3, 1, 2).contiguous()
        else:
            image = _interpolated(self.images, height, width, "bicubic")
        if self.masks is None:
            return image, None
        if isinstance(self.masks, list):
            mask = torch.from_numpy(np.stack([
                np.asarray(_resized(m.convert("L"), width, height), dtype=np.float32)[None] / 255.0
                for m in self.masks]))
        else:
            mask = _interpolated(self.masks, height, width, "bilinear")
        return image, (mask >= 0.5).float()


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    return image.resize((width, height), resample=Image.Resampling.BICUBIC, reducing_gap=None)


def _interpolated(tensor: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == (height, width):
        return tensor
    return F.interpolate(tensor, (height, width), mode=mode, antialias=True, align_corners=False)


MAX_EDIT_ASPECT = 4  # an edit's picture: its long side at most this many times its short side


def edit_input(image, mask) -> EditInput:
    """An EditInput from a request's image= and mask_image= (mask None: image-to-image); InvalidRequestError for
    forms, values or sizes that cannot work, naming the field."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
        check_image(list(image))  # the same checks as any input image (one size, ...)
        images = list(image)
    else:
        images = to_model_range(image)
    edit = EditInput(images, None)
    width, height = edit.size
    if max(width, height) > MAX_EDIT_ASPECT * min(width, height):
        raise InvalidRequestError(f"image is {width}x{height}; an edit keeps the picture's aspect, at most "
                                  f"{MAX_EDIT_ASPECT}:1 (the short side becomes the stage's size): crop it")
    if mask is None:
        return edit
    masks = _masks(mask)
    size = masks[0].size if isinstance(masks, list) else (masks.shape[-1], masks.shape[-2])
    if size != edit.size:
        raise InvalidRequestError(f"mask_image is {size[0]}x{size[1]} but image is {edit.size[0]}x{edit.size[1]}: "
                                  "give a mask the size of the picture (white where it is redrawn)")
    return EditInput(images, masks)


def _masks(mask) -> list | torch.Tensor:
    """A mask as given: PIL images (any mode, made grey), or [0, 1] arrays/tensors (H, W), (B, H, W) or
    (B, 1, H, W) as (B, 1, H, W) float32."""
    if isinstance(mask, Image.Image):
        mask = [mask]
    if isinstance(mask, (list, tuple)) and mask and all(isinstance(m, Image.Image) for m in mask):
        if len({m.size for m in mask}) != 1:
            raise InvalidRequestError(f"mask_image: masks must share one size, got {sorted({m.size for m in mask})}")
        return list(mask)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
    if not isinstance(mask, torch.Tensor):
        raise InvalidRequestError(f"mask_image must be a PIL image, a list of them, a numpy array or a torch tensor, "
                                  f"got {type(mask).__name__}")
    tensor = mask.detach().float().cpu()
    tensor = {2: lambda t: t[None, None], 3: lambda t: t[:, None], 4: lambda t: t}.get(tensor.dim(), lambda t: t)(tensor)
    if tensor.dim() != 4 or tensor.shape[1] != 1:
        raise InvalidRequestError(f"mask_image must be (H, W), (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
        raise InvalidRequestError("mask_image values must be finite and in [0, 1] (1, white: redraw)")
    return tensor.contiguous()


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
