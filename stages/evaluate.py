"""Stage `evaluate`: score the generated samples and the learned flow of one data set.

Usage: ``python -m stages.evaluate DATASET``.

Reads ``data/samples/DATASET/samples.npz`` and ``manifest.json`` (one sample set per
solver and NFE budget), the model ``data/models/DATASET/model.pt`` and ``data/prepared``.
Writes

- ``reports/metrics/DATASET.json``: headline metrics at the top level for the best
  solver (lowest ``w2``, or ``fid`` for images) at the largest NFE budget, named in
  ``solver``, ``nfe`` and ``nfe_budget``. The metrics of the learned flow are at the top
  level too, and every solver and budget is under ``by_solver``;
- ``reports/plots/DATASET/quality_vs_nfe.csv``: one row per solver and NFE budget;
- ``reports/plots/DATASET/learned_flow/``: ``straightness.csv`` and, for the Gaussian
  case, ``velocity_error.csv``, both against ``t``;
- ``reports/figures/DATASET/``: samples beside held-out data, quality against NFE and
  the per-time curves of the learned flow;
- ``reports/timing/evaluate_DATASET.json``: seconds, in all and per part.

The learned flow (``stages.evaluate_flow``): every set gets the ``straightness`` of the
model's trajectories. Low-dimensional sets also get the held-out ``nll`` and
``nll_per_dim``, and the Gaussian case gets ``nll_true`` under ``N(mean, cov)`` and the
``velocity_error`` against the closed-form velocity.

Low-dimensional sets (toys, Gaussian) get the exact ``w2``, ``energy`` and ``mmd`` to a
fixed random subset of ``n`` held-out points, where ``n = min(evaluate.n_eval, n_test,
samples per set)`` and each sample set is subsampled to ``n`` as well. Each distance
has a noise floor: its mean and standard deviation over ``evaluate.floor_seeds`` pairs
of independent ``n``-point draws from the true distribution (the toy sampler, or
``N(mean, cov)`` for the Gaussian case).

Digits get the Frechet distance ``fid`` to the held-out split in the feature space of
the pipeline's classifier, with its floor (train images against the held-out split).
They also get the class-balance ``entropy`` of the predicted labels and the classifier's
held-out ``accuracy``. The ``memorisation`` ratio divides the median distance from a
sample to its nearest training image by the same median for held-out images, and
``memorisation_reference`` gives its level for fresh images.

Other image sets (MNIST, Fashion-MNIST, CIFAR-10) have no classifier in the pipeline, so
they get no ``fid``, ``entropy`` or ``accuracy`` (``class_metrics`` says so in the
metrics file). They get ``fd_pca``: the Frechet distance between Gaussians fitted to
samples and held-out images after projection onto the first ``PCA_COMPONENTS``
principal components of the training images. Its floor compares ``n`` random training
images with the held-out split. They also get the ``memorisation`` ratio and its reference.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from flowmatch import metrics
from flowmatch.datasets import make_rng, make_toy, sample_gaussian
from stages import evaluate_flow
from stages.classifier import MODEL_PATH as CLASSIFIER_PATH
from stages.classifier import classify, load_classifier
from stages.common import StageError, load_npz, run_stage, save_figure, write_csv, write_json
from stages.config import DATASETS, load_params

log = logging.getLogger("flowmatch.evaluate")

PREPARED_DIR = Path("data/prepared")
SAMPLES_DIR = Path("data/samples")
REPORTS_DIR = Path("reports")

LOW_DIM_DISTANCES = ("w2", "energy", "mmd")

# Image sets with a classifier in the pipeline; other image sets are scored in pixel space.
CLASSIFIED_DATASETS = ("digits",)

# Principal components of the training images that fd_pca compares, and the training
# images the components are fitted on (a random subset when there are more).
PCA_COMPONENTS = 64
PCA_FIT_IMAGES = 10_000
DISTANCE_FUNCTIONS = {"w2": metrics.w2, "energy": metrics.energy_distance, "mmd": metrics.mmd}


# ---------------------------------------------------------------- inputs


def parse_dataset(argv: list[str]) -> str:
    """Return the single DATASET argument; raise ``StageError`` naming the accepted names otherwise."""
    accepted = ", ".join(DATASETS)
    if len(argv) != 1:
        raise StageError(f"expected one argument DATASET, got {len(argv)}: usage: python -m stages.evaluate DATASET (accepted: {accepted})")
    if argv[0] not in DATASETS:
        raise StageError(f"invalid value for argument DATASET: {argv[0]!r} (accepted: {accepted})")
    return argv[0]


def read_json_file(path: Path) -> object:
    """Read a JSON file, raising ``StageError`` naming the file when it is missing or invalid."""
    if not path.exists():
        raise StageError(f"{path}: file not found; run the stage that writes it first (dvc repro)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StageError(f"{path}: cannot read the JSON file ({error}); delete it and rerun dvc repro") from error


def sample_records(manifest: object, path: Path) -> list[dict]:
    """Return the records ``{"solver", "nfe_budget", "nfe", "key", ...}`` of a samples manifest.

    The manifest is either the list of records or an object that keeps the list under
    ``"records"``, next to other entries such as the schedules used.
    """
    records = manifest.get("records") if isinstance(manifest, dict) else manifest
    if not isinstance(records, list) or not records:
        raise StageError(f"{path}: expected a non-empty list of sample records (or an object with 'records'), found {type(records).__name__}")
    for index, record in enumerate(records):
        missing = [key for key in ("solver", "nfe", "key") if not isinstance(record, dict) or key not in record]
        if missing:
            raise StageError(f"{path}: record {index} lacks {', '.join(missing)}")
    return records


def budget_of(record: dict) -> int:
    """Return the NFE budget of a record, or its actual NFE when it has no budget."""
    budget = record.get("nfe_budget")
    return int(record["nfe"] if budget is None else budget)


def load_samples(dataset: str) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Load the sample sets of ``dataset`` and their records, checking that every key exists."""
    directory = SAMPLES_DIR / dataset
    arrays = load_npz(directory / "samples.npz")
    manifest_path = directory / "manifest.json"
    records = sample_records(read_json_file(manifest_path), manifest_path)
    for record in records:
        if record["key"] not in arrays:
            raise StageError(f"{manifest_path}: sample set {record['key']!r} is not in {directory / 'samples.npz'} (found: {', '.join(sorted(arrays))})")
    return arrays, records


