"""POST /v1/images/edits: OpenAI's image edit call, a multipart/form-data body as its SDK's `images.edit` sends it.

Files: `image` (the picture to edit; `image[]` for several, one per prompt) and `mask` (optional: inpainting).
Fields: prompt, n, size, response_format, model, and the cascade's settings as /v1/images/generations takes
them, plus strength. Form values are text: numbers and per-stage lists are read as JSON (steps=[10, 8]), the
text fields (TEXT_FIELDS) as they are; `name[]` parts repeated make a list.

The mask: where it has an alpha channel, OpenAI's convention (fully transparent pixels are redrawn); where it
has none, diffusers' (white is redrawn, black kept).

The body arrives whole and bounded (the server's max_upload_bytes). It is parsed by python-multipart's streaming
parser, fed FEED_BYTES at a time, and every limit trips as soon as it is passed, before the rest is looked at:
parts (MAX_PARTS), picture files (max_images, and one mask), headers per part and bytes per header
(MAX_HEADERS, MAX_HEADER_BYTES), bytes per text field (MAX_FIELD_BYTES), and no nested multipart. Then the
pictures are counted against the prompts x n and their sizes read from their headers, without decoding:
each at most MAX_PICTURE_PIXELS, all of them (mask included) at most picture_budget(). Only then are they
decoded (PNG, JPEG or WebP) and made RGB (the mask grey); a mode that has no faithful 8-bit RGB (CMYK, 16-bit,
float, LAB, ...) is refused. The server calls parse_form in a worker thread, never on its event loop.
"""

from __future__ import annotations

import io
import json
import re

from engine.errors import InvalidRequestError
from engine.options import DEFAULT_MAX_BATCH

MAX_PICTURE_PIXELS = 4096 * 4096  # a picture to edit, decoded: 48 MiB as RGB
MAX_PARTS = 64  # a form has at most ~25 fields, --max-images pictures and a mask
MAX_HEADERS = 8  # per part: Content-Disposition and Content-Type are all a form needs
MAX_HEADER_BYTES = 1024  # one header of a part, name and value (a long file name is cut by browsers well before)
MAX_FIELD_BYTES = 64 << 10  # a text field: the longest prompt (max_prompt_chars) is far below this in UTF-8
MAX_BOUNDARY_CHARS = 70  # RFC 2046's bound
FEED_BYTES = 16 << 10  # the parser is fed this much at a time, so a limit trips within this much work
FORMATS = ("PNG", "JPEG", "WEBP")  # OpenAI's images.edit takes these; Pillow's other decoders are not reached
PICTURE_NAMES = ("image", "image[]")
# Modes made RGB (a picture) or grey (a mask) as they are: 8 bits a channel, with or without alpha or palette.
MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "P", "PA", "1"})
TEXT_FIELDS = frozenset({"prompt", "negative_prompt", "scheduler", "preset", "model", "size", "response_format",
                         "output_format", "user", "quality", "style", "background", "moderation", "input_fidelity",
                         "safety_identifier"})
_PARAM = re.compile(r'\s*;\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\\r\n]|\\.)*"|[^;\s"]*)\s*')


def picture_budget(max_pixels_per_request: int | None) -> int:
    """Decoded pixels of all of one request's pictures and mask: the request's output bound, and never less than
    one picture of MAX_PICTURE_PIXELS (a picture larger than the output is resized down)."""
    return max(max_pixels_per_request or 0, MAX_PICTURE_PIXELS)


