"""Real model architectures with random weights, for benchmarks: the speed is real, the images are noise.

Tokenizers are the in-memory ones of ``tiny``: prompts are padded to the real model's
sequence length, so the text encoder does the real amount of work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from dreamserve.engine.tiny import clip_vocab, klein_pipeline, sd_turbo_pipeline


@contextlib.contextmanager
def _created_in(dtype: torch.dtype, seed: int, device: str | None = None) -> Iterator[None]:
    """Create parameters directly in ``dtype`` (a 4B model in float32 would not fit beside its encoder), and on
    ``device`` (random initialisation of 8B parameters takes minutes on a CPU, seconds on a GPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    torch.manual_seed(seed)
    try:
        with torch.device(device or "cpu"):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_random_sd_turbo(dtype: torch.dtype = torch.bfloat16, seed: int = 0, device: str | None = None) -> Any:
    """SD-Turbo (SD 2.1 architecture): 865M UNet, OpenCLIP-H text encoder, SD VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with _created_in(dtype, seed, device):
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=1024,
                intermediate_size=4096,
                num_attention_heads=16,
                num_hidden_layers=23,
                hidden_act="gelu",
                projection_dim=512,
                max_position_embeddings=77,
            )
        )
        vae = AutoencoderKL(
            block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=768,
        )
    tokenizer = CLIPTokenizer(vocab=clip_vocab(), merges=[], model_max_length=77)
    return sd_turbo_pipeline(vae, text_encoder, tokenizer, unet)


def build_random_klein_4b_small_te(
    dtype: torch.dtype = torch.bfloat16, seed: int = 0, device: str | None = None
) -> Any:
    """klein 4B with only 3 text-encoder layers (hidden size, vocabulary and sequence length unchanged): the
    transformer and VAE are the real ones; the text encoding costs about 1/12 of Qwen3-4B's."""
    return build_random_klein_4b(dtype, seed, device, text_layers=3)


def build_random_klein_4b(
    dtype: torch.dtype = torch.bfloat16, seed: int = 0, device: str | None = None, text_layers: int = 36
) -> Any:
    """FLUX.2 [klein] 4B: 5 double + 20 single blocks (24 heads x 128), Qwen3-4B text encoder, FLUX.2 VAE.

    The transformer reads the hidden states of 3 text-encoder layers (9, 18, 27 of 36; evenly spaced ones of a
    smaller ``text_layers``, see ``runner._klein_text_layers``), concatenated: 3 x 2560 = ``joint_attention_dim``.
    """
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with _created_in(dtype, seed, device):
        transformer = Flux2Transformer2DModel(
            num_layers=5,
            num_single_layers=20,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=7680,
            guidance_embeds=False,
        )
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=151936,
                hidden_size=2560,
                intermediate_size=9728,
                num_hidden_layers=text_layers,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
                tie_word_embeddings=True,
            )
        )
        vae = AutoencoderKLFlux2()
    return klein_pipeline(text_encoder, transformer, vae)
