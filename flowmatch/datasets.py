"""Data sets of the study: 2-D toy distributions, a Gaussian with full covariance, digit images.

Every sampler draws independent points from a ``numpy.random.Generator``, so two sets
drawn with different generators are independent samples of the same distribution. A
noise floor measured between two such sets is therefore the floor a perfect model
would reach (a grid of evenly spaced points, as in scikit-learn's ``make_moons``, would
make two sets near copies and the floor far too low).

Toy sets are standardised with their exact moments: ``x = (raw - center) / scale`` with
``center`` the mean of the raw distribution and ``scale`` the root of its per-coordinate
variance averaged over the two coordinates. So ``E|x|^2 = 2``, the same as for the
``N(0, I)`` noise that the flow starts from, and the shape is kept (one scale for both axes).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np

TOY_NAMES = ("moons", "checkerboard", "eight_gaussians")

# Digit images from scikit-learn are 8 x 8 pixels with integer grey levels 0..16.
DIGITS_MAX_LEVEL = 16.0
DIGITS_SHAPE = (1, 8, 8)
DIGITS_CLASSES = 10


def make_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """Return a generator for the stream named by ``seed`` and ``keys``.

    Different key tuples give statistically independent streams (``numpy.random.SeedSequence``
    with the keys as extra entropy words), so every dataset, split and purpose gets its own.
    Strings are mapped to integers with CRC-32, which is stable across runs and platforms.
    """
    words = [int(seed)]
    for key in keys:
        words.append(zlib.crc32(key.encode("utf-8")) if isinstance(key, str) else int(key))
    return np.random.default_rng(words)


@dataclass(frozen=True, eq=False)
class ToyDistribution:
    """A standardised 2-D toy distribution: ``sample`` returns ``(raw - center) / scale``.

    ``options`` contains the shape parameters that ``make_toy`` accepts for ``name``, so
    ``make_toy(name, **options)`` rebuilds the same distribution.
    """

    name: str
    options: dict = field(hash=False)
    center: np.ndarray = field(hash=False)
    scale: float = 1.0

    def sample_raw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``n`` independent points ``(n, 2)`` float64 in the raw, unstandardised layout."""
        return _RAW_SAMPLERS[self.name](n, rng, **self.options)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``n`` independent standardised points, shape ``(n, 2)``, float64."""
        return (self.sample_raw(n, rng) - self.center) / self.scale


def make_toy(name: str, **options: float) -> ToyDistribution:
    """Build the toy distribution ``name`` (one of ``TOY_NAMES``) with its exact standardisation.

    Options: ``moons`` takes ``noise``, the std of the Gaussian jitter in units of the moon
    radius. ``checkerboard`` takes ``cells``, the number of squares per side of the board,
    whose filled squares alternate. ``eight_gaussians`` takes ``std``, the std of each mode
    in units of the radius of the circle that carries the modes.
    """
    if name not in _RAW_MOMENTS:
        raise ValueError(f"unknown toy distribution {name!r} (accepted: {', '.join(TOY_NAMES)})")
    center, variance = _RAW_MOMENTS[name](**options)
    return ToyDistribution(name=name, options=dict(options), center=center, scale=math.sqrt(variance))


def _moons_raw(n: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    # Two interleaved half circles of radius 1: the upper one centred at (0, 0), the lower
    # one flipped and centred at (1, 0.5). Each point picks a moon and an angle at random.
    upper = rng.random(n) < 0.5
    angle = rng.uniform(0.0, math.pi, size=n)
    x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    points = np.stack([x, y], axis=1)
    return points + noise * rng.standard_normal((n, 2))


def _moons_moments(noise: float) -> tuple[np.ndarray, float]:
    # With angle ~ U(0, pi): E[cos] = 0, E[cos^2] = E[sin^2] = 1/2, E[sin] = 2/pi.
    # x: mean 1/2, E[x^2] = (1/2 + 3/2) / 2 = 1, so Var x = 3/4.
    # y: mean 1/4, E[y^2] = (1/2 + 3/4 - 2/pi) / 2, so Var y = 9/16 - 1/pi.
    center = np.array([0.5, 0.25])
    var_x = 0.75 + noise**2
    var_y = 9.0 / 16.0 - 1.0 / math.pi + noise**2
    return center, 0.5 * (var_x + var_y)


def _checkerboard_cells(cells: int) -> np.ndarray:
    """Return the lower-left corners ``(k, 2)`` of the filled unit squares, board centred at 0."""
    if int(cells) != cells or cells < 2:
        raise ValueError(f"checkerboard cells must be an integer >= 2, got {cells!r}")
    cells = int(cells)
    corners = [(i, j) for i in range(cells) for j in range(cells) if (i + j) % 2 == 0]
    return np.array(corners, dtype=np.float64) - cells / 2.0


def _checkerboard_raw(n: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    corners = _checkerboard_cells(cells)
    chosen = corners[rng.integers(0, len(corners), size=n)]
    return chosen + rng.random((n, 2))


def _checkerboard_moments(cells: int) -> tuple[np.ndarray, float]:
    # An equal-weight mixture of unit squares: each square adds variance 1/12 per
    # coordinate around its centre, plus the spread of the centres.
    centres = _checkerboard_cells(cells) + 0.5
    center = centres.mean(axis=0)
    variance = 1.0 / 12.0 + ((centres - center) ** 2).mean()
    return center, float(variance)


def _eight_gaussians_raw(n: int, rng: np.random.Generator, std: float) -> np.ndarray:
    angle = rng.integers(0, 8, size=n) * (math.pi / 4.0)
    modes = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return modes + std * rng.standard_normal((n, 2))


def _eight_gaussians_moments(std: float) -> tuple[np.ndarray, float]:
    # Eight equally spaced unit vectors have mean 0 and E[cos^2] = E[sin^2] = 1/2.
    return np.zeros(2), 0.5 + std**2


_RAW_SAMPLERS = {"moons": _moons_raw, "checkerboard": _checkerboard_raw, "eight_gaussians": _eight_gaussians_raw}
_RAW_MOMENTS = {"moons": _moons_moments, "checkerboard": _checkerboard_moments, "eight_gaussians": _eight_gaussians_moments}


def random_gaussian(dim: int, rng: np.random.Generator, mean_std: float = 0.5, min_variance: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Draw the parameters ``(mean (d,), cov (d, d))`` of a Gaussian with full covariance.

    ``mean ~ N(0, mean_std^2 I)``. ``cov = Q diag(lambda) Q^T`` with ``Q`` a uniformly
    random rotation (QR of a Gaussian matrix, signs fixed) and variances ``lambda``
    spaced geometrically from 1 down to ``min_variance``, so for ``d >= 2`` the axes
    are correlated and the condition number is ``1 / min_variance``.
    """
    mean = mean_std * rng.standard_normal(dim)
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))
    variances = np.geomspace(1.0, min_variance, dim)
    cov = (q * variances) @ q.T
    return mean, 0.5 * (cov + cov.T)


