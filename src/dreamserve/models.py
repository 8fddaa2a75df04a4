"""Built-in model presets: a name given as ``ModelSpec.source`` expands to where the weights live and
how to run them. Anything else in ``source`` is taken as a local folder, a checkpoint file or a hub id.

- ``flux2-klein-4b``: black-forest-labs/FLUX.2-klein-4B, 4 steps, 4 MP. The default on GPU: text-to-image
  and multi-reference editing in one Apache-2.0 checkpoint.
- ``flux2-dev``: black-forest-labs/FLUX.2-dev, 28 steps, 4 MP. Quality tier (non-commercial licence).
- ``qwen-image-edit-2509`` / ``-2511``: Qwen/Qwen-Image-Edit-*, 40 steps (``lora_steps`` with a Lightning
  LoRA in ``lora``), ~1.7 MP. The editing backend.
- ``sd-turbo``: stabilityai/sd-turbo, 1 step, 512x512. CPU-feasible; img2img with one reference.
- ``tiny``, ``tiny-sd-turbo``: built in code with random weights; the offline default and the tests.
- ``random:sd-turbo``, ``random:flux2-klein-4b``: the real architectures with random weights, for
  benchmarks (real speed, noise out).
"""

from __future__ import annotations

from dataclasses import dataclass

from dreamserve.settings import ModelSpec


@dataclass(frozen=True)
class Preset:
    source: str
    steps: int
    max_pixels: int


PRESETS = {
    "flux2-klein-4b": Preset("black-forest-labs/FLUX.2-klein-4B", 4, 2048 * 2048),
    "flux2-dev": Preset("black-forest-labs/FLUX.2-dev", 28, 2048 * 2048),
    "qwen-image-edit-2509": Preset("Qwen/Qwen-Image-Edit-2509", 40, 1328 * 1328),
    "qwen-image-edit-2511": Preset("Qwen/Qwen-Image-Edit-2511", 40, 1328 * 1328),
    "sd-turbo": Preset("stabilityai/sd-turbo", 1, 512 * 512),
    "tiny": Preset("tiny", 4, 256 * 256),
    "tiny-sd-turbo": Preset("tiny-sd-turbo", 2, 256 * 256),
    "random:sd-turbo": Preset("random:sd-turbo", 1, 512 * 512),
    "random:flux2-klein-4b": Preset("random:flux2-klein-4b", 4, 512 * 512),
}
#: Built in code rather than loaded: no weights on disk.
BUILT_IN = {"tiny", "tiny-sd-turbo", "random:sd-turbo", "random:flux2-klein-4b"}


def resolve(spec: ModelSpec) -> ModelSpec:
    """Fill what the user left unset from the preset named by ``source``; other sources pass through."""
    preset = PRESETS.get(spec.source)
    if preset is None:
        return spec
    unset = spec.model_fields_set
    return spec.model_copy(
        update={
            "source": preset.source,
            "steps": spec.steps if "steps" in unset else (spec.lora_steps if spec.lora else preset.steps),
            "max_pixels": spec.max_pixels if "max_pixels" in unset else preset.max_pixels,
        }
    )
