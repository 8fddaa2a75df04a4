"""Cheap per-step previews: latent -> RGB by one linear map, no decoder running during denoising.

For the known VAE families (SD 1.x/2.x and SD-Turbo, SDXL, FLUX.1, FLUX.2, Qwen-Image) the map is the published
one (``latent_rgb``: ComfyUI's ``latent_rgb_factors``), so loading costs nothing. For other VAEs it is fitted once:
a few smooth random colour images go through the VAE encoder into the pipeline's latent space, and a
least-squares fit gives one (C+1)x3 matrix from latent channels to RGB. The fit is cached on disk, keyed by a
hash of the VAE's weights, so later loads of the same weights skip it. Each preview is then one small matrix
product over the latent grid (1/8 or 1/16 of the image side), resized to at most 256 px and sent as a JPEG data
URI.

With ``preview_decoder`` set, previews are decoded instead by a tiny autoencoder (diffusers'
``AutoencoderTiny``: TAESD-style, a few conv layers) trained for the model's VAE latents, e.g.
``madebyollin/taesd`` for SD-Turbo: sharper previews for a few milliseconds per step on a GPU.

What is previewed is the denoised estimate x0 = x_t - sigma_t * v, with v recovered from two consecutive
latents of the Euler step (x_t = x_prev + (sigma_t - sigma_prev) * v); on the first step, where there is no
previous latent, the noisy latent itself. Families without a known latent layout get no previews.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from dreamserve.engine.latent_rgb import PublishedFactors, published_factors

log = logging.getLogger(__name__)

PREVIEW_SIDE = 256
Layout = Literal["scaled", "patched", "packed"]
#: Pipeline family -> how its denoiser's latents relate to the VAE's: ``scaled`` (SD: the VAE latent scaled, one
#: cell per latent pixel), ``patched`` (FLUX.2: 2x2 patches as channels, batch-normalised) or ``packed`` (FLUX.1,
#: Qwen-Image: scaled or normalised, then 2x2 patches as channels). Patch channels are ordered ``c * 4 + 2 * dy +
#: dx`` in both 2x2 layouts, and the callback sees packed/patched latents as a token sequence.
LAYOUTS: dict[str, Layout] = {
    "sd": "scaled",
    "sdxl": "scaled",
    "klein": "patched",
    "flux2": "patched",
    "flux": "packed",
    "kontext": "packed",
    "qwen": "packed",
    "qwen-edit": "packed",
    "qwen-edit-plus": "packed",
}
#: Families whose latents the tiny-decoder previews know how to hand to an ``AutoencoderTiny``.
PATCHED_FAMILIES = ("klein", "flux2")
TINY_DECODER_FAMILIES = (*PATCHED_FAMILIES, "sd")
CALIBRATION_IMAGES = 16
#: Latent cells per calibration image side.
CALIBRATION_GRID = 8
#: Bumped when the fit changes, so that older cached fits are not reused.
FIT_VERSION = 1


def default_cache_dir() -> Path:
    """Where fitted maps are kept unless ``ModelSpec.preview_cache_dir`` says otherwise."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dreamserve" / "preview-maps"


