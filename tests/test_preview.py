"""Preview maps: published factors for known VAE families (nothing fitted at load), a cached fit for others."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dreamserve.engine import Engine
from dreamserve.engine.latent_rgb import FLUX1, FLUX2, QWEN_IMAGE, SD, SDXL, published_factors
from dreamserve.engine.loader import load_pipeline
from dreamserve.engine.preview import LatentPreview, published_weights
from dreamserve.jobs import GenerationJob, StepInfo
from dreamserve.settings import ModelSpec


def _no_encoder(pipeline: Any) -> None:
    """Make any use of the VAE encoder fail the test: a known family must not run it at load."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the VAE encoder ran")

    pipeline.vae.encode = refuse


def test_a_known_vae_family_uses_the_published_factors_without_a_fit(tmp_path: Path) -> None:
    pipeline, family = load_pipeline(ModelSpec(source="tiny-sd-turbo"))
    _no_encoder(pipeline)
    preview = LatentPreview.for_pipeline(pipeline, family, tmp_path)
    assert preview is not None and preview.origin == "published:sd"
    assert torch.equal(preview.weights[:4], torch.tensor(SD.factors)) and not list(tmp_path.iterdir())
    # The engine's load takes the same path: its previews render with no encoder available.
    spec = ModelSpec(source="tiny-sd-turbo", max_pixels=128 * 128, preview_cache_dir=str(tmp_path))
    engine = Engine(spec, pipeline, family, load_seconds=0.0)
    assert isinstance(engine.previewer, LatentPreview) and engine.previewer.origin == "published:sd"
    steps: list[StepInfo] = []
    job = GenerationJob(
        task_id=1, prompt="a fox", width=128, height=128, num_images=1, seed=1, references=[], watermark=False,
        output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    engine.generate(job, steps.append, lambda: False)
    assert steps and all(s.preview and s.preview.startswith("data:image/jpeg;base64,") for s in steps)


def test_an_unknown_vae_is_fitted_once_then_read_from_the_cache(tmp_path: Path) -> None:
    pipeline, family = load_pipeline(ModelSpec(source="tiny"))  # a 1-channel VAE: no published factors
    assert published_factors(pipeline.vae) is None
    fitted = LatentPreview.for_pipeline(pipeline, family, tmp_path)
    assert fitted is not None and fitted.origin == "fitted" and fitted.weights.shape == (4 + 1, 3)
    (cached_file,) = tmp_path.iterdir()
    _no_encoder(pipeline)
    cached = LatentPreview.for_pipeline(pipeline, family, tmp_path)
    assert cached is not None and cached.origin == "cached" and cached.fit_r2 == fitted.fit_r2
    assert torch.allclose(cached.weights, fitted.weights)

    # Other weights, another key: fitted again, and the first fit stays.
    del pipeline.vae.encode  # the instance attribute: the real encoder again
    with torch.no_grad():
        next(pipeline.vae.parameters()).add_(0.01)
    refitted = LatentPreview.for_pipeline(pipeline, family, tmp_path)
    assert refitted is not None and refitted.origin == "fitted"
    assert len(list(tmp_path.iterdir())) == 2 and cached_file.exists()

    # A damaged cache file is fitted over, not trusted.
    for path in tmp_path.iterdir():
        path.write_text("{not json")
    again = LatentPreview.for_pipeline(pipeline, family, tmp_path)
    assert again is not None and again.origin == "fitted"


def _small(cls_name: str, **config: Any) -> Any:
    import diffusers

    if cls_name != "AutoencoderKLQwenImage":  # one block of 4 channels: built in milliseconds
        config.update(block_out_channels=(4,), norm_num_groups=2)
        config.update(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    return getattr(diffusers, cls_name)(**config)


@pytest.mark.parametrize(
    ("vae", "expected"),
    [
        (lambda: _small("AutoencoderKL"), SD),
        (lambda: _small("AutoencoderKL", scaling_factor=0.13025), SDXL),
        (
            lambda: _small(
                "AutoencoderKL",
                latent_channels=16,
                scaling_factor=0.3611,
                shift_factor=0.1159,
            ),
            FLUX1,
        ),
        (lambda: _small("AutoencoderKLFlux2"), FLUX2),
        (lambda: _small("AutoencoderKLQwenImage", base_dim=4, dim_mult=[1]), QWEN_IMAGE),
        (lambda: _small("AutoencoderKL", scaling_factor=0.5), None),
        (lambda: _small("AutoencoderKLFlux2", latent_channels=4), None),
    ],
)
def test_vae_families_are_recognised_by_class_and_latent_config(vae: Any, expected: object) -> None:
    assert published_factors(vae()) is expected


def test_published_factors_in_2x2_layouts_give_the_mean_colour_of_the_patch() -> None:
    """On a patched/packed grid (channel c*4 + 2*dy + dx), the map must equal ComfyUI's map applied to the
    un-patched latents and averaged over each 2x2 patch: this pins the channel order."""
    for published in (FLUX2, FLUX1, QWEN_IMAGE):
        channels = len(published.factors)
        latents = torch.randn(1, channels, 6, 4)
        factors, bias = torch.tensor(published.factors), torch.tensor(published.bias)
        full = torch.einsum("nchw,cr->nrhw", latents, factors) + bias.view(1, 3, 1, 1)
        expected = torch.nn.functional.avg_pool2d(full, 2)[0].permute(1, 2, 0)  # (3, 2, 3)
        patched = latents.view(1, channels, 3, 2, 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, channels * 4, 3, 2)
        cells = patched[0].permute(1, 2, 0)
        weights = published_weights(published, "patched")
        got = torch.cat([cells, torch.ones(3, 2, 1)], dim=2) @ weights
        assert torch.allclose(got, expected, atol=1e-5), published.family
