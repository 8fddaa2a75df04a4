"""Model presets: a name given as ``ModelSpec.source`` expands to where the weights live and how to run them.

Anything else in ``source`` is a local diffusers folder, a single-file checkpoint or a hub id; its defaults then
come from the family of the pipeline class it loads as (``FAMILY_DEFAULTS``). ``resolve`` is the one place
where a spec becomes concrete numbers; it imports no torch, so the API side may call it too.

| preset | weights | family | steps | native cap | refs | licence |
|---|---|---|---|---|---|---|
| ``flux2-klein-4b`` | black-forest-labs/FLUX.2-klein-4B | klein | 4 | 2048x2048 | 14 | Apache-2.0 (GPU default) |
| ``flux2-klein-9b-kv`` | black-forest-labs/FLUX.2-klein-9b-kv | klein | 4 | 2048x2048 | 14 | non-commercial |
| ``flux2-dev`` | black-forest-labs/FLUX.2-dev | flux2 | 28 | 2048x2048 | 10 | non-commercial |
| ``qwen-image-edit-2509`` | Qwen/Qwen-Image-Edit-2509 | qwen-edit-plus | 40 (4/8 LoRA) | 1328² | 3 | Apache-2.0 |
| ``qwen-image-edit-2511`` | Qwen/Qwen-Image-Edit-2511 | qwen-edit-plus | 40 (4/8 LoRA) | 1328² | 3 | Apache-2.0 |
| ``sd-turbo`` | stabilityai/sd-turbo | sd | 1 | 512x512 | 1 (img2img) | Stability AI Community |
| ``tiny``, ``tiny-sd-turbo`` | random weights, built in code | klein, sd | 4, 2 | 256x256 | 14, 1 | tests |
| ``random:flux2-klein-4b`` | real architecture, random weights | klein | 4 | 2048x2048 | 14 | benchmarks |
| ``random:flux2-klein-4b-small-te`` | the same, 3 of 36 text-encoder layers | klein | 4 | 2048x2048 | 14 | CPU bench |
| ``random:sd-turbo`` | real architecture, random weights | sd | 1 | 512x512 | 1 | benchmarks |
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dreamserve.settings import ModelSpec

FOUR_MP = 2048 * 2048


@dataclass(frozen=True)
class FamilyDefaults:
    steps: int
    max_pixels: int
    #: References the pipeline takes (0: text-to-image only; 1 for SD's img2img).
    max_references: int
    #: Extra keyword arguments of every pipeline call.
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)


#: Defaults per family, for sources that are not presets (a local folder of any supported pipeline).
FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "klein": FamilyDefaults(4, FOUR_MP, 14),
    # FLUX.2 [dev] is guidance-distilled: guidance is an input of the transformer, not a second pass.
    "flux2": FamilyDefaults(28, FOUR_MP, 10, {"guidance_scale": 4.0}),
    # Qwen-Image runs true classifier-free guidance, which needs a negative prompt (a space: "no preference").
    # Edit-Plus (2509/2511) takes a list of references, best with 1-3 (model card); the first Edit takes one.
    "qwen-edit-plus": FamilyDefaults(40, 1328 * 1328, 3, {"true_cfg_scale": 4.0, "negative_prompt": " "}),
    "qwen-edit": FamilyDefaults(40, 1328 * 1328, 1, {"true_cfg_scale": 4.0, "negative_prompt": " "}),
    "qwen": FamilyDefaults(40, 1328 * 1328, 0, {"true_cfg_scale": 4.0, "negative_prompt": " "}),
    # SD-Turbo is trained without classifier-free guidance; img2img from one reference.
    "sd": FamilyDefaults(2, 512 * 512, 1, {"guidance_scale": 0.0}),
    "sdxl": FamilyDefaults(30, 1024 * 1024, 0),
    "flux": FamilyDefaults(28, 1024 * 1024, 0),
    "kontext": FamilyDefaults(28, 1024 * 1024, 1, {"guidance_scale": 2.5}),
    "other": FamilyDefaults(30, 1024 * 1024, 0),
}

#: With a Lightning LoRA (CFG- and step-distilled), Qwen-Image runs without CFG on a shift-3 schedule
#: (the scheduler settings published with lightx2v/Qwen-Image-Lightning).
LIGHTNING_CALL_KWARGS: Mapping[str, Any] = {"true_cfg_scale": 1.0}
LIGHTNING_SCHEDULER: Mapping[str, Any] = {
    "base_shift": math.log(3),
    "max_shift": math.log(3),
    "shift": 1.0,
    "shift_terminal": None,
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
}
LIGHTNING_FAMILIES = {"qwen", "qwen-edit", "qwen-edit-plus"}


@dataclass(frozen=True)
class Preset:
    source: str
    family: str
    steps: int
    max_pixels: int
    max_references: int
    licence: str
    #: Overrides of ``ModelSpec`` fields the preset needs (e.g. the reference K/V cache of a -kv checkpoint).
    options: Mapping[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "flux2-klein-4b": Preset("black-forest-labs/FLUX.2-klein-4B", "klein", 4, FOUR_MP, 14, "Apache-2.0"),
    "flux2-klein-9b-kv": Preset(
        "black-forest-labs/FLUX.2-klein-9b-kv",
        "klein",
        4,
        FOUR_MP,
        14,
        "FLUX Non-Commercial",
        {"reference_kv_cache": True},
    ),
    "flux2-dev": Preset("black-forest-labs/FLUX.2-dev", "flux2", 28, FOUR_MP, 10, "FLUX [dev] Non-Commercial"),
    "qwen-image-edit-2509": Preset("Qwen/Qwen-Image-Edit-2509", "qwen-edit-plus", 40, 1328 * 1328, 3, "Apache-2.0"),
    "qwen-image-edit-2511": Preset("Qwen/Qwen-Image-Edit-2511", "qwen-edit-plus", 40, 1328 * 1328, 3, "Apache-2.0"),
    "sd-turbo": Preset("stabilityai/sd-turbo", "sd", 1, 512 * 512, 1, "Stability AI Community"),
    "tiny": Preset("tiny", "klein", 4, 256 * 256, 14, "random weights"),
    "tiny-sd-turbo": Preset("tiny-sd-turbo", "sd", 2, 256 * 256, 1, "random weights"),
    "random:sd-turbo": Preset("random:sd-turbo", "sd", 1, 512 * 512, 1, "random weights"),
    "random:flux2-klein-4b": Preset("random:flux2-klein-4b", "klein", 4, FOUR_MP, 14, "random weights"),
    # The same with 3 of Qwen3-4B's 36 text-encoder layers: fits a 24 GB CPU machine beside another process.
    "random:flux2-klein-4b-small-te": Preset(
        "random:flux2-klein-4b-small-te", "klein", 4, FOUR_MP, 14, "random weights"
    ),
}
#: Built in code rather than loaded: no weights on disk.
BUILT_IN = {"tiny", "tiny-sd-turbo", "random:sd-turbo", "random:flux2-klein-4b", "random:flux2-klein-4b-small-te"}


@dataclass(frozen=True)
class ResolvedModel:
    """A ``ModelSpec`` made concrete: what ``engine`` loads and how it calls the pipeline."""

    #: The preset name, or None for a folder, file or hub id given directly.
    preset: str | None
    #: Where the weights are: a built-in name, a local path or a hub id.
    source: str
    #: The family when known (from the preset, or from the loaded pipeline's class); None before loading.
    family: str | None
    steps: int
    max_pixels: int
    max_references: int
    call_kwargs: Mapping[str, Any]
    #: Scheduler config changes to apply after loading (Lightning LoRAs).
    scheduler_overrides: Mapping[str, Any]
    reference_kv_cache: bool
    licence: str

    @property
    def built_in(self) -> bool:
        return self.source in BUILT_IN


def resolve(spec: ModelSpec, family: str | None = None) -> ResolvedModel:
    """Expand a preset and fill every value the spec leaves unset (``None``) from the preset, then the family.

    ``family`` is the family of the loaded pipeline (``engine.loader.family_of``); before loading, a source
    that is not a preset resolves with the ``other`` defaults, which only matters for ``source``.
    """
    preset = PRESETS.get(spec.source)
    family = family or (preset.family if preset else None)
    defaults = FAMILY_DEFAULTS.get(family or "other", FAMILY_DEFAULTS["other"])
    limits = preset or defaults  # what the preset says, else the family's defaults
    steps, call_kwargs, scheduler = _sampling(spec, family, limits.steps, dict(defaults.call_kwargs))
    options = dict(preset.options) if preset else {}
    preset_name, source, licence = (spec.source, preset.source, preset.licence) if preset else _own_source(spec)
    return ResolvedModel(
        preset=preset_name,
        source=source,
        family=family,
        steps=spec.steps or steps,
        max_pixels=spec.max_pixels or limits.max_pixels,
        max_references=limits.max_references if spec.max_references is None else spec.max_references,
        call_kwargs=call_kwargs,
        scheduler_overrides=scheduler,
        reference_kv_cache=spec.reference_kv_cache or bool(options.get("reference_kv_cache")),
        licence=licence,
    )


def _own_source(spec: ModelSpec) -> tuple[None, str, str]:
    """A source that names no preset: its own source, and its model card's licence."""
    return None, spec.source, "see the model card"


def _sampling(
    spec: ModelSpec, family: str | None, steps: int, call_kwargs: dict[str, Any]
) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Steps, pipeline call arguments and scheduler overrides, a step-distilled LoRA's included."""
    scheduler: dict[str, Any] = {}
    if spec.lora and family in LIGHTNING_FAMILIES:
        steps = lora_steps(spec.lora, spec.lora_steps)
        call_kwargs.update(LIGHTNING_CALL_KWARGS)
        scheduler.update(LIGHTNING_SCHEDULER)
    elif spec.lora and spec.lora_steps:
        steps = spec.lora_steps
    return steps, call_kwargs, scheduler


def lora_steps(lora: str, given: int | None) -> int:
    """Steps for a step-distilled LoRA: ``lora_steps`` if given, else the ``4steps``/``8steps`` in its name, else 8."""
    if given:
        return given
    found = re.search(r"(\d+)[-_ ]?steps?", lora, re.IGNORECASE)
    return int(found.group(1)) if found else 8
