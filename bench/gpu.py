"""GPU benchmark: the full-size FLUX.2 [klein] 4B architecture (5 double + 20 single blocks, Qwen3-4B text
encoder, FLUX.2 VAE) with random weights, so the speed is real and the images are noise. bf16, 4 steps.

    .venv/bin/python bench/gpu.py                         # 1024 and 2048, raw and through the service
    .venv/bin/python bench/gpu.py --sizes 1024 --images 5 --compile
    .venv/bin/python bench/gpu.py --no-service            # raw only (needs torch, diffusers, transformers)

For each size: latency per image of the raw pipeline (the engine's call arguments, one image per call, timed
after a warm-up), then the same model behind ``dreamserve serve`` on 127.0.0.1 (submit over HTTP, follow the
socket, download the PNG) for latency and for throughput with ``--clients`` concurrent clients (the service
batches same-size requests into one pipeline call). Needs only the wheels of ``dreamserve[server,worker]``:
no network, no weights. Each size starts a fresh server (the model is created on the GPU in seconds).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

MODEL = "random:flux2-klein-4b"


def raw_latency(model: str, device: str, size: int, steps: int, images: int, compile_: bool) -> dict[str, float]:
    import torch

    from dreamserve.engine.loader import load_pipeline
    from dreamserve.engine.runner import call_kwargs
    from dreamserve.models import resolve
    from dreamserve.settings import ModelSpec

    spec = ModelSpec(source=model, dtype="bfloat16", device=device, steps=steps, compile=compile_)
    started = time.perf_counter()
    pipeline, family = load_pipeline(spec)
    _sync(device)
    figures = {"load": time.perf_counter() - started}
    if size > 2048:
        pipeline.vae.enable_tiling()
    extra = call_kwargs(pipeline, family, resolve(spec, family))
    figures.update(_time(pipeline, extra, device, size, steps, images))
    del pipeline
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return figures


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _time(pipeline: Any, extra: dict[str, Any], device: str, size: int, steps: int, images: int) -> dict[str, float]:
    import torch

    def one() -> None:
        generator = torch.Generator(device).manual_seed(0)
        prompt = "a red fox in the snow"
        pipeline(prompt=prompt, height=size, width=size, num_inference_steps=steps, generator=generator, **extra)
        _sync(device)

    started = time.perf_counter()
    one()  # warm-up (and compilation with --compile)
    warm = time.perf_counter() - started
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(images):
        one()
    latency = (time.perf_counter() - started) / images
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return {"warm-up": warm, "latency": latency, "peak GiB": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=3, help="timed images per measurement")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (regional)")
    parser.add_argument("--no-service", action="store_true", help="only the raw pipeline")
    parser.add_argument("--model", default=MODEL, help="another source, e.g. tiny with --device cpu for a dry run")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    import diffusers

    sys.path.insert(0, str(Path(__file__).parent))
    print(
        f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else args.device}; "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}; {args.model} (random weights, real "
        f"architecture), bf16, {args.steps} steps, "
        f"{args.images} timed image(s) after a warm-up{', compiled' if args.compile else ''}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        figures = raw_latency(args.model, args.device, size, args.steps, args.images, args.compile)
        print(
            f"{size}x{size} raw: {figures['latency']:.3f} s/image (load {figures['load']:.1f} s, "
            f"warm-up {figures['warm-up']:.1f} s, peak {figures['peak GiB']:.1f} GiB)",
            flush=True,
        )
        row: dict[str, Any] = {"size": size, "raw": figures["latency"]}
        if not args.no_service:
            try:
                from overhead import service
            except ImportError as exc:
                print(f"service part skipped: {exc} (install dreamserve[server])", flush=True)
                args.no_service = True
            else:
                latency, throughput = service(
                    args.model, args.steps, args.images, args.clients, size, "bfloat16", ready_timeout=900
                )
                row.update(service=latency, throughput=throughput)
                print(
                    f"{size}x{size} service: latency {latency:.3f} s/image (ratio {latency / figures['latency']:.3f}, "
                    f"target <= 1.05); throughput {throughput:.3f} images/s with {args.clients} clients "
                    f"(raw one-at-a-time {1 / figures['latency']:.3f}; ratio {throughput * figures['latency']:.3f}, "
                    "target >= 1.0)",
                    flush=True,
                )
        rows.append(row)
    print("\n| size | raw s/image | service s/image | latency ratio | service images/s | throughput ratio |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "service" in row:
            print(
                f"| {row['size']}² | {row['raw']:.3f} | {row['service']:.3f} | {row['service'] / row['raw']:.3f} | "
                f"{row['throughput']:.3f} | {row['throughput'] * row['raw']:.3f} |"
            )
        else:
            print(f"| {row['size']}² | {row['raw']:.3f} | | | | |")


if __name__ == "__main__":
    main()