def check_sample_shapes(dataset: str, samples: dict[str, np.ndarray], records: list[dict], shape: tuple[int, ...]) -> None:
    """Raise ``StageError`` naming the file and the set when a sample set is not ``(n, *shape)`` with ``n >= 1``."""
    for record in records:
        points = samples[record["key"]]
        if points.ndim != len(shape) + 1 or tuple(points.shape[1:]) != tuple(shape) or len(points) == 0:
            raise StageError(
                f"{SAMPLES_DIR / dataset / 'samples.npz'}: sample set {record['key']!r} has shape {tuple(points.shape)}, "
                f"but {dataset} samples have shape (n, {', '.join(map(str, shape))}); rerun the sample stage (dvc repro sample@{dataset})"
            )


def load_prepared(dataset: str) -> tuple[dict[str, np.ndarray], dict]:
    """Load the prepared arrays of ``dataset`` and its manifest entry."""
    manifest_path = PREPARED_DIR / "manifest.json"
    manifest = read_json_file(manifest_path)
    if not isinstance(manifest, dict) or dataset not in manifest:
        raise StageError(f"{manifest_path}: no entry for {dataset!r}; rerun the prepare stage (dvc repro prepare)")
    return load_npz(PREPARED_DIR / f"{dataset}.npz"), manifest[dataset]


def true_sampler(entry: dict, prepared: dict[str, np.ndarray]) -> Callable[[int, np.random.Generator], np.ndarray]:
    """Return ``sample(n, rng)`` drawing fresh independent points from the true distribution of a low-dimensional set."""
    if entry["kind"] == "toy":
        options = dict(entry["sampler"])
        toy = make_toy(options.pop("name"), **options)
        return toy.sample
    mean, cov = prepared["mean"], prepared["cov"]
    return lambda n, rng: sample_gaussian(mean, cov, n, rng)


