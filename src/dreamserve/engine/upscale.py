"""Reaching the requested size above the model's native cap: Lanczos (default) or an ESRGAN-class model.

The model is any super-resolution checkpoint ``spandrel`` recognises (ESRGAN/Real-ESRGAN, SwinIR, HAT, ...), a
local ``.pth`` or ``.safetensors`` named by ``ModelSpec.upscaler``. ``spandrel`` imports ``torchvision``: install
the torchvision build that matches your torch (on GPU machines the CUDA wheels), then ``dreamserve[upscale]``.
The model runs on tiles so a 2048 px input does not need one 4096 px activation map; its output is then
resized with Lanczos to the exact requested size (models scale by a fixed factor, usually 2x or 4x).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

TILE = 512
OVERLAP = 32


class ModelUpscaler:
    def __init__(self, path: str, device: str, dtype: torch.dtype) -> None:
        try:
            import spandrel
        except ImportError as exc:  # torchvision missing or mismatched is the usual cause
            raise RuntimeError(
                f"ModelSpec.upscaler is set but spandrel cannot be imported ({exc}). Install torchvision for your "
                "torch, then `pip install 'dreamserve[upscale]'`; or unset upscaler to upscale with Lanczos."
            ) from exc
        if not Path(path).is_file():
            raise FileNotFoundError(f"upscaler model {path} does not exist")
        descriptor = spandrel.ModelLoader(device=device).load_from_file(path)
        if not isinstance(descriptor, spandrel.ImageModelDescriptor):
            raise ValueError(f"{path} is not a single-image model (spandrel found {type(descriptor).__name__})")
        supported = {torch.bfloat16: descriptor.supports_bfloat16, torch.float16: descriptor.supports_half}
        if not supported.get(dtype, True):
            dtype = torch.float32
        self.model = descriptor.to(device=device, dtype=dtype).eval()
        self.scale: int = int(descriptor.scale)
        self.name = f"{descriptor.architecture.name} {self.scale}x"
        self.device = device
        self.dtype = dtype

    def __call__(self, image: Image.Image) -> Image.Image:
        """``image`` enlarged ``scale`` times by the model, tile by tile."""
        tensor = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        tensor = tensor.view(image.height, image.width, 3).permute(2, 0, 1).unsqueeze(0)
        source = tensor.to(self.device, self.dtype) / 255.0
        output = torch.zeros(1, 3, image.height * self.scale, image.width * self.scale, dtype=self.dtype)
        with torch.inference_mode():
            for top in range(0, image.height, TILE):
                for left in range(0, image.width, TILE):
                    tile = self._tile(source, top, left)
                    row, col = top * self.scale, left * self.scale
                    output[..., row : row + tile.shape[-2], col : col + tile.shape[-1]] = tile
        pixels = (output[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(pixels, "RGB")

    def _tile(self, source: torch.Tensor, top: int, left: int) -> torch.Tensor:
        """One TILE x TILE tile upscaled, computed with OVERLAP px of context on each side and cropped back."""
        height, width = source.shape[-2:]
        bottom, right = min(top + TILE, height), min(left + TILE, width)
        pad_top, pad_left = min(OVERLAP, top), min(OVERLAP, left)
        window = source[
            ..., top - pad_top : min(bottom + OVERLAP, height), left - pad_left : min(right + OVERLAP, width)
        ]
        result: torch.Tensor = self.model(window).cpu()
        s = self.scale
        return result[..., pad_top * s : (pad_top + bottom - top) * s, pad_left * s : (pad_left + right - left) * s]


def lanczos(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def upscale(image: Image.Image, size: tuple[int, int], model: Any | None) -> Image.Image:
    """``image`` at exactly ``size``: through the model first when it enlarges, then Lanczos to the exact size."""
    if model is not None and (size[0] > image.width or size[1] > image.height):
        image = model(image)
    return lanczos(image, size)
