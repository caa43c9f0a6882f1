"""What a generation request may ask for, its defaults (the one source the API and the CLI both read) and
its validation, which runs before any model work.

A request names steps, guidance and noise level once for every stage or once per stage; `per_stage()`
resolves that against the loaded cascade into one `StageSettings` per stage.

Seeds, one rule for the Python API, the CLI and the HTTP service: a request without a seed (and without a
generator) draws a fresh one when it is made, and carries it, so that any picture can be drawn again; an
explicit seed, or a CPU `torch.Generator` as diffusers takes one, is exact.

`request_from_call` is the keyword door of `Pipeline.generate` and `Pipeline.__call__`: the engine's names and
diffusers' (`num_inference_steps`, `guidance_scale`, `timesteps`, `generator`, ...), with a hint for a misspelt one.
"""

from __future__ import annotations

import difflib
import math
import secrets
from dataclasses import dataclass, fields, replace
from numbers import Real
from typing import Any, Mapping, Sequence, Union

import torch

from engine.errors import InvalidRequestError
from engine.images import check_image, edit_input
from engine.samplers import SAMPLERS
from engine.schedules import NAMED_SCHEDULES, named_timesteps

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 0..2**64 - 1; JSON clients handle signed 64 bit
MAX_STEPS = 1000
# Images per U-Net call per stage, by default: the service's and batch jobs' step batches (a guided image
# takes two rows), and the most a TensorRT engine is built to take.
DEFAULT_MAX_BATCH = 8
OUTPUT_TYPES = ("pil", "np", "pt")

# A stage's steps: a count (evenly spaced per the scheduler config), a named IF schedule, or explicit timesteps.
Steps = Union[int, str, Sequence[int]]


@dataclass(frozen=True)
class Caching:
    """Feature caching across steps (DeepCache, Ma et al. 2024) for one stage: at a full step the U-Net runs
    whole and keeps the input of its last `depth` up-blocks; at a shallow step only its embeddings, conv_in, its
    first `depth` down-blocks, those up-blocks (on the kept input) and its head run. Which steps are full, counted
    among the steps that run (k = 0, 1, ...): `refresh` where given, else every `interval`-th and the first
    `full_first`; a step outside `window` (lo <= t < hi), where given, is always full."""

    interval: int = 2
    depth: int = 1
    full_first: int = 0
    window: tuple[int, int] | None = None
    refresh: tuple[int, ...] | None = None  # explicit full steps, instead of the interval

    def full_at(self, k: int, timestep: int) -> bool:
        """Whether the k-th step that runs (at `timestep`) is a full step."""
        if self.window is not None and not self.window[0] <= timestep < self.window[1]:
            return True
        if self.refresh is not None:
            return k in self.refresh
        return k < self.full_first or k % self.interval == 0


CACHE_FIELDS = ("interval", "depth", "full_first", "window", "refresh")


def caching(value) -> Caching | None:
    """A stage's Caching from what a request or a preset gives: None, an interval (an int), a mapping of
    CACHE_FIELDS, or a Caching; InvalidRequestError naming the field otherwise."""
    if value is None or isinstance(value, Caching):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"interval": value}
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"cache takes an interval (a full step every N steps), a mapping of "
                                  f"{', '.join(CACHE_FIELDS)}, or one of those per stage; got {value!r}")
    unknown = sorted(set(value) - set(CACHE_FIELDS))
    if unknown:
        raise InvalidRequestError(f"cache has unknown field(s) {', '.join(unknown)}; it takes {', '.join(CACHE_FIELDS)}")
    for name in ("interval", "depth"):
        if name in value:
            _check_int(f"cache {name}", value[name], 1, MAX_STEPS)
    if "full_first" in value:
        _check_int("cache full_first", value["full_first"], 0, MAX_STEPS)
    window = value.get("window")
    if window is not None:
        _check_interval(window, "cache window")
        window = tuple(window)
    refresh = value.get("refresh")
    if refresh is not None:
        ok = isinstance(refresh, (list, tuple)) and refresh and all(
            isinstance(k, int) and not isinstance(k, bool) for k in refresh)
        if not ok or refresh[0] != 0 or any(a >= b for a, b in zip(refresh, refresh[1:])):
            raise InvalidRequestError(f"cache refresh must be the full steps' indices among the steps that run, "
                                      f"ascending and starting at 0 (the first step fills the cache), got {refresh!r}")
        refresh = tuple(refresh)
    return Caching(**{**value, "window": window, "refresh": refresh})


