"""Tests of the evaluate stage on tiny prepared data and hand-made sample sets.

Samples drawn from the true distribution must score within the noise floor's spread,
shifted or corrupted samples far above it, and copies of training images must show up
as memorisation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flowmatch.datasets import make_rng, make_toy, sample_gaussian
from flowmatch.gaussian import GaussianPath
from flowmatch.models import build_model
from flowmatch.paths import conditional_velocity_x
from flowmatch.schedules import get_schedule
from flowmatch.training import LoadedModel, Trainer, TrainSettings, model_file_contents, schedule_config
from stage_utils import copy_params, run_in_directory, run_python_module
from stages import classifier, evaluate, evaluate_flow, prepare
from stages.common import save_npz, save_torch
from stages.config import load_params

N_SAMPLES = 300

# Small settings of the learned-flow metrics, so that each evaluation takes about a second.
LEARNED_FLOW_PARAMS = {"nll_n": 200, "straightness_n": 200, "straightness_steps": 16, "velocity_error_n": 500, "velocity_error_times": 8}


def write_samples(directory: Path, dataset: str, sets: dict[tuple[str, int], np.ndarray], wrap: bool = True) -> None:
    """Write ``data/samples/DATASET`` with one array per ``(solver, nfe budget)``, as the sample stage does."""
    arrays, records = {}, []
    for (solver, budget), points in sets.items():
        key = f"{solver}_nfe{budget}"
        arrays[key] = points.astype(np.float32)
        records.append({"solver": solver, "nfe_budget": budget, "nfe": budget + 1, "steps": budget, "key": key, "seconds": 0.01})
    folder = directory / "data" / "samples" / dataset
    save_npz(folder / "samples.npz", **arrays)
    manifest = {"records": records, "schedule": "cosine"} if wrap else records
    (folder / "manifest.json").write_text(json.dumps(manifest))


def write_untrained_mlp(directory: Path, dataset: str, shape: list[int], schedule: str = "cosine") -> None:
    """Write data/models/DATASET/model.pt with a small untrained MLP, in the train stage's file format."""
    torch.manual_seed(0)
    config = {"kind": "mlp", "shape": shape, "hidden": 16, "layers": 2, "time_dim": 8}
    settings = TrainSettings(steps=1, batch_size=1, lr=1e-3, warmup_steps=0, grad_clip=0.0, ema_decay=0.9)
    trainer = Trainer(build_model(config), get_schedule(schedule), settings, seed=0)
    save_torch(directory / "data" / "models" / dataset / "model.pt", model_file_contents(trainer, config, schedule_config(schedule), dataset))


def run_evaluate(directory: Path, dataset: str) -> dict:
    run_in_directory(evaluate.main, directory, dataset)
    return json.loads((directory / "reports" / "metrics" / f"{dataset}.json").read_text())


