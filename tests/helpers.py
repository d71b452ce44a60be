"""Reusable checks for linear operators (STYLE.md §3.3): adjoint, normal, autograd, exact-DFT."""

from __future__ import annotations

from typing import Callable

import torch

from recon_core.linop import LinearOperator

Tensor = torch.Tensor


def randc(shape, dtype=torch.complex64, device="cpu", seed: int = 0) -> Tensor:
    """Reproducible complex Gaussian noise."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    real_dtype = torch.float64 if dtype == torch.complex128 else torch.float32
    re = torch.randn(tuple(shape), generator=g, dtype=real_dtype)
    im = torch.randn(tuple(shape), generator=g, dtype=real_dtype)
    return torch.complex(re, im).to(device)


def vdot(a: Tensor, b: Tensor) -> Tensor:
    """⟨a, b⟩ = Σ conj(a)·b in double precision."""
    return torch.sum(a.conj().to(torch.complex128) * b.to(torch.complex128))


def check_adjoint(op: LinearOperator, ishape=None, oshape=None, rtol: float = 1e-4, seed: int = 0,
                  device="cpu") -> float:
    """Dot-product test ⟨A u, v⟩ = ⟨u, Aᴴ v⟩; asserts shapes first and returns the relative error."""
    ishape = tuple(ishape if ishape is not None else op.ishape)
    oshape = tuple(oshape if oshape is not None else op.oshape)
    u = randc(ishape, seed=seed, device=device)
    v = randc(oshape, seed=seed + 1, device=device)
    Au = op(u)
    Ahv = op.adjoint(v)
    assert tuple(Au.shape) == oshape, f"forward shape {tuple(Au.shape)} != {oshape}"
    assert tuple(Ahv.shape) == ishape, f"adjoint shape {tuple(Ahv.shape)} != {ishape}"
    assert Au.dtype == torch.complex64 and Ahv.dtype == torch.complex64, (Au.dtype, Ahv.dtype)
    lhs = vdot(Au, v)
    rhs = vdot(u, Ahv)
    err = float(abs(lhs - rhs) / max(abs(lhs), abs(rhs)))
    assert err < rtol, f"adjoint test failed: <Au,v>={complex(lhs)}, <u,AHv>={complex(rhs)}, rel err {err:.2e}"
    return err


def check_normal(op: LinearOperator, normal: Callable[[Tensor], Tensor] | None = None, ishape=None,
                 rtol: float = 1e-4, seed: int = 0, device="cpu") -> float:
    """``normal(x)`` (default ``op.normal``) equals ``Aᴴ(A x)``; returns the relative error."""
    ishape = tuple(ishape if ishape is not None else op.ishape)
    x = randc(ishape, seed=seed, device=device)
    n = (normal or op.normal)(x)
    ref = op.adjoint(op(x))
    err = float(torch.linalg.vector_norm(n - ref) / torch.linalg.vector_norm(ref))
    assert err < rtol, f"normal != adjoint∘forward: rel err {err:.2e}"
    return err


def check_autograd_is_adjoint(op: LinearOperator, ishape=None, oshape=None, rtol: float = 1e-4,
                              seed: int = 0, device="cpu") -> float:
    """For L(x) = Re⟨v, A x⟩ the gradient w.r.t. x (torch's conjugate convention) equals Aᴴ v."""
    ishape = tuple(ishape if ishape is not None else op.ishape)
    oshape = tuple(oshape if oshape is not None else op.oshape)
    x = randc(ishape, seed=seed, device=device).requires_grad_(True)
    v = randc(oshape, seed=seed + 1, device=device)
    loss = torch.real(torch.sum(v.conj() * op(x)))
    (g,) = torch.autograd.grad(loss, x)
    ref = op.adjoint(v)
    err = float(torch.linalg.vector_norm(g - ref) / torch.linalg.vector_norm(ref))
    assert err < rtol, f"autograd gradient != adjoint: rel err {err:.2e}"
    return err


def dense_matrix(fn: Callable[[Tensor], Tensor], ishape, dtype=torch.complex64, device="cpu") -> Tensor:
    """The matrix of a linear map, column by column (tiny sizes only)."""
    n = 1
    for s in ishape:
        n *= s
    cols = []
    for i in range(n):
        e = torch.zeros(n, dtype=dtype, device=device)
        e[i] = 1
        cols.append(fn(e.reshape(ishape)).reshape(-1))
    return torch.stack(cols, dim=1)


def check_operator(op: LinearOperator, rtol: float = 1e-4, normal_rtol: float | None = None,
                   seed: int = 0, device="cpu") -> None:
    """The whole contract of one operator: adjoint (dot-product) test of ``A``, ``Aᴴ`` and ``AᴴA``;
    ``normal`` = adjoint∘forward; autograd gradient = adjoint for ``A`` and for ``A.N``."""
    normal_rtol = rtol if normal_rtol is None else normal_rtol
    check_adjoint(op, rtol=rtol, seed=seed, device=device)
    check_adjoint(op.H, rtol=rtol, seed=seed + 2, device=device)
    check_normal(op, rtol=normal_rtol, seed=seed + 4, device=device)
    check_adjoint(op.N, rtol=normal_rtol, seed=seed + 6, device=device)
    check_autograd_is_adjoint(op, rtol=rtol, seed=seed + 8, device=device)
    check_autograd_is_adjoint(op.N, rtol=normal_rtol, seed=seed + 10, device=device)


def _embed_frames(part: Tensor, idx: Tensor, n_frames: int) -> Tensor:
    """A zero series of ``n_frames`` frames (axis 0) holding ``part`` at frames ``idx``."""
    full = part.new_zeros((n_frames,) + tuple(part.shape[1:]))
    return full.index_copy(0, idx.to(part.device), part)


def check_select_frames(op: LinearOperator, idx, rtol: float = 1e-5, seed: int = 0,
                        device="cpu") -> LinearOperator:
    """``op.select_frames(idx)`` equals ``op`` on frames ``idx`` (forward, adjoint and normal), for a
    frame-separable operator with frames on axis 0 of ``ishape`` and ``oshape``; returns the selection.

    ``idx`` must not repeat frames (the comparison embeds the selected frames in a zero series).
    """
    idx_t = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    assert len(set(idx_t.tolist())) == idx_t.numel(), "check_select_frames needs distinct frame indices"
    F = op.ishape[0]
    sel = op.select_frames(idx)
    k = idx_t.numel()
    assert isinstance(sel, LinearOperator), type(sel)
    assert tuple(sel.ishape) == (k,) + tuple(op.ishape[1:]), (sel.ishape, op.ishape)
    assert tuple(sel.oshape) == (k,) + tuple(op.oshape[1:]), (sel.oshape, op.oshape)

    def close(a: Tensor, b: Tensor, what: str) -> None:
        assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        err = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))
        assert err < rtol, f"select_frames {what} differs from the full operator's frames: rel err {err:.2e}"

    x = randc(sel.ishape, seed=seed, device=device)
    y = randc(sel.oshape, seed=seed + 1, device=device)
    close(sel(x), op(_embed_frames(x, idx_t, F))[idx_t.to(device)], "forward")
    close(sel.adjoint(y), op.adjoint(_embed_frames(y, idx_t, F))[idx_t.to(device)], "adjoint")
    close(sel.normal(x), op.normal(_embed_frames(x, idx_t, F))[idx_t.to(device)], "normal")
    check_adjoint(sel, rtol=max(rtol, 1e-4), seed=seed + 2, device=device)
    return sel


