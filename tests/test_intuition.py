"""The (z, eps) plane and the which-way arrows, checked against the noised images and closed forms."""

from __future__ import annotations

import pytest
import torch

from flowmatch.intuition import Plane, conditional_path, noise_reaching, path_coordinates, span_plane, which_way_arrows
from flowmatch.marginal import marginal_velocity
from flowmatch.paths import sample_x_t
from flowmatch.schedules import SCHEDULE_NAMES, get_schedule

TIMES = torch.linspace(0.0, 1.0, 21, dtype=torch.float64)
# Times where beta_t > 0 for every schedule, so that the x form of u_t is defined.
INNER_TIMES = (0.1, 0.5, 0.9)


@pytest.fixture()
def image_pair():
    generator = torch.Generator().manual_seed(3)
    z = 2 * torch.rand(3, 16, 16, generator=generator, dtype=torch.float64) - 1
    eps = torch.randn(3, 16, 16, generator=generator, dtype=torch.float64)
    return z, eps


@pytest.fixture()
def four_points():
    generator = torch.Generator().manual_seed(5)
    data = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    x = torch.randn(2, generator=generator, dtype=torch.float64)
    return x, data


def test_plane_basis_orthonormal(image_pair):
    plane = span_plane(*image_pair)

    gram = plane.basis @ plane.basis.T

    torch.testing.assert_close(gram, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-14)


