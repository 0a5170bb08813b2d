"""The noise_sequence stage: its seven figures, their determinism, its arrows and its input errors."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from flowmatch.marginal import marginal_velocity
from flowmatch.schedules import SCHEDULE_NAMES, get_schedule
from stage_utils import copy_params, run_in_directory, run_python_module, run_stage_expecting_error
from stages import noise_animations, noise_sequence

FIGURES = Path("reports/figures")
SIZE = 64
MAX_BYTES = 2 * 1024 * 1024


def write_params(directory: Path, schedule: str | None = None, **noise_sequence_values) -> Path:
    """Copy the repository's params.yaml into ``directory`` with a small image and the given overrides."""
    return copy_params(directory, {"noise_sequence": {"size": SIZE, "steps": 6, **noise_sequence_values}}, schedule)


@dataclass
class Runs:
    """Three runs of the stage: a subprocess and an in-process run with equal params, and one under another schedule."""

    first: Path
    first_result: subprocess.CompletedProcess
    second: Path
    other_schedule: Path
    drawn_arrows: list[tuple[tuple[float, float], dict]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    first = write_params(tmp_path_factory.mktemp("first"))
    result = run_python_module("stages.noise_sequence", first, timeout=300)

    drawn_arrows = []
    draw_arrow = noise_animations.draw_arrow

    def recording_draw_arrow(ax, start, vector, **style):
        drawn_arrows.append((tuple(float(v) for v in vector), style))
        return draw_arrow(ax, start, vector, **style)

    second = write_params(tmp_path_factory.mktemp("second"))
    other_schedule = write_params(tmp_path_factory.mktemp("other_schedule"), schedule="linear")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(noise_animations, "draw_arrow", recording_draw_arrow)
        run_in_directory(noise_sequence.main, second)
    run_in_directory(noise_sequence.main, other_schedule)
    return Runs(first, result, second, other_schedule, drawn_arrows)


def test_stage_exits_cleanly(runs):
    assert runs.first_result.returncode == 0, runs.first_result.stderr


@pytest.mark.parametrize("name", noise_sequence.OUTPUT_NAMES)
def test_stage_writes_figure(runs, name):
    path = runs.first / FIGURES / name

    assert path.is_file()
    assert path.stat().st_size < MAX_BYTES


@pytest.mark.parametrize("name", [n for n in noise_sequence.OUTPUT_NAMES if n.endswith(".png")])
def test_png_is_wide_enough(runs, name):
    with Image.open(runs.first / FIGURES / name) as image:
        image.load()
        assert image.format == "PNG"
        assert image.width >= 600


@pytest.mark.parametrize("name", [n for n in noise_sequence.OUTPUT_NAMES if n.endswith(".gif")])
def test_gif_has_enough_frames(runs, name):
    with Image.open(runs.first / FIGURES / name) as image:
        assert image.format == "GIF"
        assert image.n_frames >= 30


def test_no_temporary_files_left(runs):
    names = sorted(path.name for path in (runs.first / FIGURES).iterdir())

    assert names == sorted(noise_sequence.OUTPUT_NAMES)


@pytest.mark.parametrize("name", noise_sequence.OUTPUT_NAMES)
def test_same_params_same_bytes(runs, name):
    assert (runs.first / FIGURES / name).read_bytes() == (runs.second / FIGURES / name).read_bytes()


def test_schedule_changes_trajectory(runs):
    name = "plot_smooth_trajectory.png"

    assert (runs.first / FIGURES / name).read_bytes() != (runs.other_schedule / FIGURES / name).read_bytes()


def test_gif_average_arrow_is_marginal_velocity(runs):
    """The bold arrow of which_way.gif's last frame is h u_t(x) for the four-point data set."""
    params = yaml.safe_load((runs.second / "params.yaml").read_text())
    schedule = get_schedule(params["schedule"])
    scene = noise_animations.which_way_scene(schedule, params["noise_sequence"]["t_example"])
    expected = noise_animations.arrow_step(scene) * marginal_velocity(scene.x[None], scene.t, scene.data, schedule)[0]

    average_arrows = [vector for vector, style in runs.drawn_arrows if style.get("color") == "black"]

    assert average_arrows
    torch.testing.assert_close(torch.tensor(average_arrows[-1], dtype=torch.float64), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("t", [0.25, 0.5, 0.75])
def test_scene_average_is_marginal_velocity(name, t):
    schedule = get_schedule(name)

    scene = noise_animations.which_way_scene(schedule, t)

    assert scene.data.shape == (4, 2)
    expected = marginal_velocity(scene.x[None], t, scene.data, schedule)[0]
    torch.testing.assert_close(scene.arrows.average, expected, rtol=1e-12, atol=1e-12)


def test_grayscale_image_loads(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (90, 70), color=200).save(path)

    photo = noise_sequence.load_photo(str(path), 64, seed=0)

    assert photo.z.shape == (64, 64, 1)
    assert photo.eps.shape == (64, 64, 1)
    assert float(photo.z.mean()) == pytest.approx(2 * 200 / 255 - 1, abs=1e-9)


def test_rgba_image_loads_as_rgb(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (80, 80), color=(255, 0, 0, 128)).save(path)

    photo = noise_sequence.load_photo(str(path), 64, seed=0)

    assert photo.z.shape == (64, 64, 3)
    assert photo.z[..., 0].min() == pytest.approx(1.0)
    assert photo.z[..., 1].max() == pytest.approx(-1.0)


def test_noise_seed_reproducible():
    first = noise_sequence.load_photo("chelsea", 32, seed=4)
    second = noise_sequence.load_photo("chelsea", 32, seed=4)
    other = noise_sequence.load_photo("chelsea", 32, seed=5)

    assert torch.equal(first.eps, second.eps)
    assert not torch.equal(first.eps, other.eps)
    assert float(first.z.min()) >= -1.0
    assert float(first.z.max()) <= 1.0


def run_expecting_error(tmp_path: Path, capsys, **values) -> str:
    """Run the stage in ``tmp_path`` with bad values, check that it leaves no figure and return its error line."""
    write_params(tmp_path, **values)

    error_line = run_stage_expecting_error(noise_sequence.main, tmp_path, capsys)

    assert not (tmp_path / FIGURES).exists() or not any((tmp_path / FIGURES).iterdir())
    return error_line


def test_missing_image_fails(tmp_path, capsys):
    path = tmp_path / "no_such_cat.png"

    line = run_expecting_error(tmp_path, capsys, image=str(path))

    assert str(path) in line
    assert "not found" in line


def test_unreadable_image_fails(tmp_path, capsys):
    path = tmp_path / "cat.png"
    path.write_bytes(b"this is not a PNG file\n")

    line = run_expecting_error(tmp_path, capsys, image=str(path))

    assert str(path) in line
    assert "not a readable image" in line


def test_truncated_image_fails(tmp_path, capsys):
    path = tmp_path / "cat.png"
    Image.new("RGB", (128, 128), color=(10, 20, 30)).save(path)
    path.write_bytes(path.read_bytes()[:60])

    line = run_expecting_error(tmp_path, capsys, image=str(path))

    assert str(path) in line
    assert "cannot read the image" in line


def test_too_small_image_fails(tmp_path, capsys):
    path = tmp_path / "small.png"
    Image.new("RGB", (80, 40), color=(10, 20, 30)).save(path)

    line = run_expecting_error(tmp_path, capsys, image=str(path))

    assert str(path) in line
    assert "80x40" in line
    assert "noise_sequence.size = 64" in line


def test_directory_as_image_fails(tmp_path, capsys):
    line = run_expecting_error(tmp_path, capsys, image=str(tmp_path))

    assert str(tmp_path) in line
    assert "not a regular file" in line


def test_invalid_t_example_fails(tmp_path, capsys):
    line = run_expecting_error(tmp_path, capsys, t_example=1.0)

    assert "'noise_sequence.t_example'" in line