@dataclass(frozen=True)
class StageDefaults:
    """Defaults for one kind of stage: DeepFloyd IF's recommended fast settings."""

    steps: Steps
    guidance: float
    noise_level: int | None = None
    guidance_interval: tuple[int, int] | None = None  # None: guide every step
    scheduler: str | None = None  # a sampler name (SAMPLERS); None: the stage's own scheduler config
    cache: Caching | None = None  # feature caching across steps (a preset's); None: every step full

    @classmethod
    def for_stage(cls, kind: str, overrides: Mapping[str, Any] | None = None) -> "StageDefaults":
        """A stage kind's defaults (STAGE_DEFAULTS), with a model's own where it states them (cascade.json
        "defaults"); InvalidRequestError names a bad or unknown entry."""
        return STAGE_DEFAULTS[kind].merged(kind, overrides)

    def merged(self, kind: str, overrides: Mapping[str, Any] | None) -> "StageDefaults":
        """These defaults with `overrides` (a cascade.json entry: the model's defaults, or a preset's) over them;
        InvalidRequestError names a bad or unknown entry."""
        default = self
        if not overrides:
            return default
        if not isinstance(overrides, Mapping):
            raise InvalidRequestError(f"defaults must be a mapping of steps/guidance/noise_level, got {overrides!r}")
        allowed = {f.name for f in fields(self)} - ({"noise_level"} if default.noise_level is None else set())
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise InvalidRequestError(f"unknown defaults {unknown} for a {kind} stage; it takes {sorted(allowed)}")
        steps = overrides.get("steps", default.steps)
        interval = overrides.get("guidance_interval", default.guidance_interval)
        merged = replace(default, **{**overrides, "steps": list(steps) if isinstance(steps, (list, tuple)) else steps,
                                     "guidance_interval": None if interval is None else tuple(interval),
                                     "cache": caching(overrides.get("cache", default.cache))})
        _check_steps(merged.steps)
        _check_guidance(merged.guidance)
        if merged.noise_level is not None:
            _check_int("noise_level", merged.noise_level, 0, MAX_STEPS - 1)
        if merged.guidance_interval is not None:
            _check_interval(merged.guidance_interval)
        _check_scheduler(merged.scheduler)
        return merged


# "smart27" is DeepFloyd's 27-step respaced schedule, tuned for the 1000-step IF models: close to the quality
# of 100 evenly spaced steps at about a quarter of the cost. Guidance 7 / 4 and noise level 250 are IF's own.
# The x4 upscaler keeps StableDiffusionUpscalePipeline's defaults: 75 DDIM steps, guidance 9, noise level 20.
STAGE_DEFAULTS = {
    "base": StageDefaults(steps="smart27", guidance=7.0),
    "super_resolution": StageDefaults(steps="smart27", guidance=4.0, noise_level=250),
    "latent_upscaler": StageDefaults(steps=75, guidance=9.0, noise_level=20),
}


@dataclass(frozen=True)
class StageSettings:
    """Everything one stage needs to know about this request."""

    timesteps: int | list[int]  # a step count or an explicit descending timestep list
    guidance: float
    noise_level: int | None
    sampler: str | None  # None: the stage's own scheduler config decides
    # Guidance only at steps whose timestep t has lo <= t < hi (None: every step); elsewhere the conditional
    # half alone runs, at half the U-Net rows.
    guidance_interval: tuple[int, int] | None = None
    strength: float | None = None  # an edit's: how much of the schedule runs on the noised picture; None: none
    cache: Caching | None = None  # feature caching across steps; None: every step full

    @property
    def steps(self) -> int:
        """How many denoising steps: the count, or the explicit list's length."""
        return self.timesteps if isinstance(self.timesteps, int) else len(self.timesteps)

    @property
    def first_step(self) -> int:
        """The step an edit starts at, as diffusers' get_timesteps: the last int(steps x strength) steps run
        (the first of them noises the picture); 0 when the stage is not editing."""
        if self.strength is None:
            return 0
        return self.steps - min(int(self.steps * self.strength), self.steps)

    def guided_at(self, timestep: int) -> bool:
        """Whether the step at `timestep` runs classifier-free guidance (guidance > 1 and inside the interval)."""
        if self.guidance <= 1.0:
            return False
        return self.guidance_interval is None or self.guidance_interval[0] <= timestep < self.guidance_interval[1]


