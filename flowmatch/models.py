"""Velocity networks ``v_theta(x, t)``: an MLP for vectors and a small U-Net for images.

Both take ``x`` of shape ``(n, *shape)`` and ``t`` of shape ``(n,)`` in ``[0, 1]`` and
return a velocity with the shape of ``x``. ``build_model`` rebuilds either one from the
plain dictionary that a checkpoint stores next to the weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MODEL_KINDS = ("mlp", "unet")


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_frequency: float = 1000.0) -> torch.Tensor:
    """Embed times ``t`` of shape ``(n,)`` as ``(n, dim)`` features ``sin(f_k t), cos(f_k t)``.

    The ``dim // 2`` angular frequencies ``f_k`` are spaced geometrically from 1 to
    ``max_frequency`` radians per unit time, so that both slow trends over ``[0, 1]`` and
    sharp changes near ``t = 1`` can be resolved. ``dim`` must be even.
    """
    if dim % 2:
        raise ValueError(f"the time embedding size must be even, got {dim}")
    frequencies = torch.exp(torch.linspace(0.0, math.log(max_frequency), dim // 2, device=t.device, dtype=t.dtype))
    angles = t[:, None] * frequencies[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class VelocityMLP(nn.Module):
    """An MLP on the flattened input concatenated with a sinusoidal embedding of ``t``.

    ``layers`` hidden layers of width ``hidden`` with SiLU activations. Image-shaped
    inputs such as ``(n, 1, 8, 8)`` are flattened and the output gets the input shape back.
    """

    def __init__(self, shape: tuple[int, ...], hidden: int = 256, layers: int = 3, time_dim: int = 32):
        super().__init__()
        if hidden < 1 or layers < 1:
            raise ValueError(f"VelocityMLP needs hidden >= 1 and layers >= 1, got hidden = {hidden}, layers = {layers}")
        self.shape = tuple(int(size) for size in shape)
        self.time_dim = time_dim
        dim = math.prod(self.shape)

        blocks: list[nn.Module] = []
        width = dim + time_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        blocks.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        features = torch.cat([flat, sinusoidal_embedding(t.to(flat.dtype), self.time_dim)], dim=1)
        return self.net(features).reshape(x.shape)


class _ResidualBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and SiLU; the time embedding shifts the features."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(embed_dim, out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time(embedding)[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return h + self.skip(x)


def _groups(channels: int) -> int:
    """Return the largest GroupNorm group count of at most 8 that divides ``channels``."""
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


class UNet(nn.Module):
    """A two-level convolutional U-Net for images of shape ``(channels, height, width)``.

    One residual block at full resolution, one at half resolution (stride-2
    convolution down, nearest-neighbour upsampling back), a skip connection between
    them, and the time embedding added inside every block. Height and width must be even.
    """

    def __init__(self, shape: tuple[int, ...], channels: int = 32, time_dim: int = 32):
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"UNet needs image inputs of shape (channels, height, width), got {tuple(shape)}")
        if shape[1] % 2 or shape[2] % 2:
            raise ValueError(f"UNet needs an even height and width, got {tuple(shape)}")
        self.shape = tuple(int(size) for size in shape)
        self.time_dim = time_dim
        embed_dim = 4 * channels
        self.embed = nn.Sequential(nn.Linear(time_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

        self.conv_in = nn.Conv2d(self.shape[0], channels, 3, padding=1)
        self.down_block = _ResidualBlock(channels, channels, embed_dim)
        self.down = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.mid_block = _ResidualBlock(2 * channels, 2 * channels, embed_dim)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.up_block = _ResidualBlock(3 * channels, channels, embed_dim)
        self.norm_out = nn.GroupNorm(_groups(channels), channels)
        self.conv_out = nn.Conv2d(channels, self.shape[0], 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        embedding = self.embed(sinusoidal_embedding(t.to(x.dtype), self.time_dim))

        skip = self.down_block(self.conv_in(x), embedding)
        h = self.mid_block(self.down(skip), embedding)
        h = self.up_block(torch.cat([self.up(h), skip], dim=1), embedding)
        return self.conv_out(self.act(self.norm_out(h)))


def build_model(config: dict) -> nn.Module:
    """Build the network that ``config`` describes.

    ``config`` is ``{"kind": "mlp", "shape": [...], "hidden": int, "layers": int,
    "time_dim": int}`` or ``{"kind": "unet", "shape": [c, h, w], "channels": int,
    "time_dim": int}``; ``time_dim`` is optional (default 32). Unknown kinds raise
    ``ValueError``.
    """
    kind = config.get("kind")
    shape = tuple(config["shape"])
    time_dim = int(config.get("time_dim", 32))
    if kind == "mlp":
        return VelocityMLP(shape, hidden=int(config["hidden"]), layers=int(config["layers"]), time_dim=time_dim)
    if kind == "unet":
        return UNet(shape, channels=int(config["channels"]), time_dim=time_dim)
    raise ValueError(f"unknown model kind {kind!r}; accepted: {', '.join(MODEL_KINDS)}")
