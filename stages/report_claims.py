"""The report's sections on the study's four mathematical claims and on the solvers (stage `report`).

Each section states a claim, then the evidence for it, with every number read from the
metrics and plot files of the stage that checked it. Settings such as sample sizes come
from params.yaml. A section whose metrics are missing states that in one sentence.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from stages.config import Params
from stages.report_figures import FigurePlacer
from stages.report_render import Document, code, format_value, slugify
from stages.report_tables import is_number, load_metrics, natural_key, nll_table

SOLVER_SECTION_TITLE = "Solvers"

# Textbook convergence orders of the fixed-step solvers on a smooth flow.
EXPECTED_ORDER = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
ORDER_TOLERANCE = 0.3

# Schedules under which alpha_t^2 lam + beta_t^2 is quadratic in t for every lam.
QUADRATIC_VARIANCE_SCHEDULES = ("linear", "linear_vp")


def lookup(metrics: dict | None, path: str) -> object:
    """Return the value at the dotted ``path`` of ``metrics``, or ``None`` when any part is missing."""
    value: object = metrics
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def numbers_or_note(doc: Document, metrics: dict | None, source: Path, stage: str, paths: tuple[str, ...]) -> dict[str, float] | None:
    """Return the numbers at ``paths`` (last key as name), or write which are missing and return ``None``.

    Writes nothing when ``metrics`` itself is missing, because ``load_metrics`` has written that note.
    """
    if metrics is None:
        return None
    found = {path: lookup(metrics, path) for path in paths}
    missing = [path for path, value in found.items() if not is_number(value)]
    if missing:
        names = ", ".join(code(path) for path in missing)
        doc.paragraph(f"*Not available:* `{source.as_posix()}` has no {names} (rerun the `{stage}` stage).")
        return None
    return {path.rsplit(".", 1)[-1]: float(value) for path, value in found.items()}


def percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def noise_verdict(max_se: float, rms_se: float) -> str:
    """Return a phrase stating whether errors in standard errors look like sampling noise: RMS below 1.5 and none beyond 5."""
    if rms_se < 1.5 and max_se < 5:
        return "consistent with sampling noise alone"
    return "larger than sampling noise explains"


def solver_order_key(solver: str) -> tuple[int, str]:
    """Sort key that lists solvers by their textbook order (euler, midpoint, heun, rk4), then the others by name."""
    known = list(EXPECTED_ORDER)
    return (known.index(solver) if solver in known else len(known), solver)


def orders_text(orders: dict) -> str:
    return ", ".join(f"{solver} {format_value(orders[solver])}" for solver in sorted(orders, key=solver_order_key) if is_number(orders[solver]))


def deviating(orders: dict) -> list[str]:
    """Return the solvers whose order differs from its textbook value by more than ``ORDER_TOLERANCE``."""
    return [solver for solver, order in orders.items() if solver in EXPECTED_ORDER and is_number(order) and abs(order - EXPECTED_ORDER[solver]) > ORDER_TOLERANCE]


# ---------------------------------------------------------------- claim 1


def section_single_point(doc: Document, reports: Path, params: Params, title: str) -> None:
    config = params.single_point
    source = reports / "metrics" / "single_point.json"
    doc.heading(2, title)
    doc.paragraph(
        "**Claim.** For one data point z, X_t = alpha_t z + beta_t eps is distributed as N(alpha_t z, beta_t^2 I). "
        "The conditional velocity u_t(x|z) = d_alpha z + d_beta eps, written as a field over positions as "
        "(d_alpha - alpha d_beta / beta) z + (d_beta / beta) x (the x form), carries N(0, I) at t = 0 onto z at t = 1."
    )
    metrics = load_metrics(doc, source, "single_point")
    figures = FigurePlacer(doc, reports / "figures", "single_point", "single_point")

    moments = numbers_or_note(doc, metrics, source, "single_point", ("mean_error_max_se", "mean_error_rms_se", "cov_error_max_se", "cov_error_rms_se"))
    if moments is not None:
        verdict = noise_verdict(max(moments["mean_error_max_se"], moments["cov_error_max_se"]), max(moments["mean_error_rms_se"], moments["cov_error_rms_se"]))
        doc.paragraph(
            f"**Marginals of X_t.** With {config.n_samples} draws at each t of {format_value(list(config.t_grid))} in {config.d} dimensions, "
            f"the empirical mean of X_t is at most {format_value(moments['mean_error_max_se'])} standard errors from alpha_t z "
            f"(RMS {format_value(moments['mean_error_rms_se'])}), and the empirical covariance at most "
            f"{format_value(moments['cov_error_max_se'])} standard errors from beta_t^2 I (RMS {format_value(moments['cov_error_rms_se'])}): {verdict}."
        )
    figures.place("moments.png")

    errors = lookup(metrics, "endpoint_error")
    if isinstance(errors, dict) and errors:
        doc.paragraph(f"**Endpoints.** RMS distance of x_1 to z for {config.n_endpoints} noise draws carried by the x form, per solver and number of steps:")
        endpoint_tables(doc, errors, lookup(metrics, "endpoint_nfe"))
    elif metrics is not None:
        doc.paragraph(f"*Not available:* `{source.as_posix()}` has no `endpoint_error` (rerun the `single_point` stage).")

    orders = lookup(metrics, "order")
    if isinstance(orders, dict) and orders:
        doc.paragraph(
            f"Fitted orders (minus the slope of log error against log steps): {orders_text(orders)}. "
            f"They differ from the textbook 1, 2, 2, 4 that the same solvers reach on the smooth Gaussian flow "
            f"(see [{SOLVER_SECTION_TITLE}](#{slugify(SOLVER_SECTION_TITLE)})), because the x form is singular at t = 1."
        )
    doc.paragraph(
        "**The singular x form at t = 1.** There beta_1 = 0, so the rate d_beta / beta grows like 1 / (1 - t) as t -> 1, and the "
        "field is 0 / 0 at x = z and infinite elsewhere. `flowmatch.paths.conditional_velocity_x` computes the rate as "
        "beta d_beta / beta^2, which is finite for every t < 1, and at t = 1 returns the field's limit d_alpha_1 z along the "
        "noise-free path; the stage rejects any non-finite endpoint. Heun and RK4 evaluate the field at t = 1, where they see this "
        "limit instead of the true velocity d_alpha_1 z + d_beta_1 eps, which leaves an error of order h in their last step. "
        "Euler and midpoint never evaluate at t = 1, and their orders come from the stiff rate near t = 1 rather than from "
        "the textbook error expansion, which assumes a smooth field. dopri5 meets its tolerance by taking many short steps near t = 1."
    )
    figures.place("convergence.png")
    figures.place("trajectories.png")
    figures.rest()


def endpoint_tables(doc: Document, errors: dict, nfe: object) -> None:
    """Tabulate endpoint errors: fixed-step solvers by steps, and dopri5 by tolerance with its NFE."""
    fixed = {solver: errors[solver] for solver in sorted(errors, key=solver_order_key) if solver != "dopri5" and isinstance(errors[solver], dict)}
    if fixed:
        labels = sorted({label for runs in fixed.values() for label in runs}, key=natural_key)
        header = ["solver", *(label.replace("steps_", "") + " steps" for label in labels)]
        doc.table(header, [[solver, *(format_value(runs[label]) if label in runs else "" for label in labels)] for solver, runs in fixed.items()])
    adaptive = errors.get("dopri5")
    if isinstance(adaptive, dict) and adaptive:
        nfe_runs = nfe.get("dopri5", {}) if isinstance(nfe, dict) else {}
        rows = [[label.replace("tol_", ""), format_value(error), format_value(nfe_runs.get(label, ""))] for label, error in sorted(adaptive.items(), key=lambda item: natural_key(item[0]))]
        doc.paragraph("dopri5, by tolerance (atol = rtol):")
        doc.table(["tolerance", "error", "nfe"], rows)


# ---------------------------------------------------------------- claim 2


def section_marginal(doc: Document, reports: Path, params: Params, title: str) -> None:
    config = params.marginal_flow
    source = reports / "metrics" / "marginal_flow.json"
    doc.heading(2, title)
    doc.paragraph(
        "**Claim.** Averaging the conditional velocities with the posterior weights of the data points, "
        "u_t(x) = E[u_t(x|Z) | X_t = x], gives a velocity whose flow carries N(0, I) to the data distribution itself: "
        "the marginals p_t of X_t and u_t satisfy the continuity equation d p_t / dt + div(p_t u_t) = 0."
    )
    metrics = load_metrics(doc, source, "marginal_flow")
    figures = FigurePlacer(doc, reports / "figures", "marginal", "marginal_flow")

    memorisation = numbers_or_note(doc, metrics, source, "marginal_flow", tuple(f"memorisation.{key}" for key in ("fraction_within_radius", "test_fraction_within_radius", "nearest_distance_median", "nearest_distance_max", "test_nearest_distance_median")))
    if memorisation is not None:
        doc.paragraph(
            f"**Memorisation by the exact flow.** For the empirical distribution of {config.n_points} training points of {config.dataset}, "
            f"the exact marginal velocity integrated with {config.solver} from {config.n_samples} noise draws puts "
            f"{percent(memorisation['fraction_within_radius'])} of its samples within {format_value(config.radius)} of a training point "
            f"(median distance {format_value(memorisation['nearest_distance_median'])}, largest {format_value(memorisation['nearest_distance_max'])}), "
            f"against {percent(memorisation['test_fraction_within_radius'])} of fresh test points (median distance "
            f"{format_value(memorisation['test_nearest_distance_median'])}). The flow transports noise to exactly the distribution it averages "
            "over, here the training set: a trained model that generalises must stay away from this optimum."
        )
    figures.place("landing.png")
    figures.place("velocity_density.png")

    continuity = numbers_or_note(doc, metrics, source, "marginal_flow", tuple(f"continuity.{key}" for key in ("residual_1d", "residual_2d", "order_1d", "order_2d")))
    if continuity is not None:
        doc.paragraph(
            f"**Continuity equation.** On grids of spacing down to {format_value(min(config.continuity_spacings))} for Gaussian mixtures, the "
            f"residual of d p_t / dt + div(p_t u_t), relative to the size of its terms, is {format_value(continuity['residual_1d'])} in 1-D and "
            f"{format_value(continuity['residual_2d'])} in 2-D, and it falls with order {format_value(continuity['order_1d'])} (1-D) and "
            f"{format_value(continuity['order_2d'])} (2-D) in the spacing: the discretisation error of central differences (order 2), "
            "not a violation of the equation."
        )
    figures.place("continuity.png")

    mc = numbers_or_note(doc, metrics, source, "marginal_flow", tuple(f"gaussian_mc.{key}" for key in ("m", "error_rms", "standard_error_rms", "z_rms", "z_max", "error_slope")))
    if mc is not None:
        doc.paragraph(
            f"**Monte Carlo against the closed form.** For Gaussian data the posterior-weighted average over m = {format_value(int(mc['m']))} "
            f"samples of z differs from the closed-form velocity by {format_value(mc['error_rms'])} (RMS), against an estimated standard error of "
            f"{format_value(mc['standard_error_rms'])}. The standardised errors have RMS {format_value(mc['z_rms'])} (1 expected) and maximum "
            f"{format_value(mc['z_max'])}, and the error falls like m^{format_value(mc['error_slope'])} (m^-0.5 expected)."
        )
    figures.place("gaussian_mc.png")
    # The Gaussian-flow, solver and likelihood figures belong to the later sections.
    for name in ("gaussian_flow.png", "solver_convergence.png", "likelihood.png"):
        figures.skip(name)
    figures.rest()


# ---------------------------------------------------------------- claim 3


def section_gaussian(doc: Document, reports: Path, params: Params, title: str) -> None:
    config = params.marginal_flow
    doc.heading(2, title)
    doc.paragraph(
        "**Claim.** For Gaussian data N(mean, cov), with cov = Q diag(lam) Q^T, the marginal velocity is affine in x: "
        "u_t(x) = d_alpha mean + Q diag(a_t) Q^T (x - alpha_t mean) with a_i = d/dt log sqrt(alpha_t^2 lam_i + beta_t^2), "
        "and its flow map is known in closed form. Both the numerics and the trained model can therefore be compared with an exact answer."
    )
    source = reports / "metrics" / "marginal_flow.json"
    metrics = load_metrics(doc, source, "marginal_flow")
    flow = numbers_or_note(doc, metrics, source, "marginal_flow", tuple(f"gaussian_flow.{key}" for key in ("mean_error_max_se", "cov_error_max_se", "solver_error_rms")))
    if flow is not None:
        doc.paragraph(
            f"**Closed form.** Integrated with {config.solver} from {config.n_samples} draws of N(0, I), the closed-form velocity gives samples "
            f"whose mean is within {format_value(flow['mean_error_max_se'])} and whose covariance is within {format_value(flow['cov_error_max_se'])} "
            f"standard errors of N(mean, cov), and which lie {format_value(flow['solver_error_rms'])} (RMS) from the exact flow map."
        )
    if flow is not None or (reports / "figures" / "marginal" / "gaussian_flow.png").is_file():
        FigurePlacer(doc, reports / "figures", "marginal", "marginal_flow", announce_empty=False).place("gaussian_flow.png")

    learned_source = reports / "metrics" / "gaussian.json"
    learned = load_metrics(doc, learned_source, "evaluate")
    velocity = numbers_or_note(doc, learned, learned_source, "evaluate", ("velocity_error", "velocity_error_max"))
    if velocity is not None:
        curve = velocity_error_extremes(reports)
        where = ""
        if curve is not None:
            (t_max, e_max), (t_min, e_min) = curve
            where = f" It is largest at t = {format_value(t_max)} ({format_value(e_max)}) and smallest at t = {format_value(t_min)} ({format_value(e_min)})."
        doc.paragraph(
            f"**Learned velocity.** The velocity trained by conditional flow matching differs from the closed form by "
            f"{format_value(velocity['velocity_error'])} on average over t (relative L2 error ||v - u_t|| / ||u_t|| over x ~ p_t), "
            f"at most {format_value(velocity['velocity_error_max'])}.{where}"
        )
    if velocity is not None or (reports / "figures" / "gaussian" / "velocity_error.png").is_file():
        FigurePlacer(doc, reports / "figures", "gaussian", "evaluate", announce_empty=False).place("velocity_error.png")

    nll = numbers_or_note(doc, learned, learned_source, "evaluate", ("nll", "nll_true"))
    if nll is not None:
        gap = nll["nll"] - nll["nll_true"]
        side = "above" if gap >= 0 else "below"
        doc.paragraph(
            f"**Likelihood of held-out data.** The learned flow gives a held-out negative log-likelihood of {format_value(nll['nll'])} nats per "
            f"sample, {format_value(abs(gap))} nats {side} the {format_value(nll['nll_true'])} of the true N(mean, cov) on the same points. "
            "The sample distances of this data set are in the results below."
        )


def velocity_error_extremes(reports: Path) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Return ``((t, error) at the maximum, (t, error) at the minimum)`` of the Gaussian velocity error curve, or ``None``.

    Reads ``velocity_error.csv`` (columns ``t``, ``velocity_error``) anywhere under
    reports/plots/gaussian.
    """
    found = sorted((reports / "plots" / "gaussian").rglob("velocity_error.csv")) if (reports / "plots" / "gaussian").is_dir() else []
    if not found:
        return None
    frame = pd.read_csv(found[0])
    if not {"t", "velocity_error"} <= set(frame.columns) or frame.empty:
        return None
    high = frame.loc[frame["velocity_error"].idxmax()]
    low = frame.loc[frame["velocity_error"].idxmin()]
    return (float(high["t"]), float(high["velocity_error"])), (float(low["t"]), float(low["velocity_error"]))