class LatentPreview:
    def __init__(self, pipeline: Any, family: str, weights: torch.Tensor, cell: int, origin: str) -> None:
        self.pipeline = pipeline
        self.family = family
        #: (C + 1, 3): latent channels and a bias -> RGB in [-1, 1].
        self.weights = weights
        #: Image pixels per latent cell.
        self.cell = cell
        #: ``published:<vae family>``, ``fitted`` (at this load) or ``cached`` (a fit of these weights, from disk).
        self.origin = origin
        #: For fitted maps: how much of the colour the map explains on its calibration images (1 = all). Trained
        #: VAEs are close to linear in colour; random test weights are not, and score near 0.
        self.fit_r2: float | None = None

    @classmethod
    def for_pipeline(cls, pipeline: Any, family: str, cache_dir: Path | None = None) -> LatentPreview | None:
        """The map for ``pipeline``: published factors for a known VAE, else a fit (from the cache when these
        weights were fitted before). None for families without a known latent layout."""
        layout = LAYOUTS.get(family)
        vae = getattr(pipeline, "vae", None)
        if layout is None or vae is None:
            return None
        cell = latent_cell(pipeline, family)
        published = published_factors(vae)
        if published is not None:
            return cls(pipeline, family, published_weights(published, layout), cell, f"published:{published.family}")
        cache = (cache_dir or default_cache_dir()) / f"{fit_key(vae, layout)}.json"
        cached = _read_fit(cache)
        if cached is not None:
            reused = cls(pipeline, family, cached[0], cell, "cached")
            reused.fit_r2 = cached[1]
            return reused
        fitted = cls.fit(pipeline, family)
        if fitted is not None:
            _write_fit(cache, fitted)
        return fitted

    @classmethod
    def fit(cls, pipeline: Any, family: str, seed: int = 0) -> LatentPreview | None:
        """Fit the map on ``pipeline``'s VAE (a full encode of the calibration images, every time)."""
        layout = LAYOUTS.get(family)
        if layout is None or getattr(pipeline, "vae", None) is None:
            return None
        cell = latent_cell(pipeline, family)
        side = cell * CALIBRATION_GRID
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(CALIBRATION_IMAGES, 3, 3, 3, generator=generator) * 2 - 1
        images = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=True)
        images = images.clamp(-1, 1)
        with torch.inference_mode():
            latents = _to_pipeline_space(pipeline, layout, _encode(pipeline.vae, images)).float().cpu()
        target = torch.nn.functional.avg_pool2d(images, cell)  # (N, 3, grid, grid)
        channels = latents.shape[1]
        inputs = latents.permute(0, 2, 3, 1).reshape(-1, channels)
        inputs = torch.cat([inputs, torch.ones(inputs.shape[0], 1)], dim=1)
        outputs = target.permute(0, 2, 3, 1).reshape(-1, 3)
        weights = torch.linalg.lstsq(inputs, outputs).solution
        preview = cls(pipeline, family, weights, cell, "fitted")
        residual = ((inputs @ weights - outputs) ** 2).sum()
        preview.fit_r2 = float(1 - residual / ((outputs - outputs.mean(0)) ** 2).sum())
        return preview

    def grid(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return as_grid(latents, width, height, self.cell)

    def render(self, grid: torch.Tensor, width: int, height: int) -> str:
        """One (C, h, w) latent grid -> a JPEG data URI of at most PREVIEW_SIDE px on the long side."""
        cells = grid.float().cpu().permute(1, 2, 0)
        rgb = torch.cat([cells, torch.ones(*cells.shape[:2], 1)], dim=2) @ self.weights
        return _jpeg(rgb, width, height)


def published_weights(published: PublishedFactors, layout: Layout) -> torch.Tensor:
    """The published per-channel factors as a (C + 1, 3) map over the pipeline's latent grid.

    In the 2x2 layouts one grid cell holds the 4 sub-pixels of each VAE channel (channel ``c * 4 + k``): the map
    gives their mean colour, i.e. each factor row a quarter weight on each of its 4 channels.
    """
    factors = torch.tensor(published.factors, dtype=torch.float32)
    if layout != "scaled":
        factors = factors.repeat_interleave(4, dim=0) / 4
    return torch.cat([factors, torch.tensor([published.bias], dtype=torch.float32)])


def fit_key(vae: Any, layout: Layout) -> str:
    """A hash of the VAE's weights (and buffers: FLUX.2's batch-norm statistics), its config and the fit recipe."""
    digest = hashlib.sha256(f"dreamserve-preview-fit-v{FIT_VERSION}:{layout}:{CALIBRATION_IMAGES}".encode())
    digest.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def _read_fit(path: Path) -> tuple[torch.Tensor, float | None] | None:
    try:
        data = json.loads(path.read_text())
        weights = torch.tensor(data["weights"], dtype=torch.float32)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the unreadable cached preview fit %s (%s); fitting again", path, exc)
        return None
    return weights, data.get("fit_r2")


def _write_fit(path: Path, preview: LatentPreview) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole then renamed: two model processes fitting the same weights never read half a file.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
            json.dump({"weights": preview.weights.tolist(), "fit_r2": preview.fit_r2}, handle)
        os.replace(handle.name, path)
    except OSError as exc:  # a read-only cache costs the fit at every load, nothing else
        log.warning("could not cache the preview fit in %s (%s)", path, exc)


def _encode(vae: Any, images: torch.Tensor) -> torch.Tensor:
    pixels = images.to(vae.device, vae.dtype)
    if type(vae).__name__ == "AutoencoderKLQwenImage":  # a video VAE: one frame
        return vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0]
    return vae.encode(pixels).latent_dist.mode()


