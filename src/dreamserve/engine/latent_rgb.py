"""Published latent -> RGB factors of the known VAE families, and how to recognise those VAEs.

The tables are ComfyUI's hand-fitted ``latent_rgb_factors`` / ``latent_rgb_factors_bias`` (Comfy-Org/ComfyUI,
``comfy/latent_formats.py`` at commit 75399d78ddcc01f46f9b94521b29f1fe8a90ed53: classes ``SD15``, ``SDXL``,
``Flux``, ``Flux2`` and ``Wan21``, the latter being the format ComfyUI uses for Qwen-Image's VAE). ComfyUI applies
them to the latent in the denoiser's space (after its ``process_in``), one row per latent channel, giving RGB in
[-1, 1]; that space is the one diffusers' pipelines denoise in:

- SD 1.x/2.x (incl. SD-Turbo) and SDXL: ``vae_latent * scaling_factor``;
- FLUX.1: ``(vae_latent - shift_factor) * scaling_factor``, packed by the pipeline into 2x2 patches;
- FLUX.2: 32-channel VAE latents patchified 2x2 into 128 channels and batch-normalised (ComfyUI's table has 32
  rows and un-patches first, ``latent_rgb_factors_reshape``);
- Qwen-Image: ``(vae_latent - latents_mean) / latents_std``, packed 2x2 like FLUX.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PublishedFactors:
    """One VAE family's map: ``rgb = latent_channels @ factors + bias`` per latent cell, in [-1, 1]."""

    family: str
    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


SD = PublishedFactors(
    "sd",
    (
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
)

SDXL = PublishedFactors(
    "sdxl",
    (
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    (0.1084, -0.0175, -0.0011),
)

FLUX1 = PublishedFactors(
    "flux1",
    (
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ),
    (-0.0329, -0.0718, -0.0851),
)

FLUX2 = PublishedFactors(
    "flux2",
    (
        (0.0058, 0.0113, 0.0073),
        (0.0495, 0.0443, 0.0836),
        (-0.0099, 0.0096, 0.0644),
        (0.2144, 0.3009, 0.3652),
        (0.0166, -0.0039, -0.0054),
        (0.0157, 0.0103, -0.0160),
        (-0.0398, 0.0902, -0.0235),
        (-0.0052, 0.0095, 0.0109),
        (-0.3527, -0.2712, -0.1666),
        (-0.0301, -0.0356, -0.0180),
        (-0.0107, 0.0078, 0.0013),
        (0.0746, 0.0090, -0.0941),
        (0.0156, 0.0169, 0.0070),
        (-0.0034, -0.0040, -0.0114),
        (0.0032, 0.0181, 0.0080),
        (-0.0939, -0.0008, 0.0186),
        (0.0018, 0.0043, 0.0104),
        (0.0284, 0.0056, -0.0127),
        (-0.0024, -0.0022, -0.0030),
        (0.1207, -0.0026, 0.0065),
        (0.0128, 0.0101, 0.0142),
        (0.0137, -0.0072, -0.0007),
        (0.0095, 0.0092, -0.0059),
        (0.0000, -0.0077, -0.0049),
        (-0.0465, -0.0204, -0.0312),
        (0.0095, 0.0012, -0.0066),
        (0.0290, -0.0034, 0.0025),
        (0.0220, 0.0169, -0.0048),
        (-0.0332, -0.0457, -0.0468),
        (-0.0085, 0.0389, 0.0609),
        (-0.0076, 0.0003, -0.0043),
        (-0.0111, -0.0460, -0.0614),
    ),
    (-0.0329, -0.0718, -0.0851),
)

QWEN_IMAGE = PublishedFactors(
    "qwen-image",
    (
        (-0.1299, -0.1692, 0.2932),
        (0.0671, 0.0406, 0.0442),
        (0.3568, 0.2548, 0.1747),
        (0.0372, 0.2344, 0.1420),
        (0.0313, 0.0189, -0.0328),
        (0.0296, -0.0956, -0.0665),
        (-0.3477, -0.4059, -0.2925),
        (0.0166, 0.1902, 0.1975),
        (-0.0412, 0.0267, -0.1364),
        (-0.1293, 0.0740, 0.1636),
        (0.0680, 0.3019, 0.1128),
        (0.0032, 0.0581, 0.0639),
        (-0.1251, 0.0927, 0.1699),
        (0.0060, -0.0633, 0.0005),
        (0.3477, 0.2275, 0.2950),
        (0.1984, 0.0913, 0.1861),
    ),
    (-0.1835, -0.0868, -0.3360),
)

#: (scaling_factor, shift_factor) of the plain ``AutoencoderKL`` families, as their published configs give them.
_AUTOENCODER_KL = {
    (4, 0.18215, 0.0): SD,
    (4, 0.13025, 0.0): SDXL,
    (16, 0.3611, 0.1159): FLUX1,
}


def published_factors(vae: Any) -> PublishedFactors | None:
    """The published factors for ``vae``'s family, recognised by its class and latent config; None if unknown.

    Recognition reads the architecture, not the weights: a VAE with a known family's config and other weights
    (a fine-tune, or the random weights of the tests) gets that family's factors.
    """
    config = vae.config
    name = type(vae).__name__
    if name == "AutoencoderKLFlux2":
        return FLUX2 if config.latent_channels == len(FLUX2.factors) else None
    if name == "AutoencoderKLQwenImage":
        plain = config.z_dim == len(QWEN_IMAGE.factors) and config.latents_mean and config.latents_std
        return QWEN_IMAGE if plain else None
    if name == "AutoencoderKL":
        if getattr(config, "latents_mean", None) is not None:
            return None  # SDXL derivatives with their own latent statistics (Playground 2.5)
        key = (
            int(config.latent_channels),
            round(float(config.scaling_factor), 5),
            round(float(getattr(config, "shift_factor", None) or 0.0), 5),
        )
        return _AUTOENCODER_KL.get(key)
    return None
