"""Tests of the noise-data couplings: minibatch OT against brute force and the identity pairing."""

from __future__ import annotations

import itertools

import pytest
import torch

from flowmatch.coupling import couple, minibatch_ot_permutation


def pairing_cost(eps: torch.Tensor, z: torch.Tensor) -> float:
    """Mean squared distance between paired rows."""
    return float(((eps - z) ** 2).reshape(len(z), -1).sum(dim=1).mean())


@pytest.mark.parametrize("seed", range(5))
def test_ot_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    z = torch.randn(6, 2, generator=generator, dtype=torch.float64) + 1.0

    best = min(pairing_cost(eps, z[list(order)]) for order in itertools.permutations(range(6)))
    found = pairing_cost(eps, z[minibatch_ot_permutation(eps, z)])
    assert found == pytest.approx(best, rel=1e-12)


def test_ot_returns_permutation():
    generator = torch.Generator().manual_seed(0)
    eps = torch.randn(64, 3, generator=generator)
    z = torch.randn(64, 3, generator=generator)

    permutation = minibatch_ot_permutation(eps, z)
    assert permutation.dtype == torch.int64
    assert torch.equal(torch.sort(permutation).values, torch.arange(64))


def test_ot_beats_identity_pairing():
    generator = torch.Generator().manual_seed(1)
    eps = torch.randn(256, 2, generator=generator)
    z = 0.5 * torch.randn(256, 2, generator=generator) + torch.tensor([2.0, -1.0])

    identity = pairing_cost(eps, z)
    optimal = pairing_cost(eps, z[minibatch_ot_permutation(eps, z)])
    # With m = (2, -1) the identity pairing costs E|eps - z|^2 = 2 (1 + 0.25) + |m|^2 = 7.5
    # on average and the population optimum is W2^2 = |m|^2 + 2 (1 - 0.5)^2 = 5.5.
    assert optimal < identity
    assert optimal / identity < 0.8


def test_ot_handles_images():
    generator = torch.Generator().manual_seed(2)
    eps = torch.randn(8, 1, 4, 4, generator=generator)
    z = eps[torch.randperm(8, generator=generator)] + 0.01

    permuted_eps, paired_z = couple(eps, z, "minibatch_ot")
    assert permuted_eps is eps
    assert pairing_cost(eps, paired_z) == pytest.approx(16 * 0.01**2, rel=1e-4)


def test_independent_keeps_pairs():
    eps, z = torch.randn(4, 2), torch.randn(4, 2)

    paired_eps, paired_z = couple(eps, z, "independent")
    assert paired_eps is eps
    assert paired_z is z


def test_ot_unequal_sizes_raise():
    with pytest.raises(ValueError, match="equal size"):
        minibatch_ot_permutation(torch.randn(3, 2), torch.randn(4, 2))


def test_unknown_coupling_raises():
    with pytest.raises(ValueError, match="unknown coupling 'sinkhorn'"):
        couple(torch.randn(3, 2), torch.randn(3, 2), "sinkhorn")