def bound_decoders() -> None:
    """Pillow's decompression-bomb bound (Image.MAX_IMAGE_PIXELS, a process-wide setting) lowered to
    MAX_PICTURE_PIXELS when a server process starts (http.run), so a decoder reached some other way refuses past
    it too. Not done by create_app: an app built in a process that does other work (tests, batch jobs) leaves
    their bound alone. Only ever lowered: code that set a tighter bound keeps it."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > MAX_PICTURE_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_PICTURE_PIXELS


def parse_form(raw: bytes, content_type: str, max_images: int = DEFAULT_MAX_BATCH,
               max_pixels: int | None = None) -> tuple[dict, list, object]:
    """(fields, pictures, mask or None) from a multipart/form-data body; InvalidRequestError naming the part or
    the limit. max_images: the most pictures a request takes (--max-images); max_pixels: the request's pixel
    bound (--max-pixels-per-request; see picture_budget)."""
    kind, params = _header_params(content_type, "Content-Type")
    if kind.lower() != "multipart/form-data" or not params.get("boundary"):
        raise InvalidRequestError(f"the body must be multipart/form-data with a boundary (image, mask, prompt, ...), "
                                  f"as OpenAI's images.edit sends it; got {content_type[:100] or 'no content type'!r}")
    form = _Form(max_images)
    form.parse(bytes(raw), params["boundary"])
    fields = form.fields
    pictures, mask = form.pictures, form.mask
    if not pictures:
        raise InvalidRequestError("image is required: the picture to edit, as a file part")
    prompts = fields.get("prompt")
    n = fields.get("n", 1)
    allowed = min(max_images, (len(prompts) if isinstance(prompts, list) else 1) *
                  (n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1))
    if len(pictures) > max(allowed, 1):
        raise InvalidRequestError(f"image gives {len(pictures)} pictures; this request takes at most {allowed} "
                                  f"(one per image made: prompts x n, at most {max_images}, --max-images)")
    opened = [_open(data, "image") for data in pictures] + ([_open(mask, "mask")] if mask is not None else [])
    budget, total = picture_budget(max_pixels), 0
    for name, picture in opened:
        total += picture.width * picture.height
        if total > budget:
            raise InvalidRequestError(f"{name} brings this request's pictures to over {budget} pixels "
                                      f"(--max-pixels-per-request, or one picture of {MAX_PICTURE_PIXELS})")
    decoded = [_decode(picture, name) for name, picture in opened]
    if mask is not None:
        return fields, [p.convert("RGB") for p in decoded[:-1]], redraw_mask(decoded[-1])
    return fields, [p.convert("RGB") for p in decoded], None


class _Form:
    """python-multipart's callbacks: the parts collected, each refused the moment it passes a limit."""

    def __init__(self, max_images: int):
        self.max_images = max_images
        self.fields: dict = {}
        self.pictures: list[bytes] = []
        self.mask: bytes | None = None
        self.parts = 0
        self.ended = False
        self._header = [bytearray(), bytearray()]  # the header being read: name, value
        self._headers: dict[str, str] = {}
        self._name, self._file, self._data = "", False, bytearray()  # the part being read

    def parse(self, raw: bytes, boundary: str) -> None:
        from python_multipart.exceptions import FormParserError
        from python_multipart.multipart import MultipartParser

        if len(boundary) > MAX_BOUNDARY_CHARS:
            raise InvalidRequestError(f"the boundary is {len(boundary)} characters; RFC 2046 allows at most "
                                      f"{MAX_BOUNDARY_CHARS}")
        parser = MultipartParser(boundary.encode("latin-1"), {
            "on_part_begin": self._part_begin, "on_header_field": self._header_bytes(0),
            "on_header_value": self._header_bytes(1), "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end},
            max_header_count=MAX_HEADERS, max_header_size=MAX_HEADER_BYTES)
        try:
            for start in range(0, len(raw), FEED_BYTES):
                parser.write(raw[start:start + FEED_BYTES])
            parser.finalize()
        except FormParserError as exc:  # its message names the limit ("Maximum header size exceeded")
            raise InvalidRequestError(f"the body is not a readable multipart/form-data body: {exc} (a part takes "
                                      f"at most {MAX_HEADERS} headers of {MAX_HEADER_BYTES} bytes)") from None
        if not self.ended:
            raise InvalidRequestError("the body is not a readable multipart/form-data body: it ends before the "
                                      "closing boundary")

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidRequestError(f"the form has more than {MAX_PARTS} parts; this service takes at most "
                                      f"{MAX_PARTS}")
        self._headers, self._data = {}, bytearray()

    def _header_bytes(self, index: int):
        def add(data: bytes, start: int, end: int) -> None:
            self._header[index] += data[start:end]
        return add

    def _header_end(self) -> None:
        name = self._header[0].decode("latin-1").lower()
        if name in self._headers:
            raise InvalidRequestError(f"a part of the form has its {name} header twice")
        self._headers[name] = self._header[1].decode("latin-1")
        self._header = [bytearray(), bytearray()]

    def _headers_finished(self) -> None:
        kind, params = _header_params(self._headers.get("content-disposition", ""), "Content-Disposition")
        try:
            name = params.get("name", "").encode("latin-1").decode("utf-8")
        except UnicodeError:
            raise InvalidRequestError("a part's name is not UTF-8 text") from None
        if kind.lower() != "form-data" or not name:
            raise InvalidRequestError('a part of the form has no name (Content-Disposition: form-data; name="...")')
        if self._headers.get("content-type", "").strip().lower().startswith("multipart/"):
            raise InvalidRequestError(f"{name} is a nested multipart; give each file as a part of its own")
        self._name = name
        self._file = name in PICTURE_NAMES or name == "mask"
        if name == "mask" and self.mask is not None:
            raise InvalidRequestError("mask is given twice: give one mask")
        if name in PICTURE_NAMES and len(self.pictures) >= self.max_images:
            raise InvalidRequestError(f"image gives more than {self.max_images} pictures; this service takes at "
                                      f"most {self.max_images} per request (--max-images)")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]  # a file is bounded by the body's limit (max_upload_bytes)
        if not self._file and len(self._data) > MAX_FIELD_BYTES:
            raise InvalidRequestError(f"{self._name} is over {MAX_FIELD_BYTES} bytes; a text field takes at most "
                                      f"{MAX_FIELD_BYTES}")

    def _part_end(self) -> None:
        data = bytes(self._data)
        if self._name in PICTURE_NAMES:
            self.pictures.append(data)
        elif self._name == "mask":
            self.mask = data
        else:
            _add_field(self.fields, self._name, data)

    def _end(self) -> None:
        self.ended = True


