"""A bounded fuzz of the request schema: whatever JSON a client sends, parsing and the checks at submit either
give a request or raise InvalidRequestError (a 400), never anything else (which would be a 500)."""

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from engine import InvalidRequestError  # noqa: E402
from engine.pipeline import CascadeRun  # noqa: E402
from engine.serve.http import parse_body  # noqa: E402
from engine.serve.schema import FIELDS, IGNORED_FIELDS  # noqa: E402

SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["smart27", "ddim", "b64_json", "32x32", "png", "\ud800", "a\x00b", ""]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                          max_size=3), max_leaves=10)
KEYS = st.sampled_from(sorted(FIELDS | IGNORED_FIELDS) + ["colour", "Prompt"])
BODIES = st.dictionaries(KEYS, JSON, max_size=6) | JSON


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES)
def test_no_body_gets_past_the_checks_as_anything_but_a_400(engine_pipe, body):
    try:
        request, _ = parse_body(body, 60.0, engine_pipe.image_size)
        CascadeRun(engine_pipe, request)  # the scheduler's checks at submit
    except InvalidRequestError:
        pass


def _png(width: int, height: int, mode: str) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


FILES = st.binary(max_size=64) | st.builds(_png, st.integers(1, 80), st.integers(1, 80),
                                            st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I;16"]))
FORM_KEYS = st.sampled_from(sorted(FIELDS | IGNORED_FIELDS) + ["strength", "steps[]", "colour", ""])
FORM_VALUES = st.text(max_size=12) | st.sampled_from(["[10, 8]", "0.7", "[0.5, 2]", "null", "1e999", "[[[1]]]",
                                                       "2", "-1", "\ud7ff", "32x32", "auto", "b64_json"])


def _form(fields, files) -> bytes:
    parts = []
    for name, value in fields:
        parts.append(f'--XyZ\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode(
            "utf-8", "surrogatepass"))
    for name, data in files:
        parts.append(f'--XyZ\r\nContent-Disposition: form-data; name="{name}"; filename="f.png"\r\n'
                     f'Content-Type: image/png\r\n\r\n'.encode() + data + b"\r\n")
    return b"".join(parts) + b"--XyZ--\r\n"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.lists(st.tuples(FORM_KEYS, FORM_VALUES), max_size=5),
       files=st.lists(st.tuples(st.sampled_from(["image", "image[]", "mask", "other"]), FILES), max_size=3),
       garbage=st.none() | st.binary(max_size=200))
def test_no_edit_form_gets_past_the_checks_as_anything_but_a_400(engine_pipe, fields, files, garbage):
    """The edit route's form (engine/serve/edits.py): whatever bytes arrive, a request or a 400."""
    from engine.serve.edits import parse_form
    from engine.serve.http import check_cost
    from engine.serve.defaults import Limits

    body = garbage if garbage is not None else _form(fields, files)
    try:
        found, pictures, mask = parse_form(body, "multipart/form-data; boundary=XyZ")
        request, _ = parse_body(found, 60.0, engine_pipe.image_size, pictures=pictures, mask=mask,
                                pipeline=engine_pipe)
        check_cost(request, engine_pipe, Limits().for_model([27, 27], engine_pipe.image_size, 8))
        CascadeRun(engine_pipe, request)
    except InvalidRequestError:
        pass
