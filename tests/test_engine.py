"""The engine on real tiny pipelines (random weights, real diffusers code paths), in this process."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from dreamserve.engine import Engine, Interrupted, WeightsNotFound, loader, runner
from dreamserve.engine.loader import LayoutChange, resolve_dtype, set_memory_format
from dreamserve.engine.runner import native_size
from dreamserve.jobs import FailedImage, GeneratedImage, GenerationJob, StepInfo
from dreamserve.settings import ModelSpec


@pytest.fixture(scope="module")
def klein() -> Engine:
    return Engine.load(ModelSpec(source="tiny", max_pixels=128 * 128, max_batch=2))


def job(tmp_path: Path, **fields: object) -> GenerationJob:
    values: dict[str, object] = {
        "task_id": 1,
        "prompt": "a red fox",
        "width": 300,
        "height": 200,
        "num_images": 1,
        "seed": 7,
        "references": [],
        "watermark": False,
        "output_dir": str(tmp_path / "out"),
    }
    values.update(fields)
    return GenerationJob(**values)  # type: ignore[arg-type]


def pixels(path: str) -> bytes:
    with Image.open(path) as image:
        return image.tobytes()


def test_distinct_images_of_the_exact_size_with_seeds(klein: Engine, tmp_path: Path) -> None:
    steps: list[StepInfo] = []
    result = klein.generate(job(tmp_path, num_images=3), steps.append, lambda: False)
    assert [i.name for i in result.images] == ["0.png", "1.png", "2.png"]
    assert [i.seed for i in result.images] == [7, 8, 9]
    assert all((i.width, i.height) == (300, 200) for i in result.images)
    assert len({pixels(i.path) for i in result.images}) == 3, "one seed per image, never copies or a grid"
    # Three images in batches of two: two pipeline calls of four steps each, counted across the task.
    assert [s.step for s in steps] == list(range(1, 9)) and {s.total for s in steps} == {8}
    assert result.method == "generated 144x96, upscaled (lanczos) to 300x200"
    assert {"encode", "denoise", "decode", "upscale", "save"} <= set(result.timings)
    with Image.open(result.images[0].path) as image:
        assert image.format == "PNG" and image.text["ai_generated"] == "true" and image.text["seed"] == "7"


def test_same_seed_same_pixels(klein: Engine, tmp_path: Path) -> None:
    first = klein.generate(job(tmp_path / "a", seed=3), lambda s: None, lambda: False)
    second = klein.generate(job(tmp_path / "b", seed=3, output_dir=str(tmp_path / "b")), lambda s: None, lambda: False)
    assert pixels(first.images[0].path) == pixels(second.images[0].path)


def test_fourteen_references(klein: Engine, tmp_path: Path) -> None:
    refs = []
    for number in range(14):
        path = tmp_path / f"ref{number}.png"
        Image.new("RGB", (96 + number, 64), (number * 15, 80, 160)).save(path)
        refs.append(str(path))
    plain = klein.generate(job(tmp_path / "p", output_dir=str(tmp_path / "p")), lambda s: None, lambda: False)
    edited = klein.generate(job(tmp_path, references=refs), lambda s: None, lambda: False)
    assert edited.method.endswith("14 references")
    assert pixels(plain.images[0].path) != pixels(edited.images[0].path), "references condition the output"


def test_watermark_marks_pixels_and_metadata(klein: Engine, tmp_path: Path) -> None:
    plain = klein.generate(job(tmp_path / "p", output_dir=str(tmp_path / "p")), lambda s: None, lambda: False)
    marked = klein.generate(
        job(tmp_path / "m", watermark=True, output_dir=str(tmp_path / "m")), lambda s: None, lambda: False
    )
    with Image.open(plain.images[0].path) as a, Image.open(marked.images[0].path) as b:
        assert b.text["watermark"] == "visible" and "watermark" not in a.text
        corner = (200, 170, 300, 200)
        assert a.crop(corner).tobytes() != b.crop(corner).tobytes()
        assert a.crop((0, 0, 100, 100)).tobytes() == b.crop((0, 0, 100, 100)).tobytes()


def test_stop_between_steps_writes_nothing(klein: Engine, tmp_path: Path) -> None:
    steps: list[StepInfo] = []
    with pytest.raises(Interrupted):
        klein.generate(job(tmp_path, num_images=4), steps.append, lambda: bool(steps))
    assert len(steps) <= 4, "the callback interrupts the pipeline; the second batch never starts"
    assert not list((tmp_path / "out").glob("*.png"))


def test_sd_turbo_img2img_with_one_reference(tmp_path: Path) -> None:
    engine = Engine.load(ModelSpec(source="tiny-sd-turbo", max_pixels=128 * 128))
    reference = tmp_path / "ref.png"
    Image.new("RGB", (128, 128), (30, 200, 30)).save(reference)
    result = engine.generate(job(tmp_path, references=[str(reference)]), lambda s: None, lambda: False)
    assert engine.family == "sd" and result.method.endswith("img2img from reference 1")
    assert (result.images[0].width, result.images[0].height) == (300, 200)


def test_loads_a_saved_pipeline_folder_like_real_weights(klein: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    klein.pipeline.save_pretrained(folder)
    engine = Engine.load(ModelSpec(source=str(folder), max_pixels=128 * 128, dtype="float32"))
    assert engine.family == "klein"
    result = engine.generate(job(tmp_path), lambda s: None, lambda: False)
    assert result.images[0].size_bytes > 0


def test_missing_weights_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFound) as info:
        Engine.load(ModelSpec(source="black-forest-labs/FLUX.2-klein-4B"))
    assert "download black-forest-labs/FLUX.2-klein-4B" in str(info.value)
    with pytest.raises(WeightsNotFound) as info:
        Engine.load(ModelSpec(source=str(tmp_path)))
    assert "model_index.json" in str(info.value)


@pytest.mark.parametrize(
    ("request_size", "cap", "expected"),
    [
        ((2048, 2048), 1024 * 1024, (1024, 1024)),
        ((1280, 720), 4096 * 4096, (1280, 720)),
        ((3024, 1296), 512 * 512, (768, 320)),
    ],
)
def test_native_size(request_size: tuple[int, int], cap: int, expected: tuple[int, int]) -> None:
    assert native_size(*request_size, cap) == expected


def test_group_batches_jobs_and_matches_running_them_alone(tmp_path: Path) -> None:
    # One pipeline call for all four images (max_batch 4): three prompts, one generator per image.
    engine = Engine.load(ModelSpec(source="tiny", max_pixels=128 * 128, max_batch=4))
    calls: list[int] = []
    hook = engine.pipeline.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    jobs = [
        job(tmp_path, prompt=f"prompt {i}", seed=10 * i, num_images=n, output_dir=str(tmp_path / f"g{i}"))
        for i, n in enumerate((1, 2, 1))
    ]
    seen: list[tuple[int, int, int]] = []
    try:
        results = engine.generate_group(
            jobs, lambda index, info: seen.append((index, info.step, info.total)), lambda index: False
        )
    finally:
        hook.remove()
    assert calls == [4] * engine.steps, "one batch of four images, four steps"
    assert sorted(seen) == [(i, step, 4) for i in range(3) for step in range(1, 5)]
    for index, grouped in enumerate(results):
        assert not isinstance(grouped, Exception)
        alone = engine.generate(
            job(
                tmp_path,
                prompt=f"prompt {index}",
                seed=10 * index,
                num_images=jobs[index].num_images,
                output_dir=str(tmp_path / f"a{index}"),
            ),
            lambda s: None,
            lambda: False,
        )
        # Batched with other prompts, the same prompt and seed give the same image up to float rounding: batched
        # matmuls sum in another order, so a few 8-bit values (0.01 % here, float32 on CPU) differ by exactly 1.
        for together, apart in zip(grouped.images, alone.images, strict=True):
            with Image.open(together.path) as a, Image.open(apart.path) as b:
                diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.001
        assert [i.seed for i in grouped.images] == [10 * index + n for n in range(jobs[index].num_images)]


def test_group_stops_one_job_and_finishes_the_others(klein: Engine, tmp_path: Path) -> None:
    jobs = [job(tmp_path / f"s{i}", seed=i, output_dir=str(tmp_path / f"s{i}")) for i in range(3)]
    results = klein.generate_group(jobs, lambda index, info: None, lambda index: index == 1)
    assert isinstance(results[1], Interrupted)
    assert not any(isinstance(results[i], Exception) for i in (0, 2))
    assert not list((tmp_path / "s1").glob("*.png")) and len(list((tmp_path / "s0").glob("*.png"))) == 1


def test_group_rejects_mixed_sizes_and_references(klein: Engine, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        klein.generate_group([job(tmp_path), job(tmp_path, width=400)], lambda i, s: None, lambda i: False)
    with pytest.raises(ValueError):
        klein.generate_group([job(tmp_path), job(tmp_path, references=["x.png"])], lambda i, s: None, lambda i: False)


def test_previews_every_n_steps_as_small_jpegs(tmp_path: Path) -> None:
    engine = Engine.load(ModelSpec(source="tiny", max_pixels=512 * 320, preview_every=2))
    assert engine.previewer is not None and engine.previewer.weights.shape == (4 + 1, 3)
    steps: list[StepInfo] = []
    engine.generate(job(tmp_path, width=640, height=400), steps.append, lambda: False)
    assert [s.preview is not None for s in steps] == [False, True, False, True]
    for info in steps[1::2]:
        assert info.preview is not None and info.preview.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(info.preview.split(",", 1)[1]))) as image:
            assert image.format == "JPEG" and image.size == (256, 160), "<= 256 px, the generation's aspect"


def test_previews_every_step_by_default_and_off_with_zero(klein: Engine, tmp_path: Path) -> None:
    steps: list[StepInfo] = []
    klein.generate(job(tmp_path), steps.append, lambda: False)
    assert len(steps) == 4 and all(s.preview is not None for s in steps)
    engine = Engine.load(ModelSpec(source="tiny", max_pixels=128 * 128, preview_every=0))
    steps.clear()
    engine.generate(job(tmp_path), steps.append, lambda: False)
    assert engine.previewer is None and len(steps) == 4 and all(s.preview is None for s in steps)


def test_sd_previews_and_img2img_at_the_generation_size(tmp_path: Path) -> None:
    engine = Engine.load(ModelSpec(source="tiny-sd-turbo", max_pixels=128 * 128, preview_every=1))
    reference = tmp_path / "ref.png"
    Image.new("RGB", (64, 256), (30, 200, 30)).save(reference)
    steps: list[StepInfo] = []
    result = engine.generate(job(tmp_path, references=[str(reference)]), steps.append, lambda: False)
    # img2img denoises int(steps * strength) steps of the reference cropped to the generation size (144x96).
    assert [(s.step, s.total) for s in steps] == [(1, 1)] and steps[0].preview is not None
    assert result.method == "generated 144x96, upscaled (lanczos) to 300x200; img2img from reference 1"


def test_klein_reference_kv_cache_with_fourteen_references(tmp_path: Path) -> None:
    refs = []
    for number in range(14):
        path = tmp_path / f"ref{number}.png"
        Image.new("RGB", (96 + number, 64), (number * 15, 80, 160)).save(path)
        refs.append(str(path))
    engine = Engine.load(ModelSpec(source="tiny", max_pixels=128 * 128, reference_kv_cache=True))
    plain = engine.generate(job(tmp_path, output_dir=str(tmp_path / "t2i")), lambda s: None, lambda: False)
    cached = engine.generate(job(tmp_path, references=refs, num_images=2), lambda s: None, lambda: False)
    assert cached.method.endswith("14 references (K/V cached after step 1)")
    kv = engine._kv or engine.pipeline  # built beside the loaded pipeline, or by the loader in its place
    assert type(kv).__name__ == "Flux2KleinKVPipeline" and kv.transformer is engine.pipeline.transformer
    # Building the K/V pipeline swapped the shared transformer's attention processors: text-to-image is unchanged.
    again = engine.generate(job(tmp_path, output_dir=str(tmp_path / "again")), lambda s: None, lambda: False)
    assert pixels(plain.images[0].path) == pixels(again.images[0].path)
    assert pixels(cached.images[0].path) != pixels(plain.images[0].path)


def test_references_beyond_the_models_limit_are_left_out(tmp_path: Path) -> None:
    engine = Engine.load(ModelSpec(source="tiny", max_pixels=128 * 128, max_references=2))
    refs = []
    for number in range(3):
        path = tmp_path / f"ref{number}.png"
        Image.new("RGB", (64, 64), (number * 80, 80, 160)).save(path)
        refs.append(str(path))
    result = engine.generate(job(tmp_path, references=refs), lambda s: None, lambda: False)
    assert result.method.endswith("; 2 references (1 of 3 references not used)")


def test_a_batch_is_decoded_one_image_at_a_time_on_a_cpu(klein: Engine, tmp_path: Path) -> None:
    # On a CPU one image keeps the cores busy: decoding the batch at once only holds more memory.
    decoded: list[int] = []
    hook = klein.pipeline.vae.decoder.register_forward_pre_hook(lambda _m, args: decoded.append(args[0].shape[0]))
    try:
        result = klein.generate(job(tmp_path, num_images=2), lambda s: None, lambda: False)
    finally:
        hook.remove()
    assert len(result.images) == 2 and decoded == [1, 1]
    vae = klein.pipeline.vae
    # On an accelerator a batch of small images is decoded at once; of large ones, image by image.
    runner._configure_decode(vae, 256, 256, 4, "cuda")
    assert not vae.use_slicing
    runner._configure_decode(vae, 1024, 1024, 4, "cuda")
    assert vae.use_slicing
    runner._configure_decode(vae, 256, 256, 1, "cpu")
    assert not vae.use_slicing


def test_a_batchs_images_are_saved_while_the_next_batch_denoises(klein: Engine, tmp_path: Path) -> None:
    # Three images, two per batch: the first image's announcement waits for the second batch's first step, which
    # comes only if saving runs beside the next batch (else it times out, and the test fails).
    forwards: list[int] = []
    second_batch = threading.Event()

    def forward(_module: object, _args: object) -> None:
        forwards.append(1)
        if len(forwards) > klein.steps:
            second_batch.set()

    overlapped: list[bool] = []

    def on_image(_job: int, image: GeneratedImage | FailedImage) -> None:
        if image.index == 0:
            overlapped.append(second_batch.wait(30))

    hook = klein.pipeline.transformer.register_forward_pre_hook(forward)
    try:
        (result,) = klein.generate_group([job(tmp_path, num_images=3)], lambda i, s: None, lambda i: False, on_image)
    finally:
        hook.remove()
    assert overlapped == [True] and len(forwards) == 2 * klein.steps
    assert not isinstance(result, Exception) and [i.name for i in result.images] == ["0.png", "1.png", "2.png"]


def test_tiled_vae_decode_above_2048_px(tmp_path: Path) -> None:
    engine = Engine.load(ModelSpec(source="tiny", max_pixels=4096 * 4096))
    wide = engine.generate(job(tmp_path, width=2080, height=64), lambda s: None, lambda: False)
    assert wide.method == "native 2080x64" and engine.pipeline.vae.use_tiling
    engine.generate(job(tmp_path, output_dir=str(tmp_path / "small")), lambda s: None, lambda: False)
    assert not engine.pipeline.vae.use_tiling


def test_timings_add_up_and_load_goes_to_the_first_job(tmp_path: Path) -> None:
    engine = Engine.load(ModelSpec(source="tiny", max_pixels=128 * 128, max_batch=2))
    started = time.perf_counter()
    first = engine.generate(job(tmp_path, num_images=3), lambda s: None, lambda: False)
    wall = time.perf_counter() - started
    assert first.timings["load"] == engine.load_seconds > 0
    stages = sum(seconds for name, seconds in first.timings.items() if name != "load")
    assert set(first.timings) == {"load", "encode", "denoise", "decode", "upscale", "save"}
    # The first batch's images are upscaled and saved while the second batch denoises: only the stages of the
    # pipeline calls follow one another.
    calls = first.timings["encode"] + first.timings["denoise"] + first.timings["decode"]
    assert 0.9 * wall <= stages and calls <= wall, (first.timings, wall)
    second = engine.generate(job(tmp_path, output_dir=str(tmp_path / "2")), lambda s: None, lambda: False)
    assert "load" not in second.timings


def test_dtype_is_float32_for_tiny_bfloat16_on_gpus_and_as_asked() -> None:
    assert resolve_dtype(ModelSpec(source="tiny"), "cpu") == torch.float32
    assert resolve_dtype(ModelSpec(source="tiny", dtype="bfloat16"), "cpu") == torch.bfloat16
    assert resolve_dtype(ModelSpec(source="flux2-klein-4b", dtype="float16"), "cuda") == torch.float16
    expected_cpu = torch.bfloat16 if torch.cpu._is_amx_tile_supported() else torch.float32
    assert resolve_dtype(ModelSpec(source="flux2-klein-4b"), "cpu") == expected_cpu
    with mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        assert resolve_dtype(ModelSpec(source="flux2-klein-4b"), "cuda") == torch.bfloat16
    with mock.patch("torch.cuda.is_bf16_supported", return_value=False):
        assert resolve_dtype(ModelSpec(source="/models/klein"), "cuda") == torch.float16


def test_regional_compile_is_available_for_the_flux2_transformer(klein: Engine) -> None:
    # ModelSpec.compile uses compile_repeated_blocks when the denoiser declares its repeated blocks.
    assert klein.pipeline.transformer._repeated_blocks


def test_esrgan_upscaler_through_spandrel(tmp_path: Path) -> None:
    spandrel = pytest.importorskip("spandrel", reason="spandrel needs a torchvision matching torch")
    from spandrel.architectures.ESRGAN import ESRGAN

    weights = tmp_path / "esrgan-2x.pth"
    torch.manual_seed(0)
    torch.save(ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2).state_dict(), weights)
    assert spandrel.ModelLoader().load_from_file(str(weights)).scale == 2
    engine = Engine.load(ModelSpec(source="tiny", max_pixels=128 * 128, upscaler=str(weights)))
    result = engine.generate(job(tmp_path), lambda s: None, lambda: False)
    assert result.method == "generated 144x96, upscaled (ESRGAN 2x + lanczos) to 300x200"
    assert (result.images[0].width, result.images[0].height) == (300, 200)


def test_single_files_and_bad_paths_say_what_to_do(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    # A transformer-only file (how FLUX.2 / Qwen-Image weights are shared) is recognised from its tensor names.
    transformer_only = tmp_path / "flux2-klein.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, str(transformer_only))
    with pytest.raises(WeightsNotFound, match="diffusers folder") as info:
        Engine.load(ModelSpec(source=str(transformer_only)))
    assert "hf download" in str(info.value)
    with pytest.raises(WeightsNotFound, match="does not exist"):
        Engine.load(ModelSpec(source=str(tmp_path / "missing.safetensors")))
    # A path that is not there is not mistaken for a hub id.
    with pytest.raises(WeightsNotFound, match="flux2-klein-4b") as info:
        Engine.load(ModelSpec(source=str(tmp_path / "no-such-folder")))
    assert "does not exist" in str(info.value)


def test_compile_and_lora_are_applied_at_load(tmp_path: Path) -> None:
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    calls: list[str] = []
    with (
        mock.patch.object(
            Flux2Transformer2DModel, "compile_repeated_blocks", lambda self, **kw: calls.append(f"compile {kw}")
        ),
        mock.patch.object(Flux2KleinPipeline, "load_lora_weights", lambda self, src, **kw: calls.append(f"lora {src}")),
        mock.patch.object(Flux2KleinPipeline, "fuse_lora", lambda self: calls.append("fuse")),
        mock.patch.object(Flux2KleinPipeline, "unload_lora_weights", lambda self: calls.append("unload")),
    ):
        engine = Engine.load(ModelSpec(source="tiny", compile=True, lora=str(tmp_path / "style.safetensors")))
    # Regional compilation of the repeated blocks; the LoRA fused into the weights and its adapter dropped.
    assert calls == [f"lora {tmp_path / 'style.safetensors'}", "fuse", "unload", "compile {'fullgraph': True}"]
    assert engine.steps == 4, "a LoRA on klein keeps klein's steps"


def tiny_autoencoder(folder: Path, latent_channels: int) -> str:
    """A random AutoencoderTiny whose decoder upsamples 4x, like the tiny VAEs, saved as a user's folder would be."""
    from diffusers import AutoencoderTiny

    decoder = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        num_encoder_blocks=(1, 1, 1),
        num_decoder_blocks=(1, 1, 1),
        latent_channels=latent_channels,
    )
    decoder.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(("source", "channels"), [("tiny", 1), ("tiny-sd-turbo", 4)])
