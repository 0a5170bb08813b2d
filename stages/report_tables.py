"""Reading metrics files and turning them into tables and sentences (stage `report`).

``render_metrics`` renders any metrics object generically, so that a new metric appears
in the report without a change here. The other functions build the views the report
explains: distances beside their noise floors, quality per solver and NFE budget, and
the held-out negative log-likelihoods.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from stages.common import StageError
from stages.report_render import Document, code, format_value

# Distances that come with a noise floor ``NAME_floor`` (and ``NAME_floor_std``).
FLOOR_METRICS = ("w2", "energy", "mmd", "fid", "fd_pca")

# Top-level metrics of a data set shown beside its distances, in column order.
RESULT_EXTRA_KEYS = ("straightness", "nll", "entropy", "memorisation")

# Columns of the held-out likelihood table, in order.
NLL_KEYS = ("nll", "nll_per_dim", "nll_true", "nll_t_end")

# Keys of ``by_solver`` entries that describe the run instead of its quality.
RUN_KEYS = {"nfe", "nfe_budget", "steps", "seconds"}


def read_json(path: Path) -> object:
    """Read a JSON file, raising ``StageError`` naming it when it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise StageError(f"{path}: cannot read the JSON file ({error}); rerun the stage that writes it") from error


def is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def is_leaf_mapping(value: object) -> bool:
    """True for a non-empty dict whose values are scalars or lists of scalars."""
    return isinstance(value, dict) and bool(value) and all(is_scalar(v) or (isinstance(v, list) and all(is_scalar(i) for i in v)) for v in value.values())


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """Flatten nested dicts into ``{"a.b.c": leaf}``. Lists are leaves."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, object] = {}
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(flatten(item, name))
    return flat


def leaf_mappings(value: dict, prefix: str = "") -> list[tuple[str, dict]]:
    """Return ``(path, leaf dict)`` for every leaf dict below ``value``, depth first in key order."""
    found: list[tuple[str, dict]] = []
    scalars = {key: item for key, item in value.items() if not isinstance(item, dict)}
    if scalars:
        found.append((prefix, scalars))
    for key, item in value.items():
        if isinstance(item, dict):
            found += leaf_mappings(item, f"{prefix}.{key}" if prefix else str(key))
    return found


def render_metrics(doc: Document, metrics: dict, source: Path, skip: tuple[str, ...] = ()) -> None:
    """Render every value of a metrics object: top-level scalars as one table, nested objects as tables.

    A top-level dict whose values are all scalars becomes one row of a table shared
    with the other such dicts that have the same keys (for example per-solver orders
    and errors). A deeper object becomes a table whose rows are the paths to its leaf
    dicts and whose columns are their keys (for example solver and NFE by metric).
    Keys in ``skip`` are left out, for objects that the report shows in another form.
    """
    metrics = {key: value for key, value in metrics.items() if key not in skip}
    scalars = [(key, value) for key, value in metrics.items() if not isinstance(value, dict)]
    doc.paragraph(f"From `{source.as_posix()}`:")
    if scalars:
        doc.table(["metric", "value"], [[code(key), format_value(value)] for key, value in scalars])

    groups: dict[tuple[str, ...], list[tuple[str, dict]]] = {}
    for key, value in metrics.items():
        if is_leaf_mapping(value):
            groups.setdefault(tuple(value), []).append((key, value))
    for columns, members in groups.items():
        doc.table(["metric", *columns], [[code(key), *(format_value(value[c]) for c in columns)] for key, value in members])

    for key, value in metrics.items():
        if isinstance(value, dict) and not is_leaf_mapping(value) and value:
            render_nested_table(doc, key, value)


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers by value: ``steps_2`` before ``steps_16``."""
    return [(0, float(part), "") if re.fullmatch(r"\d+(\.\d+)?", part) else (1, 0.0, part) for part in re.split(r"(\d+(?:\.\d+)?)", text)]


def render_nested_table(doc: Document, name: str, value: dict) -> None:
    rows = sorted(leaf_mappings(value), key=lambda row: natural_key(row[0]))
    columns = sorted({key for _, leaf in rows for key in leaf}, key=natural_key)
    doc.paragraph(f"{code(name)}:")
    doc.table([name, *columns], [[path or "(top)", *(format_value(leaf[c]) if c in leaf else "" for c in columns)] for path, leaf in rows])


