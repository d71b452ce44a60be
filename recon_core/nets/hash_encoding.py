"""Multiresolution hash encoding (Müller et al. 2022, "Instant neural graphics primitives") in pure PyTorch.

A coordinate ``x ∈ [0, 1]^d`` (here ``d = 3``: ``(t, y, x)`` of a dynamic image series) is encoded by
``L`` grids of growing resolution. Level ``l`` has the scale ``s_l = N_min · b^l − 1`` and
``ceil(s_l) + 1`` vertices per axis (tiny-cuda-nn's rule); the position in its grid is
``p = x · s_l + ½``. Each vertex owns an ``F``-dim learnable feature vector stored in a table of at
most ``T`` entries: coarse levels whose ``(ceil(s_l)+1)^d`` vertices fit in ``T`` index it densely,
finer levels by the spatial hash ``(⊕_d c_d · π_d) mod T`` (``π = 1, 2654435761, 805459861``).
The level's feature at ``x`` is the (tri)linear interpolation of its ``2^d`` surrounding vertices;
the ``L · F`` features of all levels are concatenated. Table entries start uniform in
``±1e-4`` (tiny-cuda-nn's initialisation).

Coarse-to-fine training masks the finer levels: :meth:`HashEncoding.forward` takes ``n_active`` and
returns zeros for levels ``≥ n_active`` (and spends no time on them).

Speed. A network fitted to one scan evaluates the *same* coordinates at every step. The
interpolation of a fixed coordinate set is a fixed sparse linear map from each level's table to
its features (``2^d`` non-zeros per row); :meth:`HashEncoding.plan` builds these sparse matrices
(CSR) once and :meth:`HashEncoding.forward` with the plan is then two sparse-dense products per
level and step (forward, and its transpose in the backward) instead of gathers and scatters.

tiny-cuda-nn (optional, never required): with ``backend="auto"`` and ``tinycudann`` importable, a
module constructed for a CUDA device uses ``tinycudann.Encoding`` (same hash grid, fused CUDA
kernels) instead of the pure tables; otherwise, and always with ``backend="torch"``, the pure
PyTorch encoding above is used.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["HashEncoding", "InterpolationPlan", "level_resolutions", "tcnn_available"]

#: tiny-cuda-nn's hash primes (the first is 1: the first axis is used as is)
_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)


def tcnn_available() -> bool:
    """True when the optional ``tinycudann`` package imports."""
    try:
        import tinycudann  # noqa: F401
    except Exception:
        return False
    return True


def level_resolutions(n_levels: int, base_resolution: int, per_level_scale: float) -> list[tuple[float, int]]:
    """``(scale s_l, vertices per axis)`` of each level: ``s_l = N_min·b^l − 1``, ``ceil(s_l) + 1`` vertices."""
    out = []
    for level in range(n_levels):
        scale = math.exp2(level * math.log2(per_level_scale)) * base_resolution - 1.0
        out.append((scale, int(math.ceil(scale)) + 1))
    return out


@dataclass
class InterpolationPlan:
    """Precomputed interpolation of a fixed coordinate set: per level the sparse matrix ``A_l``
    (``[P, T_l]``, CSR, ``2^d`` weights per row) and its transpose (for the backward)."""

    n_points: int
    forward_mats: list[Tensor]
    backward_mats: list[Tensor]


class _SparseLookup(torch.autograd.Function):
    """``A @ table`` with backward ``Aᵀ @ grad`` (both precomputed CSR matrices)."""

    @staticmethod
    def forward(ctx, table: Tensor, mat: Tensor, mat_t: Tensor) -> Tensor:  # type: ignore[override]
        ctx.mat_t = mat_t
        return torch.sparse.mm(mat, table)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return torch.sparse.mm(ctx.mat_t, grad.contiguous()), None, None


def _csr(rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    """CSR matrix from COO triplets (row-sorted by a stable sort; duplicates are summed by spmm)."""
    order = torch.argsort(rows, stable=True)
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = torch.bincount(rows, minlength=shape[0])
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(counts, 0)
    # int32 indices halve the memory of the plan (all our sizes fit)
    itype = torch.int32 if max(shape) < 2 ** 31 and vals.numel() < 2 ** 31 else torch.int64
    with warnings.catch_warnings():   # "sparse CSR support is in beta": the products used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.to(itype), cols.to(itype), vals, size=shape,
                                       check_invariants=False)


class HashEncoding(nn.Module):
    """Multiresolution hash encoding ``[P, d] → [P, L·F]`` (see the module docstring).

    Parameters
    ----------
    n_dims:
        Input dimension ``d`` (3 for ``(t, y, x)``).
    n_levels, n_features:
        ``L`` levels of ``F`` features each.
    log2_table_size:
        ``log2 T``, the largest table of a level (2^24 in the INR authors' configuration).
    base_resolution, per_level_scale:
        ``N_min`` and the growth factor ``b`` of the level resolutions.
    init_range:
        Table entries start uniform in ``±init_range``.
    backend:
        ``"auto"`` (tiny-cuda-nn when importable and ``device`` is CUDA, else pure PyTorch) or
        ``"torch"``.
    device:
        Where the tables are allocated.

    References
    ----------
    T. Müller, A. Evans, C. Schied, A. Keller, "Instant neural graphics primitives with a
    multiresolution hash encoding", ACM TOG 41(4):102, 2022.
    """

    def __init__(self, n_dims: int = 3, n_levels: int = 16, n_features: int = 2, log2_table_size: int = 24,
                 base_resolution: int = 16, per_level_scale: float = 2.0, init_range: float = 1e-4,
                 backend: str = "auto", device: torch.device | str | None = None) -> None:
        super().__init__()
        if not (1 <= n_dims <= len(_PRIMES)):
            raise ValueError(f"n_dims must be in 1..{len(_PRIMES)}, got {n_dims}")
        if n_levels < 1 or n_features < 1 or base_resolution < 1 or not (1 <= log2_table_size <= 30):
            raise ValueError("n_levels, n_features, base_resolution must be >= 1 and log2_table_size in 1..30")
        if not per_level_scale >= 1.0:
            raise ValueError(f"per_level_scale must be >= 1, got {per_level_scale}")
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
        self.n_dims, self.n_levels, self.n_features = int(n_dims), int(n_levels), int(n_features)
        self.table_cap = 2 ** int(log2_table_size)
        self.levels = level_resolutions(self.n_levels, int(base_resolution), float(per_level_scale))
        self.hashed = [res ** self.n_dims > self.table_cap for _, res in self.levels]
        self.table_sizes = [self.table_cap if h else res ** self.n_dims
                            for h, (_, res) in zip(self.hashed, self.levels)]
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.tcnn: Optional[nn.Module] = None
        self._compacted = False
        if backend == "auto" and dev.type == "cuda" and tcnn_available():
            import tinycudann as tcnn

            self.tcnn = tcnn.Encoding(n_input_dims=self.n_dims, encoding_config={
                "otype": "HashGrid", "n_levels": self.n_levels, "n_features_per_level": self.n_features,
                "log2_hashmap_size": int(log2_table_size), "base_resolution": int(base_resolution),
                "per_level_scale": float(per_level_scale)})
            self.tables = nn.ParameterList()
        else:
            self.tables = nn.ParameterList([
                nn.Parameter(torch.empty(n, self.n_features, device=dev).uniform_(-init_range, init_range))
                for n in self.table_sizes])

    @property
    def out_dim(self) -> int:
        return self.n_levels * self.n_features

    # ------------------------------------------------------------------------------------------
    def corners(self, coords: Tensor, level: int) -> tuple[Tensor, Tensor]:
        """Table rows ``[P, 2^d]`` (int64) and interpolation weights ``[P, 2^d]`` (float32) of level
        ``level`` at ``coords`` ``[P, d]`` in ``[0, 1]``."""
        if coords.ndim != 2 or coords.shape[1] != self.n_dims:
            raise ValueError(f"coords must be [P, {self.n_dims}], got {tuple(coords.shape)}")
        scale, res = self.levels[level]
        pos = coords.to(torch.float64) * scale + 0.5
        base = torch.floor(pos)
        frac = (pos - base).to(torch.float32)
        base = base.to(torch.int64)
        d = self.n_dims
        offs = torch.tensor([[(c >> k) & 1 for k in range(d)] for c in range(2 ** d)],
                            dtype=torch.int64, device=coords.device)                 # [2^d, d]
        vert = base.unsqueeze(1) + offs.unsqueeze(0)                                  # [P, 2^d, d]
        w = torch.where(offs.unsqueeze(0).bool(), frac.unsqueeze(1), 1.0 - frac.unsqueeze(1)).prod(-1)
        if self.hashed[level]:
            h = torch.zeros(vert.shape[:2], dtype=torch.int64, device=coords.device)
            for k in range(d):
                h = h ^ (vert[..., k] * _PRIMES[k])
            idx = h & (self.table_cap - 1)   # T is a power of two: = (uint32 product) mod T
        else:
            vert = vert.clamp(0, res - 1)
            idx = torch.zeros(vert.shape[:2], dtype=torch.int64, device=coords.device)
            stride = 1
            for k in range(d):
                idx = idx + vert[..., k] * stride
                stride *= res
        return idx, w

    def plan(self, coords: Tensor, compact: bool = True) -> InterpolationPlan:
        """Precompute the sparse interpolation matrices of the fixed coordinates ``coords`` ``[P, d]``.

        ``compact`` (once per module): the trainable parameters of each level become only the table
        rows these coordinates touch; the other rows are kept, frozen at their initial values, for
        evaluations elsewhere (:meth:`table`). Rows no planned coordinate touches receive no gradient,
        so a fit on the plan is unchanged — but the optimiser and the gradients handle ``≤ 2^d·P``
        rows per level instead of ``T``."""
        if self.tcnn is not None:
            raise RuntimeError("plan() is for the pure PyTorch encoding (tiny-cuda-nn interpolates itself)")
        if compact and self._compacted:
            raise RuntimeError("this encoding is already compacted to one coordinate set")
        P = int(coords.shape[0])
        fwd, bwd = [], []
        for level in range(self.n_levels):
            idx, w = self.corners(coords, level)
            rows = torch.arange(P, device=coords.device).repeat_interleave(idx.shape[1])
            cols, vals = idx.reshape(-1), w.reshape(-1)
            n = self.table_sizes[level]
            if compact:
                used, cols = torch.unique(cols, return_inverse=True)
                table = self.tables[level].detach()
                self.register_buffer(f"frozen_{level}", table.clone())
                self.register_buffer(f"rows_{level}", used)
                self.tables[level] = nn.Parameter(table[used].clone())
                n = int(used.numel())
            fwd.append(_csr(rows, cols, vals, (P, n)))
            bwd.append(_csr(cols, rows, vals, (n, P)))
        self._compacted = self._compacted or compact
        return InterpolationPlan(P, fwd, bwd)

    def table(self, level: int) -> Tensor:
        """The whole ``[T_l, F]`` table of ``level`` (differentiable in the trainable rows)."""
        if not self._compacted:
            return self.tables[level]
        frozen = getattr(self, f"frozen_{level}")
        return frozen.index_copy(0, getattr(self, f"rows_{level}"), self.tables[level])

    def forward(self, coords: Optional[Tensor] = None, n_active: Optional[int] = None,
                plan: Optional[InterpolationPlan] = None) -> Tensor:
        """Features ``[P, L·F]`` float32 at ``coords`` ``[P, d]`` (or of the planned coordinates).

        Levels ``≥ n_active`` (coarse-to-fine) are zero; ``None`` = all levels."""
        n_act = self.n_levels if n_active is None else max(0, min(int(n_active), self.n_levels))
        if self.tcnn is not None:
            if coords is None:
                raise ValueError("the tiny-cuda-nn encoding needs coords")
            feats = self.tcnn(coords.float()).float()
            keep = torch.zeros(self.out_dim, device=feats.device)
            keep[: n_act * self.n_features] = 1.0
            return feats * keep
        if plan is None and coords is None:
            raise ValueError("give coords or a plan")
        P = plan.n_points if plan is not None else int(coords.shape[0])  # type: ignore[union-attr]
        parts = []
        for level in range(n_act):
            table = self.tables[level]
            if plan is not None:
                parts.append(_SparseLookup.apply(table, plan.forward_mats[level], plan.backward_mats[level]))
            else:
                idx, w = self.corners(coords, level)  # type: ignore[arg-type]
                full = self.table(level)
                parts.append((full[idx] * w.unsqueeze(-1).to(full.dtype)).sum(1))
        if n_act < self.n_levels:
            ref = self.tables[0]
            parts.append(ref.detach().new_zeros((P, (self.n_levels - n_act) * self.n_features)))
        return torch.cat(parts, dim=1)