def prewhitened_radial_problem(n: int, n_frames: int, n_coils: int, seed: int, spokes_per_frame: int = 8,
                               noise_std: float = 0.015, prewhitened: bool = True):
    """A golden-angle radial cine as the chain gives it to a method: k-space prewhitened with the scan's
    own noise covariance, maps = the whitened true maps at unit RSS, reference = object × whitened
    receive profile (as ``bench.quality`` builds it), finufft. ``prewhitened`` sets the flag the noise
    gadget sets (σ = 1). Returns ``(problem, reference, body_mask)``."""
    from recon_core.coils import noise_covariance, prewhiten, prewhitening_matrix
    from recon_core.methods import make_problem
    from recon_core.phantoms import simulate_scan

    s = simulate_scan("radial", matrix=n, n_frames=n_frames, n_coils=n_coils, spokes_per_frame=spokes_per_frame,
                      noise_std=noise_std, seed=seed)
    W = prewhitening_matrix(noise_covariance(s.noise))
    k = prewhiten(s.kspace, W, coil_dim=1)
    maps = prewhiten(s.coil_maps, W, coil_dim=0)
    rss = torch.linalg.vector_norm(maps, dim=0)
    reference = s.ground_truth * rss
    maps = maps / rss.clamp_min(1e-6)
    p = make_problem(k, maps, trajectory=s.trajectory, nufft_backend="finufft", seed=0)
    if prewhitened:
        p.extra["prewhitened"] = True
    return p, reference, s.body_mask
