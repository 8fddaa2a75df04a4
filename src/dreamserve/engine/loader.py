"""Loading a diffusers pipeline from ``ModelSpec.source``, exactly as a user would point at weights."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from dreamserve.settings import ModelSpec

BUILDERS = {
    "tiny": ("dreamserve.engine.tiny", "build_tiny_klein"),
    "tiny-sd-turbo": ("dreamserve.engine.tiny", "build_tiny_sd_turbo"),
    "random:sd-turbo": ("dreamserve.engine.random_init", "build_random_sd_turbo"),
    "random:flux2-klein-4b": ("dreamserve.engine.random_init", "build_random_klein_4b"),
}

#: Pipeline class name -> family: the family picks default steps and call arguments in ``runner``.
FAMILIES = {
    "Flux2KleinPipeline": "klein",
    "Flux2KleinKVPipeline": "klein",
    "Flux2Pipeline": "flux2",
    "QwenImageEditPlusPipeline": "qwen-edit",
    "QwenImageEditPipeline": "qwen-edit",
    "QwenImagePipeline": "qwen",
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sd",
    "FluxPipeline": "flux",
}


class WeightsNotFound(RuntimeError):
    """The weights named by the model source are not on this machine."""


def resolve_device(spec: ModelSpec) -> str:
    if spec.device != "auto":
        return spec.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(spec: ModelSpec, device: str) -> torch.dtype:
    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    if spec.source.startswith("tiny"):
        return torch.float32  # random weights: precision is not what is tested
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 is ~3x faster than fp32 on CPUs with AMX tiles (runtime.md §3.3); with AVX512-BF16 alone it was
    # 3x slower here (SD-Turbo UNet step: 15.7 s bf16 vs 4.7 s fp32, bench/RESULTS.md).
    return torch.bfloat16 if torch.cpu._is_amx_tile_supported() else torch.float32


def family_of(pipeline: Any) -> str:
    return FAMILIES.get(type(pipeline).__name__, "other")


def load_pipeline(spec: ModelSpec) -> tuple[Any, str]:
    """Build or load the pipeline for ``spec`` (already resolved, see ``models.resolve``) and move it to
    its device; returns ``(pipeline, family)``."""
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    source = spec.source
    if source in BUILDERS:
        module, builder = BUILDERS[source]
        build = getattr(importlib.import_module(module), builder)
        pipeline = build() if source.startswith("tiny") else build(dtype=dtype)
    elif Path(source).is_dir():
        pipeline = _from_pretrained(source, dtype, local_only=True)
    elif Path(source).suffix in (".safetensors", ".ckpt"):
        pipeline = _from_single_file(Path(source), dtype)
    else:
        pipeline = _from_pretrained(source, dtype, local_only=not spec.allow_download)
    # from_pretrained already loaded in ``dtype``; the tiny builds are float32 unless asked otherwise.
    pipeline = pipeline.to(device) if pipeline.dtype == dtype else pipeline.to(device=device, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    if spec.lora:
        pipeline.load_lora_weights(spec.lora, local_files_only=not spec.allow_download)
        pipeline.fuse_lora()
    if spec.compile:
        denoiser = getattr(pipeline, "transformer", None) or pipeline.unet
        # Regional compilation compiles one repeated block and reuses it: far shorter compile times.
        compile_blocks = getattr(denoiser, "compile_repeated_blocks", None)
        if compile_blocks is not None and getattr(denoiser, "_repeated_blocks", None):
            compile_blocks(fullgraph=True)
        else:
            denoiser.compile()
    return pipeline, family_of(pipeline)


def _from_pretrained(source: str, dtype: torch.dtype, local_only: bool) -> Any:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(source, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise WeightsNotFound(
                f"{source} is not a complete diffusers pipeline folder ({exc}). It needs model_index.json and "
                "one sub-folder per component, as written by pipeline.save_pretrained() or huggingface-cli download."
            ) from exc
        raise WeightsNotFound(
            f"The weights of {source!r} are not on this machine. Fetch them with "
            f"`huggingface-cli download {source} --local-dir /models/{source.split('/')[-1]}` and start with "
            f"`--model /models/{source.split('/')[-1]}`, or allow downloads for this model "
            "(ModelSpec.allow_download) on a machine that reaches the hub."
        ) from exc


def _from_single_file(path: Path, dtype: torch.dtype) -> Any:
    if not path.is_file():
        raise WeightsNotFound(f"Checkpoint {path} does not exist.")
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_single_file(str(path), dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsNotFound(
            f"{path} could not be loaded as a single-file Stable Diffusion checkpoint ({exc}). FLUX.2 and Qwen-Image "
            "load from a diffusers folder: pass the folder with --model."
        ) from exc
