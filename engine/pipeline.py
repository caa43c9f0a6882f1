"""The cascade: encode the prompt once per text encoder, run the stages in order, return images.

IF's stages share stage I's T5 encoder (`Pipeline.text`); an x4 upscaler stage brings its own CLIP encoder
(`stage.text`). Each encoder runs once per request, for the stages that use it.

`Pipeline.generate` is the public call and returns the images; `pipe(...)` is the same call through diffusers'
door (diffusers' argument names work too) and returns a `Generation`: `.images`, the `.seed` that draws them
again, per-stage `.timings`. `Pipeline.run` takes a ready `GenerateRequest`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace

import torch

from engine import offload
from engine.errors import InvalidRequestError
from engine.executor import bucket
from engine.images import EditInput, ModelRange, edit_input, edit_size, from_model_range, to_model_range
from engine.options import GenerateRequest, Preset, StageSettings, edit_strengths, request_from_call
from engine.stage import Conditioning, Edit, Stage, StageRun, timed
from engine.text import TextEncoder

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """The images of one request, the seed that draws them again, and where the time went (seconds, device
    synchronised per stage). Shaped like diffusers' IFPipelineOutput where the two overlap."""

    images: object  # list[PIL.Image] | np.ndarray (B, H, W, 3) float32 | torch.Tensor (B, 3, H, W) float32
    timings: dict[str, float] = field(default_factory=dict)
    seed: int | None = None  # None when the request gave a generator instead
    # No safety checker or watermarker runs (README): None, as diffusers reports with safety_checker=None.
    nsfw_detected: None = None
    watermark_detected: None = None
    # (B, 3, H, W) the last stage's output in the model's range (about [-1, 1]), before output_type's scaling:
    # what diffusers' IF stages return for output_type="pt" (the door hands it on as theirs do).
    model_output: object = field(default=None, repr=False)

    def to_tuple(self) -> tuple:
        """diffusers' BaseOutput.to_tuple: its fields that are not None (here: the images)."""
        return tuple(v for v in (self.images, self.nsfw_detected, self.watermark_detected) if v is not None)

    def __getitem__(self, key):
        """out[0] (the images) and out["images"], as diffusers' outputs index."""
        if isinstance(key, str):
            if key not in ("images", "nsfw_detected", "watermark_detected") or getattr(self, key) is None:
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