def test_previews_decoded_by_a_tiny_autoencoder(source: str, channels: int, tmp_path: Path) -> None:
    folder = tiny_autoencoder(tmp_path / "tae", channels)
    engine = Engine.load(ModelSpec(source=source, max_pixels=192 * 128, preview_decoder=folder))
    assert type(engine.previewer).__name__ == "TinyDecoderPreview"
    steps: list[StepInfo] = []
    engine.generate(job(tmp_path, width=300, height=200), steps.append, lambda: False)
    assert steps and all(s.preview is not None for s in steps)
    for info in steps:
        assert info.preview is not None
        with Image.open(io.BytesIO(base64.b64decode(info.preview.split(",", 1)[1]))) as image:
            assert image.format == "JPEG" and image.size == (192, 128), "the generation's size (under 256 px)"


def test_a_tiny_autoencoder_for_other_latents_is_refused(tmp_path: Path) -> None:
    folder = tiny_autoencoder(tmp_path / "tae", 16)
    with pytest.raises(ValueError, match="reads 16-channel latents; this model's VAE makes 4-channel ones"):
        Engine.load(ModelSpec(source="tiny-sd-turbo", preview_decoder=folder))
    with pytest.raises(ValueError, match="is not an AutoencoderTiny folder"):
        Engine.load(ModelSpec(source="tiny-sd-turbo", preview_decoder=str(tmp_path / "missing")))


