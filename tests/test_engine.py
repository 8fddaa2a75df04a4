"""The engine on real tiny pipelines (random weights, real diffusers code paths), in this process."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dreamserve.engine import Engine, Interrupted, WeightsNotFound
from dreamserve.engine.runner import native_size
from dreamserve.jobs import GenerationJob, StepInfo
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
    assert "huggingface-cli download black-forest-labs/FLUX.2-klein-4B" in str(info.value)
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


def test_group_batches_jobs_and_matches_running_them_alone(klein: Engine, tmp_path: Path) -> None:
    jobs = [
        job(tmp_path / f"g{i}", prompt=f"prompt {i}", seed=10 * i, num_images=n, output_dir=str(tmp_path / f"g{i}"))
        for i, n in enumerate((1, 2, 1))
    ]
    seen: list[tuple[int, int]] = []
    results = klein.generate_group(jobs, lambda index, info: seen.append((index, info.step)), lambda index: False)
    assert all(not isinstance(r, Exception) for r in results)
    alone = klein.generate(
        job(tmp_path / "a", prompt="prompt 1", seed=10, num_images=2, output_dir=str(tmp_path / "a")),
        lambda s: None,
        lambda: False,
    )
    grouped = results[1]
    assert not isinstance(grouped, Exception)
    # Batched with other prompts, the same prompt and seeds give the same pixels (checked equal, not close).
    assert [pixels(i.path) for i in grouped.images] == [pixels(i.path) for i in alone.images]
    assert {index for index, _ in seen} == {0, 1, 2}


def test_group_stops_one_job_and_finishes_the_others(klein: Engine, tmp_path: Path) -> None:
    jobs = [job(tmp_path / f"s{i}", seed=i, output_dir=str(tmp_path / f"s{i}")) for i in range(3)]
    results = klein.generate_group(jobs, lambda index, info: None, lambda index: index == 1)
    assert isinstance(results[1], Interrupted)
    assert not any(isinstance(results[i], Exception) for i in (0, 2))
    assert not list((tmp_path / "s1").glob("*.png")) and len(list((tmp_path / "s0").glob("*.png"))) == 1
