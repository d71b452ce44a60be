"""Iterative solvers on complex tensors of any shape.

Every solver treats the whole tensor as one vector: a batch of frames ``[F, Ny, Nx]`` is one big
system, inner products are ``Re Σ conj(a)·b`` over all elements. Operators are plain callables or
:class:`~recon_core.linop.LinearOperator` objects (which are callables too). Nothing here picks a
device, prints or changes global state; progress is reported through ``callback`` arguments.

Solvers run under whatever autograd mode the caller chose: they use only differentiable torch
operations, so unrolled / differentiable use is possible, and ``torch.no_grad()`` around the call
saves memory when gradients are not wanted.

Contents
--------
* :func:`conjugate_gradient` / :func:`cg_least_squares` — (AᴴA + λI) x = Aᴴy (CG-SENSE, x-updates).
* :func:`power_iteration` — largest eigenvalue of a self-adjoint PSD operator (step sizes, ‖A‖²).
* :func:`fista` — proximal gradient with Beck–Teboulle momentum and adaptive restart.
* :func:`admm` — scaled-form ADMM for min f(x) + Σᵢ gᵢ(Dᵢ x) with a user x-update (e.g. CG).
* :func:`nonlinear_cg` — nonlinear CG with backtracking line search for smooth objectives (GRASP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

Tensor = torch.Tensor

__all__ = [
    "CGInfo",
    "SolverInfo",
    "LineSearch",
    "conjugate_gradient",
    "cg_least_squares",
    "power_iteration",
    "fista",
    "admm",
    "make_cg_x_update",
    "nonlinear_cg",
]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def _rdot(a: Tensor, b: Tensor) -> Tensor:
    """Re⟨a, b⟩ = Re Σ conj(a)·b over all elements, as a real 0-d tensor."""
    if a.is_complex():
        return torch.sum(torch.real(a.conj() * b))
    return torch.sum(a * b)


def _norm(a: Tensor) -> float:
    return float(torch.linalg.vector_norm(a))


def _check_tensor(name: str, x: Any) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_positive_int(name: str, v: Any, allow_zero: bool = True) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} integer, got {v!r}")
    return v


def _check_nonneg(name: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}") from None
    if not math.isfinite(f) or f < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
    return f


# --------------------------------------------------------------------------------------------
# conjugate gradient
# --------------------------------------------------------------------------------------------

@dataclass
class CGInfo:
    """What a CG run did.

    Attributes
    ----------
    iterations
        Number of CG iterations performed.
    residual_norms
        ``‖rₖ‖`` for k = 0 … iterations (``r₀`` from the start point), absolute values.
    converged
        True when ``‖rₖ‖ / ‖rhs‖ < tol`` was reached.
    """

    iterations: int
    residual_norms: list[float]
    converged: bool


def conjugate_gradient(
    normal: Callable[[Tensor], Tensor],
    rhs: Tensor,
    x0: Tensor | None = None,
    max_iter: int = 30,
    tol: float = 1e-6,
    lam: float = 0.0,
    callback: Callable[[int, Tensor, float], None] | None = None,
) -> tuple[Tensor, CGInfo]:
    """Solve ``(N + lam·I) x = rhs`` for a self-adjoint positive (semi-)definite ``N`` by CG.

    Used for CG-SENSE (``N = AᴴA``, ``rhs = Aᴴy``) and for the quadratic x-updates inside ADMM.

    Parameters
    ----------
    normal
        Callable applying the self-adjoint PSD operator ``N`` (e.g. ``A.normal`` or ``A.N``).
    rhs
        Right-hand side, any shape; the whole tensor is one vector.
    x0
        Warm start (same shape as ``rhs``); zeros if None.
    max_iter
        Maximum number of iterations (0 returns ``x0``).
    tol
        Stop when the relative residual ``‖rhs − (N+λI)x‖ / ‖rhs‖`` drops below ``tol``.
    lam
        Tikhonov weight ``λ ≥ 0`` added to the diagonal.
    callback
        Called as ``callback(it, x, rel_residual)`` after every iteration (``it`` starts at 1).

    Returns
    -------
    x, info
        The solution estimate and a :class:`CGInfo`.

    Raises
    ------
    TypeError, ValueError
        On a non-tensor ``rhs``, a ``x0`` of the wrong shape, or negative ``lam``/``tol``/``max_iter``.
    """
    rhs = _check_tensor("rhs", rhs)
    _check_positive_int("max_iter", max_iter)
    tol = _check_nonneg("tol", tol)
    lam = _check_nonneg("lam", lam)
    if not callable(normal):
        raise TypeError("normal must be callable (a function or LinearOperator)")

    def apply(v: Tensor) -> Tensor:
        out = normal(v)
        if out.shape != v.shape:
            raise ValueError(f"normal must preserve the shape: got {tuple(out.shape)} "
                             f"for input {tuple(v.shape)}")
        return out + lam * v if lam else out

    if x0 is None:
        x = torch.zeros_like(rhs)
        r = rhs.clone()
    else:
        x0 = _check_tensor("x0", x0)
        if x0.shape != rhs.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} differs from rhs shape {tuple(rhs.shape)}")
        x = x0.to(dtype=rhs.dtype).clone()
        r = rhs - apply(x)

    rhs_norm = _norm(rhs)
    rr = _rdot(r, r)
    res = [math.sqrt(max(float(rr), 0.0))]
    if rhs_norm == 0.0:
        # (N+λI) x = 0: x = 0 is a solution (the minimum-norm one).
        return torch.zeros_like(rhs), CGInfo(0, [0.0], True)
    if res[0] / rhs_norm < tol:
        return x, CGInfo(0, res, True)

    p = r.clone()
    converged = False
    for it in range(1, max_iter + 1):
        Ap = apply(p)
        pAp = _rdot(p, Ap)
        if float(pAp) <= 0.0:
            # Zero/negative curvature along p: N is singular there (or not PSD). Stop here.
            break
        alpha = rr / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = _rdot(r, r)
        res.append(math.sqrt(max(float(rr_new), 0.0)))
        rel = res[-1] / rhs_norm
        if callback is not None:
            callback(it, x, rel)
        if rel < tol:
            converged = True
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, CGInfo(len(res) - 1, res, converged)


def cg_least_squares(
    A: Any,
    y: Tensor,
    lam: float = 0.0,
    x0: Tensor | None = None,
    max_iter: int = 30,
    tol: float = 1e-6,
    callback: Callable[[int, Tensor, float], None] | None = None,
) -> tuple[Tensor, CGInfo]:
    """Solve ``min ‖A x − y‖² + lam‖x‖²`` via CG on the normal equations ``(AᴴA + λI) x = Aᴴy``.

    ``A`` is a :class:`~recon_core.linop.LinearOperator` (anything with ``adjoint`` and ``normal``),
    so a fast normal operator (Toeplitz embedding) is used when the operator has one.
    Other arguments and the return value are as in :func:`conjugate_gradient`.
    """
    if not (hasattr(A, "adjoint") and hasattr(A, "normal")):
        raise TypeError("A must provide adjoint() and normal() (e.g. a LinearOperator)")
    y = _check_tensor("y", y)
    rhs = A.adjoint(y)
    return conjugate_gradient(A.normal, rhs, x0=x0, max_iter=max_iter, tol=tol, lam=lam, callback=callback)


# --------------------------------------------------------------------------------------------
# power iteration
# --------------------------------------------------------------------------------------------

def power_iteration(
    normal: Callable[[Tensor], Tensor],
    shape: Sequence[int],
    n_iter: int = 30,
    dtype: torch.dtype = torch.complex64,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> float:
    """Largest eigenvalue of a self-adjoint PSD operator by power iteration.

    Given ``A.normal`` this is ``‖A‖₂²``, the Lipschitz constant of ∇½‖Ax − y‖² that sets the
    FISTA step ``1/L``. The start vector is reproducible complex Gaussian noise (``seed``); the
    result is the Rayleigh quotient of the last iterate (a lower bound that converges from below).

    Parameters
    ----------
    normal
        Callable applying the operator.
    shape
        Shape of the operator's domain.
    n_iter
        Number of iterations (≥ 1).
    dtype, device
        Of the start vector (complex64 on the CPU by default).
    seed
        Seed of the start vector (a private generator; global RNG state is untouched).
    """
    if not callable(normal):
        raise TypeError("normal must be callable (a function or LinearOperator)")
    _check_positive_int("n_iter", n_iter, allow_zero=False)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    if any(s <= 0 for s in shape):
        raise ValueError(f"shape must have positive entries, got {shape}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    if dtype.is_complex:
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        re = torch.randn(shape, generator=g, dtype=real)
        x = torch.complex(re, torch.randn(shape, generator=g, dtype=real))
    else:
        x = torch.randn(shape, generator=g, dtype=dtype)
    x = x.to(device if device is not None else "cpu")
    x = x / torch.linalg.vector_norm(x)
    eig = 0.0
    for _ in range(n_iter):
        y = normal(x)
        eig = float(_rdot(x, y))  # Rayleigh quotient, ‖x‖ = 1
        ny = torch.linalg.vector_norm(y)
        if float(ny) == 0.0:
            return 0.0
        x = y / ny
    return eig


# --------------------------------------------------------------------------------------------
# FISTA
# --------------------------------------------------------------------------------------------

@dataclass
class SolverInfo:
    """What an iterative solver did.

    Attributes
    ----------
    iterations
        Number of iterations performed.
    history
        Per-iteration convergence measure (relative change ``‖xₖ₊₁ − xₖ‖/‖xₖ₊₁‖`` for FISTA and
        nonlinear CG; ``max(primal, dual)`` relative residual for ADMM).
    converged
        True when the stopping tolerance was reached before ``max_iter``.
    restarts
        Number of momentum restarts (FISTA, nonlinear CG).
    extra
        Solver-specific lists (ADMM: ``primal_residuals``, ``dual_residuals``; nonlinear CG:
        ``objective``, ``line_search_steps``).
    """

    iterations: int = 0
    history: list[float] = field(default_factory=list)
    converged: bool = False
    restarts: int = 0
    extra: dict[str, list[float]] = field(default_factory=dict)


def fista(
    grad_f: Callable[[Tensor], Tensor],
    prox_g: Callable[[Tensor, float], Tensor],
    x0: Tensor,
    step: float,
    max_iter: int = 50,
    tol: float = 1e-4,
    callback: Callable[[int, Tensor, float], None] | None = None,
    restart: bool = True,
    momentum: bool = True,
) -> tuple[Tensor, SolverInfo]:
    """Minimise ``f(x) + g(x)`` (f smooth, g with a cheap prox) by FISTA.

    Iteration (Beck & Teboulle 2009): ``xₖ₊₁ = prox_g(yₖ − step·∇f(yₖ), step)``,
    ``tₖ₊₁ = (1 + √(1 + 4tₖ²))/2``, ``yₖ₊₁ = xₖ₊₁ + (tₖ − 1)/tₖ₊₁ · (xₖ₊₁ − xₖ)``.
    With ``restart`` the gradient-based adaptive restart of O'Donoghue & Candès (2015) resets
    the momentum whenever ``Re⟨yₖ − xₖ₊₁, xₖ₊₁ − xₖ⟩ > 0`` (the step goes uphill), which removes
    the rippling of plain FISTA. ``momentum=False`` gives ISTA.

    Parameters
    ----------
    grad_f
        ``x ↦ ∇f(x)`` (torch's convention for complex x: ∂f/∂Re + i·∂f/∂Im).
    prox_g
        ``(v, step) ↦ argmin_x g(x) + ‖x − v‖²/(2·step)``.
    x0
        Start point.
    step
        Step size, at most ``1/L`` with L the Lipschitz constant of ∇f (see :func:`power_iteration`).
    max_iter
        Maximum number of iterations.
    tol
        Stop when ``‖xₖ₊₁ − xₖ‖ / ‖xₖ₊₁‖ < tol``.
    callback
        ``callback(it, x, rel_change)`` after every iteration.
    restart
        Adaptive momentum restart on/off.
    momentum
        False runs plain ISTA (proximal gradient).

    Returns
    -------
    x, info
        The last iterate and a :class:`SolverInfo`.
    """
    x = _check_tensor("x0", x0)
    step = _check_nonneg("step", step)
    if step == 0.0:
        raise ValueError("step must be > 0")
    _check_positive_int("max_iter", max_iter)
    tol = _check_nonneg("tol", tol)
    info = SolverInfo()
    y = x
    t = 1.0
    for it in range(1, max_iter + 1):
        x_new = prox_g(y - step * grad_f(y), step)
        if x_new.shape != x.shape:
            raise ValueError(f"prox_g changed the shape from {tuple(x.shape)} to {tuple(x_new.shape)}")
        dx = x_new - x
        rel = _norm(dx) / max(_norm(x_new), 1e-30)
        info.history.append(rel)
        info.iterations = it
        if momentum:
            if restart and float(_rdot(y - x_new, dx)) > 0.0:
                t = 1.0
                y = x_new
                info.restarts += 1
            else:
                t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
                y = x_new + ((t - 1.0) / t_new) * dx
                t = t_new
        else:
            y = x_new
        x = x_new
        if callback is not None:
            callback(it, x, rel)
        if rel < tol:
            info.converged = True
            break
    return x, info


# --------------------------------------------------------------------------------------------
# ADMM
# --------------------------------------------------------------------------------------------

def admm(
    x_update: Callable[..., Tensor],
    prox_z: Callable[[Tensor, float], Tensor] | Sequence[Callable[[Tensor, float], Tensor]],
    x0: Tensor,
    D: Any = None,
    rho: float | Sequence[float] = 1.0,
    max_iter: int = 50,
    tol: float = 1e-4,
    callback: Callable[[int, Tensor, float], None] | None = None,
) -> tuple[Tensor, SolverInfo]:
    """Scaled-form ADMM for ``min_x f(x) + Σᵢ gᵢ(Dᵢ x)`` (Boyd et al. 2011, §3.1.1).

    With splits ``zᵢ = Dᵢ x`` and scaled duals ``uᵢ`` each iteration does

    * x-update: ``x = x_update(v, rho, x)`` with ``vᵢ = zᵢ − uᵢ``, which must return
      ``argmin_x f(x) + Σᵢ ρᵢ/2 ‖Dᵢ x − vᵢ‖²`` (exactly or approximately, e.g. a few warm-started CG
      steps; see :func:`make_cg_x_update`);
    * z-update: ``zᵢ = prox_zᵢ(Dᵢ x + uᵢ, 1/ρᵢ)`` where ``prox(w, s) = argmin_z gᵢ(z) + ‖z − w‖²/(2s)``;
    * dual update: ``uᵢ = uᵢ + Dᵢ x − zᵢ``.

    Parameters
    ----------
    x_update
        ``(v, rho, x_prev) ↦ x``. With a single split, ``v`` is a tensor and ``rho`` a float; with a
        sequence of splits they are lists in the same order.
    prox_z
        One prox callable, or a sequence of them (one per split).
    x0
        Start point (z is initialised to ``D x0``, u to 0).
    D
        The split operator(s): a LinearOperator (needs ``adjoint`` for the dual residual), None for
        the identity, or a sequence matching ``prox_z``.
    rho
        Penalty parameter(s) ``ρᵢ > 0``.
    max_iter, tol
        Stop when both the relative primal residual ``‖Dx − z‖ / max(‖Dx‖, ‖z‖)`` and the relative
        dual residual ``‖Σ ρᵢ Dᵢᴴ(zᵢ − zᵢ_prev)‖ / ‖Σ ρᵢ Dᵢᴴ uᵢ‖`` are below ``tol``.
    callback
        ``callback(it, x, max(primal, dual))`` after every iteration.

    Returns
    -------
    x, info
        The last x and a :class:`SolverInfo` whose ``extra`` holds ``primal_residuals`` and
        ``dual_residuals``.
    """
    x = _check_tensor("x0", x0)
    _check_positive_int("max_iter", max_iter)
    tol = _check_nonneg("tol", tol)
    multi = isinstance(prox_z, (list, tuple))
    proxes = list(prox_z) if multi else [prox_z]
    n = len(proxes)
    if n == 0:
        raise ValueError("prox_z must hold at least one prox")
    if D is None or not isinstance(D, (list, tuple)):
        Ds = [D] * n if (D is None or n == 1) else None
        if Ds is None:
            raise ValueError(f"D must be a sequence of {n} operators (or None) when prox_z has {n} entries")
    else:
        Ds = list(D)
        if len(Ds) != n:
            raise ValueError(f"D has {len(Ds)} entries but prox_z has {n}")
    rhos = list(rho) if isinstance(rho, (list, tuple)) else [rho] * n
    if len(rhos) != n:
        raise ValueError(f"rho has {len(rhos)} entries but prox_z has {n}")
    rhos = [_check_nonneg("rho", r) for r in rhos]
    if any(r == 0.0 for r in rhos):
        raise ValueError("rho must be > 0")
    for p in proxes:
        if not callable(p):
            raise TypeError("prox_z entries must be callable")

    def fwd(Di: Any, v: Tensor) -> Tensor:
        return v if Di is None else Di(v)

    def adj(Di: Any, v: Tensor) -> Tensor:
        return v if Di is None else Di.adjoint(v)

    z = [fwd(Di, x) for Di in Ds]
    u = [torch.zeros_like(zi) for zi in z]
    info = SolverInfo(extra={"primal_residuals": [], "dual_residuals": []})
    for it in range(1, max_iter + 1):
        v = [zi - ui for zi, ui in zip(z, u)]
        x = x_update(v if multi else v[0], rhos if multi else rhos[0], x)
        Dx = [fwd(Di, x) for Di in Ds]
        z_old = z
        z = [proxes[i](Dx[i] + u[i], 1.0 / rhos[i]) for i in range(n)]
        u = [u[i] + Dx[i] - z[i] for i in range(n)]
        prim_num = math.sqrt(sum(_norm(Dx[i] - z[i]) ** 2 for i in range(n)))
        prim_den = max(math.sqrt(sum(_norm(t) ** 2 for t in Dx)),
                       math.sqrt(sum(_norm(t) ** 2 for t in z)), 1e-30)
        dual_vec = sum(rhos[i] * adj(Ds[i], z[i] - z_old[i]) for i in range(n))
        dual_den_vec = sum(rhos[i] * adj(Ds[i], u[i]) for i in range(n))
        prim = prim_num / prim_den
        dual = _norm(dual_vec) / max(_norm(dual_den_vec), 1e-30)
        info.extra["primal_residuals"].append(prim)
        info.extra["dual_residuals"].append(dual)
        info.history.append(max(prim, dual))
        info.iterations = it
        if callback is not None:
            callback(it, x, max(prim, dual))
        if prim < tol and dual < tol:
            info.converged = True
            break
    return x, info


def make_cg_x_update(
    normal: Callable[[Tensor], Tensor],
    rhs: Tensor,
    D: Any = None,
    max_iter: int = 10,
    tol: float = 1e-6,
) -> Callable[..., Tensor]:
    """x-update for :func:`admm` when ``f(x) = ½‖Ax − y‖²``: warm-started CG on
    ``(AᴴA + Σᵢ ρᵢ DᵢᴴDᵢ) x = Aᴴy + Σᵢ ρᵢ Dᵢᴴ vᵢ``.

    Parameters
    ----------
    normal
        ``AᴴA`` (e.g. ``A.normal``).
    rhs
        ``Aᴴy``.
    D
        None (identity), one LinearOperator, or a sequence matching the ADMM splits.
    max_iter, tol
        Inner CG settings.
    """
    rhs = _check_tensor("rhs", rhs)

    def update(v: Tensor | list[Tensor], rho: float | list[float], x_prev: Tensor) -> Tensor:
        vs = v if isinstance(v, list) else [v]
        rhos = rho if isinstance(rho, list) else [rho]
        Ds = list(D) if isinstance(D, (list, tuple)) else [D] * len(vs)
        if len(Ds) != len(vs):
            raise ValueError(f"D has {len(Ds)} entries but ADMM passed {len(vs)} splits")

        def op(w: Tensor) -> Tensor:
            out = normal(w)
            for Di, r in zip(Ds, rhos):
                out = out + r * (w if Di is None else Di.normal(w))
            return out

        b = rhs
        for Di, r, vi in zip(Ds, rhos, vs):
            b = b + r * (vi if Di is None else Di.adjoint(vi))
        x, _ = conjugate_gradient(op, b, x0=x_prev, max_iter=max_iter, tol=tol)
        return x

    return update


# --------------------------------------------------------------------------------------------
# nonlinear conjugate gradient
# --------------------------------------------------------------------------------------------

@dataclass
class LineSearch:
    """Backtracking (Armijo) line search settings for :func:`nonlinear_cg`.

    A step ``t`` is accepted when ``f(x + t·d) ≤ f(x) + alpha·t·Re⟨∇f(x), d⟩``; otherwise
    ``t ← beta·t``, at most ``max_ls`` times. ``t0`` is the first trial step; it adapts between
    iterations (shrinks by ``beta`` after a long search, grows by ``1/beta`` after an immediate
    acceptance). Defaults follow GRASP (α = 0.01, β = 0.6, 150 steps).
    """

    alpha: float = 0.01
    beta: float = 0.6
    max_ls: int = 150
    t0: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.alpha) < 1.0:
            raise ValueError(f"line_search.alpha must be in (0, 1), got {self.alpha!r}")
        if not 0.0 < float(self.beta) < 1.0:
            raise ValueError(f"line_search.beta must be in (0, 1), got {self.beta!r}")
        _check_positive_int("line_search.max_ls", self.max_ls, allow_zero=False)
        if not float(self.t0) > 0.0:
            raise ValueError(f"line_search.t0 must be > 0, got {self.t0!r}")


def nonlinear_cg(
    fun_and_grad: Callable[[Tensor], tuple[Any, Tensor]],
    x0: Tensor,
    max_iter: int = 50,
    tol: float = 1e-6,
    line_search: LineSearch | tuple | dict | None = None,
    restart_every: int | None = None,
    beta_rule: str = "fr",
    fun: Callable[[Tensor], Any] | None = None,
    callback: Callable[[int, Tensor, float], None] | None = None,
) -> tuple[Tensor, SolverInfo]:
    """Minimise a smooth real function of a (complex) tensor by nonlinear CG.

    Direction ``dₖ = −gₖ + βₖ dₖ₋₁`` with Fletcher–Reeves ``β = ‖gₖ‖²/‖gₖ₋₁‖²`` (``"fr"``, as in
    GRASP) or Polak–Ribière+ ``β = max(0, Re⟨gₖ, gₖ − gₖ₋₁⟩/‖gₖ₋₁‖²)`` (``"pr"``), a backtracking
    Armijo line search, and a restart to steepest descent every ``restart_every`` iterations or
    whenever ``dₖ`` is not a descent direction.

    Parameters
    ----------
    fun_and_grad
        ``x ↦ (f(x), ∇f(x))``; f real (float or 0-d tensor), gradient in torch's convention
        (∂f/∂Re + i·∂f/∂Im for complex x), so ``Re⟨∇f, d⟩`` is the directional derivative.
    x0
        Start point.
    max_iter
        Maximum number of iterations.
    tol
        Stop when ``‖xₖ₊₁ − xₖ‖ / ‖xₖ₊₁‖ < tol`` or the gradient vanishes.
    line_search
        :class:`LineSearch`, a tuple ``(alpha, beta, max_ls[, t0])`` or a dict of its fields.
    restart_every
        Reset the direction to −∇f every this many iterations (None: only on non-descent).
    beta_rule
        ``"fr"`` (Fletcher–Reeves) or ``"pr"`` (Polak–Ribière+).
    fun
        Optional cheaper value-only function for the line search (default: ``fun_and_grad(x)[0]``).
    callback
        ``callback(it, x, rel_change)`` after every iteration.

    Returns
    -------
    x, info
        The last iterate and a :class:`SolverInfo` (``extra``: ``objective``, ``line_search_steps``).
    """
    x = _check_tensor("x0", x0)
    _check_positive_int("max_iter", max_iter)
    tol = _check_nonneg("tol", tol)
    if line_search is None:
        ls = LineSearch()
    elif isinstance(line_search, LineSearch):
        ls = line_search
    elif isinstance(line_search, dict):
        ls = LineSearch(**line_search)
    elif isinstance(line_search, (tuple, list)):
        ls = LineSearch(*line_search)
    else:
        raise TypeError(f"line_search must be a LineSearch, tuple or dict, got {type(line_search).__name__}")
    if restart_every is not None:
        _check_positive_int("restart_every", restart_every, allow_zero=False)
    if beta_rule not in ("fr", "pr"):
        raise ValueError(f"beta_rule must be 'fr' or 'pr', got {beta_rule!r}")
    value = fun if fun is not None else (lambda v: fun_and_grad(v)[0])

    info = SolverInfo(extra={"objective": [], "line_search_steps": []})
    f, g = fun_and_grad(x)
    f = float(f)
    gg = float(_rdot(g, g))
    d = -g
    t0 = float(ls.t0)
    since_restart = 0
    for it in range(1, max_iter + 1):
        if gg == 0.0:
            info.converged = True
            break
        slope = float(_rdot(g, d))
        if slope >= 0.0:  # not a descent direction: restart
            d = -g
            slope = -gg
            info.restarts += 1
            since_restart = 0
        t = t0
        n_ls = 0
        f_new = float(value(x + t * d))
        while f_new > f + ls.alpha * t * slope and n_ls < ls.max_ls:
            t *= ls.beta
            n_ls += 1
            f_new = float(value(x + t * d))
        info.extra["line_search_steps"].append(float(n_ls))
        if f_new > f + ls.alpha * t * slope:
            # Line search failed: no decrease found along d; stop at the current point.
            break
        # Adapt the first trial step (as GRASP does) to keep line searches short.
        if n_ls > 2:
            t0 *= ls.beta
        elif n_ls < 1:
            t0 /= ls.beta
        x_new = x + t * d
        rel = _norm(x_new - x) / max(_norm(x_new), 1e-30)
        x = x_new
        f, g_new = fun_and_grad(x)
        f = float(f)
        gg_new = float(_rdot(g_new, g_new))
        since_restart += 1
        if restart_every is not None and since_restart >= restart_every:
            beta_k = 0.0
            since_restart = 0
            info.restarts += 1
        elif beta_rule == "fr":
            beta_k = gg_new / max(gg, 1e-300)
        else:
            beta_k = max(0.0, float(_rdot(g_new, g_new - g)) / max(gg, 1e-300))
        d = -g_new + beta_k * d
        g, gg = g_new, gg_new
        info.history.append(rel)
        info.extra["objective"].append(f)
        info.iterations = it
        if callback is not None:
            callback(it, x, rel)
        if rel < tol:
            info.converged = True
            break
    return x, info
