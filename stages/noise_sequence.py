"""Draw the intuition figures: a photograph noised along the study's schedule.

Writes to reports/figures/: cat_denoise_example.png, noise_sequence.png,
plot_denoise_arrow.png, plot_stepwise_path.png, plot_smooth_trajectory.png,
interpolation.gif and which_way.gif. The two GIFs are written by
``stages.noise_animations``, which also defines ``NoisedPhoto`` and the other pieces
that both kinds of figure share.

Pixels are mapped from [0, 1] to [-1, 1], so that the data ``z`` and the noise
``eps ~ N(0, I)`` have comparable scale. Images of ``x_t`` are shown clipped to
[-1, 1]. The 2-D plots draw points in the plane spanned by ``z`` and ``eps``, where the
path ``x_t = alpha_t z + beta_t eps`` lies exactly (see ``flowmatch.intuition``), with
coordinates divided by ``sqrt(d)`` so that they read as root-mean-square pixel values.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.offsetbox import AnnotationBbox, OffsetImage, TextArea, VPacker  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from flowmatch.intuition import Plane, path_coordinates, span_plane  # noqa: E402
from flowmatch.schedules import SCHEDULE_NAMES, Schedule  # noqa: E402
from stages.common import StageError, run_stage, save_figure  # noqa: E402
from stages.config import ScheduleParams, load_params  # noqa: E402
from stages.noise_animations import (  # noqa: E402
    COLOURS,
    NoisedPhoto,
    schedule_values,
    to_display,
    which_way_scene,
    write_interpolation_gif,
    write_which_way_gif,
)

log = logging.getLogger("flowmatch.noise_sequence")

FIGURE_DIR = Path("reports/figures")
OUTPUT_NAMES = (
    "cat_denoise_example.png",
    "noise_sequence.png",
    "plot_denoise_arrow.png",
    "plot_stepwise_path.png",
    "plot_smooth_trajectory.png",
    "interpolation.gif",
    "which_way.gif",
)
BUILTIN_IMAGE = "chelsea"

TRAJECTORY_POINTS = 201
MARK_TIMES = (0.25, 0.5, 0.75)
MARKERS = ("o", "s", "^", "D", "v")
STRIP_COLUMNS = 9
STRIP_PANEL_INCHES = 1.75
STRIP_IMAGE_AREA = 9 * STRIP_PANEL_INCHES**2
THUMBNAIL_INCHES = 0.75

SCHEDULE_COLOURS = dict(zip(SCHEDULE_NAMES, (COLOURS[4], COLOURS[9], COLOURS[6], COLOURS[1], COLOURS[8])))


# ---------------------------------------------------------------- reading the image


def read_pixels(image: str) -> tuple[np.ndarray, str]:
    """Read the image named by ``noise_sequence.image``; return floats in [0, 1] of shape ``(h, w, channels)`` and a label.

    ``chelsea`` is the cat photograph that ships with scikit-image. Any other value is a
    path to an RGB or grayscale file with 8 or 16 bits per channel. Raises ``StageError``
    naming the path when the file is missing or unreadable.
    """
    if image == BUILTIN_IMAGE:
        import skimage.data

        return skimage.data.chelsea().astype(np.float64) / 255.0, "chelsea (skimage.data.chelsea)"

    path = Path(image)
    if not path.exists():
        raise StageError(f"noise_sequence.image: {path}: file not found; give an existing image file or 'chelsea'")
    if not path.is_file():
        raise StageError(f"noise_sequence.image: {path}: not a regular file; give an image file or 'chelsea'")
    try:
        with Image.open(path) as opened:
            opened.load()
            pixels = _pixels_of(opened)
    except UnidentifiedImageError:
        raise StageError(f"noise_sequence.image: {path}: not a readable image (Pillow does not recognise the format)") from None
    except ValueError as error:
        raise StageError(f"noise_sequence.image: {path}: unsupported image ({error})") from error
    except OSError as error:
        raise StageError(f"noise_sequence.image: {path}: cannot read the image ({' '.join(str(error).split())})") from error
    return pixels, str(path)


def _pixels_of(opened: Image.Image) -> np.ndarray:
    """Return the pixels of an opened image as floats in [0, 1], shape ``(h, w, 1)`` or ``(h, w, 3)``.

    Pillow 13 opens 16-bit grayscale PNG and TIFF files in mode ``I;16``. Mode ``I`` is
    read the same way, as values in [0, 65535], and larger values are clipped. Mode ``F``
    (32-bit float) has no agreed range and raises ``ValueError``.
    """
    if opened.mode == "I" or opened.mode.startswith("I;16"):
        return np.clip(np.asarray(opened, dtype=np.float64) / 65535.0, 0.0, 1.0)[:, :, None]
    if opened.mode == "F":
        raise ValueError("32-bit float pixels have no agreed range; save the image with 8 or 16 bits per channel")
    if opened.mode in ("1", "L", "LA") or (opened.mode == "P" and _palette_is_gray(opened)):
        gray = opened.convert("L")
        return (np.asarray(gray, dtype=np.float64) / 255.0)[:, :, None]
    rgb = opened.convert("RGB")
    return np.asarray(rgb, dtype=np.float64) / 255.0


def _palette_is_gray(opened: Image.Image) -> bool:
    colours = np.asarray(opened.convert("RGB"))
    return bool((colours[..., 0] == colours[..., 1]).all() and (colours[..., 1] == colours[..., 2]).all())


def load_photo(image: str, size: int, seed: int) -> NoisedPhoto:
    """Read the image, crop its centre square, resize it to ``size`` x ``size``, scale it to [-1, 1] and draw ``eps``."""
    import skimage.transform

    pixels, source = read_pixels(image)
    height, width = pixels.shape[:2]
    if min(height, width) < size:
        raise StageError(
            f"noise_sequence.image: {source}: the image is {width}x{height} px, smaller than "
            f"noise_sequence.size = {size} px on its shorter side; lower noise_sequence.size or use a larger image"
        )

    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = pixels[top : top + side, left : left + side]
    resized = skimage.transform.resize(square, (size, size), order=1, anti_aliasing=side > size)
    z = torch.from_numpy(2.0 * np.clip(resized, 0.0, 1.0) - 1.0)

    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(z.shape, generator=generator, dtype=torch.float64)
    return NoisedPhoto(z=z, eps=eps, source=source)


def show_image(ax, x: torch.Tensor, **kwargs) -> None:
    ax.imshow(to_display(x), cmap="gray", vmin=0, vmax=255, **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------- image figures


def strip_times(steps: int) -> torch.Tensor:
    """Return ``steps + 1`` evenly spaced times from data (t = 1) down to noise (t = 0)."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def draw_denoise_example(photo: NoisedPhoto, schedule: Schedule, t: float, seed: int):
    alpha, beta = schedule_values(schedule, t)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5.6))
    show_image(left, photo.z)
    left.set_title("z: the photograph (t = 1)")
    show_image(right, photo.x_t(t, schedule))
    right.set_title(f"x_t at t = {t:.2f}\nalpha_t = {alpha:.3f}, beta_t = {beta:.3f}")
    fig.suptitle(f"Can you denoise it?  x_t = alpha_t z + beta_t eps, {schedule.name} schedule", fontsize=13)
    fig.text(
        0.5, 0.03,
        f"Pixels scaled to [-1, 1]; eps ~ N(0, I) drawn with seed {seed}; x_t shown clipped to [-1, 1]. Image: {photo.source}",
        ha="center", fontsize=9, color="0.3",
    )
    fig.subplots_adjust(left=0.03, right=0.97, top=0.84, bottom=0.08, wspace=0.06)
    return fig


