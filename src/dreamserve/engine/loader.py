"""Loading a diffusers pipeline from ``ModelSpec.source``, exactly as a user would point at weights."""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dreamserve.presets import PRESETS, resolve
from dreamserve.settings import ModelSpec

log = logging.getLogger(__name__)

BUILDERS = {
    "tiny": ("dreamserve.engine.tiny", "build_tiny_klein"),
    "tiny-sd-turbo": ("dreamserve.engine.tiny", "build_tiny_sd_turbo"),
    "random:sd-turbo": ("dreamserve.engine.random_init", "build_random_sd_turbo"),
    "random:flux2-klein-4b": ("dreamserve.engine.random_init", "build_random_klein_4b"),
    "random:flux2-klein-4b-small-te": ("dreamserve.engine.random_init", "build_random_klein_4b_small_te"),
}

#: Pipeline class name -> family: the family picks default steps, size cap and call arguments in ``runner``.
FAMILIES = {
    "Flux2KleinPipeline": "klein",
    "Flux2KleinKVPipeline": "klein",
    "Flux2Pipeline": "flux2",
    "QwenImageEditPlusPipeline": "qwen-edit-plus",
    "QwenImageEditPipeline": "qwen-edit",
    "QwenImagePipeline": "qwen",
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
    "FluxKontextPipeline": "kontext",
}

#: Single-file checkpoints diffusers can turn into a whole pipeline, told apart by a key only they have.
SINGLE_FILE_KEYS = {
    "conditioner.embedders.1.": "StableDiffusionXLPipeline",
    "cond_stage_model.": "StableDiffusionPipeline",
}


class WeightsNotFound(RuntimeError):
    """The weights named by the model source are not on this machine (or not in a loadable form)."""


def resolve_device(spec: ModelSpec) -> str:
    if spec.device != "auto":
        return spec.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(spec: ModelSpec, device: str) -> torch.dtype:
    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    if resolve(spec).source.startswith("tiny"):
        return torch.float32  # random weights: precision is not what is tested, robustness is
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 is ~3x faster than fp32 on CPUs with AMX tiles (runtime.md §3.3); with AVX512-BF16 alone it was
    # 3x slower here (SD-Turbo UNet step: 15.7 s bf16 vs 4.7 s fp32, bench/RESULTS.md).
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private API: absent on some builds
    return torch.bfloat16 if has_amx is not None and has_amx() else torch.float32


def family_of(pipeline: Any) -> str:
    return FAMILIES.get(type(pipeline).__name__, "other")


