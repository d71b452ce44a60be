"""Iterative solvers on complex tensors of any shape.

Every solver treats the whole tensor as one vector: a batch of frames ``[F, Ny, Nx]`` is one big
system, inner products are ``Re Σ conj(a)·b`` over all elements. Operators are plain callables or
:class:`~recon_core.linop.LinearOperator` objects (which are callables too). Nothing here picks a
device, prints or changes global state; progress is reported through ``callback`` arguments.

Solvers run under whatever autograd mode the caller chose: they use only differentiable torch
operations, so unrolled / differentiable use is possible, and ``torch.no_grad()`` around the call
saves memory when gradients are not wanted. Every iterative solver calls ``callback(it, x, measure)``
after each iteration; a callback that returns ``True`` stops the solver there (time budgets), and
the solver returns its current estimate.

Contents (each used by a method; a solver no method uses is deleted, not kept "just in case")
--------
* :func:`conjugate_gradient` — (N + λI) x = b (CG-SENSE, k-t SLR's x-update, TD-DIP's final DC).
* :func:`power_iteration` — largest eigenvalue of a self-adjoint PSD operator (step sizes, ‖A‖²).
* :func:`fista` — proximal gradient with Beck–Teboulle momentum and adaptive restart (ℓ1-wavelet).
* :func:`nonlinear_cg` — nonlinear CG with backtracking line search for a quadratic data term plus
  a smooth penalty (GRASP's published solver).
* :func:`admm_l1` — ADMM for a quadratic data term plus ``λ‖D x‖₁`` with a CG x-update on the
  (Toeplitz) normal operator, over-relaxation, residual-balancing ρ and a stopping rule on the
  relative primal/dual residuals, as ``bart pics`` solves ``-R T`` (GRASP's default solver).
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
    "power_iteration",
    "fista",
    "nonlinear_cg",
    "admm_l1",
    "temporal_dct_preconditioner",
]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def _rdot(a: Tensor, b: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Re⟨a, b⟩ = Re Σ conj(a)·b over all elements, as a real 0-d tensor (accumulated in ``dtype``).

    Complex inputs of the same dtype are summed as their real views (``Re(ā b) = a_re b_re + a_im b_im``):
    the same value without the complex product, several times faster on the CPU.
    """
    if a.is_complex():
        if b.is_complex() and a.dtype == b.dtype and not a.is_conj() and not b.is_conj():
            return torch.sum(torch.view_as_real(a) * torch.view_as_real(b), dtype=dtype)
        return torch.sum(torch.real(a.conj() * b), dtype=dtype)
    return torch.sum(a * b, dtype=dtype)


