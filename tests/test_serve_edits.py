"""POST /v1/images/edits: OpenAI's image edit call over the scheduler. The engine's own edit images, through a
multipart form and through the OpenAI SDK's images.edit unmodified; the mask's two conventions (OpenAI's alpha,
diffusers' white); and bad uploads answered 400/413 naming the field, each followed by a request that still
succeeds."""

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from engine.serve.defaults import Limits  # noqa: E402
from engine.serve.edits import MAX_PICTURE_PIXELS  # noqa: E402
from engine.serve.http import create_app  # noqa: E402
from engine.testing.ports import serving  # noqa: E402

FIELDS = {"prompt": "a red circle", "seed": "3", "steps": "[3, 2]", "strength": "[0.9, 0.7]"}


def picture(width=40, height=40, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def white_left_mask(width=40, height=40) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 255
    return Image.fromarray(mask)


def transparent_left_mask(width=40, height=40) -> Image.Image:
    """OpenAI's convention: the transparent pixels are redrawn (the colour does not matter)."""
    rgba = np.full((height, width, 4), 255, np.uint8)
    rgba[:, : width // 2, 3] = 0
    return Image.fromarray(rgba, "RGBA")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(data) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"] if isinstance(d, dict) else d.b64_json))))
            .astype(int) for d in data]


def expected(pipe, **options) -> list[np.ndarray]:
    images = pipe.generate("a red circle", image=picture(), mask_image=white_left_mask(), strength=(0.9, 0.7),
                           steps=(3, 2), seed=3, **options)
    return [np.asarray(image).astype(int) for image in images]


@pytest.fixture(scope="module")
def client(engine_pipe):
    limits = Limits(max_upload_bytes=200_000)
    with TestClient(create_app(engine_pipe, max_batch=4, max_queue=8, timeout_s=60, limits=limits)) as client:
        deadline = time.monotonic() + 60
        while client.get("/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield client


def part(image: Image.Image, name: str = "in.png") -> tuple:
    return name, png(image), "image/png"


def edit(client, fields=FIELDS, **files):
    """POST an edit form: the picture and the white-left mask, unless `files` replaces one (None: no such part)."""
    parts = {"image": part(picture()), "mask": part(white_left_mask(), "mask.png"), **files}
    return client.post("/v1/images/edits", data=fields, files={k: v for k, v in parts.items() if v is not None})


def test_an_edit_form_gives_the_engines_images_with_either_mask_convention(client, engine_pipe):
    want = expected(engine_pipe, num_images_per_prompt=2)
    for mask in (white_left_mask(), transparent_left_mask()):
        response = edit(client, {**FIELDS, "n": "2", "size": "32x32", "response_format": "b64_json"},
                        mask=part(mask, "mask.png"))
        assert response.status_code == 200, response.text
        assert response.json()["seed"] == 3
        for got, image in zip(decoded(response.json()["data"]), want, strict=True):
            assert np.abs(got - image).max() <= 1  # PNG is lossless; batching may move a value by one step
    plain = edit(client, {**FIELDS, "strength": "0.6"}, mask=None)  # no mask part: image-to-image
    want = engine_pipe.generate("a red circle", image=picture(), strength=0.6, steps=(3, 2), seed=3)
    assert np.abs(decoded(plain.json()["data"])[0] - np.asarray(want[0]).astype(int)).max() <= 1
    spec = client.get("/openapi.json").json()["paths"]["/v1/images/edits"]["post"]
    assert {"image", "mask", "strength", "prompt"} <= set(
        spec["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"])


@pytest.mark.parametrize("fields, files, status, param, message", [
    (FIELDS, {"image": None}, 400, "image", "image is required"),
    (FIELDS, {"image": ("in.png", b"not a picture", "image/png")}, 400, "image", "not a picture this service"),
    (FIELDS, {"mask": part(white_left_mask(20, 20))}, 400, "mask", "mask is 20x20 but"),
    (FIELDS, {"image": None, "mask": None}, 400, None, "must be multipart/form-data"),  # no file: urlencoded
    ({**FIELDS, "strength": "1.5"}, {}, 400, "strength", "strength must be a number in \\(0, 1\\]"),
    ({**FIELDS, "size": "64x64"}, {}, 400, "size", "size must be '32x32'"),
    ({**FIELDS, "colour": "red"}, {}, 400, None, "unknown field\\(s\\) colour"),
    ({**FIELDS, "n": "two"}, {}, 400, "n", "n has the wrong type"),
    (FIELDS, {"image": part(picture(300, 300))}, 413, None, "over 200000 bytes"),
])
def test_bad_uploads_are_answered_naming_the_field_and_the_service_goes_on(client, engine_pipe, fields, files,
                                                                          status, param, message):
    import re

    response = edit(client, fields, **files)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and re.search(message, error["message"])
    assert edit(client).status_code == 200


def test_a_picture_past_the_pixel_bound_is_refused_before_it_is_decoded(client):
    side = int(MAX_PICTURE_PIXELS ** 0.5) + 1
    huge = png(Image.new("L", (side, side)))  # all black: compresses to a few kB
    response = edit(client, image=("huge.png", huge, "image/png"))
    assert response.status_code == 400 and f"is {side}x{side}" in response.json()["error"]["message"]


def test_a_json_body_is_not_an_edit(client):
    response = client.post("/v1/images/edits", json={"prompt": "a red circle"})
    assert response.status_code == 400 and "multipart/form-data" in response.json()["error"]["message"]


def test_the_openai_sdk_edits_through_it_unmodified(engine_pipe, tmp_path):
    openai = pytest.importorskip("openai")

    app = create_app(engine_pipe, max_batch=4, max_queue=4, warmup=False)
    with serving(app) as url:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        picture().save(tmp_path / "in.png")
        transparent_left_mask().save(tmp_path / "mask.png")
        with open(tmp_path / "in.png", "rb") as image, open(tmp_path / "mask.png", "rb") as mask:
            result = sdk.images.edit(image=image, mask=mask, prompt="a red circle", n=1, size="32x32",
                                     response_format="b64_json", model=Path(engine_pipe.source).name,
                                     extra_body={"seed": 3, "steps": [3, 2], "strength": [0.9, 0.7]})
        assert np.abs(decoded(result.data)[0] - expected(engine_pipe)[0]).max() <= 1
        with open(tmp_path / "in.png", "rb") as image, pytest.raises(openai.BadRequestError) as info:
            sdk.images.edit(image=image, prompt="a red circle", extra_body={"strength": 2})
        assert info.value.param == "strength"