def _to_pipeline_space(pipeline: Any, layout: Layout, encoded: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the space the denoiser works in, as a (N, C, h, w) grid."""
    vae = pipeline.vae
    if layout == "patched":
        patched = _patchify(encoded)
        mean, std = batch_norm_stats(pipeline, patched)
        return (patched - mean) / std
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(encoded.device, encoded.dtype)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(encoded.device, encoded.dtype)
        scaled = (encoded - mean) / std
    else:
        shift = getattr(config, "shift_factor", None) or 0.0
        scaled = (encoded - shift) * config.scaling_factor
    return scaled if layout == "scaled" else _patchify(scaled)


def _patchify(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C * 4, H / 2, W / 2), channel ``c * 4 + 2 * dy + dx`` (diffusers' order)."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, c * 4, h // 2, w // 2)


class TinyDecoderPreview:
    """Previews decoded by an ``AutoencoderTiny`` that reads the latents the model's VAE decodes."""

    def __init__(self, pipeline: Any, family: str, decoder: Any, cell: int) -> None:
        self.pipeline = pipeline
        self.family = family
        self.decoder = decoder
        self.cell = cell

    @classmethod
    def load(cls, path: str, pipeline: Any, family: str) -> TinyDecoderPreview:
        """Load the decoder folder (diffusers layout) beside ``pipeline``; ValueError when it cannot serve it."""
        from diffusers import AutoencoderTiny

        if family not in TINY_DECODER_FAMILIES or getattr(pipeline, "vae", None) is None:
            raise ValueError(f"preview_decoder is for FLUX.2 and Stable Diffusion pipelines, not the {family} family")
        try:
            decoder = AutoencoderTiny.from_pretrained(path, dtype=pipeline.vae.dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"preview_decoder {path!r} is not an AutoencoderTiny folder ({exc}). Fetch one with "
                "`hf download madebyollin/taesd --local-dir /models/taesd` (for SD-Turbo) and pass that folder."
            ) from exc
        expected = pipeline.vae.config.latent_channels
        if decoder.config.latent_channels != expected:
            raise ValueError(
                f"preview_decoder {path!r} reads {decoder.config.latent_channels}-channel latents; this model's VAE "
                f"makes {expected}-channel ones. Use the tiny autoencoder trained for this model's VAE."
            )
        decoder = decoder.to(pipeline.vae.device).eval()
        return cls(pipeline, family, decoder, latent_cell(pipeline, family))

    def grid(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return as_grid(latents, width, height, self.cell)

    def render(self, grid: torch.Tensor, width: int, height: int) -> str:
        latents = grid.unsqueeze(0).to(self.decoder.device, self.decoder.dtype)
        if self.family in PATCHED_FAMILIES:
            # The pipeline's own decode path: undo the batch-norm scaling, then the 2x2 patching.
            mean, std = batch_norm_stats(self.pipeline, latents)
            latents = latents * std + mean
            latents = self.pipeline._unpatchify_latents(latents)
        config = self.decoder.config
        latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        with torch.inference_mode():
            pixels = self.decoder.decode(latents).sample[0]  # (3, H, W) in [-1, 1]
        return _jpeg(pixels.float().cpu().permute(1, 2, 0), width, height)


Previewer = LatentPreview | TinyDecoderPreview


def latent_cell(pipeline: Any, family: str) -> int:
    """Image pixels per cell of the denoiser's latent grid."""
    return int(pipeline.vae_scale_factor) * (1 if LAYOUTS.get(family, "scaled") == "scaled" else 2)


def batch_norm_stats(pipeline: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FLUX.2 VAE's latent mean and std, shaped (1, C, 1, 1) on ``like``'s device and dtype."""
    vae = pipeline.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


def as_grid(latents: torch.Tensor, width: int, height: int, cell: int) -> torch.Tensor:
    """The callback's latents as a (B, C, h, w) grid (FLUX.2 packs them as a token sequence, row-major)."""
    if latents.ndim == 3:
        rows, cols = height // cell, width // cell
        return latents.reshape(latents.shape[0], rows, cols, latents.shape[2]).permute(0, 3, 1, 2)
    return latents


def _jpeg(rgb: torch.Tensor, width: int, height: int) -> str:
    """(H, W, 3) values in [-1, 1] -> a JPEG data URI, the generation's aspect, at most PREVIEW_SIDE px."""
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    scale = min(PREVIEW_SIDE, max(width, height)) / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def denoised_estimate(scheduler: Any, latents: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """x0 from the latents after an Euler step and those before it; the latents themselves when unknown."""
    sigmas = getattr(scheduler, "sigmas", None)
    index = getattr(scheduler, "step_index", None)
    if previous is None or sigmas is None or index is None or not 1 <= index < len(sigmas):
        return latents
    sigma, sigma_before = float(sigmas[index]), float(sigmas[index - 1])
    if sigma == sigma_before:
        return latents
    velocity = (latents.float() - previous.float()) / (sigma - sigma_before)
    return latents.float() - sigma * velocity