def _norm(a: Tensor) -> float:
    # the 2-norm of a complex tensor is that of its real view, which torch computes ~100× faster on the CPU
    if a.is_complex() and not a.is_conj():
        return float(torch.linalg.vector_norm(torch.view_as_real(a)))
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
    callback: Callable[[int, Tensor, float], bool | None] | None = None,
) -> tuple[Tensor, CGInfo]:
    """Solve ``(N + lam·I) x = rhs`` for a self-adjoint positive (semi-)definite ``N`` by CG.

    Used for CG-SENSE (``N = AᴴA``, ``rhs = Aᴴy``) and for k-t SLR's augmented-Lagrangian x-update.

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
        Called as ``callback(it, x, rel_residual)`` after every iteration (``it`` starts at 1);
        returning True stops the iteration there.

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
        stop = callback is not None and bool(callback(it, x, rel))
        if rel < tol:
            converged = True
            break
        if stop:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, CGInfo(len(res) - 1, res, converged)


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
    x = x / _norm(x)
    eig = 0.0
    for _ in range(n_iter):
        y = normal(x)
        eig = float(_rdot(x, y))  # Rayleigh quotient, ‖x‖ = 1
        ny = _norm(y)
        if ny == 0.0:
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
        Per-iteration convergence measure (relative change ``‖xₖ₊₁ − xₖ‖/‖xₖ₊₁‖``).
    converged
        True when the stopping tolerance was reached before ``max_iter``.
    restarts
        Number of momentum restarts (FISTA, nonlinear CG).
    extra
        Solver-specific lists (nonlinear CG: ``objective``, ``line_search_steps``, ``trial_step``).
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
    callback: Callable[[int, Tensor, float], bool | None] | None = None,
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
        ``callback(it, x, rel_change)`` after every iteration; returning True stops there.
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
        if _finish(info, it, x, rel, tol, callback):
            break
    return x, info


def _finish(info: SolverInfo, it: int, x: Tensor, rel: float, tol: float,
            callback: Callable[[int, Tensor, float], bool | None] | None) -> bool:
    """Record iteration ``it`` (relative change ``rel``), call ``callback``; True when the solver stops."""
    info.history.append(rel)
    info.iterations = it
    stop = callback is not None and bool(callback(it, x, rel))
    if rel < tol:
        info.converged = True
        return True
    return stop


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
    fun_and_grad: Callable[[Tensor], tuple[Any, Tensor]] | None,
    x0: Tensor,
    max_iter: int = 50,
    tol: float = 1e-6,
    line_search: LineSearch | tuple | dict | None = None,
    restart_every: int | None = None,
    beta_rule: str = "fr",
    fun: Callable[[Tensor], Any] | None = None,
    callback: Callable[[int, Tensor, float], bool | None] | None = None,
    quadratic: tuple[Callable[[Tensor], Tensor], Tensor] | None = None,
) -> tuple[Tensor, SolverInfo]:
    """Minimise ``q(x) + s(x)`` (real-valued, of a complex tensor) by nonlinear CG.

    ``s`` is a smooth function given by ``fun_and_grad``; ``q`` an optional quadratic
    ``q(x) = Re⟨x, N x⟩ − 2 Re⟨x, b⟩`` (= ``‖A x − y‖² − ‖y‖²`` for ``N = AᴴA``, ``b = Aᴴy``), given
    as ``quadratic=(N, b)``. Along a search direction ``d`` the quadratic is exact,
    ``q(x + t d) − q(x) = 2t·Re⟨d, N x − b⟩ + t²·Re⟨d, N d⟩``, so it costs one application of ``N``
    per iteration and none per line-search step (``N x`` is updated, not recomputed); only ``s`` is
    re-evaluated while backtracking. That is GRASP's data term plus smoothed temporal TV.

    Direction ``dₖ = −gₖ + βₖ dₖ₋₁`` with Fletcher–Reeves ``β = ‖gₖ‖²/‖gₖ₋₁‖²`` (``"fr"``, as in
    GRASP) or Polak–Ribière+ ``β = max(0, Re⟨gₖ, gₖ − gₖ₋₁⟩/‖gₖ₋₁‖²)`` (``"pr"``), a backtracking
    Armijo line search on the decrease ``f(x + t d) − f(x)``, and a restart to steepest descent every
    ``restart_every`` iterations or whenever ``dₖ`` is not a descent direction. Inner products are
    accumulated in float64: the line search compares small differences of large sums.

    Parameters
    ----------
    fun_and_grad
        ``x ↦ (s(x), ∇s(x))``; ``s`` real (float or 0-d tensor), gradient in torch's convention
        (∂s/∂Re + i·∂s/∂Im for complex x), so ``Re⟨∇s, d⟩`` is the directional derivative. None
        when the objective is the quadratic alone.
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
        Optional cheaper value-only ``s`` for the line search (default: ``fun_and_grad(x)[0]``).
    callback
        ``callback(it, x, rel_change)`` after every iteration; returning True stops there.
    quadratic
        ``(N, b)``: a self-adjoint PSD operator (callable) and a tensor like ``x0``.

    Returns
    -------
    x, info
        The last iterate and a :class:`SolverInfo`; ``extra`` holds ``objective`` (``q + s`` after
        each iteration), ``line_search_steps`` and ``trial_step`` (the adapted first trial step,
        to continue in a restarted run with ``LineSearch(t0=…)``).
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
    if fun_and_grad is None and quadratic is None:
        raise ValueError("nothing to minimise: give fun_and_grad, quadratic or both")
    smooth = fun_and_grad
    value = fun if fun is not None else (lambda v: smooth(v)[0])  # type: ignore[misc]
    f64 = torch.float64

    def rdot(a: Tensor, b: Tensor) -> float:
        return float(_rdot(a, b, f64))

    N: Callable[[Tensor], Tensor] | None = None
    if quadratic is not None:
        N, b = quadratic
        if not callable(N):
            raise TypeError("quadratic must be (callable N, tensor b)")
        b = _check_tensor("quadratic b", b)
        if b.shape != x.shape:
            raise ValueError(f"quadratic b has shape {tuple(b.shape)}, x0 has {tuple(x.shape)}")
        nx = N(x)
        q = rdot(x, nx) - 2.0 * rdot(x, b)
    else:
        q = 0.0

    def smooth_at(v: Tensor) -> tuple[float, Tensor | None]:
        if smooth is None:
            return 0.0, None
        sv, sg = smooth(v)
        return float(sv), sg

    def gradient(s_grad: Tensor | None) -> Tensor:
        if N is None:
            return s_grad  # type: ignore[return-value]
        g_q = 2.0 * (nx - b)
        return g_q if s_grad is None else g_q + s_grad

    info = SolverInfo(extra={"objective": [], "line_search_steps": [], "trial_step": []})
    s_val, s_grad = smooth_at(x)
    g = gradient(s_grad)
    gg = rdot(g, g)
    d = -g
    t0 = float(ls.t0)
    since_restart = 0
    for it in range(1, max_iter + 1):
        if gg == 0.0:
            info.converged = True
            break
        slope = rdot(g, d)
        if slope >= 0.0:  # not a descent direction: restart
            d = -g
            slope = -gg
            info.restarts += 1
            since_restart = 0
        if N is not None:
            nd = N(d)
            curv = rdot(d, nd)          # Re⟨d, N d⟩
            half_slope = rdot(d, nx - b)  # Re⟨d, N x − b⟩
        t = t0
        n_ls = 0
        while True:
            delta = 2.0 * t * half_slope + t * t * curv if N is not None else 0.0
            if smooth is not None:
                delta += float(value(x + t * d)) - s_val
            if delta <= ls.alpha * t * slope or n_ls >= ls.max_ls:
                break
            t *= ls.beta
            n_ls += 1
        info.extra["line_search_steps"].append(float(n_ls))
        if delta > ls.alpha * t * slope:
            # Line search failed: no decrease found along d; stop at the current point.
            break
        # Adapt the first trial step (as GRASP does) to keep line searches short.
        if n_ls > 2:
            t0 *= ls.beta
        elif n_ls < 1:
            t0 /= ls.beta
        info.extra["trial_step"].append(t0)
        x = x + t * d
        if N is not None:
            nx = nx + t * nd
            q += 2.0 * t * half_slope + t * t * curv
        s_val, s_grad = smooth_at(x)
        g_new = gradient(s_grad)
        gg_new = rdot(g_new, g_new)
        rel = abs(t) * _norm(d) / max(_norm(x), 1e-30)
        since_restart += 1
        if restart_every is not None and since_restart >= restart_every:
            beta_k = 0.0
            since_restart = 0
            info.restarts += 1
        elif beta_rule == "fr":
            beta_k = gg_new / max(gg, 1e-300)
        else:
            beta_k = max(0.0, rdot(g_new, g_new - g) / max(gg, 1e-300))
        d = -g_new + beta_k * d
        g, gg = g_new, gg_new
        info.extra["objective"].append(q + s_val)
        if _finish(info, it, x, rel, tol, callback):
            break
    return x, info


