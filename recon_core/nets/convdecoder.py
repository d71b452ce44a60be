"""The ConvDecoder network (Darestani & Heckel, IEEE TCI 2021): an untrained image generator.

A fixed random tensor ``z`` (``channels × h₀ × w₀``, e.g. 8 × 4) is mapped to ``out_channels`` images
of the k-space grid size by ``n_layers − 1`` blocks of [nearest up-sampling to the next size → 3×3
convolution (no bias) → ReLU → BatchNorm], one more [3×3 convolution → ReLU → BatchNorm] at full size
and a final 1×1 convolution (a linear combination of the feature maps, no non-linearity). The sizes
grow geometrically from the input to the output, per axis: ``h_i = ceil(h₀ · s^i)`` with
``s = (H/h₀)^{1/(L−1)}`` and the last one exactly the output size. Under-parameterisation (few
channels, few layers) is the prior; nothing is learned from other data.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["ConvDecoder", "upsampling_sizes", "auto_input_size"]


def upsampling_sizes(in_size: Sequence[int], out_size: Sequence[int], n_layers: int) -> list[tuple[int, int]]:
    """The feature-map sizes after each of the ``n_layers − 1`` up-sampling blocks.

    Geometric growth per axis, ``ceil(in · s^i)`` for ``i = 1 … L−2`` and exactly ``out`` last
    (the authors' rule; for the fastMRI knee grid 640×368 from 8×4 with ``L = 7``: 17×9, 35×19,
    72×39, 149×82, 309×174, 640×368)."""
    if n_layers < 2:
        raise ValueError(f"n_layers must be >= 2, got {n_layers}")
    (h0, w0), (h, w) = (int(v) for v in in_size), (int(v) for v in out_size)
    if min(h0, w0, h, w) < 1:
        raise ValueError(f"bad sizes in={tuple(in_size)} out={tuple(out_size)}")
    n = n_layers - 1
    sh, sw = (h / h0) ** (1.0 / n), (w / w0) ** (1.0 / n)
    sizes = [(int(math.ceil(h0 * sh ** i - 1e-9)), int(math.ceil(w0 * sw ** i - 1e-9))) for i in range(1, n)]
    sizes.append((h, w))
    return sizes


def auto_input_size(out_size: Sequence[int], longer: int = 8) -> tuple[int, int]:
    """Input size with the output's aspect ratio: ``longer`` along the longer axis, the other
    ``floor(longer · short/long)`` (≥ 1). The fastMRI knee grid 640×368 gives the paper's 8×4."""
    h, w = (int(v) for v in out_size)
    if h >= w:
        return longer, max(1, int(longer * w / h))
    return max(1, int(longer * h / w)), longer


class ConvDecoder(nn.Module):
    """ConvDecoder ``G``: fixed input ``[1, channels, h₀, w₀]`` → ``[1, out_channels, H, W]`` (real).

    Parameters
    ----------
    out_size:
        ``(H, W)`` of the output (the k-space grid).
    out_channels:
        Real output channels: ``2·n_coils`` for the coil-by-coil network (channel ``2c`` = real,
        ``2c+1`` = imaginary part of coil ``c``), 2 for one complex image (ESPIRiT variant).
    channels:
        Feature channels of every hidden layer (160 or 256 in the authors' notebooks).
    n_layers:
        Number of up-sampling blocks plus one (7 in the paper's comparison with the U-net).
    in_size:
        Spatial size of the input ``z`` (8×4 in the paper for the 640×368 knee grid).
    bias:
        Biases in the convolutions (off in the paper's comparisons, on in the Colab demo).
    upsample:
        ``nearest`` (the paper) or ``bilinear`` (Deep Decoder's choice).
    """

    def __init__(self, out_size: Sequence[int], out_channels: int, channels: int = 160, n_layers: int = 7,
                 in_size: Sequence[int] = (8, 4), bias: bool = False, upsample: str = "nearest") -> None:
        super().__init__()
        if channels < 1 or out_channels < 1:
            raise ValueError(f"channels and out_channels must be >= 1, got {channels}, {out_channels}")
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {upsample!r}")
        self.out_size = (int(out_size[0]), int(out_size[1]))
        self.in_size = (int(in_size[0]), int(in_size[1]))
        self.sizes = upsampling_sizes(self.in_size, self.out_size, n_layers)
        layers: list[nn.Module] = []
        for size in self.sizes:
            layers += [nn.Upsample(size=size, mode=upsample),
                       nn.Conv2d(channels, channels, 3, padding=1, bias=bias), nn.ReLU(inplace=True),
                       nn.BatchNorm2d(channels, affine=True)]
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=bias), nn.ReLU(inplace=True),
                   nn.BatchNorm2d(channels, affine=True),
                   nn.Conv2d(channels, out_channels, 1, bias=bias)]
        self.net = nn.Sequential(*layers)
        self.channels = int(channels)

    def make_input(self, generator: torch.Generator) -> Tensor:
        """The fixed input ``z ~ U[0, 1)`` of shape ``[1, channels, h₀, w₀]`` (CPU, float32), drawn
        from ``generator`` (never optimised)."""
        return torch.rand((1, self.channels, *self.in_size), generator=generator)

    def forward(self, z: Tensor) -> Tensor:
        """Real output ``[1, out_channels, H, W]``."""
        return self.net(z)