def test_fp8_quantization_needs_a_cuda_gpu_and_says_so() -> None:
    # Refused before any weights load, with what to do; on a GPU it is bench/gpu.py's --configs fp8 that runs it.
    with pytest.raises(ValueError, match=r'quantize="fp8" needs a CUDA GPU.*Leave quantize at "none"'):
        Engine.load(ModelSpec(source="tiny", device="cpu", quantize="fp8"))
    with pytest.raises(ValueError):
        ModelSpec(source="tiny", quantize="int3")  # type: ignore[arg-type]


def test_images_are_announced_as_saved_and_one_failure_spares_the_others(klein: Engine, tmp_path: Path) -> None:
    announced: list[tuple[int, str, bool]] = []

    def on_image(image: GeneratedImage | FailedImage) -> None:
        saved = isinstance(image, GeneratedImage) and Path(image.path).is_file()
        announced.append((image.index, type(image).__name__, saved))

    calls = {"n": 0}
    real_upscale = runner.upscale

    def failing_once(image: Image.Image, *args: object) -> Image.Image:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("No space left on device")
        return real_upscale(image, *args)  # type: ignore[arg-type]

    with mock.patch.object(runner, "upscale", failing_once):
        result = klein.generate(
            job(tmp_path, num_images=3, output_format="jpeg"), lambda s: None, lambda: False, on_image
        )
    # Each image is on disk when it is announced, in order; the failed one keeps its place and the next still comes.
    assert announced == [(0, "GeneratedImage", True), (1, "FailedImage", False), (2, "GeneratedImage", True)]
    assert [image.name for image in result.images] == ["0.jpeg", "2.jpeg"] and [i.index for i in result.images] == [
        0,
        2,
    ]
    assert [(f.index, f.seed) for f in result.failed] == [(1, 8)] and "No space" in result.failed[0].message
    with Image.open(result.images[0].path) as image:
        assert image.format == "JPEG" and image.size == (300, 200)
        assert '"ai_generated": "true"' in image.info["comment"].decode()


