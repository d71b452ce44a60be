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
