"""Flow matching from Gaussian noise to data: schedules, paths, flows, solvers, metrics.

Conventions used everywhere in the package:

- time runs from noise to data: ``t = 0`` is pure Gaussian noise, ``t = 1`` is data;
- the noising path is ``x_t = alpha_t * z + beta_t * eps`` with ``eps ~ N(0, I)``;
- the conditional velocity is ``u_t(x | z) = d_alpha_t * z + d_beta_t * eps``;
- the marginal velocity is the posterior average ``u_t(x) = E[u_t(x | Z) | X_t = x]``.

The package does no file or parameter I/O; the ``stages`` package does.
"""