def test_a_job_whose_every_image_fails_fails(klein: Engine, tmp_path: Path) -> None:
    with (
        mock.patch.object(runner, "upscale", side_effect=OSError("disk gone")),
        pytest.raises(RuntimeError, match="disk"),
    ):
        klein.generate(job(tmp_path, num_images=2), lambda s: None, lambda: False)


def test_convolutions_run_channels_last_with_the_same_images(tmp_path: Path) -> None:
    # NHWC weights make the VAE's oneDNN/cuDNN convolutions faster; the images must be those of the default format.
    made = {}
    for flag in (True, False):
        engine = Engine.load(ModelSpec(source="tiny-sd-turbo", max_pixels=128 * 128, channels_last=flag))
        engine.pipeline.vae.state_dict()  # waits for the background layout change (LayoutChange)
        # A 1x1 kernel's weight is laid out alike in both formats: the 3x3 ones tell.
        vae, unet = (
            [m for m in part.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size > (1, 1)]
            for part in (engine.pipeline.vae, engine.pipeline.unet)
        )
        assert vae and all(m.weight.is_contiguous(memory_format=torch.channels_last) == flag for m in vae), (
            "every 2-D convolution of the VAE is NHWC exactly when asked"
        )
        assert unet and all(m.weight.is_contiguous() for m in unet), "the UNet's stay as loaded"
        folder = str(tmp_path / str(flag))
        result = engine.generate(job(tmp_path, output_dir=folder), lambda s: None, lambda: False)
        with Image.open(result.images[0].path) as image:
            made[flag] = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert made[True].shape == made[False].shape == (200, 300, 3)
    # The same computation in another memory order: equal up to float rounding (a pixel level at most).
    assert np.abs(made[True] - made[False]).max() <= 1


