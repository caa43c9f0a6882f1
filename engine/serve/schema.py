"""The HTTP API's schema: pydantic models of the request and response bodies, served as /openapi.json.

Types are checked here (strictly: "3" is not 3); values (ranges, per-stage lengths, the model's own limits)
are checked underneath by the one core check, `GenerateRequest`, and by the scheduler at submit.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

Number = Union[int, float]
StepValue = Union[int, str, list[int]]  # a count, a named schedule ("smart27"), or a stage's timestep list


class GenerationBody(BaseModel):
    """POST /v1/images/generations: OpenAI's images API, plus the cascade's own settings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Union[str, list[str]] = Field(description="a string, or a list of strings")
    n: int = Field(1, description="an integer: images per prompt")
    response_format: Literal["b64_json"] = Field("b64_json", description="'b64_json': PNGs inline, base64")
    size: str | None = Field(None, description="a string: the model's output size, e.g. '256x256' (checked, not chosen)")
    seed: int | None = Field(None, description="an integer 0..2**63-1; default: a fresh one, returned")
    steps: Union[StepValue, list[StepValue], None] = Field(None, description="a step count, a schedule name ('smart27') or a list of timesteps; or a list of those, one per stage")
    guidance: Union[Number, list[Number], None] = Field(None, description="a number (classifier-free guidance); or a list, one per stage")
    negative_prompt: Union[str, list[str], None] = Field(None, description="a string, or a list of strings")
    noise_level: Union[int, list[int], None] = Field(None, description="an integer (noise augmentation); or a "
                                                                       "list, one per stage after the first")
    scheduler: str | None = Field(None, description="a string, ddpm | ddim | dpm++2m; default: each stage's own")
    guidance_interval: Union[list[int], list[Union[list[int], None]], None] = Field(
        None, description="[lo, hi]: guidance only at timesteps lo <= t < hi (0..1000); or a list, one per stage "
                          "([lo, hi] or null)")
    preset: str | None = Field(None, description="a string: one of the model's presets (GET /v1/presets)")
    cache: Union[int, dict, list[Union[int, dict, None]], None] = Field(
        None, description="feature caching across steps: an interval (a full step every N), an object of interval, "
                          "depth, full_first, window, refresh; or a list, one (or null) per stage")
    timeout: Number | None = Field(None, description="a number of seconds, at most the server's --timeout")
    model: str | None = Field(None, description="a string: the served model's name (GET /v1/models); another is a 404")
    # OpenAI's optional fields: accepted so that its clients work unchanged, and ignored.
    user: Any = Field(None, description="ignored")
    quality: Any = Field(None, description="ignored")
    style: Any = Field(None, description="ignored")
    background: Any = Field(None, description="ignored")
    moderation: Any = Field(None, description="ignored")
    output_format: Literal["png"] | None = Field(None, description="'png'")
    output_compression: Any = Field(None, description="ignored")
    partial_images: Any = Field(None, description="ignored")
    stream: Any = Field(None, description="ignored")


class EditBody(GenerationBody):
    """POST /v1/images/edits: OpenAI's image edit form (the picture, `image`, and the `mask` are files beside these
    fields), plus the cascade's own settings and the edit's strength."""

    strength: Union[Number, list[Number], None] = Field(
        None, description="a number in (0, 1]: how much of the schedule redraws the picture; or a list, one per "
                          "stage that edits")
    input_fidelity: Any = Field(None, description="ignored")
    safety_identifier: Any = Field(None, description="ignored")


IGNORED_FIELDS = frozenset(name for name, f in EditBody.model_fields.items() if f.description == "ignored")
FIELDS = frozenset(GenerationBody.model_fields) - IGNORED_FIELDS
EDIT_FIELDS = frozenset(EditBody.model_fields) - IGNORED_FIELDS
FILES = ("image", "mask")  # an edit's files, by their form names


class Image(BaseModel):
    b64_json: str


class ImagesResponse(BaseModel):
    created: int
    seed: int = Field(description="draws the same images again")
    data: list[Image]


class ErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error | authentication_error | server_error")
    param: str | None = Field(description="the field a 400 is about")
    code: str = Field(description="invalid_request, unauthorized, queue_full, timeout, draining, ...")


class ErrorResponse(BaseModel):
    error: ErrorBody