# --------------------------------------------------------------------------------------------
# ADMM for  ½‖A x − y‖² + λ‖D x‖₁
# --------------------------------------------------------------------------------------------

def admm_l1(
    normal: Callable[[Tensor], Tensor],
    rhs: Tensor,
    D: Any,
    lam: float,
    x0: Tensor,
    rho: float,
    max_iter: int = 50,
    cg_iters: int = 10,
    cg_tol: float = 1e-3,
    rel_tol: float = 1e-3,
    alpha: float = 1.6,
    balance: tuple[float, float] | None = (10.0, 2.0),
    max_cg_total: int | None = None,
    cg_first: int | None = None,
    group_dim: int | None = None,
    callback: Callable[[int, Tensor, float], bool | None] | None = None,
    normal_x0: Tensor | None = None,
    precond: Callable[[Tensor, float], Tensor] | None = None,
) -> tuple[Tensor, SolverInfo]:
    """Minimise ``½‖A x − y‖² + λ‖D x‖₁`` by ADMM (Boyd et al. 2011 §3; ADMM-2 of Afonso et al.).

    Split ``z = D x`` with the scaled multiplier ``u``; per iteration

    1. ``x ← argmin ½‖Ax − y‖² + ρ/2‖Dx − z + u‖²``: CG on ``(AᴴA + ρDᴴD) x = Aᴴy + ρDᴴ(z − u)``,
       warm-started at the previous ``x``, at most ``cg_iters`` steps or relative residual ``cg_tol``;
    2. over-relaxation ``h = α·Dx + (1 − α)·z`` (α = 1.6 as BART's default);
    3. ``z ← soft(h + u, λ/ρ)`` (complex soft threshold; with ``group_dim`` the group shrink along it);
    4. ``u ← u + h − z``;
    5. primal residual ``r = ‖Dx − z‖``, dual ``s = ρ‖Dᴴ(z − z_prev)‖``; stop when
       ``r < rel_tol·max(‖Dx‖, ‖z‖)`` and ``s < rel_tol·ρ‖Dᴴu‖`` (Boyd's rule with relative
       tolerances only, so it does not depend on the data's scale);
    6. residual balancing (Boyd §3.4.1, BART's ``dynamic_rho``): with ``balance = (μ, τ)``,
       ``ρ ← τρ`` when ``r > μs`` and ``ρ ← ρ/τ`` when ``s > μr``, rescaling ``u`` by the inverse.

    The start is warm as BART's: ``z = soft(D x₀, λ/ρ)``, ``u = D x₀ − z``.

    ``AᴴA x`` is carried along (updated from the ``AᴴA p`` of every CG step), so a warm-started
    x-update needs no extra normal-operator application for its initial residual: ``cg_iters``
    steps cost exactly ``cg_iters`` applications (``normal_x0`` = ``AᴴA x₀`` saves the first one).

    Parameters
    ----------
    normal, rhs
        ``AᴴA`` (a callable, e.g. a Toeplitz ``op.normal``) and ``Aᴴy``.
    D
        The sparsifying operator: callable with an ``adjoint`` method (a
        :class:`~recon_core.linop.LinearOperator`, e.g. :func:`recon_core.priors.temporal_tv_op`).
    lam, rho
        ``λ ≥ 0`` and the initial penalty ``ρ > 0`` (same units as ``AᴴA``).
    x0
        Start point.
    max_iter, cg_iters, cg_tol
        ADMM iterations; CG steps and relative tolerance per x-update.
    rel_tol
        Relative primal/dual residual tolerance of the stopping rule (0 disables it).
    alpha
        Over-relaxation in [1, 2) (1 = plain ADMM).
    balance
        ``(μ, τ)`` for residual balancing, or None for a fixed ρ.
    cg_first
        CG steps of the first x-update (default ``cg_iters``): a longer first solve takes the start
        point most of the way to data consistency, which later short solves only refine.
    max_cg_total
        Optional budget of normal-operator applications over the whole run (BART's ``-i`` counts
        these), checked after every iteration.
    group_dim
        Shrink groups along this axis of ``D x`` (isotropic TV) instead of elementwise.
    callback
        ``callback(it, x, rel_change)`` after every iteration; returning True stops there.
    normal_x0
        ``AᴴA x₀`` when the caller has it (e.g. :class:`~recon_core.methods.data_term.DataTerm`'s
        ``normal_x_ref``); else it is computed once.
    precond
        Optional preconditioner of the x-update: ``precond(r, ρ)`` ≈ ``(AᴴA + ρDᴴD)⁻¹ r``
        (self-adjoint positive definite), used by preconditioned CG.

    Returns
    -------
    x, info
        ``info.extra`` holds ``rho``, ``r_norm``, ``s_norm`` and ``cg_iters`` per iteration.
    """
    from recon_core.priors import group_soft_threshold, soft_threshold

    x = _check_tensor("x0", x0)
    rhs = _check_tensor("rhs", rhs)
    if rhs.shape != x.shape:
        raise ValueError(f"rhs shape {tuple(rhs.shape)} differs from x0 shape {tuple(x.shape)}")
    lam = _check_nonneg("lam", lam)
    rho = _check_nonneg("rho", rho)
    if rho == 0.0:
        raise ValueError("rho must be > 0")
    _check_positive_int("max_iter", max_iter)
    _check_positive_int("cg_iters", cg_iters, allow_zero=False)
    if cg_first is not None:
        _check_positive_int("cg_first", cg_first, allow_zero=False)
    rel_tol = _check_nonneg("rel_tol", rel_tol)
    if not 1.0 <= float(alpha) < 2.0:
        raise ValueError(f"alpha must be in [1, 2), got {alpha!r}")
    if balance is not None and (balance[0] <= 1.0 or balance[1] <= 1.0):
        raise ValueError(f"balance must be (mu > 1, tau > 1), got {balance!r}")
    if not callable(D) or not hasattr(D, "adjoint"):
        raise TypeError("D must be callable and have an adjoint method")

    def shrink(v: Tensor, t: float) -> Tensor:
        return group_soft_threshold(v, t, dim=group_dim) if group_dim is not None else soft_threshold(v, t)

    info = SolverInfo(extra={"rho": [], "r_norm": [], "s_norm": [], "cg_iters": []})
    Dx = D(x)
    z = shrink(Dx, lam / rho)
    u = Dx - z
    cg_total = 0
    if normal_x0 is not None:
        normal_x0 = _check_tensor("normal_x0", normal_x0)
        if normal_x0.shape != x.shape:
            raise ValueError(f"normal_x0 shape {tuple(normal_x0.shape)} differs from x0 shape "
                             f"{tuple(x.shape)}")
        Nx = normal_x0
    else:
        Nx = normal(x)
    for it in range(1, max_iter + 1):
        b = rhs + rho * D.adjoint(z - u)
        n_cg = cg_first if (it == 1 and cg_first is not None) else cg_iters
        x_new, Nx, cg = _cg_tracked(normal, D, rho, b, x, Nx, n_cg, cg_tol, precond)
        cg_total += cg.iterations
        rel = _norm(x_new - x) / max(_norm(x_new), 1e-30)
        x = x_new
        Dx = D(x)
        h = alpha * Dx + (1.0 - alpha) * z if alpha != 1.0 else Dx
        z_old = z
        z = shrink(h + u, lam / rho)
        u = u + h - z
        r_norm = _norm(Dx - z)
        s_norm = rho * _norm(D.adjoint(z - z_old))
        info.extra["rho"].append(rho)
        info.extra["r_norm"].append(r_norm)
        info.extra["s_norm"].append(s_norm)
        info.extra["cg_iters"].append(float(cg.iterations))
        info.history.append(rel)
        info.iterations = it
        stop = callback is not None and bool(callback(it, x, rel))
        eps_pri = rel_tol * max(_norm(Dx), _norm(z))
        eps_dual = rel_tol * rho * _norm(D.adjoint(u))
        if rel_tol > 0 and r_norm <= eps_pri and s_norm <= eps_dual:
            info.converged = True
            break
        if stop or (max_cg_total is not None and cg_total >= max_cg_total):
            break
        if balance is not None:
            mu, tau = balance
            if r_norm > mu * s_norm:
                rho *= tau
                u = u / tau
            elif s_norm > mu * r_norm:
                rho /= tau
                u = u * tau
    return x, info