class Pipeline:
    def __init__(self, text: TextEncoder, stages: list[Stage], device: torch.device, dtype: torch.dtype,
                 source: str = "", notice: str | None = None, run_context=None, backend: str = "torch"):
        self.text = text
        self.stages = stages
        self.device = device
        self.dtype = dtype
        self.backend = backend  # the name of the backend that runs its components ("torch", "onnxruntime", ...)
        self.source = source  # what it was loaded from, for messages
        self.notice = notice  # something the user must know about this model (e.g. random weights)
        self.run_context = run_context or contextlib.nullcontext  # a backend's setup around each run
        # Named presets, name -> options.Preset; each stage holds its settings. Written by add_preset only.
        self.presets: dict[str, Preset] = {}
        self.progress_bar_config: dict = {}  # the door's tqdm options (set_progress_bar_config)
        self.reload = None  # (device=, dtype=) -> the same model loaded again; engine.load sets it (pipe.to)
        self.offloader = None  # engine/offload.py's, where the models wait in host memory between their phases

    @property
    def image_size(self) -> int | None:
        """Side of the output images; None when the input image decides (a cascade that starts with an upscaler)."""
        return self.output_sizes()[-1]

    def output_sizes(self) -> list[int | None]:
        """Side of each stage's output images (None where the input image decides)."""
        sizes, size = [], None
        for stage in self.stages:
            size = stage.output_size(size)
            sizes.append(size)
        return sizes

    def __repr__(self) -> str:
        sizes = " -> ".join(f"{s.name}({s.kind}, {f'{size}px' if size else 'x' + str(s.decoder.scale)})"
                            for s, size in zip(self.stages, self.output_sizes()))
        return f"Pipeline({sizes}, device={self.device}, dtype={self.dtype}, source={self.source!r})"

    def generate(self, prompt=None, on_step=None, **options):
        """Images for `prompt` (a string or a list of strings); options as in `GenerateRequest`, or by
        diffusers' names; on_step(stage, step, total) is called after each U-Net step."""
        return self.run(request_from_call(prompt, options), on_step=on_step).images

    def __call__(self, prompt=None, on_step=None, return_dict: bool = True, **options):
        """diffusers' door: as `generate`, returning the Generation (images, seed, timings), as diffusers'
        pipelines return an output with `.images` (also out[0]), or with return_dict=False their tuple
        (images, nsfw_detected, watermark_detected): pipe("a corgi", num_inference_steps=(50, 25),
        guidance_scale=7.0, generator=g). As theirs, it shows a progress bar per stage
        (set_progress_bar_config), and output_type="pt" gives an IF stage's output unscaled, in about [-1, 1]
        (an x4 upscaler's in [0, 1], as StableDiffusionUpscalePipeline's), and image= takes such tensors back:
        stage_2(image=stage_1(..., output_type="pt").images, ...), as the DeepFloyd model card chains them."""
        for name in ("image", "original_image"):
            image = options.get(name)
            if isinstance(image, torch.Tensor) and (self.stages[0].kind != "latent_upscaler" or image.min() < 0):
                # diffusers' convention for image tensors: IF stages take them in [-1, 1] as they are (a
                # super-resolution stage the previous stage's output, unclamped); the x4 upscaler takes [0, 1],
                # or [-1, 1] where a value is negative. The engine's own calls take [0, 1].
                options = {**options, name: ModelRange(image)}
        request = request_from_call(prompt, options)
        generation = self.run(request, progress={"leave": False, **self.progress_bar_config}, on_step=on_step)
        if request.output_type == "pt" and self.stages[-1].kind != "latent_upscaler":
            generation.images = generation.model_output
        if not return_dict:
            return generation.images, generation.nsfw_detected, generation.watermark_detected
        return generation

    def to(self, *args, device=None, dtype=None, **diffusers_options) -> "Pipeline":
        """diffusers' pipe.to(device), .to(dtype), .to(device, dtype): this pipeline, in place, on that device
        and in that dtype; returns it. The model is loaded again from where engine.load read it (the fast
        path's buffers and compiled calls, and an export's sessions, are made for one device and dtype); the
        presets added with add_preset and the progress bar options are kept."""
        unknown = set(diffusers_options) - {"silence_dtype_warnings"}
        if unknown:
            raise InvalidRequestError(f"unknown argument {sorted(unknown)[0]!r} to pipe.to(device, dtype)")
        for arg in args:
            if isinstance(arg, torch.dtype) and dtype is None:
                dtype = arg
            elif isinstance(arg, (str, torch.device)) and device is None:
                device = arg
            else:
                raise InvalidRequestError(f"pipe.to takes a device and a dtype, got {arg!r}")
        same_device = device is None or torch.device(device) == self.device or (
            torch.device(device).type == self.device.type and torch.device(device).index is None)
        if same_device and (dtype is None or dtype == self.dtype):
            return self
        if self.reload is None:
            raise InvalidRequestError("this pipeline was not made by engine.load, so it cannot be loaded again on "
                                      "another device: build it there (engine.load(..., device=, dtype=))")
        fresh = self.reload(device=self.device if device is None else device,
                            dtype=self.dtype if dtype is None else dtype)
        for name, preset in self.presets.items():
            if name not in fresh.presets:
                fresh.add_preset(name, preset.stages, preset.certified)
        fresh.progress_bar_config = self.progress_bar_config
        self.__dict__.update(fresh.__dict__)
        return self

    def enable_model_cpu_offload(self, gpu_id=None, device="cuda") -> None:
        """diffusers' offload: each model in host memory, on the GPU only while it runs (engine/offload.py;
        engine.load(..., offload="model") is the same from the start). On a pipeline that runs on the CPU, where
        its models already are, nothing is done."""
        self._offload("enable_model_cpu_offload", "model")

    def enable_sequential_cpu_offload(self, gpu_id=None, device="cuda") -> None:
        """diffusers' submodule-by-submodule offload: every layer streamed to the GPU as it runs (offload="sequential")."""
        self._offload("enable_sequential_cpu_offload", "sequential")

    def _offload(self, method: str, mode: str) -> None:
        if self.device.type == "cpu":
            log.info("%s(): this pipeline runs on the CPU, where its models already are: nothing to offload", method)
            return
        if self.offloader is not None:
            if self.offloader.mode == mode:
                return
            raise InvalidRequestError(f"{method}(): this pipeline is offloaded already (offload="
                                      f"{self.offloader.mode!r}): load it again to change that")
        self.offloader = offload.install(self, mode)

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """diffusers' switch to xformers' attention: nothing to do, the backend's attention is already fused
        (engine.load(..., attention=)); kept so that code written for diffusers runs."""
        log.info("enable_xformers_memory_efficient_attention(): attention is the backend's own; nothing to do")

    # The components diffusers' IF pipelines carry and the engine does not run (model cards pass them on).
    safety_checker = feature_extractor = watermarker = None

    def set_progress_bar_config(self, **tqdm_options) -> None:
        """The door's progress bars' tqdm options, as diffusers takes them (disable=True turns them off)."""
        self.progress_bar_config.update(tqdm_options)

    @torch.inference_mode()
    def encode_prompt(self, prompt, do_classifier_free_guidance: bool = True, num_images_per_prompt: int = 1,
                      device=None, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                      clean_caption: bool = False):
        """diffusers' IF encode_prompt: (prompt_embeds, negative_prompt_embeds or None), each (B x n, 77, D), in
        the U-Nets' dtype on the pipeline's device; what `prompt_embeds=` / `negative_prompt_embeds=` take (with
        num_images_per_prompt=1 there). Given embeddings pass through, repeated as diffusers repeats them."""
        if clean_caption:
            raise InvalidRequestError("clean_caption=True is not supported: prompts are encoded as diffusers does "
                                      "with clean_caption=False; clean them yourself")
        if device is not None and torch.device(device) != self.device:
            raise InvalidRequestError(f"this pipeline runs on {self.device}; encode there (device=None) or move it "
                                      "with pipe.to(...)")
        if prompt_embeds is None:
            if prompt is None:
                raise InvalidRequestError("give a prompt (a string or a list of strings), or prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self.text.encode(prompts)
        batch = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                negative_prompt_embeds = self.text.empty().expand(batch, -1, -1)
            else:
                negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
                if len(negatives) != batch:
                    raise InvalidRequestError(f"negative_prompt has {len(negatives)} prompt(s) for {batch} prompt(s)")
                negative_prompt_embeds = self.text.encode(negatives)
        if not do_classifier_free_guidance:
            negative_prompt_embeds = None
        repeat = (lambda e: None if e is None else e.repeat_interleave(num_images_per_prompt, dim=0).contiguous())
        return repeat(prompt_embeds), repeat(negative_prompt_embeds)

    @property
    def components(self) -> dict:
        """The pipeline's parts by diffusers' names: tokenizer, text_encoder, and each stage's unet and
        scheduler (its scheduler config: the engine makes a sampler per request from it), prefixed by the
        stage's name in a cascade ("stage_II.unet"); safety_checker, feature_extractor and watermarker are
        None (none runs). A U-Net is the backend's (for torch, its module is .model)."""
        parts = {"tokenizer": self.text.tokenizer, "text_encoder": self.text.model}
        for stage in self.stages:
            prefix = "" if len(self.stages) == 1 else f"{stage.name}."
            parts[f"{prefix}unet"] = stage.unet
            parts[f"{prefix}scheduler"] = stage.scheduler_config
        return {**parts, "safety_checker": None, "feature_extractor": None, "watermarker": None}

    def run(self, request: GenerateRequest, progress: bool = False, on_step=None) -> Generation:
        with self.run_context():
            return self._run(request, progress, on_step)

    @torch.inference_mode()
    def _run(self, request: GenerateRequest, progress: bool, on_step) -> Generation:
        walk = CascadeRun(self, request)
        walk.begin()
        while not walk.done:
            stage = walk.stage

            def whole_stage():
                run = walk.start_stage()
                stage.denoise(run, progress, on_step)
                walk.finish_stage(run)

            _, walk.timings[stage.name] = timed(self.device, whole_stage)
        return walk.result()

    def warmup(self, images=(1,), scheduler_rows=(), caching=None, **options) -> dict[str, float]:
        """Compile and capture what a deployment will run, before its first request; returns seconds per part.

        A generation per image count in `images` (options as `generate` takes them: steps, guidance, preset...)
        makes each stage's single-run buffers for that shape (executor.StepRunner; compiled, and on CUDA
        captured, where the U-Nets are static). For the step-level scheduler (engine.serve, engine.batch), the
        static buffers of each row bucket that row counts in `scheduler_rows` run at (executor.bucket), for each
        base and super-resolution stage (an x4 stage's size is its input's), and for each step kind a request
        can run there: the plain call, and the full and shallow calls of each caching depth in `caching`, lists of
        per-stage settings (pipe.settings(request) or a preset's; None: every preset of the model's). Eager
        U-Nets have nothing to make: this then costs only those generations."""
        timings = {}
        for n in images:
            _, timings[f"generate, {n} image(s)"] = timed(
                self.device, lambda: self.generate("warm-up", num_images_per_prompt=n, output_type="pt", **options))
        if caching is None:
            caching = [[stage.presets[name] for stage in self.stages] for name in self.presets]
        for index, stage in enumerate(self.stages):
            if not stage.executor.static or stage.kind == "latent_upscaler":
                continue
            embeddings = self.encoder(stage).empty()  # (1, 77, D): conditioning rows as requests give them
            depths = sorted({per_stage[index].cache.depth for per_stage in caching
                             if per_stage[index].cache is not None})
            kinds = [("unet", 0)] + [(kind, depth) for depth in depths for kind in ("full", "shallow")]
            for rows in sorted({bucket(r) for r in scheduler_rows}):
                for kind in kinds:
                    name = f"{stage.name} U-Net, {rows} rows" + ("" if kind[0] == "unet" else f", {kind[0]} {kind[1]}")
                    _, timings[name] = timed(self.device, stage.executor.warmup, rows, embeddings, kind)
        return timings

    def settings(self, request: GenerateRequest) -> list[StageSettings]:
        """The request's settings for each stage, checked against each stage's model (before any model work)."""
        settings = request.per_stage(self.stage_defaults(request.preset))
        if self.edited_image(request) is not None:
            strengths = edit_strengths(request.strength, [s.kind for s in self.stages], request.mask_image is not None)
            settings = [replace(s, strength=strength) for s, strength in zip(settings, strengths)]
        for stage, stage_settings in zip(self.stages, settings):
            stage.validate(stage_settings)
            if stage_settings.first_step == stage_settings.steps:
                raise InvalidRequestError(
                    f"strength {stage_settings.strength} of {stage.name}'s {stage_settings.steps} steps runs none "
                    f"(int(steps x strength) = 0): raise the strength or the steps")
        self._check_embeddings(request)
        return settings

    def add_preset(self, name: str, stages, certified: dict | None = None) -> None:
        """Name a set of settings: `stages` holds, per stage in cascade order, its settings over the model's
        defaults ({"steps": 10, "guidance_interval": [200, 700], ...}) or None for its defaults; `certified`,
        what the quality gate measured for it. Then generate(..., preset=name), as for the model's own
        (cascade.json "presets", which loading adds through this too). InvalidRequestError for a setting a
        stage cannot take; the pipeline is left as it was."""
        stages = list(stages)
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"a preset's name must be a non-empty string, got {name!r}")
        if len(stages) != len(self.stages):
            raise InvalidRequestError(f"preset {name!r} gives settings for {len(stages)} stage(s); this cascade has "
                                      f"{len(self.stages)} ({', '.join(s.name for s in self.stages)}): give one "
                                      "dict (or None) per stage")
        merged = []
        for stage, overrides in zip(self.stages, stages):
            try:
                merged.append(stage.defaults.merged(stage.kind, overrides))
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"preset {name!r} for {stage.name}: {exc}") from exc
        for stage, settings in zip(self.stages, merged):
            stage.presets[name] = settings
        self.presets[name] = Preset(stages, dict(certified or {}))

    def stage_defaults(self, preset: str | None = None) -> list:
        """Each stage's defaults: the model's own, or a named preset's (InvalidRequestError for an unknown one)."""
        if preset is None:
            return [s.defaults for s in self.stages]
        if preset not in self.presets:
            known = ", ".join(self.presets) or "none"
            raise InvalidRequestError(f"preset {preset!r} is not one of this model's presets: {known}")
        return [s.presets[preset] for s in self.stages]

    def _check_embeddings(self, request: GenerateRequest) -> None:
        if request.prompt_embeds is None:
            return
        own = [s.name for s in self.stages if s.text is not None and s.text is not self.text]
        if own:
            raise InvalidRequestError(f"{', '.join(own)} encode(s) the prompt with their own text encoder: give "
                                      "prompt= (prompt_embeds are the first text encoder's only)")
        width = request.prompt_embeds.shape[-1]
        if width != self.text.dim:
            raise InvalidRequestError(f"prompt_embeds are {width} wide but this model's text encoder gives "
                                      f"{self.text.dim}: embeddings from another model?")

    def edited_image(self, request: GenerateRequest):
        """The picture a request edits, as given (None: not an edit): image= for a cascade that starts with a base
        stage, original_image= for one that starts with a super-resolution stage (as diffusers' IF
        super-resolution edit pipelines take it); an x4 upscaler does not edit."""
        first = self.stages[0]
        if request.original_image is not None and first.kind != "super_resolution":
            what = "image= is the picture to edit" if first.kind == "base" else "it upscales, and does not edit"
            raise InvalidRequestError(f"original_image= is for a cascade that starts with a super-resolution stage; "
                                      f"this one starts with {first.name} ({first.kind}): {what}")
        edited = request.image if first.kind == "base" else request.original_image
        if edited is None and (request.mask_image is not None or request.strength is not None):
            field = "mask_image" if request.mask_image is not None else "strength"
            fix = {"base": "give image=, the picture to edit",
                   "super_resolution": f"give the picture to edit as original_image= ({first.name} takes image= "
                                       "as its low-res input)"}.get(first.kind, "an x4 upscaler does not edit")
            raise InvalidRequestError(f"{field} is for edits: {fix}")
        return edited

    def edit_input(self, request: GenerateRequest, settings: list[StageSettings]) -> EditInput | None:
        """The request's edit (its picture and mask, checked: 1 or one per prompt, sizes each stage with
        `settings` can take), or None."""
        edited = self.edited_image(request)
        if edited is None:
            return None
        edit = edit_input(edited, request.mask_image)
        for name, parts in (("image", edit.images), ("mask_image", edit.masks)):
            if parts is not None and len(parts) not in (1, request.batch_size):
                raise InvalidRequestError(f"got {len(parts)} {name}s for {request.batch_size} prompts: give one, "
                                          "or one per prompt")
        for stage, stage_settings in zip(self.stages, settings):
            if stage_settings.strength is not None:
                width, height = edit_size(*edit.size, stage.size)
                stage.validate_edit_size((height, width))
        return edit

    def input_image(self, request: GenerateRequest) -> torch.Tensor | None:
        """The request's image, (B * n, 3, H, W) in [-1, 1] on the device, for a cascade that starts with an
        upscaler (None for one that starts with a base stage: there image= is the picture to edit)."""
        first = self.stages[0]
        if first.kind == "base":
            return None
        if request.image is None:
            raise InvalidRequestError(f"{first.name} ({first.kind}) upscales an image: pass image= (a PIL image, "
                                      "or [0, 1] arrays as output_type 'np'/'pt' give)")
        image = to_model_range(request.image)
        if len(image) != request.batch_size:
            raise InvalidRequestError(f"got {len(image)} images for {request.batch_size} prompts: give one image "
                                      "per prompt")
        first.validate_input_size(image.shape[-2:])
        return image.repeat_interleave(request.num_images_per_prompt, dim=0).to(self.device)

    def encoder(self, stage: Stage) -> TextEncoder:
        return stage.text or self.text

    def conditioning(self, request: GenerateRequest, settings) -> dict[TextEncoder, Conditioning]:
        """Each encoder's conditioning, repeated per image; the unconditional half only where a stage guides."""
        guides: dict[TextEncoder, bool] = {}
        for stage, stage_settings in zip(self.stages, settings):
            encoder = self.encoder(stage)
            guides[encoder] = guides.get(encoder, False) or stage_settings.guidance > 1.0
        n = request.num_images_per_prompt
        return {encoder: self._encode(encoder, request, guided).repeat_interleave(n)
                for encoder, guided in guides.items()}

    def _encode(self, encoder: TextEncoder, request: GenerateRequest, guided: bool) -> Conditioning:
        given = request.prompt_embeds is not None and encoder is self.text  # the caller's cached embeddings

        def cast(embeds):  # (B, L, D) as the caller gave them -> the U-Nets' device and dtype
            return embeds.to(device=encoder.device, dtype=encoder.output_dtype)

        cond = cast(request.prompt_embeds) if given else encoder.encode(request.prompts)  # (B, 77, D)
        if not guided:
            return Conditioning(cond, None)
        negatives = request.negative_prompts
        if given and request.negative_prompt_embeds is not None:
            uncond = cast(request.negative_prompt_embeds)
        elif negatives is None:
            uncond = encoder.empty().expand(request.batch_size, -1, -1)
        else:
            uncond = encoder.encode(negatives)
        return Conditioning(cond, uncond)