@dataclass(frozen=True)
class GenerateRequest:
    """One call to `Pipeline.generate`; validated on construction, before any model work.

    `steps`, `guidance` and `noise_level` take one value for every stage or a tuple with one per stage
    (for `noise_level`, one per stage after the base stage); None means each stage's default (`Stage.defaults`: the model's own, else
    STAGE_DEFAULTS). Classifier-free guidance runs when guidance > 1, as in
    diffusers; at 1 or below the unconditional half of the batch is dropped.

    `preset` names one of the model's presets (cascade.json "presets"): its per-stage settings replace the
    model's defaults; what the request gives itself still wins.

    `guidance_interval` (lo, hi) limits guidance to the steps whose timestep t has lo <= t < hi, in 0..1000
    (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample and distribution quality
    in diffusion models"); a step outside runs the conditional half only, at half the U-Net rows. (0, 1000) is
    full guidance, lo == hi none. One pair for every stage, or a tuple with a pair (or None) per stage.
    """

    prompt: str | list[str] | None
    negative_prompt: str | list[str] | None = None
    seed: int | None = None  # None: a fresh seed, drawn now (unless a generator is given)
    generator: object = None  # a CPU torch.Generator (or one per image), as diffusers takes it, instead of a seed
    num_images_per_prompt: int = 1
    steps: Steps | tuple[Steps, ...] | None = None
    guidance: float | tuple[float, ...] | None = None
    noise_level: int | tuple[int, ...] | None = None
    guidance_interval: tuple[int, int] | tuple[tuple[int, int] | None, ...] | None = None
    scheduler: str | None = None
    preset: str | None = None  # one of the model's named presets (Pipeline.presets): its settings under these
    output_type: str = "pil"
    # The picture to edit (a cascade that starts with a base stage), or to upscale (one that starts with an
    # upscaler); engine/images.py lists the forms.
    image: object = None
    mask_image: object = None  # inpainting: white (1) where the picture is redrawn; needs the picture to edit
    # The picture to edit for a cascade that starts with a super-resolution stage, as diffusers' IF
    # super-resolution edit pipelines take it (image= is then the low-res input).
    original_image: object = None
    # Edits: how far into the schedule the picture is noised, in (0, 1]: one value, or one per stage (None for
    # a stage's default: diffusers' 0.7 for a base stage, 1.0 inpainting, 0.8 for super-resolution).
    strength: float | tuple[float | None, ...] | None = None
    # Feature caching across steps (Caching): an interval, a mapping, or a tuple with one (or None) per stage
    cache: object = None
    prompt_embeds: object = None  # (B, L, D) text embeddings instead of prompt (e.g. cached T5 outputs)
    negative_prompt_embeds: object = None  # (B, L, D) instead of negative_prompt; needs prompt_embeds

    def __post_init__(self):
        self._check_prompts()
        batch = self.batch_size
        if self.negative_prompt is not None:
            negatives = _string_list(self.negative_prompt, "negative_prompt")
            if len(negatives) not in (1, batch):
                raise InvalidRequestError(f"negative_prompt has {len(negatives)} entries but prompt has "
                                          f"{batch}: give one negative prompt, or one per prompt")
        if self.generator is not None:
            _check_int("num_images_per_prompt", self.num_images_per_prompt, 1, None)
            _check_generator(self.generator, self.seed, self.batch_size * self.num_images_per_prompt)
        elif self.seed is None:
            object.__setattr__(self, "seed", fresh_seed())  # frozen: set once, here, and carried from now on
        else:
            _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("num_images_per_prompt", self.num_images_per_prompt, 1, None)
        for value in _values(self.steps, is_sequence=_is_steps_tuple):
            _check_steps(value)
        for value in _values(self.guidance):
            _check_guidance(value)
        for value in _values(self.noise_level):
            _check_int("noise_level", value, 0, MAX_STEPS - 1)
        for value in _values(self.guidance_interval, is_sequence=_is_interval_tuple):
            _check_interval(value)
        _check_scheduler(self.scheduler)
        if self.preset is not None and not isinstance(self.preset, str):
            raise InvalidRequestError(f"preset must be a preset's name, got {self.preset!r}")
        if self.image is not None:
            check_image(self.image)  # refuses a bad image now, before any model work (and converts no picture)
        for value in _values(self.strength):
            _check_strength(value)
        for value in _values(self.cache, is_sequence=lambda v: isinstance(v, tuple)):
            caching(value)
        edited = self.original_image if self.original_image is not None else self.image
        if edited is None and (self.mask_image is not None or self.strength is not None):
            raise InvalidRequestError(f"{'mask_image' if self.mask_image is not None else 'strength'} is for edits: "
                                      "give image= too, the picture to edit")
        if self.mask_image is not None or self.original_image is not None:
            edit_input(edited, self.mask_image)  # a bad mask or a size mismatch is refused now
        if self.output_type not in OUTPUT_TYPES:
            raise InvalidRequestError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {self.output_type!r}")

    def _check_prompts(self) -> None:
        if self.prompt_embeds is None:
            if self.prompt is None:
                raise InvalidRequestError("give a prompt (a string or a list of strings), or prompt_embeds")
            _string_list(self.prompt, "prompt")
            if self.negative_prompt_embeds is not None:
                raise InvalidRequestError("negative_prompt_embeds needs prompt_embeds: give both, or use "
                                          "prompt and negative_prompt")
            return
        if self.prompt is not None:
            raise InvalidRequestError("give prompt or prompt_embeds, not both")
        _check_embeddings("prompt_embeds", self.prompt_embeds)
        if self.negative_prompt_embeds is not None:
            if self.negative_prompt is not None:
                raise InvalidRequestError("give negative_prompt or negative_prompt_embeds, not both")
            _check_embeddings("negative_prompt_embeds", self.negative_prompt_embeds)
            if self.negative_prompt_embeds.shape != self.prompt_embeds.shape:
                raise InvalidRequestError(f"negative_prompt_embeds has shape {tuple(self.negative_prompt_embeds.shape)}"
                                          f" but prompt_embeds {tuple(self.prompt_embeds.shape)}: they must match")

    @property
    def batch_size(self) -> int:
        """Prompts in the request (rows of prompt_embeds where it has those instead)."""
        return len(self.prompts) if self.prompt_embeds is None else self.prompt_embeds.shape[0]

    @property
    def prompts(self) -> list[str] | None:
        """The prompts as a list; None where the request gives prompt_embeds instead."""
        return None if self.prompt is None else _as_list(self.prompt)  # checked in __post_init__

    @property
    def negative_prompts(self) -> list[str] | None:
        """One negative prompt per prompt, or None for the empty prompt (whose embedding is cached)."""
        if self.negative_prompt is None:
            return None
        negatives = _as_list(self.negative_prompt)  # checked in __post_init__
        return negatives * self.batch_size if len(negatives) == 1 else negatives

    def per_stage(self, defaults: Sequence[StageDefaults]) -> list[StageSettings]:
        """One StageSettings per stage of a cascade whose stages have these defaults (`Stage.defaults`).

        A tuple of noise levels has one value per stage that takes one (every stage but a base stage).
        """
        n = len(defaults)
        steps = _spread(self.steps, n, "steps", is_sequence=_is_steps_tuple)
        guidance = _spread(self.guidance, n, "guidance")
        intervals = _spread(self.guidance_interval, n, "guidance_interval", is_sequence=_is_interval_tuple)
        caches = _spread(self.cache, n, "cache", is_sequence=lambda v: isinstance(v, tuple))
        noisy = [default for default in defaults if default.noise_level is not None]
        noise = iter(_spread(self.noise_level, len(noisy), "noise_level", what="stages that take a noise level"))
        settings = []
        for default, s, g, gi, cache in zip(defaults, steps, guidance, intervals, caches):
            s = default.steps if s is None else s
            nl = None if default.noise_level is None else next(noise)
            settings.append(StageSettings(
                timesteps=named_timesteps(s) if isinstance(s, str) else (s if isinstance(s, int) else list(s)),
                guidance=float(default.guidance if g is None else g),
                noise_level=default.noise_level if nl is None else nl,
                sampler=self.scheduler or default.scheduler,
                guidance_interval=default.guidance_interval if gi is None else tuple(gi),
                cache=default.cache if cache is None else caching(cache),
            ))
        return settings