def _header_params(value: str, header: str) -> tuple[str, dict[str, str]]:
    """A header's value and its parameters ('form-data; name="image"' -> "form-data", {"name": "image"}), read
    with one linear pattern over at most MAX_HEADER_BYTES; InvalidRequestError naming the header."""
    if len(value) > MAX_HEADER_BYTES:
        raise InvalidRequestError(f"the {header} header is over {MAX_HEADER_BYTES} bytes")
    first, _, rest = value.partition(";")
    params, at, rest = {}, 0, ";" + rest if rest or value.endswith(";") else ""
    while at < len(rest):
        match = _PARAM.match(rest, at)
        if match is None or match.end() == at:
            raise InvalidRequestError(f"the {header} header is malformed: {value[:80]!r}")
        key, text = match.group(1).lower(), match.group(2)
        params[key] = re.sub(r"\\(.)", r"\1", text[1:-1]) if text.startswith('"') else text
        at = match.end()
    return first.strip(), params


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


def _open(data: bytes, name: str):
    """(name, the PIL image with only its header read): its size is known, nothing is decoded yet."""
    from PIL import Image, UnidentifiedImageError

    try:
        picture = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = picture.size
    except UnidentifiedImageError:
        raise InvalidRequestError(f"{name} is not a picture this service can read: it takes PNG, JPEG and "
                                  "WebP") from None
    except Exception as exc:  # a decoder's header reader fails in its own ways: each is a bad upload
        raise InvalidRequestError(f"{name} is not a picture this service can read (PNG, JPEG, WebP): "
                                  f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if width * height > MAX_PICTURE_PIXELS:
        raise InvalidRequestError(f"{name} is {width}x{height}; this service takes pictures of at most "
                                  f"{MAX_PICTURE_PIXELS} pixels")
    if picture.mode not in MODES:
        raise InvalidRequestError(f"{name} is a {picture.mode} picture; this service takes RGB, RGBA, grey or "
                                  f"palette pictures of 8 bits a channel: convert it to RGB")
    return name, picture


def _decode(picture, name: str):
    """The picture decoded (its size checked by _open); a palette made RGBA where it has a transparent index (a
    mask's alpha), else RGB."""
    try:
        picture.load()
    except Exception as exc:
        raise InvalidRequestError(f"{name} is not a picture this service can read (PNG, JPEG, WebP): "
                                  f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if picture.mode == "PA" or (picture.mode == "P" and "transparency" in picture.info):
        return picture.convert("RGBA")
    return picture.convert("RGB") if picture.mode == "P" else picture


def redraw_mask(mask):
    """A grey mask, white where the picture is redrawn: from the alpha channel where the upload has one
    (OpenAI's: transparent is redrawn), else the picture itself in grey (diffusers': white is redrawn)."""
    if mask.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0)
    return mask.convert("L")