def load_pipeline(spec: ModelSpec, layout_in_background: bool = False) -> tuple[Any, str]:
    """Build or load the pipeline for ``spec`` (a preset name is expanded by ``models.resolve``), move it to its
    device (its VAE's convolutions in channels-last memory format), fuse its LoRA, quantize and compile it if asked;
    returns ``(pipeline, family)``. With ``layout_in_background`` the convolutions are reordered by a
    ``LayoutChange`` that may still be running when this returns (the service's model process: ready sooner)."""
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    # Checked before the weights load: a setting this machine cannot honour fails in a second, not minutes.
    quantize = fp8_quantizer(device) if spec.quantize == "fp8" else None
    pipeline = _weights(spec, resolve(spec).source, dtype, device)
    # from_pretrained already loaded in ``dtype``; the tiny builds are float32 unless asked otherwise.
    pipeline = pipeline.to(device) if pipeline.dtype == dtype else pipeline.to(device=device, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    if spec.channels_last and layout_in_background:
        LayoutChange(pipeline, torch.channels_last).start()
    elif spec.channels_last:
        set_memory_format(pipeline, torch.channels_last)
    pipeline = _adapted(spec, pipeline)
    if quantize is not None:
        quantize(getattr(pipeline, "transformer", None) or pipeline.unet)
    if spec.compile:
        _compile(getattr(pipeline, "transformer", None) or pipeline.unet)
    return pipeline, family_of(pipeline)


#: The pipeline parts whose convolutions ``ModelSpec.channels_last`` reorders: the VAE, whose decode is most of an
#: SD-Turbo image's time on a CPU and runs in 0.83x the CPU time channels-last. The UNet ran no faster (1.01x),
#: and reordering its 2.5 GiB of weights cost 3 s of load (``bench/memory_format.py``, bench/RESULTS.md).
CONVOLUTIONAL = ("vae",)


def set_memory_format(
    pipeline: Any, memory_format: torch.memory_format, parts: tuple[str, ...] = CONVOLUTIONAL
) -> None:
    """Lay the 2-D convolutions of the pipeline's ``parts`` out in ``memory_format``: channels-last with
    ``ModelSpec.channels_last``. Their inputs need not be converted: a convolution on NHWC weights returns NHWC
    activations, which the next layers keep. 3-D convolutions (Qwen-Image's video VAE) are left as they are."""
    for layer in _convolutions(_parts(pipeline, parts)):
        _reorder_in_place(layer.weight, memory_format)


class LayoutChange:
    """``set_memory_format`` on a thread, so that the model process reports ready without waiting for it: the VAE
    is first needed at the first request's decode, seconds later, and reordering SD-Turbo's 335 MB of VAE weights
    in place (every page of the safetensors mapping written once) cost 0.4-0.9 s of load on a 2-core CPU.

    Nothing reads the weights half reordered: until the thread is done, each convolution's forward and each
    part's ``state_dict`` wait for it (the forward hooks remove themselves once passed). A reorder that failed
    fails those calls rather than let a convolution read weights left in an unknown order."""

    def __init__(
        self, pipeline: Any, memory_format: torch.memory_format, parts: tuple[str, ...] = CONVOLUTIONAL
    ) -> None:
        self.memory_format = memory_format
        modules = _parts(pipeline, parts)
        self.layers = list(_convolutions(modules))
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._hooks = {id(layer): layer.register_forward_pre_hook(self._before) for layer in self.layers}
        # Kept for good: ``state_dict`` iterates over the hooks themselves, so one must not remove itself there.
        for module in modules:
            module.register_state_dict_pre_hook(lambda *_: self.wait())

    def start(self) -> None:
        # Not a daemon: an interpreter exiting mid-reorder would abort in torch (C++ terminate), not end cleanly.
        threading.Thread(target=self._run, name="layout-change").start()

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise RuntimeError(f"the convolutions' memory format could not be changed: {self.error}") from self.error

    def _run(self) -> None:
        try:
            for layer in self.layers:
                _reorder_in_place(layer.weight, self.memory_format)
        except BaseException as exc:  # kept for the waiting calls: raised there, in the model's own thread
            log.exception("changing the convolutions' memory format failed")
            self.error = exc
        finally:
            self.done.set()

    def _before(self, layer: torch.nn.Module, _args: Any) -> None:
        self.wait()
        hook = self._hooks.pop(id(layer), None)
        if hook is not None:  # the forward iterates over a copy of the hooks: removing this one as it runs is safe
            hook.remove()


def _parts(pipeline: Any, names: tuple[str, ...]) -> list[torch.nn.Module]:
    return [module for name in names if (module := getattr(pipeline, name, None)) is not None]


def _convolutions(modules: list[torch.nn.Module]) -> Iterator[torch.nn.Module]:
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                yield layer


def _reorder_in_place(weight: torch.Tensor, memory_format: torch.memory_format) -> None:
    """Lay ``weight`` out in ``memory_format`` within its own storage. ``Module.to(memory_format=...)`` would copy
    it instead: weights loaded from safetensors are views of the file's private mapping, whose pages would then
    stay mapped beside the copy (SD-Turbo: 2.5 GiB more RSS). Written in place, each page becomes the process's
    own copy once, as any first write to a private mapping does."""
    reordered = weight.detach().contiguous(memory_format=memory_format)
    if reordered.stride() == weight.stride():
        return
    dense = weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last)
    if not dense:  # a view with gaps: its storage holds other data, so it gets a storage of its own
        weight.data = reordered
        return
    weight.data = weight.data.as_strided(weight.shape, reordered.stride(), weight.storage_offset())
    weight.data.copy_(reordered)


def _weights(spec: ModelSpec, source: str, dtype: torch.dtype, device: str) -> Any:
    """The pipeline ``source`` names: a built one (tiny, random-weight), a folder, a checkpoint file, a hub id."""
    if source in BUILDERS:
        module, builder = BUILDERS[source]
        build = getattr(importlib.import_module(module), builder)
        # Random real-size models are created on their device, in their dtype: seconds on a GPU, not minutes.
        return build() if source.startswith("tiny") else build(dtype=dtype, device=device)
    if Path(source).is_dir():
        return _from_pretrained(source, dtype, local_only=True)
    if Path(source).suffix in (".safetensors", ".ckpt"):
        return _from_single_file(Path(source), dtype, local_only=not spec.allow_download)
    if _looks_like_path(source):
        raise WeightsNotFound(
            f"{source} does not exist. --model takes a preset ({', '.join(sorted(PRESETS))}), a diffusers folder, "
            "a .safetensors/.ckpt checkpoint or a hub id (owner/name)."
        )
    return _from_pretrained(source, dtype, local_only=not spec.allow_download)


def _adapted(spec: ModelSpec, pipeline: Any) -> Any:
    """The LoRA fused in, its scheduler overrides, the reference KV cache: what the spec adds to the weights."""
    if spec.lora:
        # Needs ``peft``. Fused, then the adapter dropped: no per-step LoRA cost, and torch.compile sees plain weights.
        pipeline.load_lora_weights(spec.lora, local_files_only=not spec.allow_download)
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
    overrides = resolve(spec, family_of(pipeline)).scheduler_overrides  # a Lightning LoRA's shift-3 schedule
    if overrides:
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, **overrides)
    if spec.reference_kv_cache:
        pipeline = _with_reference_kv_cache(pipeline)
    return pipeline