# diffusers' IF edit pipelines' default strength, by stage kind and whether a mask is given: IFImg2ImgPipeline
# 0.7, IFInpaintingPipeline 1.0, their super-resolution variants 0.8. An x4 upscaler does not edit: it upscales
# what the stages before it made, as diffusers' model card chains it.
DEFAULT_STRENGTH = {("base", False): 0.7, ("base", True): 1.0,
                    ("super_resolution", False): 0.8, ("super_resolution", True): 0.8}


def edit_strengths(strength, kinds: Sequence[str], masked: bool) -> list[float | None]:
    """Each stage's strength in an edit (None for a stage that does not edit): `strength` is one value, or one
    per editing stage (base and super-resolution), None for its default (DEFAULT_STRENGTH)."""
    editing = [(kind, masked) in DEFAULT_STRENGTH for kind in kinds]
    given = iter(_spread(strength, sum(editing), "strength", what="stages that edit (base and super-resolution)"))
    out = []
    for kind, edits in zip(kinds, editing):
        value = next(given) if edits else None
        out.append(None if not edits else DEFAULT_STRENGTH[kind, masked] if value is None else float(value))
    return out


def request_defaults() -> dict[str, object]:
    """Field name -> default, for the CLI (so defaults are written once, here)."""
    return {f.name: f.default for f in fields(GenerateRequest)
            if f.name not in ("prompt", "image", "mask_image", "original_image")}