def sample_gaussian(mean: np.ndarray, cov: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` independent points ``(n, d)`` float64 from ``N(mean, cov)``."""
    chol = np.linalg.cholesky(cov)
    return mean + rng.standard_normal((n, len(mean))) @ chol.T


@dataclass(frozen=True)
class DigitsSplit:
    """Digit images scaled to ``[-1, 1]``, shape ``(n, 1, 8, 8)`` float32, labels int64."""

    train: np.ndarray
    train_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray


def scale_digit_levels(levels: np.ndarray) -> np.ndarray:
    """Map grey levels ``0..16`` linearly onto ``[-1, 1]``."""
    half = DIGITS_MAX_LEVEL / 2.0
    return (levels - half) / half


def load_digits_split(test_fraction: float, seed: int) -> DigitsSplit:
    """Load scikit-learn's bundled handwritten digits and split them, stratified by class.

    The 1797 images ship with scikit-learn, so no download happens. ``test_fraction`` of
    each class goes to the held-out split; ``seed`` fixes which images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = scale_digit_levels(digits.images.astype(np.float64)).astype(np.float32)
    images = images.reshape(-1, *DIGITS_SHAPE)
    labels = digits.target.astype(np.int64)
    train, test, train_labels, test_labels = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed % 2**32
    )
    return DigitsSplit(train=train, train_labels=train_labels, test=test, test_labels=test_labels)
