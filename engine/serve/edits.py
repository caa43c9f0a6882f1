"""POST /v1/images/edits: OpenAI's image edit call, a multipart/form-data body as its SDK's `images.edit` sends it.

Files: `image` (the picture to edit; `image[]` for several, one per prompt) and `mask` (optional: inpainting).
Fields: prompt, n, size, response_format, model, and the cascade's settings as /v1/images/generations takes
them, plus strength. Form values are text: numbers and per-stage lists are read as JSON (steps=[10, 8]), the
text fields (TEXT_FIELDS) as they are; `name[]` parts repeated make a list.

The mask: where it has an alpha channel, OpenAI's convention (fully transparent pixels are redrawn); where it
has none, diffusers' (white is redrawn, black kept).

The body arrives whole and bounded (the server's max_upload_bytes) and is parsed with the standard library's
MIME parser; a picture's size is read from its header and refused past MAX_PICTURE_PIXELS before it is
decoded.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json

from engine.errors import InvalidRequestError

MAX_PICTURE_PIXELS = 4096 * 4096  # a picture to edit, decoded: 48 MiB as RGB
TEXT_FIELDS = frozenset({"prompt", "negative_prompt", "scheduler", "preset", "model", "size", "response_format",
                         "output_format", "user", "quality", "style", "background", "moderation", "input_fidelity",
                         "safety_identifier"})


def parse_form(raw: bytes, content_type: str) -> tuple[dict, list, object]:
    """(fields, pictures, mask or None) from a multipart/form-data body; InvalidRequestError naming the part."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidRequestError(f"the body must be multipart/form-data (image, mask, prompt, ...), as OpenAI's "
                                  f"images.edit sends it; got {content_type or 'no content type'!r}")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + bytes(raw))
    if not message.is_multipart() or message.defects:
        raise InvalidRequestError("the body is not a readable multipart/form-data body")
    fields: dict = {}
    pictures, mask = [], None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if not name:
            raise InvalidRequestError("a part of the form has no name")
        if name in ("image", "image[]"):
            pictures.append(read_picture(data, "image"))
        elif name == "mask":
            if mask is not None:
                raise InvalidRequestError("mask is given twice: give one mask")
            mask = redraw_mask(read_picture(data, "mask"))
        else:
            _add_field(fields, name, data)
    if not pictures:
        raise InvalidRequestError("image is required: the picture to edit, as a file part")
    return fields, pictures, mask


def _add_field(fields: dict, name: str, data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{name} is not UTF-8 text") from None
    key = name.removesuffix("[]")
    value = text if key in TEXT_FIELDS else _value(text)
    if name.endswith("[]") and isinstance(fields.setdefault(key, []), list):
        fields[key].append(value)
    elif key in fields:
        raise InvalidRequestError(f"{key} is given twice")
    else:
        fields[key] = value


def _value(text: str):
    """A form value as JSON where it parses (2, 0.7, [10, 8], null), else the text itself."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def read_picture(data: bytes, name: str):
    """A PIL image from an uploaded file, its pixel count bounded before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        picture = Image.open(io.BytesIO(data))
        width, height = picture.size
        if width * height > MAX_PICTURE_PIXELS:
            raise InvalidRequestError(f"{name} is {width}x{height}; this service takes pictures of at most "
                                      f"{MAX_PICTURE_PIXELS} pixels")
        picture.load()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InvalidRequestError(f"{name} is not a picture this service can read (PNG, JPEG, WebP): {exc}") from None
    return picture


def redraw_mask(mask):
    """A grey mask, white where the picture is redrawn: from the alpha channel where the upload has one
    (OpenAI's: transparent is redrawn), else the picture itself in grey (diffusers': white is redrawn)."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0)
    return mask.convert("L")
