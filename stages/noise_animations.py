"""Animate the noising path and the arrows of the marginal velocity as GIFs for the noise_sequence stage.

``write_interpolation_gif`` writes interpolation.gif: the photograph's ``x_t`` from data
(t = 1) to noise (t = 0) and back. ``write_which_way_gif`` writes which_way.gif: for a
four-point data set in 2-D, the conditional velocities ``u_t(x | z_i)`` at one point
``x`` and their posterior-weighted average, the marginal velocity ``u_t(x)``.
``stages.noise_sequence.main`` calls both with paths under reports/figures/.

The still figures of ``stages.noise_sequence`` use ``NoisedPhoto``, ``to_display``,
``schedule_values`` and ``COLOURS`` as well. They are defined here because that module
imports this one, so importing them from it would be circular.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from flowmatch.intuition import WhichWay, conditional_path, which_way_arrows  # noqa: E402
from flowmatch.paths import sample_x_t  # noqa: E402
from flowmatch.schedules import Schedule  # noqa: E402
from stages.common import atomic_path  # noqa: E402

# The interpolation GIF shows x_t in a square of this many pixels (nearest-neighbour
# resampling, so noise keeps its per-pixel variance) with a shared 64-colour palette,
# which keeps the file near 1.3 MB at 40 frames.
GIF_IMAGE_PIXELS = 192
INTERPOLATION_COLOURS = 64
INTERPOLATION_FRAMES_ONE_WAY = 21
FRAME_MILLISECONDS = 90
END_FRAME_MILLISECONDS = 700

# A four-point data set in 2-D and the noise that carries z_1 to the point x of which_way.gif.
WHICH_WAY_DATA = ((1.8, 1.2), (-1.6, 1.6), (-1.4, -1.8), (1.6, -1.4))
WHICH_WAY_NOISE = (-1.5, -0.5)
# Frames in which the conditional arrows grow, then the average arrow. Pillow merges
# identical consecutive frames, so the pause at the end is the last frame's duration.
WHICH_WAY_GROW_FRAMES = 20
WHICH_WAY_AVERAGE_FRAMES = 16
WHICH_WAY_COLOURS = 128
# Arrows are drawn as h * u with h chosen so that the longest conditional arrow covers
# this fraction of the distance from x to the farthest data point.
ARROW_REACH = 0.45

COLOURS = plt.get_cmap("tab10").colors


@dataclass(frozen=True)
class NoisedPhoto:
    """The photograph ``z`` and one noise sample ``eps``, both float64 of shape ``(size, size, channels)``."""

    z: torch.Tensor
    eps: torch.Tensor
    source: str

    @property
    def dimension(self) -> int:
        return self.z.numel()

    def x_t(self, t: float, schedule: Schedule) -> torch.Tensor:
        return sample_x_t(self.z, self.eps, t, schedule)


def to_display(x: torch.Tensor) -> np.ndarray:
    """Map pixels from [-1, 1] (clipping outside values) to uint8; drop a single channel for ``imshow``."""
    pixels = np.rint((np.clip(x.numpy(), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return pixels[:, :, 0] if pixels.shape[2] == 1 else pixels


def schedule_values(schedule: Schedule, t: float) -> tuple[float, float]:
    values = schedule(torch.tensor(t, dtype=torch.float64))
    return float(values.alpha), float(values.beta)


# ---------------------------------------------------------------- GIFs


def render_frame(fig) -> Image.Image:
    fig.canvas.draw()
    return grab_frame(fig)


def grab_frame(fig) -> Image.Image:
    """Return the current canvas contents as an RGB image, without drawing the figure again."""
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy())


def write_gif(path: Path, frames: list[Image.Image], durations: list[int], colours: int) -> None:
    """Write ``frames`` as a looping GIF with one palette built from the first, middle and last frame.

    Median-cut quantisation without dithering is deterministic, so the same frames give
    the same bytes.
    """
    width, height = frames[0].size
    samples = [frames[0], frames[len(frames) // 2], frames[-1]]
    montage = Image.new("RGB", (width, height * len(samples)))
    for index, frame in enumerate(samples):
        montage.paste(frame, (0, height * index))
    palette = montage.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    indexed = [frame.quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    with atomic_path(path) as tmp:
        indexed[0].save(tmp, format="GIF", save_all=True, append_images=indexed[1:], duration=durations, loop=0, optimize=False)


def interpolation_times() -> list[float]:
    """Return times from data to noise and back, without repeating the two ends."""
    one_way = np.linspace(1.0, 0.0, INTERPOLATION_FRAMES_ONE_WAY).tolist()
    return one_way + one_way[-2:0:-1]


def resample_nearest(photo: NoisedPhoto, side: int) -> NoisedPhoto:
    """Return ``photo`` with ``z`` and ``eps`` resampled to ``side`` x ``side`` pixels by nearest neighbour.

    Each pixel of the result is a pixel of the original, so the resampled ``eps`` is still
    ``N(0, I)`` and ``x_t`` of the result is ``x_t`` of the original at those pixels.
    """
    size = photo.z.shape[0]
    index = ((torch.arange(side, dtype=torch.float64) + 0.5) * size / side).floor().long()
    return NoisedPhoto(z=photo.z[index][:, index], eps=photo.eps[index][:, index], source=photo.source)


def write_interpolation_gif(path: Path, photo: NoisedPhoto, schedule: Schedule) -> int:
    side = GIF_IMAGE_PIXELS
    band = 40
    photo = resample_nearest(photo, side)
    fig = plt.figure(figsize=(side / 100, (side + band) / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, side / (side + band)))
    ax.axis("off")
    artist = ax.imshow(to_display(photo.z), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    title = fig.text(0.5, 1 - 4 / (side + band), "", ha="center", va="top", fontsize=9, fontweight="bold")
    subtitle = fig.text(0.5, 1 - 22 / (side + band), "", ha="center", va="top", fontsize=7.5)

    times = interpolation_times()
    frames = []
    for t in tqdm(times, desc="interpolation.gif", unit="frame", leave=False):
        alpha, beta = schedule_values(schedule, t)
        artist.set_data(to_display(photo.x_t(t, schedule)))
        title.set_text(f"t = {t:.2f}  ({schedule.name})")
        subtitle.set_text(f"alpha_t = {alpha:.2f}, beta_t = {beta:.2f}")
        frames.append(render_frame(fig))
    plt.close(fig)

    durations = [END_FRAME_MILLISECONDS if t in (0.0, 1.0) else FRAME_MILLISECONDS for t in times]
    write_gif(path, frames, durations, INTERPOLATION_COLOURS)
    return len(frames)


@dataclass(frozen=True)
class WhichWayScene:
    """The point ``x`` reached at time ``t`` from ``data[0]``, the four data points and the arrows at ``x``."""

    x: torch.Tensor
    data: torch.Tensor
    t: float
    arrows: WhichWay


def which_way_scene(schedule: Schedule, t: float) -> WhichWayScene:
    """Place ``x = alpha_t z_1 + beta_t eps`` and compute the arrows of every data point at it."""
    data = torch.tensor(WHICH_WAY_DATA, dtype=torch.float64)
    alpha, beta = schedule_values(schedule, t)
    x = alpha * data[0] + beta * torch.tensor(WHICH_WAY_NOISE, dtype=torch.float64)
    return WhichWayScene(x=x, data=data, t=t, arrows=which_way_arrows(x, data, t, schedule))


def draw_arrow(ax, start: np.ndarray, vector: np.ndarray, **style) -> FancyArrowPatch:
    arrow = FancyArrowPatch(tuple(start), tuple(start + vector), arrowstyle="-|>", shrinkA=0, shrinkB=0, **style)
    ax.add_patch(arrow)
    return arrow


def draw_which_way_background(axes, scene: WhichWayScene, schedule: Schedule, step: float) -> list:
    """Draw what stays fixed in every frame (points, conditional paths, labels) and return the markers of x."""
    x = scene.x.numpy()
    path_times = torch.linspace(scene.t, 1.0, 60, dtype=torch.float64)
    single, several = axes
    weights = scene.arrows.weights.numpy()
    x_markers = []

    for ax, data_indices in ((single, [0]), (several, range(len(scene.data)))):
        for i in data_indices:
            z = scene.data[i]
            path = conditional_path(scene.x, z, scene.t, path_times, schedule).numpy()
            colour = COLOURS[i]
            ax.plot(path[:, 0], path[:, 1], ls="--", lw=1.0, color=colour, alpha=0.6)
            ax.scatter(*z.numpy(), s=90, color=colour, zorder=3)
            name = "z" if ax is single else f"z_{i + 1}"
            ax.annotate(name, z.numpy(), xytext=(8, 6), textcoords="offset points", fontsize=12, color=colour, fontweight="bold")
            if ax is several:
                ax.annotate(f"P = {weights[i]:.2f}", z.numpy(), xytext=(8, -12), textcoords="offset points", fontsize=9, color=colour)
        x_markers.append(ax.scatter(*x, s=70, color="black", zorder=4))
        ax.annotate(f"X_t = x\n(t = {scene.t:.2f})", x, xytext=(-10, -14), textcoords="offset points", ha="right", va="top", fontsize=10)

    several.text(-2.6, 0.0, "...\n(more z)", fontsize=11, color="0.4", ha="center", va="center")
    single.set_title("One data point: the way back is known", fontsize=12)
    several.set_title("Four data points: which way to go?", fontsize=12)

    ends = [x[None], scene.data.numpy(), x + step * scene.arrows.conditional.numpy(), (x + step * scene.arrows.average.numpy())[None], np.array([[-2.8, 0.0]])]
    points = np.vstack(ends)
    low, high = points.min(axis=0) - 0.6, points.max(axis=0) + np.array([1.0, 0.6])
    for ax in axes:
        ax.set_xlim(low[0], high[0])
        ax.set_ylim(low[1], high[1])
        ax.set_aspect("equal")
        ax.grid(alpha=0.25)
        ax.set_xlabel("coordinate 1")
        ax.set_ylabel("coordinate 2")
    return x_markers


def arrow_step(scene: WhichWayScene) -> float:
    """Return the display time step h: the longest ``h u_t(x | z_i)`` covers ``ARROW_REACH`` of the farthest data point's distance."""
    longest = float(torch.linalg.vector_norm(scene.arrows.conditional, dim=1).max())
    farthest = float(torch.linalg.vector_norm(scene.data - scene.x, dim=1).max())
    return ARROW_REACH * farthest / max(longest, 1e-12)