def draw_noise_sequence(photo: NoisedPhoto, schedule: Schedule, times: torch.Tensor):
    """Draw ``x_t`` at each of ``times`` in rows of up to ``STRIP_COLUMNS`` panels.

    Noise does not compress, so the panels shrink as their number grows to keep the
    total image area, and the PNG size, near that of the default 9 panels.
    """
    count = len(times)
    columns = min(count, STRIP_COLUMNS)
    rows = math.ceil(count / columns)
    panel = min(STRIP_PANEL_INCHES, math.sqrt(STRIP_IMAGE_AREA / count))
    detailed = panel >= 1.2
    title_inches = 0.45 if detailed else 0.22
    fig, axes = plt.subplots(rows, columns, figsize=(max(panel * columns, 6.0), (panel + title_inches) * rows + 0.45), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    for ax, t in zip(axes.flat, times.tolist()):
        show_image(ax, photo.x_t(t, schedule))
        ax.axis("on")
        if detailed:
            alpha, beta = schedule_values(schedule, t)
            ax.set_title(f"t = {t:.3f}\nalpha {alpha:.2f}, beta {beta:.2f}", fontsize=9)
        else:
            ax.set_title(f"t = {t:.3f}", fontsize=7)
    fig.suptitle(f"x_t from data (t = 1) to noise (t = 0) in {count - 1} equal steps of t, {schedule.name} schedule", fontsize=12 if detailed else 10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return fig


# ---------------------------------------------------------------- plane figures


@dataclass(frozen=True)
class PlaneView:
    """The plane of ``z`` and ``eps`` as drawn: coordinates divided by ``sqrt(d)``, with the points of ``z`` and ``eps``."""

    plane: Plane
    dimension: int
    z_point: np.ndarray
    eps_point: np.ndarray

    @property
    def scale(self) -> float:
        return math.sqrt(self.dimension)

    def points(self, x: torch.Tensor) -> np.ndarray:
        """Return the drawn coordinates of images ``x`` of shape ``(n, ...)``: their projections divided by ``sqrt(d)``."""
        return self.plane.coordinates(x).numpy() / self.scale

    def path(self, photo: NoisedPhoto, times: torch.Tensor, schedule: Schedule) -> np.ndarray:
        return path_coordinates(self.plane, photo.z, photo.eps, times, schedule).numpy() / self.scale


def view_plane(photo: NoisedPhoto) -> PlaneView:
    plane = span_plane(photo.z, photo.eps)
    z_point, eps_point = plane.coordinates(torch.stack([photo.z, photo.eps])).numpy() / math.sqrt(photo.dimension)
    return PlaneView(plane=plane, dimension=photo.dimension, z_point=z_point, eps_point=eps_point)


def new_plane_axes(view: PlaneView, title: str, width: float = 8.8, right: float = 0.97):
    """Create a figure whose axes show the plane with equal scales on both axes.

    Every schedule in ``flowmatch.schedules`` has ``alpha_t, beta_t`` in [0, 1], so its
    path lies in the parallelogram spanned by the points of ``z`` and ``eps``. That
    parallelogram sets the limits.
    """
    fig, ax = plt.subplots(figsize=(width, 7.2))
    fig.subplots_adjust(left=0.1, right=right, top=0.87, bottom=0.09)
    corners = np.stack([np.zeros(2), view.z_point, view.eps_point, view.z_point + view.eps_point])
    set_equal_limits(ax, fig, corners, margin=0.12)

    ax.grid(alpha=0.3)
    ax.axhline(0, color="0.7", lw=0.8, zorder=0)
    ax.axvline(0, color="0.7", lw=0.8, zorder=0)
    ax.set_xlabel(r"$\langle x, e_1 \rangle / \sqrt{d}$,   $e_1 = z / |z|$")
    ax.set_ylabel(r"$\langle x, e_2 \rangle / \sqrt{d}$,   $e_2$: eps made orthogonal to z")
    fig.suptitle(title, fontsize=13)
    ax.set_title(f"The plane spanned by z and eps (d = {view.dimension} pixel values); x_t = alpha_t z + beta_t eps lies in it exactly", fontsize=9, color="0.3")
    return fig, ax


def set_equal_limits(ax, fig, points: np.ndarray, margin: float) -> None:
    """Set limits that contain ``points`` and fill the axes box with one data unit the same length on both axes."""
    low, high = points.min(axis=0), points.max(axis=0)
    span = float((high - low).max())
    low, high = low - margin * span, high + margin * span
    box = ax.get_position()
    box_ratio = (box.height * fig.get_figheight()) / (box.width * fig.get_figwidth())
    width, height = high - low
    if height / width < box_ratio:
        extra = 0.5 * (width * box_ratio - height)
        low[1], high[1] = low[1] - extra, high[1] + extra
    else:
        extra = 0.5 * (height / box_ratio - width)
        low[0], high[0] = low[0] - extra, high[0] + extra
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_aspect("equal", adjustable="box")


def add_thumbnail(ax, x: torch.Tensor, point: np.ndarray, position: tuple[float, float], label: str) -> None:
    """Show a small picture of ``x`` with ``label`` at ``position`` (axes fraction), joined to ``point`` (data)."""
    pixels = to_display(x)
    picture = OffsetImage(pixels, zoom=THUMBNAIL_INCHES * 72 / pixels.shape[0], cmap="gray", norm=plt.Normalize(0, 255))
    content = VPacker(children=[picture, TextArea(label, textprops={"fontsize": 8, "multialignment": "center"})], align="center", pad=0, sep=2)
    box = AnnotationBbox(
        content, point, xybox=position, xycoords="data", boxcoords="axes fraction",
        frameon=True, pad=0.25, bboxprops={"edgecolor": "0.6"}, arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.8},
    )
    ax.add_artist(box)


def draw_denoise_arrow(view: PlaneView, photo: NoisedPhoto, schedule: Schedule, t: float):
    x_t = photo.x_t(t, schedule)
    x_point = view.points(x_t.unsqueeze(0))[0]
    alpha, beta = schedule_values(schedule, t)

    fig, ax = new_plane_axes(view, f"Denoising maps x_t back to z ({schedule.name} schedule)")
    ax.scatter(*view.z_point, s=70, color=COLOURS[2], zorder=3, label="z (data, t = 1)")
    ax.scatter(*x_point, s=70, color=COLOURS[3], zorder=3, label=f"x_t (t = {t:.2f})")
    ax.scatter(*view.eps_point, s=45, color="0.5", zorder=3, label="eps (noise, t = 0)")
    ax.annotate("", xy=view.z_point, xytext=x_point, arrowprops={"arrowstyle": "-|>", "color": COLOURS[3], "lw": 2.2, "mutation_scale": 18})
    ax.annotate("denoise", 0.5 * (view.z_point + x_point), xytext=(10, 4), textcoords="offset points", color=COLOURS[3], fontsize=11)

    add_thumbnail(ax, photo.eps, view.eps_point, (0.12, 0.82), "eps")
    add_thumbnail(ax, x_t, x_point, (0.84, 0.55), f"x_t (t = {t:.2f})\nalpha_t {alpha:.2f}, beta_t {beta:.2f}")
    add_thumbnail(ax, photo.z, view.z_point, (0.84, 0.2), "z")
    ax.legend(loc="upper right", fontsize=9)
    return fig


def draw_stepwise_path(view: PlaneView, photo: NoisedPhoto, schedule: Schedule, times: torch.Tensor):
    """Draw the projections of the noised images at ``times``, joined in order from noise to data."""
    order = torch.argsort(times)
    times = times[order]
    images = torch.stack([photo.x_t(t, schedule) for t in times.tolist()])
    points = view.points(images)
    residual = float(view.plane.residual(images).max()) / view.scale

    fig, ax = new_plane_axes(view, f"Denoising step by step: noise (t = 0) to data (t = 1), {schedule.name} schedule")
    for start, end in zip(points[:-1], points[1:]):
        ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "-|>", "color": COLOURS[0], "lw": 1.6, "mutation_scale": 13})
    ax.scatter(points[:, 0], points[:, 1], s=30, color=COLOURS[0], zorder=3, label=f"x_t at {len(times)} evenly spaced t")
    # The first label goes to the left of its point, because the next point can be close on the right.
    for index, (point, t) in enumerate(zip(points, times.tolist())):
        offset, align = ((-8, 0), "right") if index == 0 else ((8, 0), "left")
        ax.annotate(f"t = {t:.2f}", point, xytext=offset, textcoords="offset points", fontsize=8, ha=align, va="center")
    ax.plot([], [], " ", label=f"largest distance from the plane / sqrt(d): {residual:.1e}")

    middle = len(times) // 2
    add_thumbnail(ax, images[0], points[0], (0.12, 0.82), f"t = {float(times[0]):.2f}")
    add_thumbnail(ax, images[middle], points[middle], (0.12, 0.5), f"t = {float(times[middle]):.2f}")
    add_thumbnail(ax, images[-1], points[-1], (0.12, 0.18), f"t = {float(times[-1]):.2f}")
    ax.legend(loc="upper right", fontsize=9)
    return fig