def temporal_dct_preconditioner(n_frames: int, a: float, device: torch.device | str | None = None
                                ) -> Callable[[Tensor, float], Tensor]:
    """``r, ρ ↦ (aI + ρD_tᴴD_t)⁻¹ r`` for ``r [F, ...]``, exact, by an orthonormal DCT-II along axis 0.

    ``D_t`` is the Neumann forward difference along the frames (:func:`recon_core.priors.temporal_tv_op`);
    ``D_tᴴD_t`` is the path-graph Laplacian, diagonalised by the DCT-II with eigenvalues
    ``2 − 2cos(πk/F)``. With ``a`` ≈ the diagonal of ``AᴴA`` this preconditions ADMM's x-update
    ``AᴴA + ρD_tᴴD_t`` (``precond`` of :func:`admm_l1`): it equalises the temporal frequencies
    that ``ρD_tᴴD_t`` spreads apart when ρ is large.
    """
    _check_positive_int("n_frames", n_frames, allow_zero=False)
    if not a > 0:
        raise ValueError(f"a must be > 0, got {a!r}")
    F = int(n_frames)
    n = torch.arange(F, dtype=torch.float64)
    k = n.unsqueeze(1)
    Q = torch.cos(math.pi * k * (2 * n + 1) / (2 * F)) * math.sqrt(2.0 / F)
    Q[0] /= math.sqrt(2.0)
    mu = 2.0 - 2.0 * torch.cos(math.pi * n / F)
    Qc = Q.to(device=device, dtype=torch.float32)
    mu = mu.to(device=device, dtype=torch.float32)

    def apply(r: Tensor, rho: float) -> Tensor:
        q = Qc.to(r.device)
        d = 1.0 / (a + rho * mu.to(r.device))
        flat = r.reshape(F, -1)
        c = torch.complex(q @ flat.real, q @ flat.imag) * d.unsqueeze(1)
        out = torch.complex(q.T @ c.real, q.T @ c.imag)
        return out.reshape(r.shape)

    return apply


