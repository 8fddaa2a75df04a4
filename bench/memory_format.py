"""Channels-last against contiguous convolutions (``ModelSpec.channels_last``, which reorders the VAE's: this is
why): the UNet step and the VAE decode of one pipeline, alternated in one process, timed in CPU seconds of one
thread (``process_time`` on one torch thread counts the work, not the waits for a core, so a busy machine blurs
it less than wall time).

    .venv/bin/python bench/memory_format.py --weights /tmp/gen-w/sd-turbo --size 256 --rounds 3

The weights folder is one ``bench/peers.py`` builds (random weights, real architecture). Prints each round's
seconds and the median ratio channels-last / contiguous per part, and checks that both give the same output.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from dreamserve.engine.loader import load_pipeline, set_memory_format
from dreamserve.settings import ModelSpec


def cpu_seconds(work: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    started = time.process_time()
    with torch.inference_mode():
        out = work()
    return time.process_time() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="a diffusers SD/SD-Turbo folder")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = ModelSpec(source=args.weights, dtype="float32", device="cpu", channels_last=False)
    pipeline, _ = load_pipeline(spec)
    side = args.size // pipeline.vae_scale_factor
    latents = torch.randn(1, pipeline.unet.config.in_channels, side, side)
    text = torch.randn(1, 77, pipeline.unet.config.cross_attention_dim)
    parts: dict[str, Callable[[], torch.Tensor]] = {
        "unet step": lambda: pipeline.unet(latents, torch.tensor([999]), encoder_hidden_states=text).sample,
        "vae decode": lambda: pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample,
    }
    for work in parts.values():  # warm-up: first-call allocations and oneDNN's kernel choice
        cpu_seconds(work)
    seconds: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        for layout, memory_format in (("contiguous", torch.contiguous_format), ("channels-last", torch.channels_last)):
            set_memory_format(pipeline, memory_format, parts=("unet", "vae"))
            outputs = {}
            for part, work in parts.items():
                spent, outputs[part] = cpu_seconds(work)
                seconds.setdefault((part, layout), []).append(spent)
            if layout == "contiguous":
                reference = outputs
            else:
                drift = max(float((outputs[p] - reference[p]).abs().max()) for p in parts)
                print(f"round {round_}: largest difference between the layouts {drift:.2e}", flush=True)
    print(f"{args.size}x{args.size}, one torch thread, load average {os.getloadavg()[0]:.2f}")
    for part in parts:
        base, last = seconds[(part, "contiguous")], seconds[(part, "channels-last")]
        ratio = statistics.median(b / a for a, b in zip(base, last, strict=True))
        print(
            f"{part}: contiguous {[round(s, 2) for s in base]} s, channels-last {[round(s, 2) for s in last]} s, "
            f"median ratio {ratio:.3f}"
        )


if __name__ == "__main__":
    main()