class CascadeRun:
    """One request's walk through the cascade, the one place it is written.

    Made from a request, it holds the request's settings and input image, both checked then (before any model
    work). `begin` encodes the prompt once per text encoder and seeds the request's generator; then each stage
    in order is started (`start_stage`, a StageRun with all its random draws made), stepped by the caller and
    finished (`finish_stage`: its output goes to the next stage). `Pipeline.run` walks one to the end; the
    step-level scheduler (engine/serve/scheduler.py) walks many together, a U-Net call at a time.
    """

    def __init__(self, pipeline: Pipeline, request: GenerateRequest):
        self.pipeline = pipeline
        self.request = request
        self.settings = pipeline.settings(request)
        self.image = pipeline.input_image(request)  # the previous stage's output, or the request's own image
        self.edit = pipeline.edit_input(request, self.settings)  # the picture to edit and its mask, or None
        self.index = 0  # the stage it is in, or waits for
        self.timings: dict[str, float] = {}  # seconds: "text", then per stage
        self.conditioning: dict[TextEncoder, Conditioning] | None = None
        self.generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.index == len(self.pipeline.stages)

    @property
    def stage(self) -> Stage:
        return self.pipeline.stages[self.index]

    def begin(self) -> None:
        """Encode the prompt (once per text encoder) and seed the generator, as the first stage starts."""
        self.conditioning, self.timings["text"] = timed(
            self.pipeline.device, self.pipeline.conditioning, self.request, self.settings)
        self.generator = self.request.generator or torch.Generator("cpu").manual_seed(self.request.seed)

    def start_stage(self) -> StageRun:
        stage, settings = self.stage, self.settings[self.index]
        text = self.conditioning[self.pipeline.encoder(stage)]
        edit = None if settings.strength is None else self._edit(stage)
        return stage.start(text, self.image, settings, self.generator, edit)

    def _edit(self, stage: Stage) -> Edit:
        """The edit's picture and mask sized for `stage`, one row per image (prompts x n), on its device."""
        n, prompts = self.request.num_images_per_prompt, self.request.batch_size

        def per_image(tensor, dtype):  # (1 or prompts, C, h, w) -> (prompts x n, C, h, w)
            tensor = tensor.expand(prompts, *tensor.shape[1:]) if len(tensor) == 1 else tensor
            return tensor.repeat_interleave(n, dim=0).to(device=stage.device, dtype=dtype)

        image, mask = self.edit.at(stage.size)
        return Edit(per_image(image, stage.dtype), None if mask is None else per_image(mask, torch.float32))

    def finish_stage(self, run: StageRun) -> None:
        """Take the finished run's output (NumericalError on NaN or inf) and move on to the next stage."""
        self.image = run.result()
        self.index += 1

    def result(self) -> Generation:
        return Generation(from_model_range(self.image, self.request.output_type), self.timings,
                          seed=self.request.seed, model_output=self.image)