# ---------------------------------------------------------------- claim 4


def section_likelihood(doc: Document, reports: Path, dataset_metrics: dict[str, dict], title: str) -> None:
    doc.heading(2, title)
    doc.paragraph(
        "**Claim.** Along a trajectory of the flow, d/dt log p_t(x_t) = -div u_t(x_t). Integrating a data point back to t = 0 "
        "therefore gives its exact log-density, log p_1(x_1) = log p_0(x_0) - int_0^1 div u_t(x_t) dt. In high dimension the "
        "Hutchinson estimator replaces div u_t by v^T (du_t/dx) v for random probes v, which is unbiased."
    )
    source = reports / "metrics" / "marginal_flow.json"
    metrics = load_metrics(doc, source, "marginal_flow")
    paths = ("likelihood_error_max", "hutchinson_z") + tuple(f"likelihood.{key}" for key in ("n_points", "dim", "tolerance", "error_rms", "hutchinson_dim", "hutchinson_probes", "n_hutchinson_points", "hutchinson_z_rms", "hutchinson_z_mean"))
    check = numbers_or_note(doc, metrics, source, "marginal_flow", paths)
    if check is not None:
        doc.paragraph(
            f"**Check against the closed form.** With the closed-form Gaussian velocity, the exact divergence and dopri5 "
            f"(atol = rtol = {format_value(check['tolerance'])}) in float64, the computed log-density of {int(check['n_points'])} held-out points "
            f"of the study's {int(check['dim'])}-D Gaussian is within {format_value(check['likelihood_error_max'])} nats of log N(x; mean, cov) "
            f"(RMS {format_value(check['error_rms'])}). In {int(check['hutchinson_dim'])} dimensions with {int(check['hutchinson_probes'])} "
            f"Rademacher probes, the Hutchinson estimate at {int(check['n_hutchinson_points'])} points is off by at most "
            f"{format_value(check['hutchinson_z'])} standard errors, with mean {format_value(check['hutchinson_z_mean'])} (0 for an unbiased "
            f"estimate) and RMS {format_value(check['hutchinson_z_rms'])} (1 expected). The standard error is exact here, because the Jacobian "
            "of the Gaussian velocity does not depend on x."
        )
    if check is not None or (reports / "figures" / "marginal" / "likelihood.png").is_file():
        FigurePlacer(doc, reports / "figures", "marginal", "marginal_flow", announce_empty=False).place("likelihood.png")

    doc.paragraph(
        "**Held-out likelihood of the trained models** (nats per sample, lower is better; `nll_true` is the true density's, known "
        "for the Gaussian case; `nll_t_end` below 1 means the flow stops short of t = 1 and scores the density of the path there):"
    )
    if not nll_table(doc, dataset_metrics):
        doc.paragraph("*Not available:* no data set's metrics file has `nll` (the `evaluate` stage writes it for low-dimensional data sets).")