def run_module(directory: Path, *arguments: str) -> subprocess.CompletedProcess:
    return run_python_module("stages.evaluate", directory, *arguments, timeout=120)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder with small prepared sets, a briefly trained classifier and sample sets."""
    directory = tmp_path_factory.mktemp("evaluate")
    sections = {
        "data": {"n_train": 400, "n_test": 400},
        "classifier": {"epochs": 4, "min_accuracy": 0.5},
        "evaluate": {"n_eval": 2000, "floor_seeds": 5, **LEARNED_FLOW_PARAMS},
    }
    copy_params(directory, sections)
    run_in_directory(prepare.main, directory)
    run_in_directory(classifier.main, directory)
    for dataset, shape in (("moons", [2]), ("gaussian", [2]), ("digits", [1, 8, 8])):
        write_untrained_mlp(directory, dataset, shape)

    rng = make_rng(99, "test samples")
    moons = make_toy("moons", noise=0.05)
    write_samples(
        directory,
        "moons",
        {
            ("euler", 4): moons.sample(N_SAMPLES, rng) + 1.0,
            ("euler", 8): moons.sample(N_SAMPLES, rng),
            ("rk4", 4): moons.sample(N_SAMPLES, rng),
            ("rk4", 8): moons.sample(N_SAMPLES, rng) + np.array([0.6, 0.0]),
        },
    )
    with np.load(directory / "data" / "prepared" / "gaussian.npz") as archive:
        mean, cov = archive["mean"], archive["cov"]
    write_samples(
        directory,
        "gaussian",
        {("midpoint", 16): sample_gaussian(mean, cov, N_SAMPLES, rng), ("euler", 16): rng.standard_normal((N_SAMPLES, 2))},
        wrap=False,
    )
    with np.load(directory / "data" / "prepared" / "digits.npz") as archive:
        train, test = archive["train"], archive["test"]
    corrupted = np.clip(test + 0.8 * rng.standard_normal(test.shape), -1.0, 1.0)
    nan_set = test.copy()
    nan_set[0, 0, 0, 0] = np.nan
    # Every digit set has the held-out size, so the stage scores the held-out set whole, in order.
    write_samples(
        directory,
        "digits",
        {("euler", 8): train[: len(test)], ("rk4", 8): test, ("midpoint", 8): corrupted, ("heun", 8): nan_set},
    )
    return directory


@pytest.fixture(scope="module")
def moons_metrics(project):
    return run_evaluate(project, "moons")


@pytest.fixture(scope="module")
def digits_metrics(project):
    return run_evaluate(project, "digits")


def test_evaluate_true_samples_within_floor(moons_metrics):
    spread = 4.0 * moons_metrics["w2_floor_std"]
    assert moons_metrics["w2"] < moons_metrics["w2_floor"] + spread
    assert moons_metrics["w2"] > moons_metrics["w2_floor"] - spread


def test_evaluate_energy_and_mmd_within_floor(moons_metrics):
    for name in ("energy", "mmd"):
        assert moons_metrics[name] < moons_metrics[f"{name}_floor"] + 4.0 * moons_metrics[f"{name}_floor_std"], name


def test_evaluate_shifted_samples_far_above_floor(moons_metrics):
    shifted = moons_metrics["by_solver"]["rk4"]["nfe8"]
    assert shifted["w2"] == pytest.approx(0.6, abs=0.1)
    assert shifted["w2"] > moons_metrics["w2_floor"] + 10.0 * moons_metrics["w2_floor_std"]
    assert shifted["energy"] > 3.0 * moons_metrics["energy_floor"]
    assert shifted["mmd"] > 3.0 * moons_metrics["mmd_floor"]


def test_evaluate_headline_best_at_largest_budget(moons_metrics):
    assert moons_metrics["solver"] == "euler"
    assert moons_metrics["nfe_budget"] == 8
    assert moons_metrics["nfe"] == 9


def test_evaluate_uses_smallest_set_size(moons_metrics):
    assert moons_metrics["n_eval"] == N_SAMPLES


def test_evaluate_by_solver_complete(moons_metrics):
    assert set(moons_metrics["by_solver"]) == {"euler", "rk4"}
    assert set(moons_metrics["by_solver"]["euler"]) == {"nfe4", "nfe8"}
    assert set(moons_metrics["by_solver"]["euler"]["nfe4"]) == {"nfe", "w2", "energy", "mmd"}


def test_evaluate_plot_csv(project, moons_metrics):
    frame = pd.read_csv(project / "reports" / "plots" / "moons" / "quality_vs_nfe.csv")
    assert list(frame.columns) == ["solver", "nfe_budget", "nfe", "energy", "mmd", "w2"]
    assert len(frame) == 4


def test_evaluate_figures_wide_png(project, moons_metrics):
    for name in ("samples.png", "quality_vs_nfe.png"):
        path = project / "reports" / "figures" / "moons" / name
        assert path.stat().st_size < 2 * 1024 * 1024
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 600


def test_evaluate_gaussian_case(project):
    metrics = run_evaluate(project, "gaussian")
    assert metrics["solver"] == "midpoint"
    assert metrics["w2"] < metrics["w2_floor"] + 4.0 * metrics["w2_floor_std"]
    assert metrics["by_solver"]["euler"]["nfe16"]["w2"] > metrics["w2_floor"] + 10.0 * metrics["w2_floor_std"]


def test_evaluate_digits_memorisation(digits_metrics):
    copies = digits_metrics["by_solver"]["euler"]["nfe8"]["memorisation"]
    fresh = digits_metrics["by_solver"]["rk4"]["nfe8"]["memorisation"]
    assert copies == 0.0
    assert fresh == pytest.approx(1.0, abs=1e-12)
    assert digits_metrics["memorisation_reference"] == pytest.approx(1.0, abs=4.0 * digits_metrics["memorisation_reference_std"] + 0.02)


def test_evaluate_digits_fid(digits_metrics):
    # Held-out images scored against themselves give 0; heavy pixel noise lands far above the floor.
    assert digits_metrics["by_solver"]["rk4"]["nfe8"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert digits_metrics["by_solver"]["midpoint"]["nfe8"]["fid"] > 3.0 * digits_metrics["fid_floor"]
    assert digits_metrics["fid_floor"] > 0.0


def test_evaluate_digits_entropy_and_accuracy(project, digits_metrics):
    report = json.loads((project / "reports" / "metrics" / "classifier.json").read_text())
    assert digits_metrics["accuracy"] == report["accuracy"]
    assert digits_metrics["entropy"] == pytest.approx(digits_metrics["entropy_heldout"])
    assert digits_metrics["entropy"] <= digits_metrics["entropy_max"]
    assert digits_metrics["entropy_heldout"] > 0.95 * digits_metrics["entropy_max"]


def test_evaluate_nan_set_reported_null(digits_metrics):
    assert digits_metrics["by_solver"]["heun"]["nfe8"]["fid"] is None
    assert digits_metrics["solver"] == "rk4"


def test_evaluate_digit_grid_written(project, digits_metrics):
    with Image.open(project / "reports" / "figures" / "digits" / "samples.png") as image:
        assert image.width >= 600


def test_evaluate_unknown_dataset(project):
    result = run_module(project, "spirals")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "'spirals'" in result.stderr
    assert "accepted: moons" in result.stderr
    assert not (project / "reports" / "metrics" / "spirals.json").exists()


def test_evaluate_missing_argument(project):
    result = run_module(project)
    assert result.returncode == 2
    assert "usage: python -m stages.evaluate DATASET" in result.stderr


def test_evaluate_missing_samples(project):
    result = run_module(project, "checkerboard")
    assert result.returncode == 2
    assert "data/samples/checkerboard/samples.npz: file not found" in result.stderr
    assert not (project / "reports" / "metrics" / "checkerboard.json").exists()


def test_evaluate_truncated_prepared_file(project, tmp_path):
    (tmp_path / "params.yaml").write_text((project / "params.yaml").read_text())
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "manifest.json").write_text((project / "data" / "prepared" / "manifest.json").read_text())
    data = (project / "data" / "prepared" / "moons.npz").read_bytes()
    (prepared / "moons.npz").write_bytes(data[: len(data) // 2])
    result = run_module(tmp_path, "moons")
    assert result.returncode == 2
    assert "data/prepared/moons.npz: cannot read the file" in result.stderr
    assert not (tmp_path / "reports").exists()


def test_sample_records_missing_key():
    with pytest.raises(evaluate.StageError, match="record 0 lacks key"):
        evaluate.sample_records([{"solver": "euler", "nfe": 4}], Path("manifest.json"))


def test_parse_dataset_accepts_known():
    assert evaluate.parse_dataset(["digits"]) == "digits"


# ---------------------------------------------------------------- image sets without a classifier


@pytest.fixture(scope="module")
def image_metrics(tmp_path_factory):
    """Metrics of an image set named mnist, made of 16 x 16 upscaled digits, and of hand-made sample sets.

    The held-out split is half of the digits' held-out images; the other half serves as
    fresh samples of the same distribution.
    """
    from flowmatch.datasets import load_digits_split

    directory = tmp_path_factory.mktemp("evaluate_images")
    copy_params(directory, {"evaluate": {"n_eval": 2000, "floor_seeds": 5, "straightness_n": 16, "straightness_steps": 4}})

    split = load_digits_split(0.25, seed=0)
    upscale = lambda images: np.kron(images, np.ones((1, 1, 2, 2), dtype=np.float32))
    train, heldout = upscale(split.train), upscale(split.test)
    half = len(heldout) // 2
    test, fresh = heldout[:half], heldout[half : 2 * half]
    prepared = directory / "data" / "prepared"
    save_npz(prepared / "mnist.npz", train=train, test=test, train_labels=split.train_labels, test_labels=split.test_labels[:half])
    entry = {"kind": "image", "shape": [1, 16, 16], "n_train": len(train), "n_test": half, "center": 127.5, "scale": 127.5, "n_classes": 10}
    (prepared / "manifest.json").write_text(json.dumps({"mnist": entry}))

    rng = make_rng(98, "image samples")
    corrupted = np.clip(fresh + 0.8 * rng.standard_normal(fresh.shape), -1.0, 1.0)
    write_samples(directory, "mnist", {("euler", 8): train[:half], ("rk4", 8): fresh, ("midpoint", 8): corrupted})
    write_untrained_unet(directory, "mnist", [1, 16, 16])
    return directory, run_evaluate(directory, "mnist")


def write_untrained_unet(directory: Path, dataset: str, shape: list[int]) -> None:
    """Write data/models/DATASET/model.pt with a small untrained U-Net, for the learned-flow metrics."""
    import torch

    from flowmatch.models import build_model
    from flowmatch.schedules import get_schedule
    from flowmatch.training import Trainer, TrainSettings, model_file_contents, schedule_config
    from stages.common import save_torch

    torch.manual_seed(0)
    config = {"kind": "unet", "shape": shape, "channels": 4, "time_dim": 32}
    settings = TrainSettings(steps=1, batch_size=1, lr=1e-3, warmup_steps=0, grad_clip=0.0, ema_decay=0.9)
    trainer = Trainer(build_model(config), get_schedule("linear"), settings, seed=0)
    save_torch(directory / "data" / "models" / dataset / "model.pt", model_file_contents(trainer, config, schedule_config("linear"), dataset))


def test_evaluate_image_fresh_samples_near_floor(image_metrics):
    _, result = image_metrics
    rows = result["by_solver"]

    assert rows["rk4"]["nfe8"]["fd_pca"] < 1.5 * result["fd_pca_floor"]
    assert rows["midpoint"]["nfe8"]["fd_pca"] > 3.0 * result["fd_pca_floor"]


def test_evaluate_image_copies_memorised(image_metrics):
    _, result = image_metrics
    rows = result["by_solver"]

    assert rows["euler"]["nfe8"]["memorisation"] == 0.0
    assert rows["rk4"]["nfe8"]["memorisation"] == pytest.approx(result["memorisation_reference"], abs=0.15)


def test_evaluate_image_states_missing_class_metrics(image_metrics):
    _, result = image_metrics

    assert "fid" not in result
    assert "entropy" not in result
    assert result["class_metrics"].startswith("not computed")


def test_evaluate_image_plot_column_and_grid(image_metrics):
    directory, _ = image_metrics
    frame = pd.read_csv(directory / "reports" / "plots" / "mnist" / "quality_vs_nfe.csv")

    assert frame.columns[-1] == "fd_pca"
    assert (directory / "reports" / "figures" / "mnist" / "samples.png").is_file()


def test_digit_grid_draws_colour_images(tmp_path):
    images = np.linspace(-1.0, 1.0, 4 * 3 * 6 * 6).reshape(4, 3, 6, 6)
    evaluate.plot_digit_grid(images, tmp_path / "grid.png", "colour", columns=2, rows=2)

    with Image.open(tmp_path / "grid.png") as image:
        assert image.mode in ("RGB", "RGBA")


# ---------------------------------------------------------------- learned flow


class ExactGaussianVelocity(torch.nn.Module):
    """The closed-form marginal velocity of a ``GaussianPath`` as a model ``forward(x, t)``."""

    def __init__(self, path: GaussianPath):
        super().__init__()
        self.path = path
        # model_velocity takes the model's dtype from its first parameter.
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64), requires_grad=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.path.velocity(x, t)


class ConstantVelocity(torch.nn.Module):
    """The field ``u_t(x) = value`` everywhere: every trajectory is a straight line run at constant speed."""

    def __init__(self, value: list[float]):
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(value, dtype=torch.float64), requires_grad=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # 0 * x keeps x in the autograd graph, which the exact divergence differentiates.
        return self.value + 0.0 * x


def gaussian_moments(project: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(project / "data" / "prepared" / "gaussian.npz") as archive:
        return archive["mean"], archive["cov"]


def exact_path(project: Path, schedule: str) -> GaussianPath:
    mean, cov = gaussian_moments(project)
    return GaussianPath(torch.as_tensor(mean), torch.as_tensor(cov), get_schedule(schedule))


def run_with_model(project: Path, dataset: str, model: torch.nn.Module, schedule: str) -> dict:
    """Run the stage on ``dataset`` with ``model`` in place of the trained one."""
    loaded = LoadedModel(model, get_schedule(schedule), schedule_config(schedule), {}, dataset, 0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate_flow, "load_model", lambda name: loaded)
        return run_evaluate(project, dataset)


@pytest.fixture(scope="module", params=["linear", "cosine", "vp", "linear_vp"])
def exact_gaussian_metrics(request, project):
    return run_with_model(project, "gaussian", ExactGaussianVelocity(exact_path(project, request.param)), request.param)


def test_learned_flow_exact_velocity_error_zero(exact_gaussian_metrics):
    assert exact_gaussian_metrics["velocity_error"] < 1e-9
    assert exact_gaussian_metrics["velocity_error_max"] < 1e-9


def test_learned_flow_exact_nll_matches_true(exact_gaussian_metrics):
    assert exact_gaussian_metrics["nll"] == pytest.approx(exact_gaussian_metrics["nll_true"], abs=1e-2)
    assert exact_gaussian_metrics["nll_per_dim"] == pytest.approx(exact_gaussian_metrics["nll"] / 2)


def test_learned_flow_metrics_of_moons(project, moons_metrics):
    assert np.isfinite(moons_metrics["nll"])
    assert moons_metrics["nll_per_dim"] == pytest.approx(moons_metrics["nll"] / 2)
    assert moons_metrics["nll_t_end"] == 1.0
    assert moons_metrics["n_nll"] == LEARNED_FLOW_PARAMS["nll_n"]
    assert moons_metrics["straightness"] > 0.0
    assert "velocity_error" not in moons_metrics


def test_learned_flow_digits_straightness_only(digits_metrics):
    assert digits_metrics["straightness"] > 0.0
    assert "nll" not in digits_metrics


def test_learned_flow_straightness_csv(project, moons_metrics):
    frame = pd.read_csv(project / "reports" / "plots" / "moons" / "learned_flow" / "straightness.csv")
    assert list(frame.columns) == ["t", "squared_deviation"]
    assert len(frame) == LEARNED_FLOW_PARAMS["straightness_steps"] + 1
    assert np.trapezoid(frame["squared_deviation"], frame["t"]) == pytest.approx(moons_metrics["straightness"])


def test_learned_flow_velocity_error_csv(project, exact_gaussian_metrics):
    frame = pd.read_csv(project / "reports" / "plots" / "gaussian" / "learned_flow" / "velocity_error.csv")
    assert list(frame.columns) == ["t", "velocity_error"]
    assert len(frame) == LEARNED_FLOW_PARAMS["velocity_error_times"]
    assert frame["t"].iloc[0] == pytest.approx(0.02)
    assert frame["t"].iloc[-1] == pytest.approx(0.98)
    assert (project / "reports" / "figures" / "gaussian" / "velocity_error.png").is_file()


def test_learned_flow_constant_velocity_straight(project):
    metrics = run_with_model(project, "moons", ConstantVelocity([0.5, -1.0]), "cosine")
    # The trajectories start from float32 noise, so rounding leaves about 1e-15.
    assert metrics["straightness"] == pytest.approx(0.0, abs=1e-12)


def test_straightness_single_point_linear_zero():
    # The linear schedule's conditional flow to one point runs straight at constant speed.
    # It is singular at t = 1, so the trajectories stop at 0.9 and are rescaled.
    schedule = get_schedule("linear")
    z = torch.tensor([1.5, -0.5], dtype=torch.float64)
    x0 = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    value, _, per_time = evaluate_flow.straightness_curve(lambda x, t: conditional_velocity_x(x, z, t, schedule), x0, 16, 0.9)
    assert value == pytest.approx(0.0, abs=1e-20)
    assert np.abs(per_time).max() < 1e-20


def test_straightness_single_point_cosine_curved():
    schedule = get_schedule("cosine")
    z = torch.tensor([1.5, -0.5], dtype=torch.float64)
    x0 = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    value, _, _ = evaluate_flow.straightness_curve(lambda x, t: conditional_velocity_x(x, z, t, schedule), x0, 16, 0.9)
    assert value > 0.1


def whitened_noise(n: int, d: int) -> torch.Tensor:
    """Draw ``n`` points in ``d`` dimensions whose empirical mean is 0 and second moment exactly the identity."""
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x - x.mean(0)
    factor = torch.linalg.cholesky(x.T @ x / n)
    return torch.linalg.solve_triangular(factor, x.T, upper=False).T


def straightness_closed_form(path: GaussianPath, grid: int = 20001) -> float:
    """Return the straightness of the exact flow of ``path`` from ``N(0, I)``, for a schedule with ``alpha_0 = 0``.

    In the eigenbasis of cov the flow scales coordinate i by ``s_i(t) = sqrt(alpha_t^2 lam_i
    + beta_t^2)`` and shifts by ``alpha_t mean``. The deviation of the velocity from
    ``x_1 - x_0`` is then ``(d_alpha_t - 1) mean + (s_i'(t) - s_i(1) + 1) y_i`` with
    ``y ~ N(0, I)``, whose mean square is ``(d_alpha_t - 1)^2 |mean|^2 + sum_i (s_i' - s_i(1) + 1)^2``.
    """
    t = torch.linspace(0.0, 1.0, grid, dtype=torch.float64)
    values = path.schedule(t)
    lam = path.eigenvalues
    scale = torch.sqrt(values.alpha[:, None] ** 2 * lam + values.beta[:, None] ** 2)
    d_scale = (values.alpha[:, None] * values.d_alpha[:, None] * lam + values.beta[:, None] * values.d_beta[:, None]) / scale
    squared = (values.d_alpha - 1) ** 2 * (path.mean**2).sum() + ((d_scale - scale[-1] + 1) ** 2).sum(1)
    return float(torch.trapezoid(squared, t))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_straightness_exact_gaussian_closed_form(project, schedule):
    path = exact_path(project, schedule)
    # The trapezoidal time average errs by O(h^2): about 1e-3 relative at 64 steps, 8e-5 at 256.
    value, _, _ = evaluate_flow.straightness_curve(path.velocity, whitened_noise(2000, 2), 256, 1.0)
    assert value == pytest.approx(straightness_closed_form(path), rel=2e-4)


def test_held_out_nll_singular_schedule_at_end_time(project):
    # linear_vp is trained up to 1 - 1e-3 only, so the NLL is that of the path's density there.
    path = exact_path(project, "linear_vp")
    points = path.sample(100, 1.0, torch.Generator().manual_seed(2))
    settings = evaluate_flow.NllSettings("dopri5", 1, 1e-6, 8, 1)
    result = evaluate_flow.held_out_nll(path.velocity, points.numpy(), path.schedule, settings, torch.Generator())
    assert result["nll_t_end"] == pytest.approx(1.0 - 1e-3)
    assert result["nll"] == pytest.approx(float(-path.log_density(points, result["nll_t_end"]).mean()), abs=1e-4)


def test_held_out_nll_vp_uses_path_base_density(project):
    # Under vp the path starts from N(alpha_0 mean, alpha_0^2 cov + beta_0^2 I), not N(0, I).
    path = exact_path(project, "vp")
    mean, cov = gaussian_moments(project)
    points = path.sample(100, 1.0, torch.Generator().manual_seed(3)).numpy()
    settings = evaluate_flow.NllSettings("dopri5", 1, 1e-6, 8, 1)
    base = evaluate_flow.base_log_density(path.schedule, mean, cov)
    result = evaluate_flow.held_out_nll(path.velocity, points, path.schedule, settings, torch.Generator(), base)
    reference = -float(path.log_density(torch.as_tensor(points), result["nll_t_end"]).mean())
    assert result["nll"] == pytest.approx(reference, abs=1e-5)
    assert evaluate_flow.base_log_density(get_schedule("cosine"), mean, cov) is None


def test_held_out_nll_hutchinson_above_threshold(project):
    path = exact_path(project, "cosine")
    mean, cov = gaussian_moments(project)
    points = path.sample(200, 1.0, torch.Generator().manual_seed(4)).numpy()
    exact = evaluate_flow.NllSettings("dopri5", 1, 1e-5, 8, 4)
    hutchinson = evaluate_flow.NllSettings("dopri5", 1, 1e-5, 1, 4)
    exact_nll = evaluate_flow.held_out_nll(path.velocity, points, path.schedule, exact, torch.Generator())["nll"]
    estimate = evaluate_flow.held_out_nll(path.velocity, points, path.schedule, hutchinson, torch.Generator().manual_seed(5))["nll"]
    assert estimate != exact_nll
    assert estimate == pytest.approx(evaluate_flow.gaussian_nll(points, mean, cov), abs=0.1)


def test_evaluate_missing_model(project, tmp_path):
    (tmp_path / "params.yaml").write_text((project / "params.yaml").read_text())
    for folder in ("data/prepared", "data/samples/moons"):
        shutil.copytree(project / folder, tmp_path / folder)
    result = run_module(tmp_path, "moons")
    assert result.returncode == 2
    assert "data/models/moons/model.pt: file not found" in result.stderr
    assert not (tmp_path / "reports" / "metrics" / "moons.json").exists()


def test_evaluate_params_reject_reversed_time_range(tmp_path):
    copy_params(tmp_path, {"evaluate": {"velocity_error_t_min": 0.9, "velocity_error_t_max": 0.1}})
    with pytest.raises(evaluate.StageError, match="evaluate.velocity_error_t_max"):
        load_params(tmp_path / "params.yaml")