def draw_smooth_trajectory(view: PlaneView, photo: NoisedPhoto, schedule_params: ScheduleParams, times: torch.Tensor):
    """Draw the study's schedule as a trajectory coloured by t, the other schedules faintly, and the strip's steps.

    Schedules with ``alpha_t + beta_t = 1`` share the straight segment and those with
    ``alpha_t^2 + beta_t^2 = 1`` share the arc, so markers at fixed ``t`` show how fast
    each one moves along its curve.
    """
    chosen = schedule_params.name
    grid = torch.linspace(0.0, 1.0, TRAJECTORY_POINTS, dtype=torch.float64)
    marks = torch.tensor(MARK_TIMES, dtype=torch.float64)
    fig, ax = new_plane_axes(view, f"The smooth trajectory x_t, t in [0, 1]: {chosen} schedule", width=11.5, right=0.62)

    handles = []
    for index, name in enumerate(SCHEDULE_NAMES):
        schedule = schedule_params.build(name)
        marker = MARKERS[index % len(MARKERS)]
        mark_points = view.path(photo, marks, schedule)
        if name == chosen:
            points = view.path(photo, grid, schedule)
            segments = np.stack([points[:-1], points[1:]], axis=1)
            line = LineCollection(segments, cmap="viridis", norm=plt.Normalize(0.0, 1.0), linewidths=3.5, zorder=2)
            line.set_array(0.5 * (grid[:-1] + grid[1:]).numpy())
            ax.add_collection(line)
            ax.scatter(mark_points[:, 0], mark_points[:, 1], s=70, marker=marker, facecolor="white", edgecolor="black", zorder=4)
            handles.append(Line2D([], [], color=plt.get_cmap("viridis")(0.55), lw=3.5, marker=marker, markerfacecolor="white", markeredgecolor="black", label=f"{name} (the study's schedule)"))
        else:
            points = view.path(photo, grid, schedule)
            colour = SCHEDULE_COLOURS.get(name, "0.5")
            ax.plot(points[:, 0], points[:, 1], lw=1.2, ls="--", alpha=0.5, color=colour, zorder=1)
            ax.scatter(mark_points[:, 0], mark_points[:, 1], s=40, marker=marker, color=colour, alpha=0.7, zorder=3)
            handles.append(Line2D([], [], color=colour, lw=1.2, ls="--", alpha=0.7, marker=marker, label=name))

    steps = view.path(photo, times, schedule_params.build(chosen))
    ax.scatter(steps[:, 0], steps[:, 1], s=14, color="black", zorder=5)
    handles.append(Line2D([], [], ls="", marker="o", markersize=4, color="black", label=f"{chosen}: the {len(times) - 1} steps of the strip"))
    ax.scatter(*view.z_point, s=90, color=COLOURS[2], zorder=6)
    ax.scatter(*view.eps_point, s=60, color="0.5", zorder=6)
    handles.append(Line2D([], [], ls="", marker="o", markersize=8, color=COLOURS[2], label="z (t = 1)"))
    handles.append(Line2D([], [], ls="", marker="o", markersize=7, color="0.5", label="eps (t = 0)"))

    colorbar_axes = fig.add_axes((0.645, 0.09, 0.015, 0.78))
    colorbar = fig.colorbar(line, cax=colorbar_axes)
    colorbar.set_label(f"t along the {chosen} trajectory (0 = noise, 1 = data)")
    marks_text = ", ".join(f"{t:g}" for t in MARK_TIMES)
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.725, 0.88), fontsize=9, title=f"markers at t = {marks_text}", title_fontsize=9, frameon=False)
    fig.text(
        0.735, 0.09,
        "Schedules with alpha_t + beta_t = 1 share the\nstraight segment, and those with\nalpha_t^2 + beta_t^2 = 1 share the arc;\nthey differ in how fast they move along it.",
        fontsize=9, color="0.3", va="bottom",
    )
    return fig