def fresh_seed() -> int:
    """A new random seed for a request that names none (0..MAX_SEED, from the OS's randomness)."""
    return secrets.randbelow(MAX_SEED + 1)


# diffusers' names for request fields (the second door to the same engine): diffusers' name -> ours.
DIFFUSERS_NAMES = {"num_inference_steps": "steps", "timesteps": "steps", "guidance_scale": "guidance"}
# diffusers arguments the engine does not take, and what to do instead.
UNSUPPORTED_ARGUMENTS = {
    "height": "the image size is the model's own (each U-Net's sample size)",
    "width": "the image size is the model's own (each U-Net's sample size)",
    "eta": "DDIM runs with eta=0, diffusers' default",
    "clean_caption": "prompts are encoded as diffusers does with clean_caption=False; clean them yourself",
    "latents": "x_T is drawn from the seed or generator; give seed= or generator=",
    "callback": "give on_step=fn, called as fn(stage, step, total) after each U-Net step",
    "callback_steps": "give on_step=fn, called as fn(stage, step, total) after each U-Net step",
    "callback_on_step_end": "give on_step=fn, called as fn(stage, step, total) after each U-Net step",
    "cross_attention_kwargs": "attention is the backend's own (engine.load(..., attention=))",
}
CALL_OPTIONS = ("on_step",)  # Pipeline.generate/__call__ arguments that are not request fields


