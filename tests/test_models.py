"""Model presets and their resolution into concrete settings (no torch involved)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from dreamserve.presets import FAMILY_DEFAULTS, LIGHTNING_SCHEDULER, PRESETS, lora_steps, resolve
from dreamserve.settings import DEFAULT_MODEL, ModelSpec, Settings


def test_the_offline_default_is_the_tiny_klein() -> None:
    spec = Settings().models[DEFAULT_MODEL]
    model = resolve(spec)
    assert (model.preset, model.source, model.family) == ("tiny", "tiny", "klein")
    assert (model.steps, model.max_pixels, model.max_references) == (4, 256 * 256, 14)
    assert model.built_in


@pytest.mark.parametrize(
    ("name", "source", "family", "steps", "side", "refs"),
    [
        ("flux2-klein-4b", "black-forest-labs/FLUX.2-klein-4B", "klein", 4, 2048, 14),
        ("flux2-dev", "black-forest-labs/FLUX.2-dev", "flux2", 28, 2048, 10),
        ("qwen-image-edit-2509", "Qwen/Qwen-Image-Edit-2509", "qwen-edit-plus", 40, 1328, 3),
        ("qwen-image-edit-2511", "Qwen/Qwen-Image-Edit-2511", "qwen-edit-plus", 40, 1328, 3),
        ("sd-turbo", "stabilityai/sd-turbo", "sd", 1, 512, 1),
        ("tiny-sd-turbo", "tiny-sd-turbo", "sd", 2, 256, 1),
        ("random:flux2-klein-4b", "random:flux2-klein-4b", "klein", 4, 2048, 14),
    ],
)
def test_presets(name: str, source: str, family: str, steps: int, side: int, refs: int) -> None:
    model = resolve(ModelSpec(source=name))
    assert (model.preset, model.source, model.family) == (name, source, family)
    assert (model.steps, model.max_pixels, model.max_references) == (steps, side * side, refs)
    assert dict(model.call_kwargs) == dict(FAMILY_DEFAULTS[family].call_kwargs)
    assert not model.scheduler_overrides


def test_what_the_spec_sets_wins_over_the_preset() -> None:
    model = resolve(ModelSpec(source="flux2-klein-4b", steps=6, max_pixels=1024 * 1024, max_references=4))
    assert (model.steps, model.max_pixels, model.max_references) == (6, 1024 * 1024, 4)


def test_a_spec_sent_to_the_model_process_resolves_the_same() -> None:
    # The supervisor sends spec.model_dump() to the child, and the CLI rebuilds specs from dumps: every field is
    # then "set", so the preset's values must come from None, not from "left unset".
    spec = ModelSpec(source="flux2-klein-4b")
    assert resolve(ModelSpec(**spec.model_dump())) == resolve(spec)
    assert resolve(ModelSpec(**spec.model_dump())).max_pixels == 2048 * 2048


def test_a_folder_or_hub_id_takes_the_defaults_of_the_family_it_loads_as() -> None:
    before = resolve(ModelSpec(source="/models/my-klein"))
    assert (before.preset, before.source, before.family) == (None, "/models/my-klein", None)
    after = resolve(ModelSpec(source="/models/my-klein"), family="klein")
    assert (after.steps, after.max_pixels, after.max_references) == (4, 2048 * 2048, 14)
    sd = resolve(ModelSpec(source="/models/sd-turbo"), family="sd")
    assert (sd.steps, sd.max_pixels, dict(sd.call_kwargs)) == (2, 512 * 512, {"guidance_scale": 0.0})


def test_lightning_lora_sets_steps_no_cfg_and_the_shift_3_schedule() -> None:
    four = resolve(
        ModelSpec(source="qwen-image-edit-2509", lora="/loras/Qwen-Image-Edit-2509-Lightning-4steps-V1.0.safetensors")
    )
    assert four.steps == 4 and four.call_kwargs["true_cfg_scale"] == 1.0
    assert four.scheduler_overrides["base_shift"] == four.scheduler_overrides["max_shift"] == math.log(3)
    assert dict(four.scheduler_overrides) == dict(LIGHTNING_SCHEDULER)
    eight = resolve(ModelSpec(source="qwen-image-edit-2511", lora="lightx2v/Qwen-Image-Lightning-8steps-V2.0"))
    assert eight.steps == 8
    explicit = resolve(ModelSpec(source="qwen-image-edit-2511", lora="/loras/fast.safetensors", lora_steps=6))
    assert explicit.steps == 6
    assert resolve(ModelSpec(source="qwen-image-edit-2511", lora="/loras/x.safetensors", steps=5)).steps == 5
    # A LoRA on another family keeps that family's schedule and guidance.
    klein = resolve(ModelSpec(source="flux2-klein-4b", lora="/loras/style.safetensors"))
    assert klein.steps == 4 and not klein.scheduler_overrides


@pytest.mark.parametrize(
    ("name", "steps"),
    [("Qwen-Image-Lightning-4steps-V1.0.safetensors", 4), ("lightning_8step.pt", 8), ("style.safetensors", 8)],
)
def test_lora_steps_from_the_file_name(name: str, steps: int) -> None:
    assert lora_steps(name, None) == steps


def test_kv_preset_turns_the_reference_cache_on() -> None:
    assert resolve(ModelSpec(source="flux2-klein-9b-kv")).reference_kv_cache
    assert not resolve(ModelSpec(source="flux2-klein-4b")).reference_kv_cache
    assert resolve(ModelSpec(source="tiny", reference_kv_cache=True)).reference_kv_cache


def test_several_slugs_map_to_specs_from_the_environment() -> None:
    models = {
        "bytedance/seedream-v4": {"source": "flux2-klein-4b"},
        "Black-Forest-Labs/FLUX.2-dev": {"source": "/models/flux2-dev", "max_pixels": 1024 * 1024},
    }
    command = (
        "from dreamserve.settings import Settings; from dreamserve.presets import resolve; "
        "print({slug: resolve(spec).max_pixels for slug, spec in Settings().models.items()})"
    )
    env = {"DREAMSERVE_MODELS": json.dumps(models), "PATH": ""}
    out = subprocess.run([sys.executable, "-c", command], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str({"bytedance/seedream-v4": 2048 * 2048, "black-forest-labs/flux.2-dev": 1024 * 1024})


def test_every_preset_names_a_known_family() -> None:
    assert all(preset.family in FAMILY_DEFAULTS for preset in PRESETS.values())


def test_models_does_not_import_torch() -> None:
    code = "import sys, dreamserve.presets; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
