"""``Engine``: one loaded pipeline, and the one way to run a Seedream-style job on it.

``generate`` is a numbered recipe in the manner of a diffusers ``__call__``. Requests above the
model's native cap are generated at the cap (same aspect) and upscaled; ``maxImages`` gives
distinct images (one seed each, never a grid); progress and cancel ride ``callback_on_step_end``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

from dreamserve.engine.loader import load_pipeline, resolve_device, resolve_dtype
from dreamserve.engine.preview import LatentPreview, Previewer, TinyDecoderPreview, denoised_estimate
from dreamserve.engine.upscale import ModelUpscaler, upscale
from dreamserve.jobs import (
    FailedImage,
    GeneratedImage,
    GenerationJob,
    GenerationResult,
    Interrupted,
    OnImage,
    OnStep,
    ShouldStop,
    StepInfo,
    generate_alone,
)
from dreamserve.presets import ResolvedModel, resolve
from dreamserve.settings import ModelSpec

#: Families whose pipeline takes a list of reference images as ``image``, and those that take one image.
MULTI_REFERENCE = {"klein", "flux2", "qwen-edit-plus"}
SINGLE_REFERENCE = {"qwen-edit", "kontext"}
#: With more references than this, each is shrunk to REFERENCE_AREA pixels to bound the token count.
MANY_REFERENCES = 4
REFERENCE_AREA = 512 * 512
SIZE_MULTIPLE = 16
#: VAEs decode tile by tile above this side (FLUX-class VAEs run out of memory decoding above 2048 px).
TILED_DECODE_ABOVE = 2048
#: On an accelerator, batches of images of at least this many pixels are decoded one image at a time; on a CPU,
#: every batch is (``_configure_decode``).
SLICED_DECODE_FROM = 1024 * 1024

#: Ark's outputs are JPEG; this quality keeps them close to the PNG at a fraction of the bytes.
JPEG_QUALITY = 95
IMG2IMG_STRENGTH = 0.6
log = logging.getLogger(__name__)


@dataclass
class _Call:
    """A planned pipeline call: the callable, the steps it is asked for and the steps it reports."""

    run: Callable[..., Any]
    steps: int
    reported_steps: int
    method: str


@dataclass
class _Group:
    """A group's state while its batches run: each job's outcome once it ended, its finished images, its steps."""

    jobs: list[GenerationJob]
    batches: list[list[tuple[int, int]]]
    steps_per_batch: int
    outcome: list[GenerationResult | Exception | None] = field(init=False)
    done: dict[int, list[GeneratedImage | FailedImage]] = field(init=False)
    steps_of: dict[int, int] = field(init=False)
    steps_done: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.outcome = [None] * len(self.jobs)
        self.done = {index: [] for index in range(len(self.jobs))}
        self.steps_of = {index: self.steps_per_batch * self._batches_of(index) for index in self.done}
        self.steps_done = dict.fromkeys(self.done, 0)

    def _batches_of(self, index: int) -> int:
        return sum(any(i == index for i, _ in batch) for batch in self.batches)

    def live(self, batch: list[tuple[int, int]], should_stop: ShouldStop) -> tuple[list[tuple[int, int]], list[int]]:
        """The images of a batch still wanted (their job neither ended nor stopped), and those jobs."""
        live = [(i, seed) for i, seed in batch if self.outcome[i] is None and not should_stop(i)]
        return live, sorted({i for i, _ in live})

    def advance(self, members: list[int], should_stop: ShouldStop) -> None:
        """A batch is done: its jobs' steps move on, and a job asked to stop is interrupted."""
        for index in members:
            self.steps_done[index] += self.steps_per_batch
        for index in range(len(self.jobs)):
            if self.outcome[index] is None and should_stop(index):
                self.outcome[index] = Interrupted()