def load_metrics(doc: Document, path: Path, stage: str) -> dict | None:
    """Read a metrics file, or write in the document which stage produces it when it is missing."""
    if not path.is_file():
        doc.paragraph(f"*Not available:* `{path.as_posix()}` is missing (the `{stage}` stage writes it).")
        return None
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise StageError(f"{path}: expected a JSON object of metrics, found {type(metrics).__name__}")
    return metrics


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def floor_sentences(metrics: dict) -> list[str]:
    """Compare each distance that has a noise floor (``w2``, ``fid``, ...) with that floor, one sentence each.

    The floor is the same distance between independent draws of the true distribution,
    the best any model can score. Only top-level numbers are used.
    """
    sentences = []
    where = ""
    if "solver" in metrics and is_number(metrics.get("nfe")):
        where = f" for the best sample set at the largest NFE budget (solver {code(str(metrics['solver']))}, nfe = {format_value(metrics['nfe'])})"
    for name in FLOOR_METRICS:
        value, floor = metrics.get(name), metrics.get(f"{name}_floor")
        if not is_number(value) or not is_number(floor):
            continue
        spread_key = next((key for key in (f"{name}_floor_std", f"{name}_floor_spread") if is_number(metrics.get(key))), None)
        spread = f" (standard deviation {format_value(metrics[spread_key])} over seeds)" if spread_key else ""
        ratio = f", so the model is at {format_value(value / floor)} times the floor" if floor > 0 else ""
        sentences.append(f"{name} = {format_value(value)}{where}, against a noise floor {name}_floor = {format_value(floor)}{spread}{ratio}.")
        where = ""
    return sentences


def image_sentences(metrics: dict) -> list[str]:
    """Describe class balance and memorisation of generated images, when the metrics have them."""
    sentences = []
    if is_number(metrics.get("entropy")) and is_number(metrics.get("entropy_max")):
        heldout = f", held-out images {format_value(metrics['entropy_heldout'])}" if is_number(metrics.get("entropy_heldout")) else ""
        sentences.append(
            f"The predicted classes of the samples have entropy {format_value(metrics['entropy'])} "
            f"(uniform classes {format_value(metrics['entropy_max'])}{heldout})."
        )
    if is_number(metrics.get("memorisation")) and is_number(metrics.get("memorisation_reference")):
        spread = f" ± {format_value(metrics['memorisation_reference_std'])}" if is_number(metrics.get("memorisation_reference_std")) else ""
        sentences.append(
            f"The memorisation ratio (median distance of samples to their nearest training image over that of "
            f"held-out images) is {format_value(metrics['memorisation'])}, against {format_value(metrics['memorisation_reference'])}{spread} "
            "for held-out images. A ratio well below the reference means samples copy training images."
        )
    return sentences


def floor_cell(metrics: dict, name: str) -> str:
    """Return ``value (floor ± std)`` for the distance ``name``, with whatever parts the metrics have."""
    value = metrics.get(name)
    if not is_number(value):
        return ""
    floor = metrics.get(f"{name}_floor")
    if not is_number(floor):
        return format_value(value)
    spread = metrics.get(f"{name}_floor_std", metrics.get(f"{name}_floor_spread"))
    spread_text = f" ± {format_value(spread)}" if is_number(spread) else ""
    return f"{format_value(value)} ({format_value(floor)}{spread_text})"


def distance_table(doc: Document, all_metrics: dict[str, dict]) -> None:
    """Tabulate each data set's distances beside their noise floors, one table per set of columns (toys, images).

    A distance cell reads ``value (floor ± std)``: the model's distance for its best
    sample set, then the same distance between independent draws of the true
    distribution, mean and standard deviation over seeds.
    """
    groups: dict[tuple[str, ...], dict[str, dict]] = {}
    for name, metrics in all_metrics.items():
        columns = tuple(key for key in (*FLOOR_METRICS, *RESULT_EXTRA_KEYS) if is_number(metrics.get(key)))
        if columns:
            groups.setdefault(columns, {})[name] = metrics

    for columns, rows in groups.items():
        header = ["data set", "solver", "nfe"] + [f"{key} (floor ± std)" if key in FLOOR_METRICS else key for key in columns]
        table = []
        for name, metrics in rows.items():
            cells = [floor_cell(metrics, key) if key in FLOOR_METRICS else format_value(metrics[key]) for key in columns]
            table.append([name, format_value(metrics.get("solver", "")), format_value(metrics.get("nfe", "")), *cells])
        doc.table(header, table, align_right_from=2)


def budget_label(key: str) -> tuple[str, int | None]:
    """Return the column label and NFE budget of a ``by_solver`` key such as ``nfe16``."""
    match = re.fullmatch(r"nfe(\d+)", key)
    if match is None:
        return key, None
    return f"nfe {match.group(1)}", int(match.group(1))


def quality_keys(by_solver: dict) -> list[str]:
    """Return the numeric quality metrics of a ``by_solver`` object, distances with floors first."""
    found = {key for runs in by_solver.values() if isinstance(runs, dict) for run in runs.values() if isinstance(run, dict) for key, value in run.items() if key not in RUN_KEYS and (is_number(value) or value is None)}
    return [key for key in FLOOR_METRICS if key in found] + sorted(found - set(FLOOR_METRICS))


