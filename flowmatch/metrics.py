"""Distances between sample sets and diagnostics of generated samples and paths.

Every distance here takes two sample sets ``x (n, d)`` and ``y (m, d)``, as NumPy arrays
or CPU tensors, and works in float64. It returns a Python float in the units of the
data, not squared. The exception is ``frechet_distance``, which is squared like FID.

A distance between finite samples is positive even when both come from the same
distribution. ``noise_floor`` measures that level: the same distance between two
independent draws of the true distribution, which is the best any model can score.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ot
from scipy.spatial.distance import cdist, pdist

# Iteration limit of POT's network simplex. The default of 100000 is too few for a few
# thousand points, and a solver stopped early returns a cost above the optimum.
EMD_MAX_ITERATIONS = 100_000_000


def _as_float64(x) -> np.ndarray:
    array = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    return array.reshape(len(array), -1)


def uniform_weights(n: int) -> np.ndarray:
    """Return ``n`` equal float64 weights whose correctly rounded sum is exactly 1.

    ``1 / n`` is not exact in binary for most ``n``. The last weight takes up the rounding
    error so that the two marginals handed to the transport solver have equal mass.
    """
    weights = np.full(n, 1.0 / n)
    weights[-1] = 1.0 - math.fsum(weights[:-1])
    return weights


def w2(x, y) -> float:
    """Return the exact 2-Wasserstein distance between the empirical distributions of ``x`` and ``y``.

    ``W2 = sqrt(min_P sum_ij P_ij |x_i - y_j|^2)`` over couplings ``P`` with uniform
    marginals, solved as a linear program by POT's network simplex (``ot.emd2``) on the
    float64 squared Euclidean cost. The square root is taken once, of the optimal cost.
    Raises ``RuntimeError`` if the solver stops before it reaches the optimum.
    """
    x, y = _as_float64(x), _as_float64(y)
    # scipy sums squared coordinate differences. The |x|^2 + |y|^2 - 2 x.y expansion would
    # cancel catastrophically and leave a cost of about 1e-16 between equal points.
    cost = cdist(x, y, "sqeuclidean")
    value, log = ot.emd2(uniform_weights(len(x)), uniform_weights(len(y)), cost, numItermax=EMD_MAX_ITERATIONS, log=True)
    if log.get("warning"):
        raise RuntimeError(f"exact optimal transport did not converge: {log['warning']}")
    return math.sqrt(max(float(value), 0.0))


def gaussian_w2(mean_1, cov_1, mean_2, cov_2) -> float:
    """Return the closed-form 2-Wasserstein distance between ``N(mean_1, cov_1)`` and ``N(mean_2, cov_2)``.

    ``W2^2 = |m_1 - m_2|^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2})``, the same
    expression as the Frechet distance.
    """
    return math.sqrt(max(frechet_gaussian(mean_1, cov_1, mean_2, cov_2), 0.0))


def energy_distance(x, y) -> float:
    """Return the energy distance ``sqrt(2 E|X - Y| - E|X - X'| - E|Y - Y'|)`` of the two sets.

    The expectations are means over all pairs, diagonal included (V-statistics), so the
    value is the energy distance between the two empirical distributions: exactly 0 for
    identical sets and positive otherwise. For 1-D data it equals
    ``scipy.stats.energy_distance``.
    """
    x, y = _as_float64(x), _as_float64(y)
    cross = cdist(x, y).mean()
    within_x = cdist(x, x).mean()
    within_y = cdist(y, y).mean()
    return math.sqrt(max(2.0 * cross - within_x - within_y, 0.0))


def median_bandwidth(x, y) -> float:
    """Return the median heuristic: the median Euclidean distance between distinct points of ``x`` and ``y`` pooled."""
    pooled = np.concatenate([_as_float64(x), _as_float64(y)])
    return float(np.median(pdist(pooled)))


def mmd(x, y, bandwidth: float | None = None) -> float:
    """Return the maximum mean discrepancy with the Gaussian kernel ``exp(-|a - b|^2 / (2 sigma^2))``.

    ``sigma`` is ``bandwidth``, or the median heuristic on the pooled sample
    (``median_bandwidth``) when it is None. The value is ``sqrt(MMD^2)`` with the biased
    (V-statistic) estimate ``mean K_xx + mean K_yy - 2 mean K_xy``, which is never
    negative and is 0 for identical sets.
    """
    x, y = _as_float64(x), _as_float64(y)
    sigma = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
    if not sigma > 0.0:
        raise ValueError(f"MMD bandwidth must be positive, got {sigma}")
    scale = -0.5 / sigma**2
    k_xx = np.exp(scale * cdist(x, x, "sqeuclidean")).mean()
    k_yy = np.exp(scale * cdist(y, y, "sqeuclidean")).mean()
    k_xy = np.exp(scale * cdist(x, y, "sqeuclidean")).mean()
    return math.sqrt(max(k_xx + k_yy - 2.0 * k_xy, 0.0))


@dataclass(frozen=True)
class NoiseFloor:
    """A distance between independent draws of the true distribution: ``mean`` and ``std`` over ``values``."""

    mean: float
    std: float
    values: tuple[float, ...]


def noise_floor(distance: Callable[[np.ndarray, np.ndarray], float], sample: Callable[[int, np.random.Generator], np.ndarray], n: int, rngs: list[np.random.Generator]) -> NoiseFloor:
    """Measure ``distance`` between two independent draws of ``n`` points from ``sample``, once per generator.

    ``sample(n, rng)`` draws from the true distribution. ``std`` is the sample standard
    deviation (``ddof = 1``) over the generators, 0 when there is only one.
    """
    values = []
    for rng in rngs:
        first = sample(n, rng)
        second = sample(n, rng)
        values.append(float(distance(first, second)))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return NoiseFloor(mean=float(np.mean(values)), std=std, values=tuple(values))


def straightness(path, velocities, times=None) -> float:
    """Return the mean squared deviation of the velocity from the straight displacement.

    ``path`` and ``velocities`` have shape ``(k, n, ...)``: positions ``x_t`` of ``n``
    trajectories at ``k`` times and the velocity evaluated there. The result is the
    average over time and trajectories of ``|u_t(x_t) - (x_1 - x_0)|^2``, with ``x_0 =
    path[0]`` and ``x_1 = path[-1]``. It is 0 exactly when every trajectory moves on a
    straight line at constant speed. With ``times`` ``(k,)`` the time average is the
    trapezoidal rule on those times, otherwise the plain mean over the ``k`` points.
    """
    path = np.asarray(path, dtype=np.float64)
    velocities = np.asarray(velocities, dtype=np.float64)
    if path.shape != velocities.shape or path.ndim < 2 or len(path) < 2:
        raise ValueError(f"path and velocities need the same shape (k >= 2, n, ...), got {path.shape} and {velocities.shape}")
    displacement = path[-1] - path[0]
    squared = ((velocities - displacement[None]) ** 2).reshape(len(path), path.shape[1], -1).sum(axis=2)
    per_time = squared.mean(axis=1)
    if times is None:
        return float(per_time.mean())
    times = np.asarray(times, dtype=np.float64)
    span = times[-1] - times[0]
    if times.shape != (len(path),) or span == 0.0:
        raise ValueError(f"times must have shape ({len(path)},) and span a non-zero interval, got {times}")
    return float(np.trapezoid(per_time, times) / span)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    # Symmetric square root through the eigen-decomposition. Rounding can leave tiny
    # negative eigenvalues on a positive semi-definite matrix, so they are clipped to 0.
    values, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_gaussian(mean_1, cov_1, mean_2, cov_2) -> float:
    """Return ``|m_1 - m_2|^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2})``.

    The matrix square roots come from symmetric eigen-decompositions (``numpy.linalg.eigh``)
    rather than ``scipy.linalg.sqrtm``. ``S_1^{1/2} S_2 S_1^{1/2}`` is symmetric positive
    semi-definite, so its eigenvalues are real. The trace of its square root is the sum of
    their square roots, with no complex round-off to discard.
    """
    mean_1, mean_2 = np.asarray(mean_1, dtype=np.float64), np.asarray(mean_2, dtype=np.float64)
    cov_1, cov_2 = np.atleast_2d(np.asarray(cov_1, dtype=np.float64)), np.atleast_2d(np.asarray(cov_2, dtype=np.float64))
    root_1 = _sqrt_psd(cov_1)
    product = root_1 @ cov_2 @ root_1
    eigenvalues = np.linalg.eigvalsh(0.5 * (product + product.T))
    trace_root = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    value = ((mean_1 - mean_2) ** 2).sum() + np.trace(cov_1) + np.trace(cov_2) - 2.0 * trace_root
    return float(max(value, 0.0))


def frechet_distance(features_1, features_2) -> float:
    """Return the Frechet distance between Gaussians fitted to two feature sets ``(n, d)`` and ``(m, d)``.

    Means and covariances (``ddof = 1``) of each set go into ``frechet_gaussian``. Like
    FID, the value is the squared 2-Wasserstein distance between the fitted Gaussians.
    """
    features_1, features_2 = _as_float64(features_1), _as_float64(features_2)
    return frechet_gaussian(
        features_1.mean(axis=0), np.cov(features_1, rowvar=False), features_2.mean(axis=0), np.cov(features_2, rowvar=False)
    )


def nearest_distances(queries, references, block: int = 1024) -> np.ndarray:
    """Return the Euclidean distance from each query ``(n, ...)`` to its nearest reference ``(m, ...)``."""
    queries, references = _as_float64(queries), _as_float64(references)
    nearest = np.empty(len(queries))
    for start in range(0, len(queries), block):
        stop = start + block
        nearest[start:stop] = cdist(queries[start:stop], references).min(axis=1)
    return nearest


def memorisation_ratio(samples, train, heldout) -> float:
    """Return ``median_i d(samples_i, train) / median_j d(heldout_j, train)``, with ``d`` the nearest-neighbour distance.

    Held-out points are fresh draws of the data distribution, so a model that samples
    that distribution without copying puts its samples as far from the training set as
    held-out points are, and scores about 1. A model that reproduces training points
    scores well below 1, and exact copies score 0. Compare with ``heldout`` of the same
    distribution as ``train`` but disjoint from it.
    """
    to_train = np.median(nearest_distances(samples, train))
    reference = np.median(nearest_distances(heldout, train))
    if not reference > 0.0:
        raise ValueError("every held-out point coincides with a training point; the memorisation ratio is undefined")
    return float(to_train / reference)


def class_entropy(labels, n_classes: int) -> float:
    """Return the Shannon entropy in nats of the class histogram of ``labels`` (integers ``0..n_classes-1``).

    A perfectly balanced set scores ``log(n_classes)``, and a set of a single class scores 0.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise ValueError("class_entropy needs at least one label")
    counts = np.bincount(labels, minlength=n_classes)[:n_classes]
    if counts.sum() != labels.size:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got values from {labels.min()} to {labels.max()}")
    p = counts[counts > 0] / labels.size
    return float(-(p * np.log(p)).sum())
