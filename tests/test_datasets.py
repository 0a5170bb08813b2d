"""Tests of flowmatch.datasets: exact standardisation, support of each toy, independent draws, the digit split."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flowmatch.datasets import (
    TOY_NAMES,
    load_digits_split,
    make_rng,
    make_toy,
    random_gaussian,
    sample_gaussian,
    scale_digit_levels,
)

TOY_OPTIONS = {"moons": {"noise": 0.05}, "checkerboard": {"cells": 4}, "eight_gaussians": {"std": 0.1}}


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_standardised_mean_zero(name):
    points = make_toy(name, **TOY_OPTIONS[name]).sample(200_000, make_rng(0, name))
    # Standard error of each coordinate's mean is at most about 1.3 / sqrt(n) = 0.003.
    assert np.abs(points.mean(axis=0)).max() < 0.015


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_standardised_unit_variance(name):
    points = make_toy(name, **TOY_OPTIONS[name]).sample(200_000, make_rng(1, name))
    mean_variance = (points**2).sum(axis=1).mean() / 2.0
    assert mean_variance == pytest.approx(1.0, abs=0.02)


def test_checkerboard_odd_cells_moments():
    toy = make_toy("checkerboard", cells=3)
    raw = toy.sample_raw(400_000, make_rng(2))
    assert np.allclose(raw.mean(axis=0), toy.center, atol=0.01)
    assert raw.var(axis=0).mean() == pytest.approx(toy.scale**2, rel=0.01)


def test_moons_points_near_unit_arcs():
    toy = make_toy("moons", noise=0.0)
    raw = toy.sample_raw(10_000, make_rng(3))
    upper = np.hypot(raw[:, 0], raw[:, 1])
    lower = np.hypot(raw[:, 0] - 1.0, raw[:, 1] - 0.5)
    on_upper = np.isclose(upper, 1.0) & (raw[:, 1] >= 0.0)
    on_lower = np.isclose(lower, 1.0) & (raw[:, 1] <= 0.5)
    assert (on_upper | on_lower).all()
    assert on_upper.mean() == pytest.approx(0.5, abs=0.02)


def test_checkerboard_points_in_filled_squares():
    cells = 4
    raw = make_toy("checkerboard", cells=cells).sample_raw(20_000, make_rng(4))
    column = np.floor(raw[:, 0] + cells / 2)
    row = np.floor(raw[:, 1] + cells / 2)
    assert ((column + row) % 2 == 0).all()
    assert (np.abs(raw) <= cells / 2).all()


def test_eight_gaussians_modes_equally_likely():
    raw = make_toy("eight_gaussians", std=0.01).sample_raw(80_000, make_rng(5))
    mode = np.round(np.arctan2(raw[:, 1], raw[:, 0]) / (math.pi / 4)).astype(int) % 8
    frequencies = np.bincount(mode, minlength=8) / len(mode)
    assert np.abs(frequencies - 1 / 8).max() < 0.01
    assert np.abs(np.hypot(raw[:, 0], raw[:, 1]) - 1.0).max() < 0.06


def test_make_toy_unknown_name():
    with pytest.raises(ValueError, match="spiral"):
        make_toy("spiral")


def test_make_rng_same_keys_reproduce():
    toy = make_toy("moons", noise=0.05)
    assert np.array_equal(toy.sample(100, make_rng(0, "moons", "train")), toy.sample(100, make_rng(0, "moons", "train")))


def test_make_rng_keys_give_independent_draws():
    toy = make_toy("moons", noise=0.05)
    first = toy.sample(2000, make_rng(0, "moons", "train"))
    second = toy.sample(2000, make_rng(0, "moons", "test"))
    # Points spaced evenly along the arcs would put the i-th point of both sets at the same
    # angle, so their coordinates would be correlated close to 1; independent draws are not.
    assert abs(np.corrcoef(first[:, 0], second[:, 0])[0, 1]) < 0.1
    assert abs(np.corrcoef(first[:, 1], second[:, 1])[0, 1]) < 0.1
    assert not np.allclose(np.sort(first[:, 0]), np.sort(second[:, 0]), atol=0.01)


def test_random_gaussian_spectrum():
    mean, cov = random_gaussian(5, make_rng(6))
    assert mean.shape == (5,)
    assert np.allclose(cov, cov.T)
    assert np.allclose(np.linalg.eigvalsh(cov), np.geomspace(0.1, 1.0, 5))


def test_random_gaussian_correlated_axes():
    _, cov = random_gaussian(2, make_rng(7))
    assert abs(cov[0, 1]) > 1e-3


def test_sample_gaussian_moments():
    mean, cov = random_gaussian(3, make_rng(8))
    points = sample_gaussian(mean, cov, 200_000, make_rng(9))
    assert np.allclose(points.mean(axis=0), mean, atol=0.01)
    assert np.allclose(np.cov(points, rowvar=False), cov, atol=0.01)


def test_scale_digit_levels_range():
    assert np.array_equal(scale_digit_levels(np.array([0.0, 8.0, 16.0])), np.array([-1.0, 0.0, 1.0]))


def test_digits_split_shapes_and_range():
    split = load_digits_split(0.25, seed=0)
    assert split.train.shape[1:] == (1, 8, 8)
    assert split.test.shape[1:] == (1, 8, 8)
    assert len(split.train) + len(split.test) == 1797
    assert len(split.test) == math.ceil(0.25 * 1797)
    assert split.train.min() >= -1.0
    assert split.train.max() <= 1.0
    assert split.train.dtype == np.float32
    assert split.train_labels.dtype == np.int64


def test_digits_split_stratified():
    split = load_digits_split(0.25, seed=0)
    train_share = np.bincount(split.train_labels, minlength=10) / len(split.train_labels)
    test_share = np.bincount(split.test_labels, minlength=10) / len(split.test_labels)
    assert np.abs(train_share - test_share).max() < 0.01


def test_digits_split_seed_reproducible():
    first = load_digits_split(0.25, seed=3)
    second = load_digits_split(0.25, seed=3)
    other = load_digits_split(0.25, seed=4)
    assert np.array_equal(first.test, second.test)
    assert not np.array_equal(first.test_labels, other.test_labels)