class Engine:
    def __init__(self, spec: ModelSpec, pipeline: Any, family: str, load_seconds: float) -> None:
        self.spec = spec
        #: The spec made concrete (preset expanded, defaults of the family filled in).
        self.model = resolve(spec, family)
        self.pipeline = pipeline
        self.family = family
        self.device = resolve_device(spec)
        self._img2img: Any = None
        self._kv: Any = None
        #: Finishes each denoised batch's images (``_finish_batch``) while the next batch denoises.
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish")
        started = time.perf_counter()
        self.upscaler = (
            ModelUpscaler(spec.upscaler, self.device, resolve_dtype(spec, self.device)) if spec.upscaler else None
        )
        self.previewer: Previewer | None = None
        if spec.preview_every and spec.preview_decoder:
            self.previewer = TinyDecoderPreview.load(spec.preview_decoder, pipeline, family)
        elif spec.preview_every:
            cache = Path(spec.preview_cache_dir) if spec.preview_cache_dir else None
            self.previewer = LatentPreview.for_pipeline(pipeline, family, cache)
        #: Seconds to load the model (and its upscaler and preview map); reported with the first job after it.
        self.load_seconds = load_seconds + time.perf_counter() - started
        self._load_reported = False

    @classmethod
    def load(cls, spec: ModelSpec) -> Engine:
        started = time.perf_counter()
        pipeline, family = load_pipeline(spec, layout_in_background=True)
        return cls(spec, pipeline, family, time.perf_counter() - started)

    @property
    def steps(self) -> int:
        return self.model.steps

    def generate(
        self,
        job: GenerationJob,
        on_step: Callable[[StepInfo], None],
        should_stop: Callable[[], bool],
        on_image: Callable[[GeneratedImage | FailedImage], None] | None = None,
    ) -> GenerationResult:
        """Run one job (text-to-image, or editing with its references)."""
        return generate_alone(self.generate_group, job, on_step, should_stop, on_image)

    def generate_group(
        self,
        jobs: list[GenerationJob],
        on_step: OnStep,
        should_stop: ShouldStop,
        on_image: OnImage | None = None,
    ) -> list[GenerationResult | Exception]:
        """Run several jobs of one size in shared pipeline calls: the images of all jobs are denoised together,
        ``max_batch`` per call, one prompt and one seeded generator per image.

        Only a single job may carry references. ``on_step(i, info)`` reports job ``i``'s progress (with a preview
        every ``preview_every`` steps); a job whose ``should_stop(i)`` turns true gets ``Interrupted`` and no
        more files while the others go on. Each image is finished (upscaled, marked, saved) as soon as its batch
        is denoised, in a thread of the engine's while the next batch denoises, and reported to
        ``on_image(i, image)`` from that thread, so a client can have it before the group ends; an image that
        cannot be finished is reported as a ``FailedImage`` and the job's next images still come. Every image is
        reported before this returns or raises.
        Returns, per job, its result or the exception that ended it (every image failed).
        """
        # 1. Check inputs.
        _check_group(jobs)
        first = jobs[0]
        started = time.perf_counter()

        # 2. Plan sizes and batches: every image of every job, max_batch per pipeline call.
        size = native_size(first.width, first.height, self.model.max_pixels)
        images = [(index, job.seed + n) for index, job in enumerate(jobs) for n in range(job.num_images)]
        batches = [images[i : i + self.spec.max_batch] for i in range(0, len(images), self.spec.max_batch)]
        method = describe(size[0], size[1], first.width, first.height, self.upscaler)

        # 3. Load references (the first max_references of them; shrunk when there are many).
        call = self._reference_call(first, size, method)

        # 4. Denoise, batch by batch, one seed per image; each batch finished while the next one denoises.
        timings = {"encode": time.perf_counter() - started, "denoise": 0.0, "decode": 0.0, "upscale": 0.0, "save": 0.0}
        group = _Group(jobs, batches, call.reported_steps)
        finishing: list[Future[None]] = []
        try:
            for batch in batches:
                finishing += self._run_batch(call, group, batch, size, timings, started, on_step, should_stop, on_image)
        finally:
            wait(finishing)  # every image announced before the group's outcome is, even when a batch failed
        for finished in finishing:
            finished.result()

        # 5. Each job's result: its saved images, and those that failed.
        return self._finish_all(jobs, group.outcome, group.done, call.method, timings)

    def _run_batch(
        self,
        call: _Call,
        group: _Group,
        batch: list[tuple[int, int]],
        size: tuple[int, int],
        timings: dict[str, float],
        started: float,
        on_step: OnStep,
        should_stop: ShouldStop,
        on_image: OnImage | None,
    ) -> list[Future[None]]:
        """Denoise one batch, and hand its images to the finishing thread (none when its jobs all stopped)."""
        live, members = group.live(batch, should_stop)
        finishing = []
        if live:
            report = self._reporter(group, live, members, size, on_step)
            stop_all = lambda: all(should_stop(i) for i in members)  # noqa: E731
            prompts, seeds = [group.jobs[i].prompt for i, _ in live], [seed for _, seed in live]
            output = self._denoise(call, prompts, size[0], size[1], seeds, timings, started, report, stop_all)
            # A stopped job gets no more files. Asked here, in this thread: ``should_stop`` may read the pipe.
            wanted = [(image, out) for image, out in zip(live, output, strict=True) if not should_stop(image[0])]
            # Upscaling, marking, PNG encoding and saving overlap the next batch's denoising (PNG encoding and
            # file writes release the GIL); one thread keeps each job's images in order.
            finishing.append(
                self._finisher.submit(self._finish_batch, group.jobs, wanted, group.done, timings, on_image)
            )
        group.advance(members, should_stop)
        return finishing

    def _reference_call(self, first: GenerationJob, size: tuple[int, int], method: str) -> _Call:
        used = first.references[: self.model.max_references]
        references = [load_reference(path, len(used)) for path in used]
        call = self._plan_call(references, size[0], size[1], method)
        if len(used) < len(first.references):
            call.method += f" ({len(first.references) - len(used)} of {len(first.references)} references not used)"
        return call

    def _reporter(
        self,
        group: _Group,
        batch: list[tuple[int, int]],
        members: list[int],
        size: tuple[int, int],
        on_step: OnStep,
    ) -> Callable[[int, float, Any], None]:
        """What reports a step of this batch to each of its jobs; each job's preview shows its first image in it."""
        rows = {index: next(row for row, (i, _) in enumerate(batch) if i == index) for index in members}

        def report(step: int, elapsed: float, grids: Any) -> None:
            for index in members:
                preview = None
                if grids is not None and self.previewer is not None:
                    preview = self.previewer.render(grids[rows[index]], size[0], size[1])
                on_step(index, StepInfo(group.steps_done[index] + step, group.steps_of[index], elapsed, preview))

        return report

    def _finish_batch(
        self,
        jobs: list[GenerationJob],
        batch: list[tuple[tuple[int, int], Image.Image]],
        done: dict[int, list[GeneratedImage | FailedImage]],
        timings: dict[str, float],
        on_image: OnImage | None,
    ) -> None:
        """Finish each image of a denoised batch (in the finishing thread) and announce it."""
        for (index, seed), image in batch:
            finished = self._finish(jobs[index], len(done[index]), image, seed, timings)
            done[index].append(finished)
            if on_image is not None:
                on_image(index, finished)

    def _finish_all(
        self,
        jobs: list[GenerationJob],
        outcome: list[GenerationResult | Exception | None],
        done: dict[int, list[GeneratedImage | FailedImage]],
        method: str,
        timings: dict[str, float],
    ) -> list[GenerationResult | Exception]:
        for index in range(len(outcome)):
            if outcome[index] is None:
                outcome[index] = self._result(index, jobs[index], done[index], method, timings)
        return [result for result in outcome if result is not None]

    def _result(
        self,
        index: int,
        job: GenerationJob,
        done: list[GeneratedImage | FailedImage],
        method: str,
        timings: dict[str, float],
    ) -> GenerationResult | Exception:
        """One job's result: its saved images and those that failed (an error when none was saved)."""
        saved = [image for image in done if isinstance(image, GeneratedImage)]
        failed = [image for image in done if isinstance(image, FailedImage)]
        if not saved:
            return RuntimeError("no image could be saved: " + "; ".join(f.message for f in failed))
        job_timings = dict(timings)
        if index == 0 and not self._load_reported:
            job_timings = {"load": self.load_seconds, **job_timings}
            self._load_reported = True
        job_method = method + (f", downscaled to {job.output_size[0]}x{job.output_size[1]}" if job.output_size else "")
        return GenerationResult(images=saved, method=job_method, timings=job_timings, failed=failed)

    def _finish(
        self, job: GenerationJob, index: int, image: Image.Image, seed: int, timings: dict[str, float]
    ) -> GeneratedImage | FailedImage:
        """Reach the exact size, mark, and save atomically; an error fails this image only (a disk error, an
        upscaler out of memory), as Ark's group generation goes on past a failed image."""
        try:
            tick = time.perf_counter()
            size = (job.output_size[0], job.output_size[1]) if job.output_size else (job.width, job.height)
            final = upscale(image, size, self.upscaler)
            timings["upscale"] += time.perf_counter() - tick
            tick = time.perf_counter()
            saved = self._save(job, index, final, seed)
            timings["save"] += time.perf_counter() - tick
        except Exception as exc:
            log.warning("task %s: image %d could not be finished: %s", job.task_id, index, exc)
            return FailedImage(index=index, seed=seed, message=f"{type(exc).__name__}: {exc}")
        return saved

    def _plan_call(self, references: list[Image.Image], width: int, height: int, method: str) -> _Call:
        """The callable to run, its step counts, and what it does with the references."""
        pipeline = self.pipeline
        if not references:
            return _Call(pipeline, self.steps, self.steps, method)
        if self.family == "klein" and self.model.reference_kv_cache:
            if type(pipeline).__name__ != "Flux2KleinKVPipeline":
                if self._kv is None:
                    from diffusers import Flux2KleinKVPipeline

                    # Shares every module with the loaded pipeline. It swaps the transformer's attention processors
                    # for K/V-cache-aware ones, which compute the same as before when no cache is passed.
                    self._kv = Flux2KleinKVPipeline.from_pipe(pipeline)
                    self._kv.set_progress_bar_config(disable=True)
                pipeline = self._kv
            text = f"{method}; {len(references)} references (K/V cached after step 1)"
            return _Call(_bind(pipeline, image=references), self.steps, self.steps, text)
        if self.family in MULTI_REFERENCE:
            return _Call(
                _bind(pipeline, image=references), self.steps, self.steps, f"{method}; {len(references)} references"
            )
        if self.family in SINGLE_REFERENCE:
            return _Call(_bind(pipeline, image=references[0]), self.steps, self.steps, f"{method}; reference 1")
        if self.family == "sd":
            if self._img2img is None:
                from diffusers import StableDiffusionImg2ImgPipeline

                self._img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipeline)
                self._img2img.set_progress_bar_config(disable=True)
            # img2img denoises the reference itself, at its size: bring it to the generation size (cropped to the
            # aspect, not stretched). It runs int(steps * strength) steps, so ask for enough to run at least one.
            start = ImageOps.fit(references[0], (width, height), Image.Resampling.LANCZOS)
            steps = max(self.steps, math.ceil(1 / IMG2IMG_STRENGTH))
            executed = min(int(steps * IMG2IMG_STRENGTH), steps)
            call = _bind(self._img2img, image=start, strength=IMG2IMG_STRENGTH)
            return _Call(call, steps, executed, f"{method}; img2img from reference 1")
        return _Call(
            pipeline, self.steps, self.steps, f"{method}; references ignored ({type(pipeline).__name__} takes none)"
        )

    def _denoise(
        self,
        call: _Call,
        prompts: list[str],
        width: int,
        height: int,
        seeds: list[int],
        timings: dict[str, float],
        started: float,
        report: Callable[[int, float, Any], None],
        should_stop: Callable[[], bool],
    ) -> list[Image.Image]:
        """One pipeline call, one image per prompt, one generator per image."""
        marks: dict[str, float] = {}
        denoiser = getattr(self.pipeline, "transformer", None) or self.pipeline.unet
        every = self.spec.preview_every if self.previewer is not None else 0
        previous: list[Any] = [None]

        def first_forward(_module: Any, _args: Any) -> None:
            marks.setdefault("denoise", time.perf_counter())

        def step_end(pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            marks["last_step"] = time.perf_counter()
            grids = None
            if every and self.previewer is not None:
                latents = kwargs["latents"]
                if (step + 1) % every == 0:
                    estimate = denoised_estimate(pipe.scheduler, latents, previous[0])
                    grids = self.previewer.grid(estimate, width, height)
                # Keep these latents only when the next step previews (x0 needs the latents before a step).
                previous[0] = latents.detach().clone() if (step + 2) % every == 0 else None
            report(step + 1, time.perf_counter() - started, grids)
            if should_stop():
                pipe._interrupt = True
            return kwargs

        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        _configure_decode(getattr(self.pipeline, "vae", None), width, height, len(prompts), self.device)
        hook = denoiser.register_forward_pre_hook(first_forward)
        begin = time.perf_counter()
        try:
            with torch.inference_mode():
                result = call.run(
                    prompt=prompts,
                    width=width,
                    height=height,
                    num_images_per_prompt=1,
                    num_inference_steps=call.steps,
                    generator=generators,
                    callback_on_step_end=step_end,
                    **self._family_kwargs(len(prompts)),
                )
        finally:
            hook.remove()
        end = time.perf_counter()
        denoise_start = marks.get("denoise", begin)
        last_step = marks.get("last_step", end)
        timings["encode"] += denoise_start - begin
        timings["denoise"] += last_step - denoise_start
        timings["decode"] += end - last_step
        return list(result.images)

    def _family_kwargs(self, batch: int) -> dict[str, Any]:
        kwargs = call_kwargs(self.pipeline, self.family, self.model)
        if isinstance(kwargs.get("negative_prompt"), str):
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * batch  # one per prompt, as CFG pairs them
        return kwargs

    def _save(self, job: GenerationJob, position: int, image: Image.Image, seed: int) -> GeneratedImage:
        if job.watermark:
            image = add_visible_mark(image)
        # Output URLs are made to be shared: the file says it is AI-generated and how to reproduce it, but carries
        # the prompt only when the operator asks, and the model's public name, never where its weights live.
        facts = {
            "Software": "dreamserve",
            "ai_generated": "true",
            "DigitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia",
            "seed": str(seed),
            "model": job.model,
        }
        if job.embed_prompt:
            facts["prompt"] = job.prompt
        if job.watermark:
            facts["watermark"] = "visible"
        if job.output_format == "jpeg":
            # JPEG has no text chunks: the same facts go in its comment segment.
            options: dict[str, Any] = {"format": "JPEG", "quality": JPEG_QUALITY, "comment": json.dumps(facts)}
        else:
            info = PngInfo()
            for key, value in facts.items():
                info.add_text(key, value)
            options = {"format": "PNG", "pnginfo": info}
        suffix = ".jpeg" if job.output_format == "jpeg" else ".png"
        folder = Path(job.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{position}{suffix}"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as handle:
                image.save(handle, **options)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        size = (folder / name).stat().st_size
        return GeneratedImage(name, str(folder / name), image.width, image.height, seed, size, position)


def call_kwargs(pipeline: Any, family: str, model: ResolvedModel) -> dict[str, Any]:
    """The keyword arguments every pipeline call of this model gets, besides prompt, size, steps and seeds."""
    kwargs = dict(model.call_kwargs)
    if family == "klein":
        kwargs.update(_klein_text_layers(pipeline))
        if getattr(pipeline.config, "is_distilled", False):
            kwargs.setdefault("guidance_scale", 1.0)  # step-distilled: no CFG pass (the default 4.0 only warns)
        if model.source == "tiny":
            kwargs["max_sequence_length"] = 32  # random weights: a short sequence keeps tests fast
    return kwargs


def _klein_text_layers(pipeline: Any) -> dict[str, Any]:
    """klein feeds the transformer hidden states of text-encoder layers (9, 18, 27) of Qwen3's 36; a model
    with a smaller encoder (a distilled or test build) gets as many evenly spaced layers as its transformer reads."""
    encoder = pipeline.text_encoder.config
    needed = pipeline.transformer.config.joint_attention_dim // encoder.hidden_size
    if needed == 3 and encoder.num_hidden_layers >= 27:
        return {}
    step = encoder.num_hidden_layers // needed
    return {"text_encoder_out_layers": tuple(step * (i + 1) for i in range(needed))}


def _bind(call: Callable[..., Any], **bound: Any) -> Callable[..., Any]:
    def bound_call(**kwargs: Any) -> Any:
        return call(**bound, **kwargs)

    return bound_call


def native_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The generation size: the request's aspect within ``max_pixels``, sides multiples of 16 (min 64)."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))

    def side(value: int) -> int:
        return max(64, int(value * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE)

    return side(width), side(height)


def describe(gen_width: int, gen_height: int, width: int, height: int, upscaler: ModelUpscaler | None = None) -> str:
    if (gen_width, gen_height) == (width, height):
        return f"native {width}x{height}"
    how = (
        f"{upscaler.name} + lanczos" if upscaler is not None and width * height > gen_width * gen_height else "lanczos"
    )
    return f"generated {gen_width}x{gen_height}, upscaled ({how}) to {width}x{height}"


def load_reference(path: str, count: int) -> Image.Image:
    """A reference as upright 8-bit RGB: the first frame of an animation, EXIF orientation applied, 16-bit
    samples scaled (not clipped), CMYK converted, and transparency composited on white (not black)."""
    with Image.open(path) as opened:
        opened.seek(0)
        image = ImageOps.exif_transpose(opened)
    if image.mode.startswith("I"):  # 16- or 32-bit grayscale: 0..65535 -> 0..255
        image = image.convert("I").point(lambda value: value * (1 / 257)).convert("L")
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    image = image.convert("RGB")
    if count > MANY_REFERENCES and image.width * image.height > REFERENCE_AREA:
        scale = math.sqrt(REFERENCE_AREA / (image.width * image.height))
        image = image.resize(
            (max(64, int(image.width * scale)), max(64, int(image.height * scale))), Image.Resampling.LANCZOS
        )
    if min(image.size) < 64:
        # FLUX.2's image processor refuses references under 64 px.
        scale = 64 / min(image.size)
        image = image.resize(
            (math.ceil(image.width * scale), math.ceil(image.height * scale)), Image.Resampling.LANCZOS
        )
    return image


def add_visible_mark(image: Image.Image) -> Image.Image:
    """A semi-transparent "AI generated" label in the bottom-right corner, scaled to the image."""
    base = image.convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = ImageFont.load_default(size=max(10, base.height // 24))
    text = "AI generated"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    margin = max(4, base.height // 64)
    x = base.width - (right - left) - 2 * margin
    y = base.height - (bottom - top) - 2 * margin
    draw.rectangle((x - margin, y - margin, base.width - margin, base.height - margin), fill=(0, 0, 0, 110))
    draw.text((x, y - top), text, font=font, fill=(255, 255, 255, 200))
    return Image.alpha_composite(base, overlay).convert("RGB")


def _check_group(jobs: list[GenerationJob]) -> None:
    first = jobs[0]
    if any((j.width, j.height) != (first.width, first.height) for j in jobs) or any(j.num_images < 1 for j in jobs):
        raise ValueError("a group needs jobs of one size, each asking for at least one image")
    if len(jobs) > 1 and any(j.references for j in jobs):
        raise ValueError("jobs with references run alone")


def _configure_decode(vae: Any, width: int, height: int, images: int, device: str) -> None:
    """Tiled decoding for large images; sliced (one image at a time) for a batch on a CPU or a batch of large
    images on an accelerator; off otherwise."""
    if vae is not None and hasattr(vae, "enable_tiling"):
        if max(width, height) > TILED_DECODE_ABOVE:
            vae.enable_tiling()
        elif getattr(vae, "use_tiling", False):
            vae.disable_tiling()
    if vae is not None and hasattr(vae, "enable_slicing"):
        # A batch of large images is decoded one image at a time: same speed, a quarter of the peak memory. On a
        # CPU one image already keeps every core busy, so a batch decoded at once is no faster and holds a
        # batch's activations (4 x 256x256 SD-Turbo: 0.45 GiB more at its peak, held by keep_freed_memory).
        if images > 1 and (device == "cpu" or width * height >= SLICED_DECODE_FROM):
            vae.enable_slicing()
        elif getattr(vae, "use_slicing", False):
            vae.disable_slicing()