def _compile(denoiser: Any) -> None:
    # Regional compilation compiles one repeated block and reuses it: far shorter compile times.
    compile_blocks = getattr(denoiser, "compile_repeated_blocks", None)
    if compile_blocks is not None and getattr(denoiser, "_repeated_blocks", None):
        compile_blocks(fullgraph=True)
    else:
        denoiser.compile()


#: FP8 matmuls (``torch._scaled_mm``) need FP8 tensor cores: compute capability 8.9 (Ada) or newer.
FP8_CAPABILITY = (8, 9)


def fp8_quantizer(device: str) -> Callable[[Any], None]:
    """What turns a denoiser's linear layers to FP8 weights with dynamic per-row FP8 activations, in place
    (torchao); ValueError, saying what to do, where ``device`` or this install cannot run it."""
    if not device.startswith("cuda"):
        raise ValueError(
            f'quantize="fp8" needs a CUDA GPU with FP8 support; this model runs on {device}. Leave quantize at "none".'
        )
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < FP8_CAPABILITY:
        raise ValueError(
            f'quantize="fp8" needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); '
            f"{torch.cuda.get_device_name(torch.device(device))} has {capability[0]}.{capability[1]}. "
            'Leave quantize at "none" on this GPU.'
        )
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise ValueError(
            f'quantize="fp8" needs torchao ({exc}): `pip install "dreamserve[fp8]"` (or `pip install torchao`).'
        ) from exc
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return lambda denoiser: quantize_(denoiser, config)


def _looks_like_path(source: str) -> bool:
    # A hub id is exactly "owner/name"; anything else with a separator was meant as a local path.
    return source.startswith(("/", ".", "~")) or source.count("/") != 1


def _from_pretrained(source: str, dtype: torch.dtype, local_only: bool) -> Any:
    from diffusers import DiffusionPipeline

    try:
        # ``dtype`` is the current name; diffusers 0.42 deprecates ``torch_dtype``.
        return DiffusionPipeline.from_pretrained(source, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise WeightsNotFound(
                f"{source} is not a complete diffusers pipeline folder ({exc}). It needs model_index.json and "
                "one sub-folder per component, as written by pipeline.save_pretrained() or `hf download`."
            ) from exc
        folder = f"/models/{source.split('/')[-1]}"
        fetch = f"`hf download {source} --local-dir {folder}` and start with `--model {folder}`"
        if not local_only:
            raise WeightsNotFound(f"Downloading {source!r} from the Hugging Face hub failed ({exc}). {fetch}.") from exc
        raise WeightsNotFound(
            f"The weights of {source!r} are not in the local Hugging Face cache. Fetch them with {fetch}, or allow "
            "downloads for this model (ModelSpec.allow_download) on a machine that reaches the hub."
        ) from exc


def _from_single_file(path: Path, dtype: torch.dtype, local_only: bool) -> Any:
    if not path.is_file():
        raise WeightsNotFound(f"Checkpoint {path} does not exist.")
    class_name = _single_file_class(path)
    if class_name is None:
        raise WeightsNotFound(
            f"{path} is not a whole Stable Diffusion / SDXL checkpoint, the only kinds loaded from one file. FLUX.2, "
            "FLUX.1 and Qwen-Image files usually hold the transformer alone; point --model at a diffusers folder "
            "(e.g. `hf download black-forest-labs/FLUX.2-klein-4B --local-dir /models/flux2-klein-4b`)."
        )
    import diffusers

    try:
        return getattr(diffusers, class_name).from_single_file(str(path), dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise WeightsNotFound(
            f"{path} could not be loaded as a {class_name} checkpoint ({exc}). Single files need the model's "
            "configs from the hub cache: allow downloads once (ModelSpec.allow_download), or convert it to a "
            "diffusers folder with pipeline.save_pretrained() and pass that folder."
        ) from exc


def _single_file_class(path: Path) -> str | None:
    """The pipeline class of a single-file checkpoint, from its tensor names only (nothing is loaded)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    else:
        try:  # mmap: tensors stay on disk; weights_only: a .ckpt is a pickle and must not run code
            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:
            raise WeightsNotFound(f"{path} could not be read safely ({exc}); convert it to .safetensors.") from exc
        keys = list(state.get("state_dict", state))
    for prefix, class_name in SINGLE_FILE_KEYS.items():
        if any(key.startswith(prefix) for key in keys):
            return class_name
    return None


def _with_reference_kv_cache(pipeline: Any) -> Any:
    if family_of(pipeline) != "klein":
        raise ValueError(f"reference_kv_cache is for FLUX.2 [klein] only, not {type(pipeline).__name__}")
    from diffusers import Flux2KleinKVPipeline

    # Same components, shared not copied: the KV pipeline caches the references' K/V on the first step.
    return Flux2KleinKVPipeline.from_pipe(pipeline)
