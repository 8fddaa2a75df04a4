"""Cheap per-step previews: latent -> RGB by a linear map fitted on the model's own VAE when the model loads.

No decoder runs during denoising. At load, a few smooth random colour images go through the VAE encoder into
the pipeline's latent space, and a least-squares fit gives one 3x(C+1) matrix from latent channels to RGB
(what ComfyUI's hand-fitted ``latent_rgb_factors`` are, fitted here for whichever weights are loaded). Each
preview is then one small matrix product over the latent grid (1/8 or 1/16 of the image side), resized to at
most 256 px and sent as a JPEG data URI.

With ``preview_decoder`` set, previews are decoded instead by a tiny autoencoder (diffusers'
``AutoencoderTiny``: TAESD-style, a few conv layers) trained for the model's VAE latents, e.g.
``madebyollin/taesd`` for SD-Turbo: sharper previews for a few milliseconds per step on a GPU.

What is previewed is the denoised estimate x0 = x_t - sigma_t * v, with v recovered from two consecutive
latents of the Euler step (x_t = x_prev + (sigma_t - sigma_prev) * v); on the first step, where there is no
previous latent, the noisy latent itself. Families: FLUX.2 (klein, dev) and Stable Diffusion; others get none.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import torch
from PIL import Image

PREVIEW_SIDE = 256
#: Families whose latent layout the previewers know: FLUX.2 packs 2x2 patches, batch-normalised; SD is scaled.
PATCHED_FAMILIES = ("klein", "flux2")
FAMILIES = (*PATCHED_FAMILIES, "sd")
CALIBRATION_IMAGES = 16
#: Latent cells per calibration image side.
CALIBRATION_GRID = 8


class LatentPreview:
    def __init__(self, pipeline: Any, family: str, weights: torch.Tensor, cell: int) -> None:
        self.pipeline = pipeline
        self.family = family
        #: (C + 1, 3): latent channels and a bias -> RGB in [-1, 1].
        self.weights = weights
        #: Image pixels per latent cell.
        self.cell = cell
        self.fit_r2 = 0.0

    @classmethod
    def fit(cls, pipeline: Any, family: str, seed: int = 0) -> LatentPreview | None:
        """Fit the map on ``pipeline``'s VAE; None for families without a supported latent layout."""
        if family not in FAMILIES or getattr(pipeline, "vae", None) is None:
            return None
        cell = latent_cell(pipeline, family)
        side = cell * CALIBRATION_GRID
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(CALIBRATION_IMAGES, 3, 3, 3, generator=generator) * 2 - 1
        images = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=True)
        images = images.clamp(-1, 1)
        vae = pipeline.vae
        with torch.inference_mode():
            encoded = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()
            latents = cls._to_pipeline_space(pipeline, family, encoded).float().cpu()
        target = torch.nn.functional.avg_pool2d(images, cell)  # (N, 3, grid, grid)
        channels = latents.shape[1]
        inputs = latents.permute(0, 2, 3, 1).reshape(-1, channels)
        inputs = torch.cat([inputs, torch.ones(inputs.shape[0], 1)], dim=1)
        outputs = target.permute(0, 2, 3, 1).reshape(-1, 3)
        weights = torch.linalg.lstsq(inputs, outputs).solution
        preview = cls(pipeline, family, weights, cell)
        # How much of the colour the map explains on its own calibration images (1 = all). Trained VAEs are close
        # to linear in colour; random test weights are not, and score near 0.
        residual = ((inputs @ weights - outputs) ** 2).sum()
        preview.fit_r2 = float(1 - residual / ((outputs - outputs.mean(0)) ** 2).sum())
        return preview

    @staticmethod
    def _to_pipeline_space(pipeline: Any, family: str, encoded: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the space the denoiser works in, as a (N, C, h, w) grid."""
        vae = pipeline.vae
        if family in PATCHED_FAMILIES:
            patched = pipeline._patchify_latents(encoded)
            mean, std = batch_norm_stats(pipeline, patched)
            return (patched - mean) / std
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (encoded - shift) * vae.config.scaling_factor

    def grid(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return as_grid(latents, width, height, self.cell)

    def render(self, grid: torch.Tensor, width: int, height: int) -> str:
        """One (C, h, w) latent grid -> a JPEG data URI of at most PREVIEW_SIDE px on the long side."""
        cells = grid.float().cpu().permute(1, 2, 0)
        rgb = torch.cat([cells, torch.ones(*cells.shape[:2], 1)], dim=2) @ self.weights
        return _jpeg(rgb, width, height)


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

        if family not in FAMILIES or getattr(pipeline, "vae", None) is None:
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
    return int(pipeline.vae_scale_factor) * (2 if family in PATCHED_FAMILIES else 1)


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
