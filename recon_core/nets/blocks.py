"""Network building blocks shared by learned and scan-specific methods.

* :func:`complex_to_channels` / :func:`channels_to_complex`: complex images ``[F, Ny, Nx]`` ↔ real
  network tensors with the real and imaginary parts as two channels (the channel-split packing of
  BRIEFS §0), 2-D (frames as batch) or 3-D (frames as depth).
* :class:`ConvStack`: ``n_layers`` convolutions (2-D or 3-D) with an activation (and optional
  normalisation) between them — DC-CNN's CNN block, TDIP/SLR-Net style conv stacks.
* :class:`UNet`: a small U-Net (2-D or 3-D), for denoisers and generators.
* :class:`MLP`: a plain multilayer perceptron (coordinate networks, hyper-networks).

All blocks are device-agnostic ``nn.Module`` s (they follow ``.to()``) and take real float tensors.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["complex_to_channels", "channels_to_complex", "ConvStack", "UNet", "MLP", "make_activation"]


def complex_to_channels(x: Tensor, dim: int = 2) -> Tensor:
    """Complex images ``[F, Ny, Nx]`` → real network input.

    ``dim=2``: ``[F, 2, Ny, Nx]`` (frames are the batch); ``dim=3``: ``[1, 2, F, Ny, Nx]`` (frames
    are the depth axis of 3-D convolutions)."""
    if not torch.is_complex(x) or x.ndim != 3:
        raise ValueError(f"expected complex images [F, Ny, Nx], got {x.dtype} {tuple(x.shape)}")
    if dim == 2:
        return torch.stack((x.real, x.imag), dim=1)
    if dim == 3:
        return torch.stack((x.real, x.imag), dim=0).unsqueeze(0)
    raise ValueError(f"dim must be 2 or 3, got {dim}")


def channels_to_complex(t: Tensor, dim: int = 2) -> Tensor:
    """Inverse of :func:`complex_to_channels`: back to complex64 ``[F, Ny, Nx]``."""
    if dim == 2:
        if t.ndim != 4 or t.shape[1] != 2:
            raise ValueError(f"expected [F, 2, Ny, Nx], got {tuple(t.shape)}")
        return torch.complex(t[:, 0].float(), t[:, 1].float())
    if dim == 3:
        if t.ndim != 5 or t.shape[:2] != (1, 2):
            raise ValueError(f"expected [1, 2, F, Ny, Nx], got {tuple(t.shape)}")
        return torch.complex(t[0, 0].float(), t[0, 1].float())
    raise ValueError(f"dim must be 2 or 3, got {dim}")


def make_activation(name: str) -> nn.Module:
    """``relu`` (Schlemper's DC-CNN), ``leaky_relu`` (slope 0.01, the PyTorch port's choice) or ``silu``."""
    table = {"relu": lambda: nn.ReLU(inplace=False), "leaky_relu": lambda: nn.LeakyReLU(0.01),
             "silu": lambda: nn.SiLU()}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; allowed: {sorted(table)}")
    return table[name]()


def _conv(dim: int, c_in: int, c_out: int, kernel: int, bias: bool = True) -> nn.Module:
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    cls = nn.Conv2d if dim == 2 else nn.Conv3d
    return cls(c_in, c_out, kernel, padding=kernel // 2, bias=bias)


def _norm(dim: int, kind: str | None, channels: int) -> nn.Module:
    if kind is None or kind == "none":
        return nn.Identity()
    if kind == "batch":
        return (nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d)(channels, affine=True)
    raise ValueError(f"unknown norm {kind!r}; allowed: none, batch, instance")


class ConvStack(nn.Module):
    """``n_layers`` convolutions: ``in → hidden → … → hidden → out`` with norm + activation between.

    The last layer has no activation (a residual or linear output). Weights get He (Kaiming)
    initialisation, as in Schlemper et al.; ``zero_last=True`` zeroes the last layer so that a
    residual block starts as the identity (stable training of long cascades).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64, n_layers: int = 5,
                 dim: int = 2, kernel: int = 3, activation: str = "relu",
                 norm: Literal["none", "batch", "instance"] | None = None, zero_last: bool = False) -> None:
        super().__init__()
        if n_layers < 2:
            raise ValueError(f"n_layers must be >= 2, got {n_layers}")
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(n_layers - 1):
            conv = _conv(dim, c, hidden, kernel, bias=norm in (None, "none"))
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            layers += [conv, _norm(dim, norm, hidden), make_activation(activation)]
            c = hidden
        last = _conv(dim, c, out_channels, kernel)
        if zero_last:
            nn.init.zeros_(last.weight)
        else:
            nn.init.kaiming_normal_(last.weight, nonlinearity="linear")
        if last.bias is not None:
            nn.init.zeros_(last.bias)
        layers.append(last)
        self.body = nn.Sequential(*layers)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class UNet(nn.Module):
    """Small U-Net: ``depth`` levels of [conv-norm-act ×2], max-pool down, nearest up + skip concat.

    Spatial sizes need not be powers of two (upsampled maps are padded/cropped to the skip's size).
    For ``dim=3`` only the last two (spatial) axes are pooled, the depth (time) axis is kept.
    """

    def __init__(self, in_channels: int, out_channels: int, base: int = 32, depth: int = 3, dim: int = 2,
                 activation: str = "relu", norm: Literal["none", "batch", "instance"] | None = "instance") -> None:
        super().__init__()
        self.dim = dim
        self.down = nn.ModuleList()
        c = in_channels
        chans = [base * 2 ** i for i in range(depth)]
        for ch in chans:
            self.down.append(self._double(c, ch, activation, norm))
            c = ch
        self.bottom = self._double(c, c * 2, activation, norm)
        c = c * 2
        self.up = nn.ModuleList()
        for ch in reversed(chans):
            self.up.append(self._double(c + ch, ch, activation, norm))
            c = ch
        self.head = _conv(dim, c, out_channels, 1)
        self._pool = (2, 2) if dim == 2 else (1, 2, 2)

    def _double(self, c_in: int, c_out: int, activation: str, norm: str | None) -> nn.Module:
        return nn.Sequential(_conv(self.dim, c_in, c_out, 3), _norm(self.dim, norm, c_out), make_activation(activation),
                             _conv(self.dim, c_out, c_out, 3), _norm(self.dim, norm, c_out), make_activation(activation))

    def forward(self, x: Tensor) -> Tensor:
        pool = nn.functional.max_pool2d if self.dim == 2 else nn.functional.max_pool3d
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = pool(x, self._pool, ceil_mode=True)
        x = self.bottom(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = nn.functional.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = block(torch.cat((x, skip), dim=1))
        return self.head(x)


class MLP(nn.Module):
    """Fully connected layers ``sizes[0] → … → sizes[-1]`` with activations between (none at the end)."""

    def __init__(self, sizes: Sequence[int], activation: str = "relu") -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least input and output sizes, got {list(sizes)}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(make_activation(activation))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)
