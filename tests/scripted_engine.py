"""A scripted engine for the model process (``ModelSpec.engine="tests.scripted_engine:ScriptedEngine"``): no torch,
no model, the real supervisor, pipe and queue around it. Each job takes ``steps`` steps of ``step_seconds`` each
(``ModelSpec.steps``; ``DREAMSERVE_SCRIPTED_STEP_SECONDS``, read when the model process starts) and then writes real
PNG files of the asked size, one seed each, as the diffusers engine does. With ``DREAMSERVE_SCRIPTED_PER_CALL=1`` a
group takes ``steps`` steps per pipeline call of ``ModelSpec.max_batch`` images, as diffusers' would (15 images at
``max_batch`` 1 are 15 calls); otherwise one call whatever its images. So one machine can host many of them:
the supervisor tier of the tests and the fleet simulations of bench/.

Words in the prompt script what a real model process may do:
``crash`` (the process dies at the first step, as an out-of-memory kill would), ``fail`` (the job raises),
``stubborn`` (stops are ignored, as a pipeline stuck in one long step would).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from dreamserve.jobs import FailedImage, GeneratedImage, GenerationJob, GenerationResult, Interrupted, StepInfo
from dreamserve.settings import ModelSpec

IMAGE = GeneratedImage | FailedImage


class ScriptedEngine:
    def __init__(self, steps: int, step_seconds: float, load_seconds: float, per_call: int | None = None) -> None:
        self.steps, self.step_seconds, self.load_seconds = steps, step_seconds, load_seconds
        #: Images per pipeline call when each call takes ``steps`` steps; ``None``: one call per group.
        self.per_call = per_call

    @classmethod
    def load(cls, spec: ModelSpec) -> ScriptedEngine:
        load_seconds = float(os.environ.get("DREAMSERVE_SCRIPTED_LOAD_SECONDS", "0"))
        time.sleep(load_seconds)
        step_seconds = float(os.environ.get("DREAMSERVE_SCRIPTED_STEP_SECONDS", "0.05"))
        per_call = spec.max_batch if os.environ.get("DREAMSERVE_SCRIPTED_PER_CALL") == "1" else None
        return cls(spec.steps or 4, step_seconds, load_seconds, per_call)

    def generate_group(
        self,
        jobs: list[GenerationJob],
        on_step: Callable[[int, StepInfo], None],
        should_stop: Callable[[int], bool],
        on_image: Callable[[int, IMAGE], None] | None = None,
    ) -> list[GenerationResult | Exception]:
        started = time.perf_counter()
        stubborn = any("stubborn" in job.prompt for job in jobs)
        stopped: set[int] = set()
        # The images (job, number) in pipeline calls: each call takes ``steps`` steps, then its images are saved.
        slots = [(index, n) for index, job in enumerate(jobs) for n in range(job.num_images)]
        size = self.per_call or max(len(slots), 1)
        calls = [slots[at : at + size] for at in range(0, len(slots), size)] or [[]]
        total = self.steps * len(calls)
        saved: dict[int, list[GeneratedImage]] = {index: [] for index in range(len(jobs))}
        for step in range(1, total + 1):
            time.sleep(self.step_seconds)
            if any("crash" in job.prompt for job in jobs):
                os._exit(70)
            for index in range(len(jobs)):
                if index not in stopped and not stubborn and should_stop(index):
                    stopped.add(index)
                if index not in stopped:
                    on_step(index, StepInfo(step, total, time.perf_counter() - started))
            if len(stopped) == len(jobs):
                break
            if step % self.steps == 0:
                for index, n in calls[step // self.steps - 1]:
                    if index not in stopped and "fail" not in jobs[index].prompt:
                        saved[index].append(self._save(index, jobs[index], n, on_image))
        return [self._outcome(index, job, stopped, saved[index], started) for index, job in enumerate(jobs)]

    @staticmethod
    def _outcome(
        index: int, job: GenerationJob, stopped: set[int], images: list[GeneratedImage], started: float
    ) -> GenerationResult | Exception:
        if index in stopped:
            return Interrupted()
        if "fail" in job.prompt:
            return RuntimeError("the scripted job failed, as asked")
        width, height = job.output_size or (job.width, job.height)
        return GenerationResult(images, f"scripted {width}x{height}", {"denoise": time.perf_counter() - started})

    @staticmethod
    def _save(index: int, job: GenerationJob, n: int, on_image: Callable[[int, IMAGE], None] | None) -> GeneratedImage:
        """Image ``n`` of the job, written as the diffusers engine writes it (a temp file, then a rename)."""
        width, height = job.output_size or (job.width, job.height)
        folder = Path(job.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        seed = job.seed + n
        path = folder / f"{n}.png"
        tmp = folder / f".tmp-{n}.png"
        Image.new("RGB", (width, height), (seed % 256, (seed // 256) % 256, 128)).save(tmp, format="PNG")
        os.replace(tmp, path)
        image = GeneratedImage(path.name, str(path), width, height, seed, path.stat().st_size, n)
        if on_image is not None:
            on_image(index, image)
        return image
