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