def subsample(points: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``n`` rows of ``points`` chosen without replacement (all of them, in order, when there are ``n``)."""
    if len(points) == n:
        return points
    return points[np.sort(rng.choice(len(points), size=n, replace=False))]


def non_finite_count(points: np.ndarray) -> int:
    """Return how many samples (rows of ``points``) contain a NaN or infinite value."""
    return int((~np.isfinite(points.reshape(len(points), -1))).any(axis=1).sum())


# ---------------------------------------------------------------- low-dimensional sets


def low_dim_floors(sample: Callable, n: int, seed: int, dataset: str, floor_seeds: int) -> dict[str, float]:
    """Return ``{name}_floor`` and ``{name}_floor_std`` for every low-dimensional distance."""
    floors = {}
    for name in LOW_DIM_DISTANCES:
        # The same generators for every distance, so all three floors use the same draws.
        rngs = [make_rng(seed, dataset, "evaluate", "floor", k) for k in range(floor_seeds)]
        floor = metrics.noise_floor(DISTANCE_FUNCTIONS[name], sample, n, rngs)
        floors[f"{name}_floor"] = floor.mean
        floors[f"{name}_floor_std"] = floor.std
        log.info("%s noise floor at n = %d: %.5f +- %.5f", name, n, floor.mean, floor.std)
    return floors


def evaluate_low_dim(dataset: str, prepared: dict, entry: dict, samples: dict, records: list[dict], seed: int, n_eval: int, floor_seeds: int) -> tuple[dict, list[dict]]:
    """Score each sample set with ``w2``, ``energy`` and ``mmd`` against held-out data; return (floors and sizes, rows)."""
    n = min(n_eval, len(prepared["test"]), *(len(samples[r["key"]]) for r in records))
    rng = make_rng(seed, dataset, "evaluate", "subsample")
    heldout = subsample(prepared["test"].astype(np.float64), n, rng)
    log.info("scoring %d sample sets of %s on %d points against held-out data", len(records), dataset, n)

    rows = []
    for record in records:
        points = subsample(samples[record["key"]].astype(np.float64), n, rng)
        row = {"solver": record["solver"], "nfe_budget": budget_of(record), "nfe": int(record["nfe"])}
        # The whole set is checked, not only the subsample, so that no non-finite sample goes unreported.
        bad = non_finite_count(samples[record["key"]])
        if bad == 0:
            row.update({name: DISTANCE_FUNCTIONS[name](points, heldout) for name in LOW_DIM_DISTANCES})
        else:
            log.warning("sample set %s: %d of %d samples contain NaN or infinite values; its distances are reported as null", record["key"], bad, len(samples[record["key"]]))
            row.update({name: None for name in LOW_DIM_DISTANCES})
        rows.append(row)
        log.info("%s at nfe %d: w2 = %s", row["solver"], row["nfe"], row["w2"])

    summary = {"n_eval": n, "floor_seeds": floor_seeds}
    summary.update(low_dim_floors(true_sampler(entry, prepared), n, seed, dataset, floor_seeds))
    return summary, rows


# ---------------------------------------------------------------- digits


def digits_floor(train_features: np.ndarray, heldout_features: np.ndarray, n: int, seed: int, floor_seeds: int) -> metrics.NoiseFloor:
    """Return the Frechet distance of ``n`` random train images to the held-out split, over ``floor_seeds`` subsets.

    Train and held-out images are independent draws of the true distribution. With
    ``n`` equal to the train size every subset is the whole split and the spread is 0.
    NOTE: the classifier was fitted to the train split, so its features separate train
    images more sharply than unseen ones. This floor is therefore somewhat above what a
    perfect generator would score.
    """
    values = []
    for k in range(floor_seeds):
        rng = make_rng(seed, "digits", "evaluate", "floor", k)
        values.append(metrics.frechet_distance(subsample(train_features, n, rng), heldout_features))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return metrics.NoiseFloor(mean=float(np.mean(values)), std=std, values=tuple(values))


def memorisation_reference(train: np.ndarray, heldout: np.ndarray, seed: int, floor_seeds: int) -> metrics.NoiseFloor:
    """Return the memorisation ratio of one random half of the held-out split against the other half.

    Both halves are fresh draws, so the ratio is about 1. Its spread over ``floor_seeds``
    random halvings shows how far from 1 a model that does not copy may land by chance.
    """
    values = []
    half = len(heldout) // 2
    for k in range(floor_seeds):
        order = make_rng(seed, "digits", "evaluate", "memorisation", k).permutation(len(heldout))
        values.append(metrics.memorisation_ratio(heldout[order[:half]], train, heldout[order[half:]]))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return metrics.NoiseFloor(mean=float(np.mean(values)), std=std, values=tuple(values))


def evaluate_digits(prepared: dict, samples: dict, records: list[dict], seed: int, n_eval: int, floor_seeds: int) -> tuple[dict, list[dict]]:
    """Score each digit sample set: ``fid``, ``entropy`` and ``memorisation``; return (floors and references, rows)."""
    classifier = load_classifier(CLASSIFIER_PATH)
    train, test = prepared["train"], prepared["test"]
    n_classes = classifier.config["n_classes"]
    train_features, _ = classify(classifier, train)
    heldout_features, heldout_predicted = classify(classifier, test)
    accuracy = float((heldout_predicted == prepared["test_labels"]).mean())
    log.info("classifier held-out accuracy %.4f", accuracy)

    n = min(n_eval, len(train), *(len(samples[r["key"]]) for r in records))
    rng = make_rng(seed, "digits", "evaluate", "subsample")
    flat_train = train.reshape(len(train), -1)
    flat_test = test.reshape(len(test), -1)
    log.info("scoring %d sample sets of digits on %d images against %d held-out images", len(records), n, len(test))

    rows = []
    for record in records:
        images = subsample(samples[record["key"]], n, rng)
        row = {"solver": record["solver"], "nfe_budget": budget_of(record), "nfe": int(record["nfe"])}
        bad = non_finite_count(samples[record["key"]])
        if bad == 0:
            features, predicted = classify(classifier, images)
            row["fid"] = metrics.frechet_distance(features, heldout_features)
            row["entropy"] = metrics.class_entropy(predicted, n_classes)
            row["memorisation"] = metrics.memorisation_ratio(images.reshape(n, -1), flat_train, flat_test)
        else:
            log.warning("sample set %s: %d of %d samples contain NaN or infinite values; its metrics are reported as null", record["key"], bad, len(samples[record["key"]]))
            row.update({"fid": None, "entropy": None, "memorisation": None})
        rows.append(row)
        log.info("%s at nfe %d: fid = %s, entropy = %s", row["solver"], row["nfe"], row["fid"], row["entropy"])

    floor = digits_floor(train_features, heldout_features, n, seed, floor_seeds)
    reference = memorisation_reference(flat_train, flat_test, seed, floor_seeds)
    log.info("fid floor at n = %d: %.4f +- %.4f, memorisation reference %.4f +- %.4f", n, floor.mean, floor.std, reference.mean, reference.std)
    summary = {
        "n_eval": n,
        "floor_seeds": floor_seeds,
        "fid_floor": floor.mean,
        "fid_floor_std": floor.std,
        "entropy_max": math.log(n_classes),
        "entropy_heldout": metrics.class_entropy(heldout_predicted, n_classes),
        "memorisation_reference": reference.mean,
        "memorisation_reference_std": reference.std,
        "accuracy": accuracy,
    }
    return summary, rows


# ---------------------------------------------------------------- other image sets


def fit_pca(train: np.ndarray, seed: int, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the mean ``(d,)`` and the first principal directions ``(d, k)`` of flattened training images.

    ``k`` is ``PCA_COMPONENTS``, at most the image size and one less than the number
    of images fitted.
    """
    flat = train.reshape(len(train), -1).astype(np.float64)
    if len(flat) > PCA_FIT_IMAGES:
        flat = subsample(flat, PCA_FIT_IMAGES, make_rng(seed, dataset, "evaluate", "pca"))
    mean = flat.mean(axis=0)
    components = min(PCA_COMPONENTS, flat.shape[1], len(flat) - 1)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    return mean, vt[:components].T


def evaluate_images(dataset: str, prepared: dict, samples: dict, records: list[dict], seed: int, n_eval: int, floor_seeds: int) -> tuple[dict, list[dict]]:
    """Score each image sample set without a classifier: ``fd_pca`` and ``memorisation``; return (floors and references, rows)."""
    train, test = prepared["train"], prepared["test"]
    n = min(n_eval, len(train), *(len(samples[r["key"]]) for r in records))
    mean, directions = fit_pca(train, seed, dataset)
    flat_train = train.reshape(len(train), -1)
    flat_test = test.reshape(len(test), -1)
    heldout_features = (flat_test - mean) @ directions
    # Nearest-neighbour searches over tens of thousands of training images cost
    # O(queries * n_train * pixels), so the memorisation ratio uses n held-out images.
    heldout_subset = subsample(flat_test, min(n, len(flat_test)), make_rng(seed, dataset, "evaluate", "memorisation_subset"))
    rng = make_rng(seed, dataset, "evaluate", "subsample")
    log.info("scoring %d sample sets of %s on %d images against %d held-out images (no classifier: fd_pca on %d components)", len(records), dataset, n, len(test), directions.shape[1])

    rows = []
    for record in records:
        images = subsample(samples[record["key"]], n, rng).reshape(n, -1)
        row = {"solver": record["solver"], "nfe_budget": budget_of(record), "nfe": int(record["nfe"])}
        bad = non_finite_count(samples[record["key"]])
        if bad == 0:
            row["fd_pca"] = metrics.frechet_distance((images - mean) @ directions, heldout_features)
            row["memorisation"] = metrics.memorisation_ratio(images, flat_train, heldout_subset)
        else:
            log.warning("sample set %s: %d of %d samples contain NaN or infinite values; its metrics are reported as null", record["key"], bad, len(samples[record["key"]]))
            row.update({"fd_pca": None, "memorisation": None})
        rows.append(row)
        log.info("%s at nfe %d: fd_pca = %s, memorisation = %s", row["solver"], row["nfe"], row["fd_pca"], row["memorisation"])

    floor_values = []
    for k in range(floor_seeds):
        chosen = subsample(flat_train, n, make_rng(seed, dataset, "evaluate", "floor", k))
        floor_values.append(metrics.frechet_distance((chosen - mean) @ directions, heldout_features))
    reference = memorisation_reference(flat_train, heldout_subset, seed, floor_seeds)
    summary = {
        "n_eval": n,
        "floor_seeds": floor_seeds,
        "pca_components": int(directions.shape[1]),
        "fd_pca_floor": float(np.mean(floor_values)),
        "fd_pca_floor_std": float(np.std(floor_values, ddof=1)) if floor_seeds > 1 else 0.0,
        "memorisation_reference": reference.mean,
        "memorisation_reference_std": reference.std,
        "class_metrics": f"not computed: the pipeline trains no classifier for {dataset}, so there is no fid, entropy or accuracy",
    }
    log.info("fd_pca floor at n = %d: %.4f +- %.4f", n, summary["fd_pca_floor"], summary["fd_pca_floor_std"])
    return summary, rows


# ---------------------------------------------------------------- results


def best_row(rows: list[dict], metric: str) -> dict:
    """Return the row with the lowest ``metric`` among the rows at the largest NFE budget.

    Raises ``StageError`` when every set at that budget has a null value.
    NOTE: the minimum of several noisy estimates is biased low. When the solvers are all
    close to the floor, the headline value can land below ``{metric}_floor`` by chance.
    """
    largest = max(row["nfe_budget"] for row in rows)
    candidates = [row for row in rows if row["nfe_budget"] == largest and row[metric] is not None]
    if not candidates:
        raise StageError(f"every sample set at NFE budget {largest} contains NaN or infinite values; check the sample stage")
    return min(candidates, key=lambda row: row[metric])


def build_metrics(summary: dict, rows: list[dict], metric: str) -> dict:
    """Assemble the metrics file: the best row's values at the top level, then the summary and ``by_solver``."""
    best = best_row(rows, metric)
    result = {key: value for key, value in best.items()}
    result.update(summary)
    by_solver: dict[str, dict] = {}
    for row in rows:
        values = {key: value for key, value in row.items() if key not in ("solver", "nfe_budget")}
        by_solver.setdefault(row["solver"], {})[f"nfe{row['nfe_budget']}"] = values
    result["by_solver"] = by_solver
    return result


def write_plot_data(rows: list[dict], metric: str, path: Path) -> None:
    """Write one CSV row per sample set, with ``metric`` as the last column.

    ``dvc plots`` draws the last column when dvc.yaml names no ``y``, and the column
    sets differ between low-dimensional sets (``w2``) and digits (``fid``).
    """
    frame = pd.DataFrame(rows)
    columns = [column for column in frame.columns if column != metric] + [metric]
    write_csv(path, frame[columns])


# ---------------------------------------------------------------- figures


def plot_quality(rows: list[dict], metric: str, floor: float, floor_std: float, path: Path, title: str) -> None:
    """Plot ``metric`` against NFE, one line per solver, with the noise floor as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(rows).dropna(subset=[metric])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for solver, group in frame.groupby("solver", sort=False):
        group = group.sort_values("nfe")
        ax.plot(group["nfe"], group[metric], marker="o", label=solver)
    ax.axhline(floor, color="black", linestyle="--", linewidth=1, label=f"{metric} floor")
    ax.axhspan(max(floor - floor_std, 1e-12), floor + floor_std, color="grey", alpha=0.25)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("nfe (velocity evaluations)")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_scatter(points: np.ndarray, heldout: np.ndarray, path: Path, title: str) -> None:
    """Show generated points beside held-out data on equal axes: a scatter of the first two coordinates, a histogram in 1-D."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharex=True, sharey=True)
    for ax, data, label in ((axes[0], heldout, "held-out data"), (axes[1], points, "generated samples")):
        if data.shape[1] >= 2:
            ax.scatter(data[:, 0], data[:, 1], s=2, alpha=0.5, linewidths=0)
            ax.set_aspect("equal", adjustable="box")
        else:
            ax.hist(data[:, 0], bins=60, density=True)
        ax.set_title(f"{label} ({len(data)})")
        ax.set_xlabel("x[0]")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("x[1]" if heldout.shape[1] >= 2 else "density")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_digit_grid(images: np.ndarray, path: Path, title: str, columns: int = 16, rows: int = 8) -> None:
    """Tile the first ``columns * rows`` images ``(n, c, h, w)`` in ``[-1, 1]`` into one grid.

    One channel is drawn in inverted grey levels (dark strokes on white), three
    channels as RGB colour.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(len(images), columns * rows)
    rows = math.ceil(count / columns)
    channels, height, width = images.shape[-3:]
    # Each tile gets a 1-pixel background border, because the digits reach the image edges.
    tiles = np.full((rows * columns, height + 2, width + 2, channels), -1.0)
    tiles[:count, 1:-1, 1:-1] = np.clip(images[:count].transpose(0, 2, 3, 1), -1.0, 1.0)
    grid = tiles.reshape(rows, columns, height + 2, width + 2, channels).transpose(0, 2, 1, 3, 4).reshape(rows * (height + 2), columns * (width + 2), channels)
    fig, ax = plt.subplots(figsize=(columns * 0.5, rows * 0.5 + 0.6))
    if channels == 1:
        ax.imshow(grid[:, :, 0], cmap="gray_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow((grid + 1.0) / 2.0, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------- stage


def main() -> None:
    params = load_params()
    dataset = parse_dataset(sys.argv[1:])
    start = time.perf_counter()

    if params.evaluate.threads > 0:
        torch.set_num_threads(params.evaluate.threads)
    prepared, entry = load_prepared(dataset)
    samples, records = load_samples(dataset)
    check_sample_shapes(dataset, samples, records, prepared["test"].shape[1:])
    loaded = evaluate_flow.load_model(dataset)
    seed, n_eval, floor_seeds = params.seed, params.evaluate.n_eval, params.evaluate.floor_seeds

    if entry["kind"] == "image" and dataset in CLASSIFIED_DATASETS:
        summary, rows = evaluate_digits(prepared, samples, records, seed, n_eval, floor_seeds)
        metric = "fid"
    elif entry["kind"] == "image":
        summary, rows = evaluate_images(dataset, prepared, samples, records, seed, n_eval, floor_seeds)
        metric = "fd_pca"
    else:
        summary, rows = evaluate_low_dim(dataset, prepared, entry, samples, records, seed, n_eval, floor_seeds)
        metric = "w2"
    samples_seconds = time.perf_counter() - start
    flow = evaluate_flow.evaluate_learned_flow(dataset, entry["kind"], loaded, prepared, params.evaluate, seed)
    summary.update(flow.metrics)
    result = build_metrics(summary, rows, metric)

    figures = REPORTS_DIR / "figures" / dataset
    best_key = next(r["key"] for r in records if r["solver"] == result["solver"] and budget_of(r) == result["nfe_budget"])
    caption = f"{dataset}: {result['solver']} at nfe {result['nfe']}"
    if entry["kind"] == "image":
        plot_digit_grid(samples[best_key], figures / "samples.png", f"generated images, {caption}")
    else:
        plot_scatter(samples[best_key], prepared["test"][: len(samples[best_key])], figures / "samples.png", caption)
    plot_quality(rows, metric, summary[f"{metric}_floor"], summary[f"{metric}_floor_std"], figures / "quality_vs_nfe.png", dataset)

    write_plot_data(rows, metric, REPORTS_DIR / "plots" / dataset / "quality_vs_nfe.csv")
    evaluate_flow.write_learned_flow_plots(flow, REPORTS_DIR / "plots" / dataset / "learned_flow", figures, dataset)
    write_json(REPORTS_DIR / "metrics" / f"{dataset}.json", result)
    seconds = time.perf_counter() - start
    write_json(REPORTS_DIR / "timing" / f"evaluate_{dataset}.json", {"seconds": seconds, "seconds_samples": samples_seconds, "seconds_learned_flow": flow.seconds})
    log.info("%s: %s = %.5f (floor %.5f) for %s at nfe %d", dataset, metric, result[metric], result[f"{metric}_floor"], result["solver"], result["nfe"])


if __name__ == "__main__":
    run_stage(main)