def test_convolutions_are_reordered_within_their_own_storage() -> None:
    # A copy would leave the weights' pages of the safetensors mapping resident beside it (2.5 GiB on SD-Turbo).
    pipeline = Engine.load(ModelSpec(source="tiny-sd-turbo", channels_last=False)).pipeline
    weight = pipeline.vae.decoder.conv_in.weight
    before, pointer = weight.detach().clone(), weight.data_ptr()
    set_memory_format(pipeline, torch.channels_last)
    weight = pipeline.vae.decoder.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert weight.data_ptr() == pointer and torch.equal(weight, before)
    set_memory_format(pipeline, torch.contiguous_format)
    assert pipeline.vae.decoder.conv_in.weight.is_contiguous() and torch.equal(
        pipeline.vae.decoder.conv_in.weight, before
    )


def test_a_layout_change_in_the_background_holds_each_convolution_until_it_is_done() -> None:
    # The model process reports ready while the VAE is reordered; a convolution that runs meanwhile must wait.
    pipeline = Engine.load(ModelSpec(source="tiny-sd-turbo", channels_last=False)).pipeline
    conv = pipeline.vae.decoder.conv_in
    before, pointer = conv.weight.detach().clone(), conv.weight.data_ptr()
    sample = torch.randn(1, conv.in_channels, 8, 8)
    expected = torch.nn.functional.conv2d(sample, before, conv.bias, conv.stride, conv.padding)
    change = LayoutChange(pipeline, torch.channels_last)
    answers: list[torch.Tensor] = []
    # A daemon: should the hold be broken, a failed assert must not leave pytest waiting on a blocked thread.
    caller = threading.Thread(target=lambda: answers.append(conv(sample).detach()), daemon=True)
    caller.start()
    caller.join(0.3)
    assert caller.is_alive() and not answers  # held: the change has not even started
    change.start()
    caller.join(30)
    assert not caller.is_alive() and change.done.is_set()
    weight = conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and weight.data_ptr() == pointer
    assert torch.allclose(answers[0], expected, atol=1e-5)
    assert not conv._forward_pre_hooks  # passed once, the hook is gone: later calls take torch's fast path
    state = pipeline.vae.state_dict()  # waits for the change too, and is done now
    assert torch.equal(state["decoder.conv_in.weight"], before)


def test_a_failed_layout_change_fails_the_convolutions_rather_than_run_them() -> None:
    pipeline = Engine.load(ModelSpec(source="tiny-sd-turbo", channels_last=False)).pipeline
    with mock.patch.object(loader, "_reorder_in_place", side_effect=MemoryError("no room")):
        change = LayoutChange(pipeline, torch.channels_last)
        change.start()
        change.done.wait(30)
    with pytest.raises(RuntimeError, match="memory format could not be changed: no room"):
        pipeline.vae.decoder.conv_in(torch.randn(1, pipeline.vae.decoder.conv_in.in_channels, 8, 8))
    with pytest.raises(RuntimeError, match="no room"):
        pipeline.vae.state_dict()


def test_the_service_loads_the_vae_channels_last_in_the_background() -> None:
    engine = Engine.load(ModelSpec(source="tiny-sd-turbo"))
    # Any call into the VAE waits for the change: after one, every convolution is channels-last.
    engine.pipeline.vae.state_dict()
    convolutions = [m for m in engine.pipeline.vae.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convolutions)
    assert all(p.is_contiguous() for p in engine.pipeline.unet.parameters())
