"""Couplings of noise and data within a training batch.

Conditional flow matching draws pairs ``(eps, z)``. The ``independent`` coupling keeps
the pairs as drawn. ``minibatch_ot`` re-pairs them by the exact optimal transport
plan of the batch for the squared Euclidean cost. This makes the conditional paths
cross less, so the learned flow is straighter.
"""

from __future__ import annotations

import numpy as np
import ot
import torch

COUPLINGS = ("independent", "minibatch_ot")


def minibatch_ot_permutation(eps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Return the permutation ``perm`` for which pairing ``eps[i]`` with ``z[perm[i]]`` is optimal.

    Optimal means that it minimises ``sum_i ||eps_i - z_perm[i]||^2`` over all
    permutations. ``eps`` and ``z`` have shape ``(n, ...)`` with the same ``n``, and the
    result is an int64 tensor ``(n,)`` on the device of ``z``. The exact plan comes
    from POT's network simplex (``ot.emd``) with uniform weights in float64. For
    equal batch sizes the plan is a vertex of the Birkhoff polytope, which is a
    permutation matrix divided by ``n``.
    """
    if eps.shape[0] != z.shape[0]:
        raise ValueError(f"minibatch OT needs batches of equal size, got {eps.shape[0]} noise and {z.shape[0]} data points")
    n = z.shape[0]
    source = eps.detach().reshape(n, -1).to("cpu", torch.float64).numpy()
    target = z.detach().reshape(n, -1).to("cpu", torch.float64).numpy()
    cost = ot.dist(source, target, metric="sqeuclidean")
    weights = np.full(n, 1.0 / n)
    plan = ot.emd(weights, weights, cost)
    return torch.from_numpy(plan.argmax(axis=1)).to(z.device)


def couple(eps: torch.Tensor, z: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the pairs ``(eps, z)`` after the coupling ``method`` re-pairs them."""
    if method == "independent":
        return eps, z
    if method == "minibatch_ot":
        return eps, z[minibatch_ot_permutation(eps, z)]
    raise ValueError(f"unknown coupling {method!r}; accepted: {', '.join(COUPLINGS)}")
