"""Tiny random-weight pipelines with the real architectures, built in code with no downloads.

They run the same diffusers code paths as the full models (so tests exercise real generation),
at a size a 2-core CI machine runs in seconds. Tokenizers are built from in-memory vocabularies
(transformers 5 accepts ``vocab=``/``merges=``); see shared/reference/runtime.md §2.
"""

from __future__ import annotations

from typing import Any

import torch

QWEN_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def byte_level_vocab() -> dict[str, int]:
    # The 256 symbols of GPT-2's byte-to-unicode map: every byte sequence tokenizes.
    codes = [*range(33, 127), *range(161, 173), *range(174, 256), *range(256, 324)]
    vocab = {chr(code): index for index, code in enumerate(codes)}
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def clip_vocab() -> dict[str, int]:
    """Character-level CLIP BPE vocabulary: every printable ASCII character, alone or word-final."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in (chr(code) for code in range(33, 127)):
            vocab.setdefault(char + suffix, len(vocab))
    return vocab


def build_tiny_klein(seed: int = 0) -> Any:
    """FLUX.2 [klein]: Flux2Transformer2DModel + AutoencoderKLFlux2 + a Qwen3 text encoder."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(byte_level_vocab()),
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
        )
    )
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    )
    # Three VAE blocks (scale factor 4) keep the token count, and so the run time, small.
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(4, 4, 4),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return klein_pipeline(text_encoder, transformer, vae)


def klein_pipeline(text_encoder: Any, transformer: Any, vae: Any) -> Any:
    """A distilled Flux2KleinPipeline (like klein-4B: one transformer pass per step, no guidance) with a
    byte-level Qwen tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(
        vocab=byte_level_vocab(), merges=[], pad_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        is_distilled=True,
    )


def build_tiny_sd_turbo(seed: int = 0) -> Any:
    """SD-Turbo's shape (StableDiffusionPipeline: UNet2DConditionModel + AutoencoderKL + CLIP)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=2,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            max_position_embeddings=77,
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        norm_num_groups=2,
    )
    return sd_turbo_pipeline(vae, text_encoder, tokenizer, unet)


def sd_turbo_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any) -> Any:
    """A StableDiffusionPipeline with SD-Turbo's scheduler settings and no safety checker."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing", steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