def closest_name(name: str, known) -> str:
    """"; did you mean 'x'?" for the known name nearest `name`, or the list of known names."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else f"; known: {', '.join(sorted(known))}"


def request_from_call(prompt, options: Mapping[str, Any]) -> GenerateRequest:
    """A GenerateRequest from keyword arguments in the engine's names or diffusers' (DIFFUSERS_NAMES).

    `timesteps` wins over `num_inference_steps`, as in diffusers; one of ours and its diffusers twin together
    (steps= and num_inference_steps=) is refused. Unknown names raise InvalidRequestError with the nearest one.
    """
    ours = {f.name for f in fields(GenerateRequest)} - {"prompt"}
    known = ours | set(DIFFUSERS_NAMES) | set(CALL_OPTIONS)
    kwargs: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for name in sorted(options, key=lambda n: n == "timesteps"):  # timesteps last: it wins over num_inference_steps
        value = options[name]
        if name in UNSUPPORTED_ARGUMENTS:
            raise InvalidRequestError(f"diffusers' {name}= is not supported: {UNSUPPORTED_ARGUMENTS[name]}")
        if name not in known or name in CALL_OPTIONS:
            raise InvalidRequestError(f"unknown argument {name!r}{closest_name(name, known - set(CALL_OPTIONS))}")
        target = DIFFUSERS_NAMES.get(name, name)
        if value is None:
            continue
        if target in kwargs and {given_as[target], name} != {"num_inference_steps", "timesteps"}:
            raise InvalidRequestError(f"{given_as[target]}= and {name}= say the same thing: give one")
        kwargs[target], given_as[target] = value, name
    return GenerateRequest(prompt, **kwargs)


# The HTTP API's (and batch files') request fields -> GenerateRequest's, where they differ.
API_FIELDS = {"n": "num_images_per_prompt", "mask": "mask_image"}
API_REQUEST_FIELDS = ("prompt", "negative_prompt", "n", "seed", "steps", "guidance", "noise_level", "scheduler",
                      "guidance_interval", "preset", "strength", "cache")


def request_from_api(fields: Mapping[str, Any], image=None, mask_image=None) -> GenerateRequest:
    """A GenerateRequest from the API's fields (API_REQUEST_FIELDS, JSON-typed: a list is one value per stage,
    as the Python API's tuple; a stage's own timestep list nests inside), and an edit's picture and mask as
    images (the caller reads them: an upload, a batch row's file). Other keys are the caller's to check;
    output_type passes through."""
    kwargs = {API_FIELDS.get(name, name): fields[name] for name in (*API_REQUEST_FIELDS, "output_type")
              if fields.get(name) is not None}
    kwargs.update({name: value for name, value in (("image", image), ("mask_image", mask_image)) if value is not None})
    for name in ("steps", "guidance", "noise_level", "strength", "cache"):
        if isinstance(kwargs.get(name), list):
            kwargs[name] = tuple(kwargs[name])
    interval = kwargs.get("guidance_interval")
    if isinstance(interval, list):  # [lo, hi] for every stage, or one [lo, hi] (or null) per stage
        per_stage = any(v is None or isinstance(v, list) for v in interval)
        kwargs["guidance_interval"] = (tuple(None if v is None else tuple(v) if isinstance(v, list) else v
                                             for v in interval) if per_stage else tuple(interval))
    return GenerateRequest(kwargs.pop("prompt", None), **kwargs)


def _check_generator(generator, seed, images: int) -> None:
    """One CPU torch.Generator for the whole request, or diffusers' list of them, one per image (prompts x n):
    image i then draws all its noise from generator[i]."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != images:
            raise InvalidRequestError(f"generator is a list of {len(generator)} but the request makes {images} "
                                      "image(s) (prompts x num_images_per_prompt): give one generator per image, "
                                      "as diffusers takes them, or one for the whole request")
        for one in generator:
            _check_generator(one, seed, 1)
        return
    if not isinstance(generator, torch.Generator):
        raise InvalidRequestError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise InvalidRequestError(f"generator is on {generator.device}; the engine draws its noise on the CPU, as "
                                  "diffusers does with a CPU generator: pass torch.Generator('cpu').manual_seed(s), "
                                  "or seed=s")
    if seed is not None:
        raise InvalidRequestError("give seed= or generator=, not both")


def _check_embeddings(name: str, value) -> None:
    if not isinstance(value, torch.Tensor) or value.ndim != 3 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InvalidRequestError(f"{name} must be a float tensor (batch, tokens, width), as diffusers' "
                                  f"encode_prompt returns, got {shape}")
    if value.shape[0] < 1:
        raise InvalidRequestError(f"{name} has no rows")


# C0 control characters, DEL and the C1 controls (U+0080-U+009F: U+0085 NEL, U+009B CSI, ...), except tab,
# newline and carriage return: nothing a prompt means by them.
_CONTROL = {chr(c) for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0))}


