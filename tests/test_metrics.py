"""Tests of flowmatch.metrics against closed forms: Gaussian W2 and Frechet distances, 1-D transport, exact shifts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from flowmatch import metrics


def gaussian_pair():
    mean_1, cov_1 = np.array([0.0, 0.0]), np.array([[1.0, 0.3], [0.3, 0.5]])
    mean_2, cov_2 = np.array([1.5, -0.5]), np.array([[0.4, -0.1], [-0.1, 1.2]])
    return mean_1, cov_1, mean_2, cov_2


@pytest.mark.parametrize("n", [1, 3, 7, 10, 49, 1000, 1999])
def test_uniform_weights_sum_exactly_one(n):
    weights = metrics.uniform_weights(n)
    assert math.fsum(weights) == 1.0
    assert np.allclose(weights, 1.0 / n, rtol=1e-12)


def test_w2_identical_sets_zero():
    points = np.random.default_rng(0).standard_normal((300, 2))
    assert metrics.w2(points, points) == pytest.approx(0.0, abs=1e-12)


def test_w2_shift_equals_shift_length():
    points = np.random.default_rng(1).standard_normal((300, 2))
    shift = np.array([0.3, -0.4])
    assert metrics.w2(points, points + shift) == pytest.approx(0.5, abs=1e-9)


def test_w2_one_dimension_sorted_coupling():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal(500), rng.exponential(size=500)
    # In 1-D the optimal coupling of equal-size sets pairs the sorted values.
    expected = math.sqrt(np.mean((np.sort(x) - np.sort(y)) ** 2))
    assert metrics.w2(x[:, None], y[:, None]) == pytest.approx(expected, rel=1e-9)


def test_w2_unequal_sizes_by_hand():
    # Mass 1/2 at 0 and at 2 against mass 1 at 1: every unit of mass moves a distance 1.
    assert metrics.w2(np.array([[0.0], [2.0]]), np.array([[1.0]])) == pytest.approx(1.0, abs=1e-12)


def test_w2_accepts_float32_tensors():
    points = torch.randn(200, 2, generator=torch.Generator().manual_seed(3))
    assert metrics.w2(points, points + 1.0) == pytest.approx(math.sqrt(2.0), abs=1e-6)


def test_w2_gaussian_samples_match_closed_form():
    mean_1, cov_1, mean_2, cov_2 = gaussian_pair()
    rng = np.random.default_rng(4)
    x = rng.multivariate_normal(mean_1, cov_1, 1000)
    y = rng.multivariate_normal(mean_2, cov_2, 1000)
    expected = metrics.gaussian_w2(mean_1, cov_1, mean_2, cov_2)
    # The sampling error at n = 1000 is a few hundredths (its own noise floor is about 0.15,
    # but that adds in quadrature to a distance of 1.7).
    assert metrics.w2(x, y) == pytest.approx(expected, abs=0.08)


def test_gaussian_w2_commuting_covariances():
    mean_1, mean_2 = np.array([1.0, 2.0]), np.array([0.0, 0.0])
    cov_1, cov_2 = np.diag([4.0, 1.0]), np.diag([1.0, 9.0])
    # Diagonal covariances: W2^2 = |m_1 - m_2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2 = 5 + 1 + 4.
    assert metrics.gaussian_w2(mean_1, cov_1, mean_2, cov_2) == pytest.approx(math.sqrt(10.0), rel=1e-12)


def test_energy_identical_sets_zero():
    points = np.random.default_rng(5).standard_normal((200, 3))
    assert metrics.energy_distance(points, points) == pytest.approx(0.0, abs=1e-7)


def test_energy_different_sets_positive():
    rng = np.random.default_rng(6)
    assert metrics.energy_distance(rng.standard_normal((200, 2)), rng.standard_normal((200, 2)) + 1.0) > 0.5


def test_energy_one_dimension_matches_scipy():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal(300), rng.standard_normal(250) * 2.0
    expected = scipy.stats.energy_distance(x, y)
    assert metrics.energy_distance(x[:, None], y[:, None]) == pytest.approx(expected, rel=1e-9)


def test_mmd_identical_sets_zero():
    points = np.random.default_rng(8).standard_normal((200, 2))
    assert metrics.mmd(points, points) == pytest.approx(0.0, abs=1e-7)


def test_mmd_two_points_closed_form():
    # One point each: MMD^2 = k(a, a) + k(b, b) - 2 k(a, b) = 2 - 2 exp(-d^2 / (2 sigma^2)).
    a, b = np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]])
    expected = math.sqrt(2.0 - 2.0 * math.exp(-25.0 / (2.0 * 2.0**2)))
    assert metrics.mmd(a, b, bandwidth=2.0) == pytest.approx(expected, rel=1e-12)


def test_mmd_shift_above_floor():
    rng = np.random.default_rng(9)
    floor = metrics.mmd(rng.standard_normal((300, 2)), rng.standard_normal((300, 2)))
    shifted = metrics.mmd(rng.standard_normal((300, 2)), rng.standard_normal((300, 2)) + 1.0)
    assert shifted > 5.0 * floor


def test_median_bandwidth_by_hand():
    # Pooled points 0, 1, 3: pairwise distances 1, 2, 3, median 2.
    assert metrics.median_bandwidth(np.array([[0.0], [1.0]]), np.array([[3.0]])) == pytest.approx(2.0)


def test_mmd_rejects_zero_bandwidth():
    with pytest.raises(ValueError, match="bandwidth"):
        metrics.mmd(np.zeros((2, 1)), np.zeros((2, 1)))


def test_noise_floor_mean_and_spread():
    def sample(n, rng):
        return rng.standard_normal((n, 2))

    rngs = [np.random.default_rng(k) for k in range(5)]
    floor = metrics.noise_floor(metrics.w2, sample, 300, rngs)
    assert len(floor.values) == 5
    assert floor.mean == pytest.approx(np.mean(floor.values))
    assert floor.std == pytest.approx(np.std(floor.values, ddof=1))
    assert 0.0 < floor.mean < 0.5


def test_noise_floor_shrinks_with_n():
    def sample(n, rng):
        return rng.standard_normal((n, 1))

    small = metrics.noise_floor(metrics.w2, sample, 100, [np.random.default_rng(k) for k in range(5)])
    large = metrics.noise_floor(metrics.w2, sample, 1600, [np.random.default_rng(k) for k in range(5)])
    # In 1-D the floor decays like n^(-1/2) up to a log factor: 16 times more points, about 4 times lower.
    assert large.mean < small.mean / 2.5


def test_straightness_straight_path_zero():
    times = np.linspace(0.0, 1.0, 11)
    start, end = np.random.default_rng(10).standard_normal((2, 5, 3))
    path = start[None] + times[:, None, None] * (end - start)[None]
    velocities = np.broadcast_to(end - start, path.shape)
    assert metrics.straightness(path, velocities, times) == pytest.approx(0.0, abs=1e-24)


def test_straightness_quarter_circle_closed_form():
    # x_t = (cos(pi t / 2), sin(pi t / 2)) runs from (1, 0) to (0, 1) with speed pi / 2.
    # |u_t - (x_1 - x_0)|^2 = pi^2 / 4 + 2 - pi (sin + cos), whose mean over [0, 1] is pi^2 / 4 - 2.
    times = np.linspace(0.0, 1.0, 2001)
    angle = 0.5 * math.pi * times
    path = np.stack([np.cos(angle), np.sin(angle)], axis=1)[:, None, :]
    velocities = 0.5 * math.pi * np.stack([-np.sin(angle), np.cos(angle)], axis=1)[:, None, :]
    assert metrics.straightness(path, velocities, times) == pytest.approx(math.pi**2 / 4 - 2.0, rel=1e-6)
    assert metrics.straightness(path, velocities) == pytest.approx(math.pi**2 / 4 - 2.0, rel=1e-3)


def test_straightness_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        metrics.straightness(np.zeros((3, 2, 2)), np.zeros((3, 2, 1)))


def test_frechet_gaussian_commuting_closed_form():
    value = metrics.frechet_gaussian(np.array([1.0, 2.0]), np.diag([4.0, 1.0]), np.zeros(2), np.diag([1.0, 9.0]))
    assert value == pytest.approx(10.0, rel=1e-12)


def test_frechet_gaussian_equals_w2_squared():
    mean_1, cov_1, mean_2, cov_2 = gaussian_pair()
    assert metrics.frechet_gaussian(mean_1, cov_1, mean_2, cov_2) == pytest.approx(metrics.gaussian_w2(mean_1, cov_1, mean_2, cov_2) ** 2)


def test_frechet_gaussian_symmetric():
    mean_1, cov_1, mean_2, cov_2 = gaussian_pair()
    forward = metrics.frechet_gaussian(mean_1, cov_1, mean_2, cov_2)
    backward = metrics.frechet_gaussian(mean_2, cov_2, mean_1, cov_1)
    assert forward == pytest.approx(backward, rel=1e-12)


def test_frechet_gaussian_matches_scipy_sqrtm():
    import scipy.linalg

    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((2, 6, 6))
    cov_1, cov_2 = a @ a.T, b @ b.T
    expected = np.trace(cov_1 + cov_2 - 2.0 * np.real(scipy.linalg.sqrtm(cov_1 @ cov_2)))
    assert metrics.frechet_gaussian(np.zeros(6), cov_1, np.zeros(6), cov_2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_gaussian_features():
    rng = np.random.default_rng(12)
    mean_1, mean_2 = rng.standard_normal(4), rng.standard_normal(4)
    a, b = rng.standard_normal((2, 4, 4))
    cov_1, cov_2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    features_1 = rng.multivariate_normal(mean_1, cov_1, 50_000)
    features_2 = rng.multivariate_normal(mean_2, cov_2, 50_000)
    expected = metrics.frechet_gaussian(mean_1, cov_1, mean_2, cov_2)
    assert metrics.frechet_distance(features_1, features_2) == pytest.approx(expected, rel=0.03)


def test_frechet_distance_identical_sets_zero():
    features = np.random.default_rng(13).standard_normal((500, 8))
    assert metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_nearest_distances_by_hand():
    queries = np.array([[0.0, 0.0], [5.0, 5.0]])
    references = np.array([[3.0, 4.0], [5.0, 6.0]])
    assert np.allclose(metrics.nearest_distances(queries, references, block=1), [5.0, 1.0])


def test_memorisation_ratio_copies_zero():
    rng = np.random.default_rng(14)
    train, heldout = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    copies = train[rng.integers(0, 400, 300)]
    assert metrics.memorisation_ratio(copies, train, heldout) == 0.0


def test_memorisation_ratio_fresh_draws_near_one():
    rng = np.random.default_rng(15)
    train, heldout, fresh = rng.standard_normal((3, 400, 16))
    assert metrics.memorisation_ratio(fresh, train, heldout) == pytest.approx(1.0, abs=0.1)


def test_class_entropy_balanced_and_single():
    assert metrics.class_entropy(np.arange(100) % 10, 10) == pytest.approx(math.log(10))
    assert metrics.class_entropy(np.full(50, 3), 10) == 0.0


def test_class_entropy_rejects_out_of_range():
    with pytest.raises(ValueError, match="0..9"):
        metrics.class_entropy(np.array([0, 10]), 10)