def render_by_solver(doc: Document, by_solver: dict) -> None:
    """Render ``by_solver`` (solver -> NFE budget -> metrics) as one table per quality metric: solvers by budgets.

    A cell whose run used a different number of velocity evaluations than its budget
    (dopri5 chooses its own steps) gives that number in brackets.
    """
    budgets = sorted({key for runs in by_solver.values() if isinstance(runs, dict) for key in runs}, key=natural_key)
    marked = False
    for metric in quality_keys(by_solver):
        rows = []
        for solver, runs in by_solver.items():
            cells = []
            for key in budgets:
                run = runs.get(key) if isinstance(runs, dict) else None
                if not isinstance(run, dict) or metric not in run:
                    cells.append("")
                    continue
                cell = format_value(run[metric])
                _, budget = budget_label(key)
                if budget is not None and is_number(run.get("nfe")) and run["nfe"] != budget:
                    cell += f" ({format_value(run['nfe'])})"
                    marked = True
                cells.append(cell)
            rows.append([solver, *cells])
        doc.paragraph(f"{code(metric)} per solver and NFE budget:")
        doc.table(["solver", *(budget_label(key)[0] for key in budgets)], rows)
    if marked:
        doc.paragraph("A number in brackets is the NFE the run actually used, where it differs from the budget of its column.")


def nll_table(doc: Document, all_metrics: dict[str, dict]) -> bool:
    """Tabulate the held-out negative log-likelihoods of the data sets that have one; return False when none has."""
    rows = {name: metrics for name, metrics in all_metrics.items() if is_number(metrics.get("nll"))}
    if not rows:
        return False
    columns = [key for key in NLL_KEYS if any(key in metrics for metrics in rows.values())]
    doc.table(["data set", *columns], [[name, *(format_value(metrics[key]) if key in metrics else "" for key in columns)] for name, metrics in rows.items()])
    return True


def primary_distance(metrics: dict) -> str | None:
    """Return the distance a data set is ranked by: ``fid`` for images with a classifier, else ``w2``."""
    return next((name for name in ("fid", "w2") if is_number(metrics.get(name))), None)


def low_nfe_quality(metrics: dict, solver: str = "euler") -> tuple[str, int, float, float] | None:
    """Return ``(distance, nfe, value, ratio)`` for ``solver`` at its smallest NFE budget against the best large-budget value.

    ``ratio`` divides the distance at the smallest budget by the top-level (best, largest
    budget) distance. ``None`` when the metrics lack what this needs.
    """
    distance = primary_distance(metrics)
    runs = metrics.get("by_solver", {}).get(solver) if isinstance(metrics.get("by_solver"), dict) else None
    if distance is None or not isinstance(runs, dict) or not metrics[distance] > 0:
        return None
    candidates = [run for run in runs.values() if isinstance(run, dict) and is_number(run.get("nfe")) and is_number(run.get(distance))]
    if not candidates:
        return None
    smallest = min(candidates, key=lambda run: run["nfe"])
    return distance, int(smallest["nfe"]), float(smallest[distance]), float(smallest[distance]) / float(metrics[distance])


def straightness_sentence(all_metrics: dict[str, dict], solver: str = "euler") -> str | None:
    """Relate each data set's ``straightness`` to how much ``solver`` loses at its smallest NFE budget.

    Returns ``None`` when no data set has both. Straightness depends on the dimension and
    scale of the data, so only data sets scored by the same distance are compared: for
    each such group of two or more, the text states whether ordering them by straightness
    also orders their low-NFE ratios.
    """
    entries = []
    for name, metrics in all_metrics.items():
        quality = low_nfe_quality(metrics, solver)
        if is_number(metrics.get("straightness")) and quality is not None:
            entries.append((float(metrics["straightness"]), name, *quality))
    if not entries:
        return None

    entries.sort()
    parts = [
        f"{name} (straightness {format_value(straightness)}): {distance} = {format_value(value)} at {nfe} NFE, {format_value(ratio)} times its large-budget value"
        for straightness, name, distance, nfe, value, ratio in entries
    ]
    sentence = (
        "Straightness is the time average of E |v(x_t, t) - (x_1 - x_0)|^2 along the learned trajectories, 0 when every "
        f"trajectory is a straight line run at constant speed, which {solver} follows exactly with any number of steps. "
        f"Against the quality of {solver} at its smallest NFE budget: " + "; ".join(parts) + "."
    )
    for distance in dict.fromkeys(entry[2] for entry in entries):
        ratios = [entry[-1] for entry in entries if entry[2] == distance]
        if len(ratios) < 2:
            continue
        if all(a <= b for a, b in zip(ratios, ratios[1:])):
            sentence += f" Among the data sets scored by {distance}, ordered by straightness, the low-NFE ratios rise too: the straighter flows lose less at low NFE."
        else:
            sentence += f" Among the data sets scored by {distance}, ordered by straightness, the low-NFE ratios do not rise monotonically, so straightness alone does not predict the low-NFE loss."
    if len({entry[2] for entry in entries}) > 1:
        sentence += " Straightness grows with the dimension and scale of the data, so data sets scored by different distances are not compared."
    return sentence