def _check_text(text: str, name: str) -> str:
    """Refuse text the tokenizer cannot take: invalid Unicode (a lone surrogate, as JSON's "\\ud800" decodes to)
    or control characters; refused here, before admission, so that no tokenizer error reaches a batch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{name} is not valid Unicode: a lone surrogate {text[exc.start]!r} at character "
                                  f"{exc.start}; send UTF-8 text") from None
    bad = next((i for i, c in enumerate(text) if c in _CONTROL), None)
    if bad is not None:
        raise InvalidRequestError(f"{name} holds the control character U+{ord(text[bad]):04X} at character {bad}")
    return text


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _string_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [_check_text(value, name)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return [_check_text(v, name) for v in value]
    if isinstance(value, (list, tuple)) and not value:
        raise InvalidRequestError(f"{name} is an empty list: give at least one string")
    raise InvalidRequestError(f"{name} must be a string or a non-empty list of strings, got {type(value).__name__}")


def _check_int(name: str, value, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise InvalidRequestError(f"{name} must be {bound}, got {value}")


def _check_guidance(value) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise InvalidRequestError(f"guidance must be a finite number >= 0, got {value!r}")


def _check_scheduler(name) -> None:
    if name is not None and name not in SAMPLERS:
        raise InvalidRequestError(f"unknown scheduler {name!r}; choose one of {', '.join(SAMPLERS)} "
                                  "(or leave it unset to use each stage's own scheduler config)")


def _check_strength(value) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= 1:
        raise InvalidRequestError(f"strength must be a number in (0, 1] (how much of the schedule redraws the "
                                  f"picture: 1 is all of it), got {value!r}")


def _check_interval(value, name: str = "guidance_interval") -> None:
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(t, int) and not isinstance(t, bool) for t in value))
    if not ok or not 0 <= value[0] <= value[1] <= MAX_STEPS:
        raise InvalidRequestError(f"{name} must be a pair of timesteps (lo, hi) with "
                                  f"0 <= lo <= hi <= {MAX_STEPS} (guidance where lo <= t < hi), got {value!r} "
                                  "(for one interval per stage, pass a tuple of pairs, e.g. ((0, 600), None))")


def _is_interval_tuple(value) -> bool:
    # One interval per stage: a sequence of pairs (or None); a pair of ints is one interval for every stage.
    return isinstance(value, (tuple, list)) and any(v is None or isinstance(v, (tuple, list)) for v in value)


def _check_steps(value) -> None:
    if isinstance(value, str):
        if value not in NAMED_SCHEDULES:
            raise InvalidRequestError(f"unknown schedule {value!r}; give a step count or one of "
                                      f"{', '.join(NAMED_SCHEDULES)}")
    elif isinstance(value, (list, tuple)):
        ok = value and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
        if not ok or any(a <= b for a, b in zip(value, value[1:])) or value[0] >= MAX_STEPS or value[-1] < 0:
            raise InvalidRequestError(f"a timestep list must be strictly descending integers in "
                                      f"0..{MAX_STEPS - 1}, got {value!r} (for one step count per stage, "
                                      "pass a tuple, e.g. steps=(27, 27))")
    else:
        _check_int("steps", value, 1, MAX_STEPS)


def _is_steps_tuple(value) -> bool:
    # A tuple of per-stage step values; a list of ints is one stage's explicit timesteps.
    return isinstance(value, tuple)


def _values(value, is_sequence=lambda v: isinstance(v, (tuple, list))) -> list:
    if value is None:
        return []
    return [v for v in value if v is not None] if is_sequence(value) else [value]


def _spread(value, n: int, name: str, is_sequence=lambda v: isinstance(v, (tuple, list)), what="stages") -> list:
    if not is_sequence(value):
        return [value] * n
    if len(value) != n:
        raise InvalidRequestError(f"{name} has {len(value)} values but the cascade has {n} {what}: "
                                  f"give one value, or one per stage")
    return list(value)


@dataclass(frozen=True)
class Preset:
    """A named set of generation settings the model ships (cascade.json "presets"), with the quality gate's
    verdict on it: {"fast": {"stages": {"stage_I": {"steps": 10, ...}, ...}, "certified": {"adherence": ...}}}."""

    stages: list  # per stage, in cascade order: its settings over the model's defaults, or None
    certified: dict  # what `python -m engine eval` measured for it (adherence, captions, seconds per image, ...)

    def to_json(self, stage_names: list[str]) -> dict:
        return {"stages": {n: s for n, s in zip(stage_names, self.stages) if s}, "certified": self.certified}