def _cg_tracked(normal: Callable[[Tensor], Tensor], D: Any, rho: float, b: Tensor, x: Tensor, Nx: Tensor,
                max_iter: int, tol: float, precond: Callable[[Tensor, float], Tensor] | None
                ) -> tuple[Tensor, Tensor, CGInfo]:
    """(P)CG on ``(N + ρDᴴD) x = b`` from ``x`` with ``Nx = N x`` known; returns ``x, N x, info``.

    The same iteration as :func:`conjugate_gradient` (relative residual ``‖r‖/‖b‖ < tol``), with the
    operator split so ``N x`` is updated from each ``N p`` and the initial residual costs no
    application of ``N``. With ``precond`` it is preconditioned CG (``z = P r``).
    """
    r = b - (Nx + rho * D.adjoint(D(x)))
    b_norm = _norm(b)
    res = [_norm(r)]
    if b_norm == 0.0 or res[0] / b_norm < tol:
        return x, Nx, CGInfo(0, res, True)
    zr = precond(r, rho) if precond is not None else r
    rz = _rdot(r, zr)
    p = zr.clone()
    converged = False
    for _it in range(max_iter):
        Np = normal(p)
        Ap = Np + rho * D.adjoint(D(p))
        pAp = _rdot(p, Ap)
        if float(pAp) <= 0.0:
            break
        a = rz / pAp
        x = x + a * p
        Nx = Nx + a * Np
        r = r - a * Ap
        res.append(_norm(r))
        if res[-1] / b_norm < tol:
            converged = True
            break
        zr = precond(r, rho) if precond is not None else r
        rz_new = _rdot(r, zr)
        p = zr + (rz_new / rz) * p
        rz = rz_new
    return x, Nx, CGInfo(len(res) - 1, res, converged)
