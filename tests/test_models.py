"""Tests of the velocity networks: shapes, time embedding, rebuilding from a config."""

from __future__ import annotations

import math

import pytest
import torch

from flowmatch.models import UNet, VelocityMLP, build_model, sinusoidal_embedding


def test_embedding_at_zero_is_sin_zero_cos_one():
    embedding = sinusoidal_embedding(torch.zeros(3), 8)

    assert embedding.shape == (3, 8)
    assert torch.equal(embedding[:, :4], torch.zeros(3, 4))
    assert torch.equal(embedding[:, 4:], torch.ones(3, 4))


def test_embedding_frequencies_span_range():
    t = torch.tensor([0.5])
    embedding = sinusoidal_embedding(t, 6, max_frequency=100.0)

    # Frequencies 1, 10 and 100 radians per unit time.
    expected = torch.tensor([[math.sin(0.5), math.sin(5.0), math.sin(50.0), math.cos(0.5), math.cos(5.0), math.cos(50.0)]])
    assert torch.allclose(embedding, expected, atol=1e-5)


def test_embedding_odd_size_raises():
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(torch.zeros(2), 7)


def test_mlp_keeps_vector_shape():
    model = VelocityMLP((2,), hidden=16, layers=2)

    assert model(torch.randn(5, 2), torch.rand(5)).shape == (5, 2)


def test_mlp_restores_image_shape():
    model = VelocityMLP((1, 8, 8), hidden=16, layers=2)

    assert model(torch.randn(4, 1, 8, 8), torch.rand(4)).shape == (4, 1, 8, 8)


def test_mlp_depends_on_time():
    torch.manual_seed(0)
    model = VelocityMLP((2,), hidden=16, layers=2)
    x = torch.randn(3, 2)

    early = model(x, torch.full((3,), 0.1))
    late = model(x, torch.full((3,), 0.9))
    assert not torch.allclose(early, late)


def test_mlp_depth_and_width():
    model = VelocityMLP((3,), hidden=10, layers=4, time_dim=8)
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]

    assert len(linears) == 5
    assert linears[0].in_features == 3 + 8
    assert linears[-1].out_features == 3


def test_unet_keeps_image_shape():
    model = UNet((1, 8, 8), channels=8)

    assert model(torch.randn(2, 1, 8, 8), torch.rand(2)).shape == (2, 1, 8, 8)


def test_unet_odd_side_raises():
    with pytest.raises(ValueError, match="even"):
        UNet((1, 7, 8), channels=8)


def test_unet_vector_shape_raises():
    with pytest.raises(ValueError, match="channels, height, width"):
        UNet((2,), channels=8)


@pytest.mark.parametrize(
    "config",
    [
        {"kind": "mlp", "shape": [2], "hidden": 12, "layers": 2, "time_dim": 8},
        {"kind": "unet", "shape": [1, 8, 8], "channels": 8},
    ],
)
def test_build_model_round_trip(config):
    torch.manual_seed(0)
    original = build_model(config)
    rebuilt = build_model(config)
    rebuilt.load_state_dict(original.state_dict())
    x = torch.randn(3, *config["shape"])
    t = torch.rand(3)

    assert torch.equal(original(x, t), rebuilt(x, t))


def test_build_model_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown model kind 'transformer'"):
        build_model({"kind": "transformer", "shape": [2]})