# ---------------------------------------------------------------- stage


def main() -> None:
    params = load_params()
    settings = params.noise_sequence
    schedule = params.schedule.build()
    log.info("noising %r at %d px along the %s schedule (seed %d)", settings.image, settings.size, schedule.name, settings.seed)

    photo = load_photo(settings.image, settings.size, settings.seed)
    view = view_plane(photo)
    times = strip_times(settings.steps)

    figures = {
        "cat_denoise_example.png": lambda: draw_denoise_example(photo, schedule, settings.t_example, settings.seed),
        "noise_sequence.png": lambda: draw_noise_sequence(photo, schedule, times),
        "plot_denoise_arrow.png": lambda: draw_denoise_arrow(view, photo, schedule, settings.t_example),
        "plot_stepwise_path.png": lambda: draw_stepwise_path(view, photo, schedule, times),
        "plot_smooth_trajectory.png": lambda: draw_smooth_trajectory(view, photo, params.schedule, times),
    }
    for name, draw in figures.items():
        save_figure(draw(), FIGURE_DIR / name)
        log.info("wrote %s", FIGURE_DIR / name)

    frames = write_interpolation_gif(FIGURE_DIR / "interpolation.gif", photo, schedule)
    log.info("wrote %s (%d frames)", FIGURE_DIR / "interpolation.gif", frames)
    scene = which_way_scene(schedule, settings.t_example)
    frames = write_which_way_gif(FIGURE_DIR / "which_way.gif", scene, schedule)
    log.info("wrote %s (%d frames, posterior weights %s)", FIGURE_DIR / "which_way.gif", frames, [round(w, 3) for w in scene.arrows.weights.tolist()])


if __name__ == "__main__":
    run_stage(main)
