"""Typed, validated parameters: params.yaml parsed once, before a stage does any work.

Every check raises ``ParamError`` naming the key path, the bad value and what is
accepted, so that a typo in ``dvc exp run -S`` fails in a second with one line.
Unknown keys are rejected as well, because a misspelt key would otherwise be ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flowmatch.image_datasets import IMAGE_DATASETS
from flowmatch.schedules import SCHEDULE_NAMES, Schedule, get_schedule
from stages.common import ParamError, StageError

# The sets that prepare always writes, then the image sets it writes when data.datasets names them.
BUILTIN_DATASETS = ("moons", "checkerboard", "eight_gaussians", "gaussian", "digits")
DATASETS = BUILTIN_DATASETS + IMAGE_DATASETS
TOY_DATASETS = ("moons", "checkerboard", "eight_gaussians")
SOLVERS = ("euler", "midpoint", "heun", "rk4", "dopri5")


class Section:
    """A mapping from params.yaml with its key path, read through typed, checked getters."""

    def __init__(self, raw: object, path: str, known: tuple[str, ...] | None = None):
        if not isinstance(raw, dict):
            raise ParamError(path or "(top level)", raw, "a mapping of keys to values")
        self.raw = raw
        self.path = path
        if known is not None:
            for key in raw:
                if key not in known:
                    where = f"'{path}'" if path else "the top level"
                    raise ParamError(self.key(str(key)), raw[key], f"known keys of {where}: {', '.join(known)}")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def _get(self, name: str) -> object:
        if name not in self.raw:
            raise ParamError(self.key(name), None, "a value; the key is missing")
        return self.raw[name]

    def section(self, name: str, known: tuple[str, ...] | None = None) -> Section:
        return Section(self._get(name), self.key(name), known)

    def choice(self, name: str, accepted: tuple[str, ...]) -> str:
        value = self._get(name)
        if value not in accepted:
            raise ParamError(self.key(name), value, ", ".join(accepted))
        return value

    def boolean(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise ParamError(self.key(name), value, "true or false")
        return value

    def string(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str) or not value:
            raise ParamError(self.key(name), value, "a non-empty string")
        return value

    def integer(self, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
        return _check_int(self._get(name), self.key(name), minimum, maximum)

    def number(self, name: str, minimum: float | None = None, maximum: float | None = None, *, strict_min: bool = False, strict_max: bool = False) -> float:
        return _check_number(self._get(name), self.key(name), minimum, maximum, strict_min, strict_max)

    def int_list(self, name: str, minimum: int | None = None, maximum: int | None = None) -> tuple[int, ...]:
        values = self._list(name)
        return tuple(_check_int(v, f"{self.key(name)}[{i}]", minimum, maximum) for i, v in enumerate(values))

    def number_list(self, name: str, minimum: float | None = None, maximum: float | None = None, *, strict_max: bool = False) -> tuple[float, ...]:
        values = self._list(name)
        return tuple(_check_number(v, f"{self.key(name)}[{i}]", minimum, maximum, False, strict_max) for i, v in enumerate(values))

    def choice_list(self, name: str, accepted: tuple[str, ...]) -> tuple[str, ...]:
        values = self._list(name)
        for i, value in enumerate(values):
            if value not in accepted:
                raise ParamError(f"{self.key(name)}[{i}]", value, ", ".join(accepted))
        if len(set(values)) != len(values):
            raise ParamError(self.key(name), values, "a list without repeated names")
        return tuple(values)

    def _list(self, name: str) -> list:
        value = self._get(name)
        if not isinstance(value, list) or not value:
            raise ParamError(self.key(name), value, "a non-empty list")
        return value


def _check_int(value: object, key: str, minimum: int | None, maximum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(key, value, _range_text("an integer", minimum, maximum))
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ParamError(key, value, _range_text("an integer", minimum, maximum))
    return value


def _check_number(value: object, key: str, minimum: float | None, maximum: float | None, strict_min: bool, strict_max: bool) -> float:
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if strict_min else '>='} {minimum:g}")
    if maximum is not None:
        bounds.append(f"{'<' if strict_max else '<='} {maximum:g}")
    accepted = " ".join(["a finite number", " and ".join(bounds)]).rstrip()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParamError(key, value, accepted)
    if minimum is not None and (value <= minimum if strict_min else value < minimum):
        raise ParamError(key, value, accepted)
    if maximum is not None and (value >= maximum if strict_max else value > maximum):
        raise ParamError(key, value, accepted)
    return float(value)


def _range_text(kind: str, minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind} from {minimum} to {maximum}"
    if minimum is not None:
        return f"{kind} >= {minimum}"
    if maximum is not None:
        return f"{kind} <= {maximum}"
    return kind


@dataclass(frozen=True)
class ScheduleParams:
    name: str
    polynomial_n: float
    vp_beta_min: float
    vp_beta_max: float

    def build(self, name: str | None = None) -> Schedule:
        """Return the schedule called ``name`` (default: the study's ``schedule``) with these parameters."""
        return get_schedule(name or self.name, n=self.polynomial_n, beta_min=self.vp_beta_min, beta_max=self.vp_beta_max)


def parse_schedule(root: Section) -> ScheduleParams:
    name = root.choice("schedule", SCHEDULE_NAMES)
    section = root.section("schedules", ("polynomial_n", "vp_beta_min", "vp_beta_max"))
    n = section.number("polynomial_n", 1.0)
    beta_min = section.number("vp_beta_min", 0.0, strict_min=True)
    beta_max = section.number("vp_beta_max", 0.0, strict_min=True)
    if beta_max <= beta_min:
        # Either value may be the one that was changed, so the message names both.
        raise ParamError(
            section.key("vp_beta_max"), beta_max, f"a number > schedules.vp_beta_min = {beta_min:g}; lower vp_beta_min or raise vp_beta_max"
        )
    return ScheduleParams(name, n, beta_min, beta_max)


@dataclass(frozen=True)
class DataParams:
    """Sizes and shapes of the prepared sets; toy shape parameters are in units of the raw layout.

    ``datasets`` lists the sets that train, sample and evaluate run on (dvc.yaml's
    matrix reads it). The image sets among them (``IMAGE_DATASETS``) are also
    prepared, read by torchvision from ``data_root``, which may fetch missing files
    when ``download`` is true.
    """

    n_train: int
    n_test: int
    moons_noise: float
    checkerboard_cells: int
    eight_gaussians_std: float
    gaussian_dim: int
    digits_test_fraction: float
    datasets: tuple[str, ...]
    data_root: str
    download: bool

    @property
    def image_datasets(self) -> tuple[str, ...]:
        """Return the image sets in ``datasets``, which prepare reads with torchvision."""
        return tuple(name for name in self.datasets if name in IMAGE_DATASETS)


def parse_data(root: Section) -> DataParams:
    s = root.section("data", tuple(DataParams.__dataclass_fields__))
    return DataParams(
        n_train=s.integer("n_train", 2),
        n_test=s.integer("n_test", 2),
        moons_noise=s.number("moons_noise", 0.0),
        checkerboard_cells=s.integer("checkerboard_cells", 2, 64),
        eight_gaussians_std=s.number("eight_gaussians_std", 0.0, strict_min=True),
        gaussian_dim=s.integer("gaussian_dim", 1, 4096),
        digits_test_fraction=s.number("digits_test_fraction", 0.0, 1.0, strict_min=True, strict_max=True),
        datasets=s.choice_list("datasets", DATASETS),
        data_root=s.string("data_root"),
        download=s.boolean("download"),
    )


@dataclass(frozen=True)
class NoiseSequenceParams:
    """The intuition figures: ``image`` ('chelsea' or a file path) cropped and resized to ``size`` pixels square.

    ``x_t`` is shown at ``t_example``, the strip and the step-wise path use ``steps`` equal
    steps of t, and ``seed`` draws the noise ``eps``.
    """

    image: str
    size: int
    t_example: float
    steps: int
    seed: int


def parse_noise_sequence(root: Section) -> NoiseSequenceParams:
    s = root.section("noise_sequence", tuple(NoiseSequenceParams.__dataclass_fields__))
    return NoiseSequenceParams(
        image=s.string("image"),
        size=s.integer("size", 16, 2048),
        t_example=s.number("t_example", 0.0, 1.0, strict_min=True, strict_max=True),
        steps=s.integer("steps", 2, 64),
        seed=s.integer("seed", 0),
    )


@dataclass(frozen=True)
class SinglePointParams:
    """The single-data-point checks: ``z`` has norm ``z_norm`` and a direction drawn with ``seed``.

    ``n_samples`` draws of ``X_t`` per time check its moments; ``n_endpoints`` noise draws
    are carried to ``z`` by each solver, fixed-step ones with each of ``steps``, dopri5
    with each of ``tolerances`` (``atol = rtol``). ``d`` is capped at 1024 because the
    check forms the ``d x d`` sample covariance.
    """

    d: int
    z_norm: float
    n_samples: int
    t_grid: tuple[float, ...]
    n_endpoints: int
    steps: tuple[int, ...]
    solvers: tuple[str, ...]
    tolerances: tuple[float, ...]
    n_trajectories: int


def parse_single_point(root: Section) -> SinglePointParams:
    s = root.section("single_point", tuple(SinglePointParams.__dataclass_fields__))
    return SinglePointParams(
        d=s.integer("d", 1, 1024),
        z_norm=s.number("z_norm", 0.0),
        n_samples=s.integer("n_samples", 2),
        t_grid=s.number_list("t_grid", 0.0, 1.0, strict_max=True),
        n_endpoints=s.integer("n_endpoints", 1),
        steps=s.int_list("steps", 1, 100_000),
        solvers=s.choice_list("solvers", SOLVERS),
        tolerances=s.number_list("tolerances", 1e-12, 1.0),
        n_trajectories=s.integer("n_trajectories", 1),
    )


@dataclass(frozen=True)
class MarginalFlowParams:
    """The marginal-flow checks: exact flow on ``n_points`` of ``dataset``, the Gaussian case, continuity.

    ``steps`` applies to a fixed-step ``solver`` and ``tolerance`` (``atol = rtol``) to dopri5.
    ``mc_*`` set the Monte Carlo check of the Gaussian marginal velocity (sample counts
    ``m``, query points per time, times) and ``continuity_*`` the finite-difference check.
    """

    dataset: str
    n_points: int
    n_samples: int
    solver: str
    steps: int
    tolerance: float
    t_grid: tuple[float, ...]
    radius: float
    mc_sizes: tuple[int, ...]
    mc_n_query: int
    mc_t_grid: tuple[float, ...]
    continuity_t_grid: tuple[float, ...]
    continuity_spacings: tuple[float, ...]


def parse_marginal_flow(root: Section) -> MarginalFlowParams:
    s = root.section("marginal_flow", tuple(MarginalFlowParams.__dataclass_fields__))
    params = MarginalFlowParams(
        dataset=s.choice("dataset", TOY_DATASETS),
        n_points=s.integer("n_points", 1),
        n_samples=s.integer("n_samples", 2),
        solver=s.choice("solver", SOLVERS),
        steps=s.integer("steps", 1, 100_000),
        tolerance=s.number("tolerance", 1e-12, 1.0),
        t_grid=s.number_list("t_grid", 0.0, 1.0, strict_max=True),
        radius=s.number("radius", 0.0, strict_min=True),
        mc_sizes=s.int_list("mc_sizes", 2, 10_000_000),
        mc_n_query=s.integer("mc_n_query", 1),
        mc_t_grid=s.number_list("mc_t_grid", 0.0, 1.0, strict_max=True),
        continuity_t_grid=s.number_list("continuity_t_grid", 0.0, 1.0, strict_max=True),
        continuity_spacings=s.number_list("continuity_spacings", 0.0, 0.5, strict_max=True),
    )
    # Central differences in time evaluate p at t - h and t + h, both inside (0, 1).
    widest = max(params.continuity_spacings)
    for i, t in enumerate(params.continuity_t_grid):
        if not widest < t < 1 - widest:
            raise ParamError(s.key(f"continuity_t_grid[{i}]"), t, f"a number > {widest:g} and < {1 - widest:g} (the largest continuity_spacings and 1 minus it)")
    for i, h in enumerate(params.continuity_spacings):
        if h <= 0:
            raise ParamError(s.key(f"continuity_spacings[{i}]"), h, "a number > 0 and < 0.5")
    return params


@dataclass(frozen=True)
class TrainParams:
    """Conditional flow matching training of one data set's velocity model.

    ``model`` is ``mlp`` (``hidden`` width, ``layers`` hidden layers) or ``unet``
    (``channels`` base channels, image data only). ``overrides`` maps a data set name to
    its fully resolved parameters, for data sets whose ``train.overrides.NAME`` mapping
    replaces some of the keys; ``for_dataset`` picks the right one.
    """

    steps: int
    batch_size: int
    lr: float
    model: str
    hidden: int
    layers: int
    channels: int
    ema_decay: float
    warmup_steps: int
    grad_clip: float
    device: str
    precision: str
    compile: bool
    time_sampling: str
    logit_normal_loc: float
    logit_normal_scale: float
    coupling: str
    checkpoint_every: int
    log_every: int
    threads: int
    nproc: int
    overrides: dict = field(default_factory=dict, compare=False)

    def for_dataset(self, name: str) -> TrainParams:
        """Return the parameters for data set ``name``, with its overrides applied."""
        return self.overrides.get(name, self)


# Every key but these may be overridden per data set: the process count is one
# launch for the whole stage.
TRAIN_NOT_OVERRIDABLE = ("nproc", "overrides")


class _OverlaySection(Section):
    """The keys of ``overlay`` on top of those of ``base``; errors name the key where its value came from."""

    def __init__(self, base: Section, overlay: Section):
        self.raw = {**base.raw, **overlay.raw}
        self.path = base.path
        self.base = base
        self.overlay = overlay

    def key(self, name: str) -> str:
        return self.overlay.key(name) if name in self.overlay.raw else self.base.key(name)


def _parse_train_fields(s: Section, nproc: int) -> dict:
    steps = s.integer("steps", 1)
    batch_size = s.integer("batch_size", 1)
    if batch_size % nproc:
        raise ParamError(s.key("batch_size"), batch_size, f"a multiple of train.nproc = {nproc} (each process takes an equal share)")
    # warmup_steps may exceed steps: the learning rate then rises for the whole run.
    warmup_steps = s.integer("warmup_steps", 0)
    return dict(
        steps=steps,
        batch_size=batch_size,
        lr=s.number("lr", 0.0, strict_min=True),
        model=s.choice("model", ("mlp", "unet")),
        hidden=s.integer("hidden", 1),
        layers=s.integer("layers", 1),
        channels=s.integer("channels", 1),
        ema_decay=s.number("ema_decay", 0.0, 1.0, strict_max=True),
        warmup_steps=warmup_steps,
        grad_clip=s.number("grad_clip", 0.0),
        device=s.choice("device", ("auto", "cpu", "cuda")),
        precision=s.choice("precision", ("fp32", "bf16")),
        compile=s.boolean("compile"),
        time_sampling=s.choice("time_sampling", ("uniform", "logit_normal")),
        logit_normal_loc=s.number("logit_normal_loc"),
        logit_normal_scale=s.number("logit_normal_scale", 0.0, strict_min=True),
        coupling=s.choice("coupling", ("independent", "minibatch_ot")),
        checkpoint_every=s.integer("checkpoint_every", 1),
        log_every=s.integer("log_every", 1),
        threads=s.integer("threads", 0),
    )


def parse_train(root: Section) -> TrainParams:
    s = root.section("train", tuple(TrainParams.__dataclass_fields__))
    nproc = s.integer("nproc", 1)
    base = _parse_train_fields(s, nproc)

    overrides = {}
    if s.raw.get("overrides") is not None:
        table = s.section("overrides", DATASETS)
        overridable = tuple(name for name in TrainParams.__dataclass_fields__ if name not in TRAIN_NOT_OVERRIDABLE)
        for name in table.raw:
            overlay = table.section(name, overridable)
            overrides[name] = TrainParams(**_parse_train_fields(_OverlaySection(s, overlay), nproc), nproc=nproc)
    return TrainParams(**base, nproc=nproc, overrides=overrides)


@dataclass(frozen=True)
class SampleParams:
    """ODE sampling of the trained models at several solvers and NFE budgets.

    ``schedule`` is ``None`` to sample along the training schedule, or a schedule name to
    sample along that one through a change of schedule. ``dopri5_tolerances`` are the
    ``atol = rtol`` values that dopri5 tries for its NFE budgets.
    """

    schedule: str | None
    solvers: tuple[str, ...]
    nfe: tuple[int, ...]
    dopri5_tolerances: tuple[float, ...]
    n_samples: int
    seed: int
    threads: int


def parse_sample(root: Section) -> SampleParams:
    s = root.section("sample", tuple(SampleParams.__dataclass_fields__))
    schedule = s.raw.get("schedule")
    if schedule is not None:
        schedule = s.choice("schedule", SCHEDULE_NAMES)
    nfe = s.int_list("nfe", 1, 100_000)
    if len(set(nfe)) != len(nfe):
        raise ParamError(s.key("nfe"), list(nfe), "a list of NFE budgets without repeats")
    return SampleParams(
        schedule=schedule,
        solvers=s.choice_list("solvers", SOLVERS),
        nfe=nfe,
        dopri5_tolerances=s.number_list("dopri5_tolerances", 1e-10, 1.0),
        n_samples=s.integer("n_samples", 1),
        seed=s.integer("seed", 0),
        threads=s.integer("threads", 0),
    )


@dataclass(frozen=True)
class EvaluateParams:
    """Scoring of the samples (``n_eval``, ``floor_seeds``) and of the learned flow itself.

    ``nll_*``: the held-out NLL of ``nll_n`` test points, integrated with ``nll_solver``
    (``nll_steps`` steps, or ``nll_tolerance`` as dopri5's atol = rtol), with the exact
    divergence up to ``nll_exact_max_dim`` dimensions and ``nll_probes`` Hutchinson probes
    above. ``straightness_*``: ``straightness_n`` trajectories of ``straightness_steps``
    rk4 steps. ``velocity_error_*``: ``velocity_error_n`` points at each of
    ``velocity_error_times`` evenly spaced times from ``velocity_error_t_min`` to
    ``velocity_error_t_max``.
    """

    n_eval: int
    floor_seeds: int
    threads: int
    nll_n: int
    nll_solver: str
    nll_steps: int
    nll_tolerance: float
    nll_exact_max_dim: int
    nll_probes: int
    straightness_n: int
    straightness_steps: int
    velocity_error_n: int
    velocity_error_times: int
    velocity_error_t_min: float
    velocity_error_t_max: float


def parse_evaluate(root: Section) -> EvaluateParams:
    s = root.section("evaluate", tuple(EvaluateParams.__dataclass_fields__))
    params = EvaluateParams(
        n_eval=s.integer("n_eval", 2),
        floor_seeds=s.integer("floor_seeds", 2),
        threads=s.integer("threads", 0),
        nll_n=s.integer("nll_n", 1),
        nll_solver=s.choice("nll_solver", SOLVERS),
        nll_steps=s.integer("nll_steps", 1, 100_000),
        nll_tolerance=s.number("nll_tolerance", 1e-12, 1.0),
        nll_exact_max_dim=s.integer("nll_exact_max_dim", 0),
        nll_probes=s.integer("nll_probes", 1, 1024),
        straightness_n=s.integer("straightness_n", 1),
        straightness_steps=s.integer("straightness_steps", 1, 100_000),
        velocity_error_n=s.integer("velocity_error_n", 1),
        velocity_error_times=s.integer("velocity_error_times", 1, 10_000),
        velocity_error_t_min=s.number("velocity_error_t_min", 0.0, 1.0),
        velocity_error_t_max=s.number("velocity_error_t_max", 0.0, 1.0),
    )
    if params.velocity_error_t_max < params.velocity_error_t_min:
        raise ParamError(s.key("velocity_error_t_max"), params.velocity_error_t_max, f"a number >= evaluate.velocity_error_t_min = {params.velocity_error_t_min:g} and <= 1")
    return params


@dataclass(frozen=True)
class ClassifierParams:
    """Training of the digits classifier whose features and predictions score generated digits."""

    epochs: int
    batch_size: int
    lr: float
    features: int
    min_accuracy: float


def parse_classifier(root: Section) -> ClassifierParams:
    s = root.section("classifier", tuple(ClassifierParams.__dataclass_fields__))
    return ClassifierParams(
        epochs=s.integer("epochs", 1),
        batch_size=s.integer("batch_size", 1),
        lr=s.number("lr", 0.0, strict_min=True),
        features=s.integer("features", 2),
        min_accuracy=s.number("min_accuracy", 0.0, 1.0),
    )


@dataclass(frozen=True)
class Params:
    seed: int
    schedule: ScheduleParams
    data: DataParams
    noise_sequence: NoiseSequenceParams
    single_point: SinglePointParams
    marginal_flow: MarginalFlowParams
    train: TrainParams
    sample: SampleParams
    evaluate: EvaluateParams
    classifier: ClassifierParams


TOP_LEVEL_KEYS = ("seed", "schedule", "schedules", "data", "noise_sequence", "single_point", "marginal_flow", "train", "sample", "evaluate", "classifier")


def parse_params(raw: object) -> Params:
    """Validate a parsed params.yaml mapping and return it as typed sections."""
    root = Section(raw, "", TOP_LEVEL_KEYS)
    return Params(
        seed=root.integer("seed", 0, 2**32 - 1),
        schedule=parse_schedule(root),
        data=parse_data(root),
        noise_sequence=parse_noise_sequence(root),
        single_point=parse_single_point(root),
        marginal_flow=parse_marginal_flow(root),
        train=parse_train(root),
        sample=parse_sample(root),
        evaluate=parse_evaluate(root),
        classifier=parse_classifier(root),
    )


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``path``; raise ``StageError`` when it is missing or not YAML."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise StageError(f"{path}: cannot read the parameter file ({error.strerror})") from error
    except UnicodeDecodeError as error:
        raise StageError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from error
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        message = " ".join(str(error).split())
        raise StageError(f"{path}: not valid YAML ({message})") from error
    return parse_params(raw)