# ---------------------------------------------------------------- solvers


def section_solvers(doc: Document, reports: Path) -> None:
    doc.heading(2, SOLVER_SECTION_TITLE)
    source = reports / "metrics" / "marginal_flow.json"
    metrics = load_metrics(doc, source, "marginal_flow")
    reference, study = lookup(metrics, "solver_order"), lookup(metrics, "solver_order_study")
    names = lookup(metrics, "solver_order_schedules")
    if metrics is not None and not (isinstance(reference, dict) and reference and isinstance(study, dict) and isinstance(names, dict)):
        doc.paragraph(f"*Not available:* `{source.as_posix()}` has no `solver_order` (rerun the `marginal_flow` stage).")
    if isinstance(reference, dict) and reference and isinstance(study, dict) and isinstance(names, dict):
        expected = ", ".join(f"{solver} {order}" for solver, order in EXPECTED_ORDER.items())
        measured = f"under the reference schedule {code(str(names.get('reference')))}, {orders_text(reference)}"
        if names.get("study") == names.get("reference"):
            measured += ", which is also the study's schedule"
        else:
            measured += f"; under the study's schedule {code(str(names.get('study')))}, {orders_text(study)}"
        doc.paragraph(
            "Measured convergence orders of the fixed-step solvers on the closed-form Gaussian flow (minus the slope of log endpoint "
            f"error against log steps, float64; textbook values {expected}): {measured}."
        )
        off = deviating(study)
        if off:
            doc.paragraph(deviation_text(off, study, str(names.get("study"))))
        elif not deviating(reference):
            doc.paragraph(f"Every order is within {ORDER_TOLERANCE} of its textbook value.")
        if deviating(reference):
            doc.paragraph(f"*Warning:* under the reference schedule {', '.join(deviating(reference))} differ from their textbook order by more than {ORDER_TOLERANCE}.")

    single_point = load_metrics(doc, reports / "metrics" / "single_point.json", "single_point") if (reports / "metrics" / "single_point.json").is_file() else None
    orders = lookup(single_point, "order")
    if isinstance(orders, dict) and orders:
        doc.paragraph(
            f"The single-point flow measures other orders ({orders_text(orders)}) because its x form is singular at t = 1, where its rate "
            "d_beta / beta grows like 1 / (1 - t) and the solvers that evaluate the field at t = 1 (heun, rk4) see its limit value "
            "instead of the true velocity; the Gaussian flow is smooth on all of [0, 1]."
        )
    if isinstance(reference, dict) or (reports / "figures" / "marginal" / "solver_convergence.png").is_file():
        FigurePlacer(doc, reports / "figures", "marginal", "marginal_flow", announce_empty=False).place("solver_convergence.png")


def deviation_text(solvers: list[str], orders: dict, schedule: str) -> str:
    """Explain the study schedule's orders that differ from their textbook values."""
    values = ", ".join(f"{solver} {format_value(orders[solver])}" for solver in solvers)
    text = f"Under {code(schedule)} these orders differ from their textbook values by more than {ORDER_TOLERANCE}: {values}."
    if schedule in QUADRATIC_VARIANCE_SCHEDULES and "midpoint" in solvers and math.isclose(orders["midpoint"], 3.0, abs_tol=ORDER_TOLERANCE):
        text += (
            " For this schedule alpha_t^2 lam + beta_t^2 is a quadratic polynomial in t for every eigenvalue lam of cov, and then the "
            "h^2 term of the midpoint rule's global error integrates to zero on the Gaussian flow, so midpoint converges with order 3 here. "
            "The reference schedule shows the textbook orders."
        )
    else:
        text += " The reference schedule shows whether the solvers themselves are at fault."
    return text