def test_plane_coordinates_of_z_and_eps(image_pair):
    z, eps = image_pair
    plane = span_plane(z, eps)

    z_point, eps_point = plane.coordinates(torch.stack([z, eps]))

    assert z_point[0] == pytest.approx(float(torch.linalg.vector_norm(z)), rel=1e-14)
    assert z_point[1] == pytest.approx(0.0, abs=1e-12)
    assert eps_point[0] == pytest.approx(float((eps * z).sum() / torch.linalg.vector_norm(z)), rel=1e-12)
    assert eps_point[1] > 0
    assert float(torch.linalg.vector_norm(eps_point)) == pytest.approx(float(torch.linalg.vector_norm(eps)), rel=1e-14)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_path_points_are_projections(image_pair, name):
    z, eps = image_pair
    schedule = get_schedule(name)
    plane = span_plane(z, eps)
    n = len(TIMES)
    images = sample_x_t(z.expand(n, *z.shape), eps.expand(n, *eps.shape), TIMES, schedule)

    points = path_coordinates(plane, z, eps, TIMES, schedule)

    torch.testing.assert_close(points, plane.coordinates(images), rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_path_residual_is_zero(image_pair, name):
    z, eps = image_pair
    schedule = get_schedule(name)
    plane = span_plane(z, eps)
    n = len(TIMES)
    images = sample_x_t(z.expand(n, *z.shape), eps.expand(n, *eps.shape), TIMES, schedule)
    image_norms = torch.linalg.vector_norm(images.reshape(n, -1), dim=1)

    residual = plane.residual(images)

    assert float((residual / image_norms).max()) < 1e-14


def test_residual_of_normal_vector(image_pair):
    z, eps = image_pair
    plane = span_plane(z, eps)
    normal = torch.randn(z.numel(), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    normal = normal - plane.basis.T @ (plane.basis @ normal)

    residual = plane.residual(normal[None])

    assert float(residual[0]) == pytest.approx(float(torch.linalg.vector_norm(normal)), rel=1e-12)
    torch.testing.assert_close(plane.coordinates(normal[None]), torch.zeros(1, 2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_linear_path_is_straight_segment(image_pair):
    z, eps = image_pair
    plane = span_plane(z, eps)
    z_point, eps_point = plane.coordinates(torch.stack([z, eps]))

    points = path_coordinates(plane, z, eps, TIMES, get_schedule("linear"))

    expected = TIMES[:, None] * z_point + (1 - TIMES[:, None]) * eps_point
    torch.testing.assert_close(points, expected, rtol=0, atol=1e-12)


def test_cosine_path_is_arc(image_pair):
    """Under the cosine schedule the point is sin(pi t / 2) Z + cos(pi t / 2) E, so its (sin, cos) pair has unit norm."""
    z, eps = image_pair
    plane = span_plane(z, eps)
    corners = plane.coordinates(torch.stack([z, eps])).T

    points = path_coordinates(plane, z, eps, TIMES, get_schedule("cosine"))

    weights = torch.linalg.solve(corners, points.T)
    torch.testing.assert_close(torch.linalg.vector_norm(weights, dim=0), torch.ones(len(TIMES), dtype=torch.float64), rtol=0, atol=1e-12)


def test_span_plane_rejects_parallel(image_pair):
    z, _ = image_pair

    with pytest.raises(ValueError, match="parallel"):
        span_plane(z, -2.5 * z)


def test_span_plane_rejects_zero_z(image_pair):
    z, eps = image_pair

    with pytest.raises(ValueError, match="zero"):
        span_plane(torch.zeros_like(z), eps)


def test_plane_rejects_wrong_dimension(image_pair):
    plane = span_plane(*image_pair)

    with pytest.raises(ValueError, match="dimensions"):
        plane.coordinates(torch.zeros(1, 5, dtype=torch.float64))


def test_plane_is_a_frozen_dataclass(image_pair):
    plane = span_plane(*image_pair)

    assert isinstance(plane, Plane)
    with pytest.raises(AttributeError):
        plane.basis = torch.zeros(2, 3)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("t", INNER_TIMES)
def test_average_arrow_is_marginal_velocity(four_points, name, t):
    x, data = four_points
    schedule = get_schedule(name)

    arrows = which_way_arrows(x, data, t, schedule)

    expected = marginal_velocity(x[None], t, data, schedule)[0]
    torch.testing.assert_close(arrows.average, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_weights_are_posterior(four_points, name):
    """P(z_i | X_t = x) is proportional to exp(-|x - alpha_t z_i|^2 / (2 beta_t^2)) for equal priors."""
    x, data = four_points
    schedule = get_schedule(name)
    values = schedule(torch.tensor(0.5, dtype=torch.float64))
    unnormalised = torch.exp(-((x - values.alpha * data) ** 2).sum(1) / (2 * values.beta**2))

    arrows = which_way_arrows(x, data, 0.5, schedule)

    torch.testing.assert_close(arrows.weights, unnormalised / unnormalised.sum(), rtol=1e-12, atol=1e-15)
    assert float(arrows.weights.sum()) == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize("t", INNER_TIMES)
def test_linear_arrow_points_at_z(four_points, t):
    """Under the linear schedule u_t(x | z) = (z - x) / (1 - t)."""
    x, data = four_points

    arrows = which_way_arrows(x, data, t, get_schedule("linear"))

    torch.testing.assert_close(arrows.conditional, (data - x) / (1 - t), rtol=1e-12, atol=1e-12)


def test_single_point_average_is_conditional(four_points):
    x, data = four_points

    arrows = which_way_arrows(x, data[:1], 0.5, get_schedule("cosine"))

    assert float(arrows.weights[0]) == 1.0
    torch.testing.assert_close(arrows.average, arrows.conditional[0], rtol=0, atol=1e-15)


def test_noise_reaching_rejects_zero_beta(four_points):
    x, data = four_points

    with pytest.raises(ValueError, match="beta_t must be positive"):
        noise_reaching(x, data, 1.0, get_schedule("linear"))


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_conditional_path_ends(four_points, name):
    x, data = four_points
    schedule = get_schedule(name)
    t = 0.4

    path = conditional_path(x, data[1], t, torch.tensor([t, 1.0], dtype=torch.float64), schedule)

    torch.testing.assert_close(path[0], x, rtol=0, atol=1e-13)
    torch.testing.assert_close(path[1], data[1], rtol=0, atol=1e-13)


def central_difference_errors(x, data, name, spacings):
    """Return |(path(t + h) - path(t - h)) / 2h - u_t(x | z)| for each spacing h, at t = 0.4."""
    schedule = get_schedule(name)
    t = 0.4
    arrow = which_way_arrows(x, data, t, schedule).conditional[2]
    errors = []
    for h in spacings:
        path = conditional_path(x, data[2], t, torch.tensor([t - h, t + h], dtype=torch.float64), schedule)
        errors.append(float(torch.linalg.vector_norm((path[1] - path[0]) / (2 * h) - arrow)))
    return errors, float(torch.linalg.vector_norm(arrow))


@pytest.mark.parametrize("name", ["cosine", "linear_vp", "vp"])
def test_conditional_path_tangent_is_arrow(four_points, name):
    """A central difference of the path at t matches u_t(x | z) with an error of order h^2."""
    errors, arrow_norm = central_difference_errors(*four_points, name, (1e-2, 5e-3))

    assert errors[1] < 1e-3 * arrow_norm
    assert errors[0] / errors[1] == pytest.approx(4.0, rel=0.05)


@pytest.mark.parametrize("name", ["linear", "polynomial"])
def test_conditional_path_tangent_exact(four_points, name):
    """alpha_t and beta_t are polynomials of degree at most 2 here, so the central difference is exact."""
    errors, arrow_norm = central_difference_errors(*four_points, name, (1e-2,))

    assert errors[0] < 1e-10 * arrow_norm