def write_which_way_gif(path: Path, scene: WhichWayScene, schedule: Schedule) -> int:
    """Animate the arrows of ``scene``: conditional arrows grow first, then their weighted average."""
    step = arrow_step(scene)
    x = scene.x.numpy()
    conditional = scene.arrows.conditional.numpy()
    average = scene.arrows.average.numpy()
    weights = scene.arrows.weights.numpy()

    fig, axes = plt.subplots(1, 2, figsize=(10.4, 5.0), dpi=100)
    x_markers = draw_which_way_background(axes, scene, schedule, step)
    single, several = axes
    fig.text(
        0.5, 0.015,
        f"Arrows: h u_t(x | z_i) with h = {step:.3g}, {schedule.name} schedule. Right: each arrow's opacity is P(z_i | X_t = x) "
        "and its width grows with it.\nBold black: u_t(x) = sum_i P(z_i | X_t = x) u_t(x | z_i). Dashed: the path from noise to z_i through x.",
        ha="center", va="bottom", fontsize=8.5, color="0.25",
    )
    fig.subplots_adjust(left=0.07, right=0.98, top=0.93, bottom=0.2, wspace=0.22)

    # Blitting: the fixed part is drawn once. Each frame restores it, draws its arrows and
    # then the markers of x again, so that the markers stay on top.
    fig.canvas.draw()
    background = fig.canvas.copy_from_bbox(fig.bbox)
    frame_count = WHICH_WAY_GROW_FRAMES + WHICH_WAY_AVERAGE_FRAMES
    frames = []
    for frame in tqdm(range(frame_count), desc="which_way.gif", unit="frame", leave=False):
        fig.canvas.restore_region(background)
        grow = min(1.0, (frame + 1) / WHICH_WAY_GROW_FRAMES)
        patches = [draw_arrow(single, x, grow * step * conditional[0], color=COLOURS[0], lw=2.5, mutation_scale=18)]
        for i, weight in enumerate(weights):
            style = {"color": COLOURS[i], "lw": 0.5 + 5.0 * weight, "alpha": float(weight), "mutation_scale": 8 + 14 * weight}
            patches.append(draw_arrow(several, x, grow * step * conditional[i], **style))

        if frame >= WHICH_WAY_GROW_FRAMES:
            share = min(1.0, (frame - WHICH_WAY_GROW_FRAMES + 1) / WHICH_WAY_AVERAGE_FRAMES)
            patches.append(draw_arrow(several, x, share * step * average, color="black", lw=3.5, mutation_scale=22, zorder=5))
            patches.append(several.annotate("u_t(x)", x + share * step * average, xytext=(-4, 10), textcoords="offset points", ha="right", fontsize=11, fontweight="bold"))

        for artist in patches + x_markers:
            artist.axes.draw_artist(artist)
        frames.append(grab_frame(fig))
        for artist in patches:
            artist.remove()
    plt.close(fig)

    durations = [FRAME_MILLISECONDS] * (frame_count - 1) + [3 * END_FRAME_MILLISECONDS]
    write_gif(path, frames, durations, WHICH_WAY_COLOURS)
    return frame_count
