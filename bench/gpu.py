"""GPU benchmark: the full-size FLUX.2 [klein] 4B architecture (5 double + 20 single blocks, Qwen3-4B text
encoder, FLUX.2 VAE) with random weights, so the speed is real and the images are noise. 4 steps.

    .venv/bin/python bench/gpu.py                                   # every config, 1024 and 2048, batch 1 and 4
    .venv/bin/python bench/gpu.py --configs bf16 fp8+compile --sizes 1024
    .venv/bin/python bench/gpu.py --no-service                      # raw only
    .venv/bin/python bench/gpu.py --model tiny --device cpu --sizes 128 --steps 2 --images 1 --configs bf16 fp8

Configs (each a fresh load of the model, the way the service loads it: ``engine.loader.load_pipeline``):
``bf16``; ``compile`` (bf16 + regional ``torch.compile``, ``ModelSpec.compile``); ``fp8`` (torchao float8
weights and dynamic activations, ``ModelSpec.quantize = "fp8"``); ``fp8+compile``. For each size and batch: one
warm-up call (it compiles, for the compiled configs), then ``--images`` timed pipeline calls of ``batch`` images,
as s/image and images/s, with peak GPU memory. A config the machine cannot run (fp8 without torchao or on a GPU
without FP8) is reported as skipped, with the reason.

Then, unless ``--no-service``, the service on the same GPU with ``--service-config`` (``python -m dreamserve
serve``, measured by ``peers.py``'s client side): latency with one client against raw batch 1, throughput with
``--clients`` concurrent clients against raw batch ``--clients``, and the overhead per image (client wall time
minus the server's own stage timings). Needs ``dreamserve[server,worker,bench]`` (and ``[fp8]`` for fp8) and a CUDA
torch; no network, no weights.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL = "random:flux2-klein-4b"
CONFIGS: dict[str, dict[str, Any]] = {
    "bf16": {},
    "compile": {"compile": True},
    "fp8": {"quantize": "fp8"},
    "fp8+compile": {"quantize": "fp8", "compile": True},
}


@dataclass
class Row:
    config: str
    size: int
    batch: int
    seconds_per_image: float
    warm_up: float
    peak_gib: float

    @property
    def images_per_second(self) -> float:
        return 1 / self.seconds_per_image


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def raw(
    model: str, device: str, config: str, sizes: list[int], batches: list[int], steps: int, images: int
) -> tuple[float, list[Row]]:
    """Load once with ``config``, then time every size x batch; returns (load seconds, rows)."""
    import torch

    from dreamserve.engine.loader import load_pipeline
    from dreamserve.engine.runner import SLICED_DECODE_FROM, TILED_DECODE_ABOVE, call_kwargs
    from dreamserve.presets import resolve
    from dreamserve.settings import ModelSpec

    spec = ModelSpec(source=model, dtype="bfloat16", device=device, steps=steps, **CONFIGS[config])
    started = time.perf_counter()
    pipeline, family = load_pipeline(spec)
    _sync(device)
    load = time.perf_counter() - started
    extra = call_kwargs(pipeline, family, resolve(spec, family))
    rows = []
    for size in sizes:
        if size > TILED_DECODE_ABOVE:
            pipeline.vae.enable_tiling()  # as the engine does: FLUX-class VAEs run out of memory above 2048 px
        for batch in batches:
            # As the engine does: a batch of large images is decoded one image at a time (a quarter of the memory).
            if batch > 1 and size * size >= SLICED_DECODE_FROM:
                pipeline.vae.enable_slicing()
            else:
                pipeline.vae.disable_slicing()

            def call(size: int = size, batch: int = batch) -> None:
                generators = [torch.Generator(device).manual_seed(seed) for seed in range(batch)]
                pipeline(
                    prompt=["a red fox in the snow"] * batch,
                    height=size,
                    width=size,
                    num_inference_steps=steps,
                    generator=generators,
                    **extra,
                )
                _sync(device)

            started = time.perf_counter()
            call()  # warm-up, and compilation for the compiled configs
            warm = time.perf_counter() - started
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            for _ in range(images):
                call()
            per_image = (time.perf_counter() - started) / (images * batch)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
            row = Row(config, size, batch, per_image, warm, peak)
            rows.append(row)
            print(
                f"{config} {size}x{size} batch {batch}: {per_image:.3f} s/image, {row.images_per_second:.3f} "
                f"images/s (warm-up {warm:.1f} s, peak {peak:.1f} GiB)",
                flush=True,
            )
    return load, rows  # the pipeline goes with this frame; main() collects it before the next config


def service(model: str, device: str, config: str, size: int, steps: int, images: int, clients: int) -> Any:
    """The service's figures for one size (``peers.Figures``), loading the model with ``config``."""
    from peers import Config, Figures, measure_dreamserve

    figures = Figures("dreamserve", 0)
    options = CONFIGS[config]
    measure_dreamserve(
        Config(
            model, steps, size, "bfloat16", device, images, clients, 1800, same_allocator=False, options=options
        ),  # the raw rows ran in this process, with glibc's defaults
        figures,
        Path(tempfile.mkdtemp(prefix="dreamserve-gpu-")),
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=3, help="timed pipeline calls per measurement")
    parser.add_argument("--clients", type=int, default=4, help="concurrent service clients (and its max_batch)")
    parser.add_argument("--no-service", action="store_true", help="only the raw pipeline")
    parser.add_argument("--service-config", default="bf16", choices=list(CONFIGS))
    parser.add_argument("--model", default=MODEL, help="another source, e.g. tiny with --device cpu for a dry run")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    import diffusers

    sys.path.insert(0, str(Path(__file__).parent))
    print(
        f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}; "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}; {args.model} (random weights, real "
        f"architecture), {args.steps} steps, {args.images} timed call(s) per figure after a warm-up; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        flush=True,
    )
    rows: list[Row] = []
    for config in args.configs:
        try:
            load, config_rows = raw(args.model, args.device, config, args.sizes, args.batches, args.steps, args.images)
        except ValueError as exc:  # a setting this machine cannot run: say why, go on with the others
            print(f"{config}: skipped ({exc})", flush=True)
            continue
        print(f"{config}: load {load:.1f} s", flush=True)
        rows.extend(config_rows)
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    print("\n| config | size | batch | s/image | images/s | warm-up s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row.config} | {row.size}² | {row.batch} | {row.seconds_per_image:.3f} | {row.images_per_second:.3f} "
            f"| {row.warm_up:.1f} | {row.peak_gib:.1f} |"
        )
    if args.no_service:
        return

    def floor(size: int, batch: int) -> Row | None:
        return next((r for r in rows if (r.config, r.size, r.batch) == (args.service_config, size, batch)), None)

    print(f"\nservice ({args.service_config}) against raw {args.service_config} on the same device")
    print("| size | latency s | / raw batch 1 | images/s | / raw batch " + f"{args.clients} | overhead s/image |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        figures = service(args.model, args.device, args.service_config, size, args.steps, args.images, args.clients)
        one, many = floor(size, 1), floor(size, args.clients)
        latency_ratio = f"{figures.latency_s / one.seconds_per_image:.3f}" if one else "-"
        throughput_ratio = f"{figures.throughput / many.images_per_second:.3f}" if many else "-"
        print(
            f"| {size}² | {figures.latency_s:.3f} | {latency_ratio} | {figures.throughput:.3f} | {throughput_ratio} "
            f"| {figures.overhead_s:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
