"""Graph Image Prior generator (Li et al., arXiv 2403.15770): per-frame CNNs and a graph network.

``G = C ∘ {G_t}``: ``F`` independent (un-shared) CNNs ``G_t`` recover each frame's spatial structure
from one shared 8×8 noise latent; the graph network ``C`` treats the frames as graph nodes, finds
each node's ``K`` most similar frames (cosine similarity of features from a fixed feature
extraction net, FEN) and mixes their features with per-node, per-neighbour convolutions (graph
aggregate layer GAL, graph update layer GUL), then per-frame residual heads and one shared 1×1 conv
give the complex frames (channel 0 real, 1 imaginary).

Layout: frames are the batch axis; the un-shared per-frame (and per-(frame, neighbour)) convolutions
are one grouped convolution each (:class:`GroupConv2d`), so all ``F`` generators run in one call.

Architecture as in the authors' code (BRIEFS §1.1): conv → ELU → InstanceNorm (norm after the
activation), bilinear up-sampling (``align_corners=False``), every conv weight ``N(0, 0.02²)``,
biases 0, BatchNorm γ = 1, β = 0. The FEN never receives gradients (its output only selects the
top-K indices), exactly as in the authors' code; the "learned" graph changes only because ``G``'s
features change. The graph is a directed kNN graph: row ``i`` lists node ``i`` itself first, then
its ``K − 1`` most cosine-similar other frames (not symmetrised, as in the code).

Matrix sizes other than the authors' 128²…256²: the up-sampling sizes are ``min(8·2^k, N)`` for
stages 2–5 and ``N`` for stage 6 (the authors' 16, 32, 64, 128, N for N ≥ 128), and FEN layers whose
output would be empty are skipped (small test images).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as nnf
from torch import nn

Tensor = torch.Tensor

__all__ = ["GroupConv2d", "FrameCNNs", "FeatureExtraction", "knn_graph", "GraphNet", "GIPGenerator",
           "init_gip_weights"]


class GroupConv2d(nn.Module):
    """``groups`` independent ``Conv2d(c_in → c_out)``, applied to ``x[groups, c_in, H, W]`` (one each).

    Equivalent to a list of ``groups`` convolutions, evaluated as a single grouped convolution.
    """

    def __init__(self, groups: int, c_in: int, c_out: int, kernel: int, padding: int = 0,
                 bias: bool = True) -> None:
        super().__init__()
        self.groups, self.c_in, self.c_out = int(groups), int(c_in), int(c_out)
        self.padding = int(padding)
        self.weight = nn.Parameter(torch.empty(self.groups * self.c_out, self.c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(self.groups * self.c_out)) if bias else None
        nn.init.normal_(self.weight, 0.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        g, c, h, w = x.shape
        if g != self.groups or c != self.c_in:
            raise ValueError(f"GroupConv2d expects [{self.groups}, {self.c_in}, H, W], got {tuple(x.shape)}")
        # plain (contiguous) layout: with channels-last inputs/weights the CPU grouped-convolution backward
        # gave wrong gradients inside the generator (torch 2.13, oneDNN; the network then did not fit at all);
        # tests/recon_core/test_gip.py checks the generator's gradients against separate convolutions
        out = nnf.conv2d(x.reshape(1, g * c, h, w), self.weight, self.bias, padding=self.padding,
                         groups=self.groups)
        return out.reshape(g, self.c_out, out.shape[-2], out.shape[-1])


def _inorm(x: Tensor) -> Tensor:
    """InstanceNorm2d (affine=False, no running statistics): per frame and channel."""
    return nnf.instance_norm(x, eps=1e-5)


class FrameCNNs(nn.Module):
    """The ``F`` independent per-frame CNNs ``G_t`` (BRIEFS §1.1 table, layers 1–7).

    ``z [1, Cz, 8, 8]`` (the same latent for every frame) → features ``[F, C, Ny, Nx]``; with
    :meth:`head` (the per-frame 1×1 convs of pre-training stage 1) → complex ``[F, Ny, Nx]``.
    """

    def __init__(self, n_frames: int, image_shape: tuple[int, int], channels: int = 12,
                 latent_channels: int = 8) -> None:
        super().__init__()
        F, C = int(n_frames), int(channels)
        ny, nx = (int(s) for s in image_shape)
        self.n_frames, self.channels, self.image_shape = F, C, (ny, nx)
        widths = [16 * C, 8 * C, 4 * C, 2 * C, C, C, C]
        self.sizes = [(min(8 * 2 ** k, ny), min(8 * 2 ** k, nx)) for k in range(1, 5)] + [(ny, nx)]
        self.conv1 = GroupConv2d(F, latent_channels, widths[0], 3, padding=1)
        self.ups = nn.ModuleList(GroupConv2d(F, widths[i], widths[i + 1], 3, padding=1) for i in range(5))
        self.conv7 = GroupConv2d(F, C, C, 3, padding=1)
        self.heads = GroupConv2d(F, C, 2, 1)

    def forward(self, z: Tensor) -> Tensor:
        """Layer-7 features ``[F, C, Ny, Nx]`` of every frame from the shared latent ``z [1, Cz, h, w]``."""
        x = self.conv1(z.expand(self.n_frames, -1, -1, -1))
        for conv, size in zip(self.ups, self.sizes):
            x = nnf.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = _inorm(nnf.elu(conv(x)))
        return _inorm(nnf.elu(self.conv7(x)))

    def head(self, features: Tensor) -> Tensor:
        """Per-frame 1×1 heads (pre-training stage 1): complex64 ``[F, Ny, Nx]``."""
        out = self.heads(features)
        return torch.complex(out[:, 0], out[:, 1])


class FeatureExtraction(nn.Module):
    """FEN: strided convs (k5 s3, k5 s3, k4 s2, k4 s2; pad 1; ReLU between; no bias) shared by all frames.

    Input is the temporal residual ``X − mean_t X``; output ``[F, D]`` flattened node features.
    Layers whose output would be empty (images below ~50²) are skipped.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = max(1, channels // 2)
        specs = [(channels, half, 5, 3), (half, half, 5, 3), (half, half, 4, 2), (half, half, 4, 2)]
        self.convs = nn.ModuleList(nn.Conv2d(ci, co, k, stride=s, padding=1, bias=False)
                                   for ci, co, k, s in specs)
        self.half = half

    def forward(self, x: Tensor) -> Tensor:
        h = x - x.mean(dim=0, keepdim=True)
        for i, conv in enumerate(self.convs):
            k, s = conv.kernel_size[0], conv.stride[0]
            if min(h.shape[-2:]) + 2 < k:
                break
            if i > 0:
                h = torch.relu(h)
            h = conv(h)
        if h.shape[1] != self.half:   # even the first layer was skipped (tiny image): channel mean
            h = h.mean(dim=1, keepdim=True)
        return h.flatten(1)


def knn_graph(features: Tensor, k: int) -> Tensor:
    """Directed kNN graph ``[F, k]`` int64 by cosine similarity; row ``i`` starts with ``i`` itself.

    ``S = F̂ F̂ᵀ`` of the L2-normalised feature rows; each row's ``k`` largest entries, the
    diagonal forced first (the authors assert self is the first neighbour). Ties are broken by the
    lower frame index (stable sort), so the graph is deterministic.
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (number of frames), got {k}")
    f = nnf.normalize(features.detach().reshape(n, -1).to(torch.float64), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(3.0)   # cosine ≤ 1: self always first
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices
    return order[:, :k].contiguous()


class GraphNet(nn.Module):
    """The graph network ``C``: FEN + kNN graph, GAL, GUL, per-frame residual heads, shared 1×1 out.

    ``forward(X [F, C, Ny, Nx])`` → complex64 ``[F, Ny, Nx]``. The graph is recomputed from ``X``
    every call unless :meth:`freeze_graph` fixed it (the authors freeze it two thirds into
    pre-training stage 3 and keep it through ADMM).
    """

    def __init__(self, n_frames: int, channels: int = 12, k: int = 7) -> None:
        super().__init__()
        F, C = int(n_frames), int(channels)
        self.n_frames, self.channels, self.k = F, C, int(min(k, n_frames))
        K = self.k
        self.fen = FeatureExtraction(C)
        for q in self.fen.parameters():   # never trained (its output only selects indices)
            q.requires_grad_(False)
        self.gal = GroupConv2d(F * K, C, C, 3, padding=1)
        self.gal_norm = nn.BatchNorm2d(C)
        self.gul_self = GroupConv2d(F, C, C, 3, padding=1)
        self.gul = GroupConv2d(F * K, 2 * C, C, 3, padding=1)
        self.res = nn.ModuleList(GroupConv2d(F, C, C, 3, padding=1) for _ in range(2))
        self.out = nn.Conv2d(C, 2, 1)
        self.register_buffer("frozen_graph", None, persistent=True)

    def graph(self, x: Tensor) -> Tensor:
        """The kNN graph ``[F, K]`` of features ``x`` (the frozen one if set)."""
        if self.frozen_graph is not None:
            return self.frozen_graph
        with torch.no_grad():
            return knn_graph(self.fen(x.detach()), self.k).to(x.device)

    def freeze_graph(self, x: Tensor) -> Tensor:
        """Compute the graph from features ``x`` once and keep it for every later call."""
        self.frozen_graph = None
        g = self.graph(x)
        self.frozen_graph = g
        return g

    def _gather(self, x: Tensor, graph: Tensor) -> Tensor:
        """Neighbour features ``[F·K, c, H, W]`` (row-major over (node, neighbour))."""
        return x.index_select(0, graph.reshape(-1))

    def forward(self, x: Tensor) -> Tensor:
        graph = self.graph(x)
        F, K = self.n_frames, self.k
        _, C, H, W = x.shape
        h = self.gal(self._gather(x, graph)).reshape(F, K, C, H, W).mean(dim=1)
        h = self.gal_norm(nnf.elu(h))
        u = _inorm(nnf.elu(self.gul_self(x)))
        c = torch.cat([u, h], dim=1)
        y = nnf.elu(self.gul(self._gather(c, graph)).reshape(F, K, C, H, W).mean(dim=1))
        for conv in self.res:
            y = y + _inorm(nnf.elu(conv(y)))
        out = self.out(y)
        return torch.complex(out[:, 0], out[:, 1])


def init_gip_weights(module: nn.Module) -> None:
    """The authors' initialisation: conv weights ``N(0, 0.02²)``, biases 0, BatchNorm γ = 1, β = 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, GroupConv2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class GIPGenerator(nn.Module):
    """The whole GIP generator ``G_θ(z) = C(G_1(z), …, G_F(z))`` with its fixed latent ``z``.

    Parameters
    ----------
    n_frames, image_shape:
        ``F`` and ``(Ny, Nx)``.
    channels:
        Width ``C`` (the paper's 12; the authors' code 24).
    latent_channels:
        ``Cz`` (8); the latent is ``[1, Cz, 8, 8]`` i.i.d. N(0, 1), drawn at construction (so under
        :func:`~recon_core.nets.fitting.init_seeded` it is fixed by the seed) and stored as a buffer.
    k:
        Neighbours per node including itself (7).
    """

    def __init__(self, n_frames: int, image_shape: Sequence[int], channels: int = 12,
                 latent_channels: int = 8, k: int = 7) -> None:
        super().__init__()
        shape = (int(image_shape[0]), int(image_shape[1]))
        if n_frames < 1 or min(shape) < 8 or channels < 1 or latent_channels < 1 or k < 1:
            raise ValueError(f"bad GIP size: frames {n_frames}, image {shape}, C {channels}, "
                             f"Cz {latent_channels}, K {k}")
        self.register_buffer("z", torch.randn(1, int(latent_channels), 8, 8))
        self.cnns = FrameCNNs(n_frames, shape, channels, latent_channels)
        self.gcn = GraphNet(n_frames, channels, k)
        init_gip_weights(self)

    def features(self) -> Tensor:
        """Layer-7 features of the per-frame CNNs ``[F, C, Ny, Nx]``."""
        return self.cnns(self.z)

    def forward_cnn(self) -> Tensor:
        """Stage-1 output: per-frame CNNs with their 1×1 heads, complex64 ``[F, Ny, Nx]``."""
        return self.cnns.head(self.features())

    def forward(self) -> Tensor:
        """``G_θ(z)``: complex64 ``[F, Ny, Nx]``."""
        return self.gcn(self.features())

    def graph(self) -> Tensor:
        """The current kNN graph ``[F, K]`` (frozen or from the current features)."""
        with torch.no_grad():
            return self.gcn.graph(self.features())

    def freeze_graph(self) -> Tensor:
        """Freeze the graph at the current features, computed in eval mode as in the authors' code."""
        was = self.training
        self.eval()
        with torch.no_grad():
            g = self.gcn.freeze_graph(self.features())
        self.train(was)
        return g

    def n_params(self, part: Optional[str] = None) -> int:
        """Number of parameters (``part`` = ``"cnns"`` or ``"gcn"``, or all)."""
        mod = self if part is None else getattr(self, part)
        return sum(q.numel() for q in mod.parameters())

