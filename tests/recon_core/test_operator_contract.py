"""One contract for every linear operator in ``recon_core`` (STYLE.md §3.3, DI's ``OPERATORS`` catalog).

Every module under ``recon_core`` is imported and every concrete :class:`LinearOperator` subclass
(recursively, private ones included) is looked up in :data:`FACTORIES` by ``"module:QualName"``.
Each factory builds small instances; each instance must pass the adjoint (dot-product), normal
(``normal`` = adjoint∘forward, fast override or not) and autograd-is-adjoint checks, for ``A``,
``Aᴴ`` and ``AᴴA``. Instances marked ``frames=True`` must also offer ``select_frames`` that equals
the full operator on the chosen frames; all others must refuse it with a ``NotImplementedError``
that names their class. A subclass without a factory fails :func:`test_every_operator_has_a_factory`,
so a new operator cannot skip these checks.

The composed SENSE operators are also pinned against explicit (NU)DFT matrices here.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

import recon_core
from recon_core.linop import ComposedOperator, Identity, LinearOperator, Multiply
from recon_core.operators import (FFT2, CartesianSense, CoilMaps, NonCartesianSense, Nufft, SampleWeights,
                                  Sampling)
from recon_core.priors import FiniteDifference, TemporalFFT, WaveletTransform
from tests.helpers import check_operator, check_select_frames, dense_matrix, randc

F, C, SHAPE, M = 3, 2, (8, 6), 24


# ---------------------------------------------------------------------------------------------
# discovery


def _import_all() -> list[str]:
    """Import every module under recon_core; return the names of those that failed (with the error)."""
    failed = []
    for info in pkgutil.walk_packages(recon_core.__path__, "recon_core."):
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # reported by test_every_module_imports
            failed.append(f"{info.name}: {type(exc).__name__}: {exc}")
    return failed


_IMPORT_ERRORS = _import_all()


def _subclasses(cls: type) -> list[type]:
    out: list[type] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def _is_concrete(cls: type) -> bool:
    return (not inspect.isabstract(cls) and cls.forward is not LinearOperator.forward
            and cls.adjoint is not LinearOperator.adjoint)


def key_of(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def discovered() -> dict[str, type]:
    """Concrete LinearOperator subclasses defined in recon_core, by ``module:QualName``."""
    found = {}
    for cls in _subclasses(LinearOperator):
        if (cls.__module__ == "recon_core" or cls.__module__.startswith("recon_core.")) and _is_concrete(cls):
            found[key_of(cls)] = cls
    return dict(sorted(found.items()))


# ---------------------------------------------------------------------------------------------
# small instances


@dataclass
class Case:
    """One small instance: tolerances for its checks and whether it has a frame axis."""

    op: LinearOperator
    frames: bool = False
    rtol: float = 1e-4
    normal_rtol: float = 1e-4


def maps(n_coils: int = C, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    s = randc((n_coils,) + tuple(shape), seed=seed)
    return (s / torch.sqrt(torch.sum(s.abs() ** 2, dim=0, keepdim=True))).to(torch.complex64)


def traj(n_frames: int = F, m: int = M, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n_frames, 2, m, generator=g) * 2 - 1) * math.pi).to(torch.float32)


def mask(n_frames: int = F, shape=SHAPE, seed: int = 2, binary: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.rand((n_frames,) + tuple(shape), generator=g)
    return (r > 0.4).to(torch.float32) if binary else r


def weights(n_frames: int = F, m: int = M, seed: int = 3) -> torch.Tensor:
    return torch.rand(n_frames, m, generator=torch.Generator().manual_seed(seed)) + 0.2


def cart_sense(shared_mask: bool = False) -> CartesianSense:
    return CartesianSense(maps(), mask(1 if shared_mask else F, binary=not shared_mask), F)


def nc_sense(backend: str = "finufft", use_weights: bool = True, toeplitz: bool = True) -> NonCartesianSense:
    return NonCartesianSense(maps(), traj(), SHAPE, backend=backend,
                             weights=weights() if use_weights else None, toeplitz=toeplitz)


def _tkbn_tol(case: Case) -> Case:
    case.rtol, case.normal_rtol = 1e-4, 2e-3
    return case


Factory = Callable[[type], list]

#: ``"module:QualName"`` → factory(cls) returning small instances (Cases or bare operators) of ``cls``.
FACTORIES: dict[str, Factory] = {
    # -- recon_core.linop --------------------------------------------------------------------
    "recon_core.linop:AdjointOperator": lambda cls: [
        Case(cls(cart_sense()), frames=True),
        Case(cls(nc_sense()), frames=True, normal_rtol=1e-3),
        Case(cls(WaveletTransform((F,) + SHAPE, levels=1))),
    ],
    "recon_core.linop:NormalOperator": lambda cls: [
        Case(cls(cart_sense(shared_mask=True)), frames=True),
        Case(cls(nc_sense()), frames=True, normal_rtol=1e-3),
        Case(cls(FiniteDifference((F,) + SHAPE, dims=(0, 2)))),
    ],
    "recon_core.linop:ComposedOperator": lambda cls: [
        Case(cls(Sampling(mask(), F, C) @ FFT2((F, C) + SHAPE), CoilMaps(maps(), F)), frames=True),
        Case(cls(Multiply(randc((F,) + SHAPE, seed=4)), TemporalFFT((F,) + SHAPE))),
    ],
    "recon_core.linop:SumOperator": lambda cls: [
        Case(cls(cart_sense(), CartesianSense(maps(seed=5), mask(1, seed=6), F)), frames=True),
        Case(cls(Identity((F,) + SHAPE), Multiply(randc((F,) + SHAPE, seed=7)),
                 TemporalFFT((F,) + SHAPE))),
    ],
    "recon_core.linop:ScaledOperator": lambda cls: [
        Case(cls(0.5 - 2j, nc_sense()), frames=True, normal_rtol=1e-3),
        Case(cls(-3, Multiply(randc((F,) + SHAPE, seed=8)))),
    ],
    "recon_core.linop:Identity": lambda cls: [Case(cls((F,) + SHAPE))],
    "recon_core.linop:Multiply": lambda cls: [
        Case(cls(randc((F,) + SHAPE, seed=9))),
        Case(cls(torch.rand(SHAPE, generator=torch.Generator().manual_seed(10)), (F,) + SHAPE)),
    ],
    # -- recon_core.operators ----------------------------------------------------------------
    "recon_core.operators:CoilMaps": lambda cls: [Case(cls(maps(3), F), frames=True)],
    "recon_core.operators:FFT2": lambda cls: [Case(cls((F, C) + SHAPE), frames=True), Case(cls((7, 5)))],
    "recon_core.operators:Sampling": lambda cls: [
        Case(cls(mask(), F, C), frames=True),
        Case(cls(mask(1, binary=False), F, C), frames=True),
    ],
    "recon_core.operators:SampleWeights": lambda cls: [
        Case(cls(weights(), F, C), frames=True),
        Case(cls(weights(1), F, C), frames=True),
    ],
    "recon_core.operators:Nufft": lambda cls: [
        Case(cls(traj(), SHAPE, backend="finufft", n_coils=C), frames=True),
        _tkbn_tol(Case(cls(traj(), (7, 5), backend="torchkbnufft", n_coils=1), frames=True)),
    ],
    "recon_core.operators:CartesianSense": lambda cls: [
        Case(cls(maps(), mask(), F), frames=True),
        Case(cls(maps(), mask(1, binary=False), F), frames=True),
    ],
    "recon_core.operators:NonCartesianSense": lambda cls: [
        Case(cls(maps(), traj(), SHAPE, backend="finufft", weights=weights(), toeplitz=True),
             frames=True, normal_rtol=1e-4),
        Case(cls(maps(), traj(), SHAPE, backend="finufft"), frames=True),
        _tkbn_tol(Case(cls(maps(), traj(), SHAPE, backend="torchkbnufft", toeplitz=True), frames=True)),
    ],
    # -- recon_core.priors -------------------------------------------------------------------
    "recon_core.priors:WaveletTransform": lambda cls: [
        Case(cls((F, 8, 8), wavelet="db2", levels=2)),
        Case(cls((F,) + SHAPE, wavelet="haar", levels=2, mode="pad")),
    ],
    "recon_core.priors:FiniteDifference": lambda cls: [
        Case(cls((F,) + SHAPE, dims=(2, 1, 0), weights=(1.0, 0.5, 2.0),
                 boundary=("periodic", "periodic", "neumann"))),
        Case(cls((F,) + SHAPE, dims=(0,), boundary="neumann")),
    ],
    "recon_core.priors:TemporalFFT": lambda cls: [Case(cls((F,) + SHAPE)),
                                                  Case(cls((4, 5, 3), centered=False))],
}


def build_cases(key: str, cls: type) -> list[Case]:
    cases = [c if isinstance(c, Case) else Case(c) for c in FACTORIES[key](cls)]
    assert cases, f"the factory for {key} built no instance"
    assert any(type(c.op) is cls for c in cases), \
        f"the factory for {key} must build at least one instance of exactly {cls.__name__}"
    return cases


# ---------------------------------------------------------------------------------------------
# the contract


def test_every_module_imports():
    assert not _IMPORT_ERRORS, "modules under recon_core failed to import:\n" + "\n".join(_IMPORT_ERRORS)


def test_every_operator_has_a_factory():
    missing = [k for k in discovered() if k not in FACTORIES]
    assert not missing, "\n".join(f"add a factory for {k} in test_operator_contract.py" for k in missing)


def test_no_stale_factories():
    stale = sorted(set(FACTORIES) - set(discovered()))
    assert not stale, "\n".join(f"the factory for {k} names no operator in recon_core any more; remove it "
                                f"from test_operator_contract.py" for k in stale)


@pytest.mark.parametrize("key", list(discovered()))
def test_operator_contract(key):
    if key not in FACTORIES:
        pytest.fail(f"add a factory for {key} in test_operator_contract.py")
    for i, case in enumerate(build_cases(key, discovered()[key])):
        try:
            check_operator(case.op, rtol=case.rtol, normal_rtol=case.normal_rtol, seed=10 * i)
        except AssertionError as exc:
            raise AssertionError(f"{key} instance {i} ({case.op!r}): {exc}") from exc


@pytest.mark.parametrize("key", list(discovered()))
def test_select_frames_contract(key):
    if key not in FACTORIES:
        pytest.fail(f"add a factory for {key} in test_operator_contract.py")
    for i, case in enumerate(build_cases(key, discovered()[key])):
        op = case.op
        if not case.frames:
            with pytest.raises(NotImplementedError, match=type(op).__name__):
                op.select_frames([0])
            continue
        n = op.ishape[0]
        sel = check_select_frames(op, [n - 1, 0], rtol=max(case.rtol, 1e-5))
        assert type(sel) is type(op), f"{key}: select_frames returned {type(sel).__name__}"
        # a LongTensor works as well as a list, and one frame as well as several
        one = op.select_frames(torch.tensor([1]))
        assert tuple(one.ishape) == (1,) + tuple(op.ishape[1:])
        with pytest.raises(IndexError):
            op.select_frames([n])


# ---------------------------------------------------------------------------------------------
# select_frames specifics


def test_select_frames_shares_a_common_mask_and_slices_per_frame_ones():
    shared = CartesianSense(maps(), mask(1), F)
    sel = shared.select_frames([2, 1])
    assert sel.mask.shape == (1,) + SHAPE and sel.mask.data_ptr() == shared.mask.data_ptr()
    per = CartesianSense(maps(), mask(F), F)
    sel = per.select_frames(torch.tensor([2, 0]))
    assert torch.equal(sel.mask, per.mask[[2, 0]])
    assert sel.coil_maps.data_ptr() == per.coil_maps.data_ptr()  # maps are shared, not copied
    # the fast normal's shifted maps/mask are built lazily, then shared or sliced by select_frames
    assert per._maps_shifted is None
    x = randc((F,) + SHAPE, seed=23)
    per.normal(x)
    sel = per.select_frames([2, 0])
    assert sel._maps_shifted is per._maps_shifted
    assert torch.equal(sel._mask2_shifted, per._mask2_shifted[[2, 0]])
    assert torch.allclose(sel.normal(x[[2, 0]]), per.normal(x)[[2, 0]], atol=1e-6)


def test_select_frames_slices_a_built_toeplitz_kernel(monkeypatch):
    op = nc_sense(backend="finufft", toeplitz=True)
    assert op.select_frames([0]).toeplitz_kernel is None   # not built yet: stays lazy
    kernel = op.precompute_toeplitz()
    idx = torch.tensor([2, 0])

    def no_rebuild(self):  # pragma: no cover - reached only when the kernel would be rebuilt
        raise AssertionError("the selected operator rebuilt its Toeplitz kernel")

    monkeypatch.setattr(NonCartesianSense, "precompute_toeplitz", no_rebuild)
    sel = op.select_frames(idx)
    assert sel.toeplitz and torch.equal(sel.toeplitz_kernel, kernel[idx])
    assert torch.equal(sel.trajectory, op.trajectory[idx]) and torch.equal(sel.weights, op.weights[idx])
    x = randc(sel.ishape, seed=11)
    full = torch.zeros((F,) + SHAPE, dtype=torch.complex64).index_copy(0, idx, x)
    assert torch.allclose(sel.normal(x), op.normal(full)[idx], atol=1e-6)


def test_select_frames_errors_name_the_problem():
    op = cart_sense()
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        op.select_frames([0, 3])
    with pytest.raises(ValueError, match="at least one"):
        op.select_frames([])
    with pytest.raises(TypeError, match="integers"):
        op.select_frames(torch.tensor([0.0]))
    comp = Multiply(randc((F,) + SHAPE)) @ op.H
    with pytest.raises(NotImplementedError, match="Multiply"):
        comp.select_frames([0])


def test_select_frames_of_compositions_delegates():
    A = cart_sense()
    t1 = 2j * (A + cart_sense(shared_mask=True))
    t2 = Sampling(mask(seed=21), F, C) @ FFT2((F, C) + SHAPE) @ CoilMaps(maps(seed=22), F)
    op = (t1 - t2).H @ (0.5 * A) + A.N + nc_sense().N / 3
    sel = check_select_frames(op, [1, 2])
    assert tuple(sel.ishape) == (2,) + SHAPE


# ---------------------------------------------------------------------------------------------
# composed SENSE = the named operators = explicit (NU)DFT matrices


def centered_dft(n: int) -> np.ndarray:
    k = np.arange(n) - n // 2
    return np.exp(-2j * np.pi * np.outer(k, k) / n) / math.sqrt(n)


def nudft_matrix(t: np.ndarray, shape) -> np.ndarray:
    ny, nx = shape
    ry, rx = np.arange(ny) - ny // 2, np.arange(nx) - nx // 2
    ph = t[0][:, None, None] * ry[None, :, None] + t[1][:, None, None] * rx[None, None, :]
    return (np.exp(-1j * ph) / math.sqrt(ny * nx)).reshape(t.shape[1], ny * nx)


@pytest.mark.parametrize("shape", [(4, 3), (5, 4)])
def test_composed_cartesian_sense_is_the_exact_dft(shape):
    nf, nc = 2, 2
    S, m = maps(nc, shape, seed=12), mask(nf, shape, seed=13, binary=False)
    comp = Sampling(m, nf, nc) @ FFT2((nf, nc) + shape) @ CoilMaps(S, nf)
    named = CartesianSense(S, m, nf)
    assert isinstance(named, ComposedOperator)
    x = randc((nf,) + shape, seed=14)
    assert torch.equal(comp(x), named(x))                     # the same operations, bit for bit
    y = randc((nf, nc) + shape, seed=15)
    assert torch.equal(comp.adjoint(y), named.adjoint(y))
    assert torch.allclose(comp.normal(x), named.normal(x), atol=1e-6)
    D = np.kron(centered_dft(shape[0]), centered_dft(shape[1]))
    Sn = S.numpy().astype(np.complex128).reshape(nc, -1)
    A = np.zeros((nf, nc, D.shape[0], nf, D.shape[1]), dtype=np.complex128)
    for f in range(nf):
        for c in range(nc):
            A[f, c, :, f, :] = m[f].double().numpy().reshape(-1, 1) * D * Sn[c][None, :]
    A = A.reshape(nf * nc * D.shape[0], nf * D.shape[1])
    scale = np.max(np.abs(A))
    assert np.max(np.abs(dense_matrix(comp, comp.ishape).numpy() - A)) / scale < 1e-6
    assert np.max(np.abs(dense_matrix(comp.adjoint, comp.oshape).numpy() - A.conj().T)) / scale < 1e-6
    G = A.conj().T @ A
    assert np.max(np.abs(dense_matrix(named.normal, named.ishape).numpy() - G)) / np.max(np.abs(G)) < 1e-6


def test_composed_noncartesian_sense_is_the_exact_nudft():
    nf, nc, m, shape = 2, 2, 15, (5, 4)
    S, t, w = maps(nc, shape, seed=16), traj(nf, m, seed=17), weights(nf, m, seed=18)
    comp = SampleWeights(w, nf, nc) @ Nufft(t, shape, backend="finufft", n_coils=nc) @ CoilMaps(S, nf)
    named = NonCartesianSense(S, t, shape, backend="finufft", weights=w, toeplitz=True)
    x = randc((nf,) + shape, seed=19)
    assert torch.equal(comp(x), named(x))
    y = randc((nf, nc, m), seed=20)
    assert torch.equal(comp.adjoint(y), named.adjoint(y))
    rows = []
    for f in range(nf):
        A = nudft_matrix(t[f].double().numpy(), shape) * w[f].double().numpy()[:, None]
        Sc = S.numpy().astype(np.complex128).reshape(nc, 1, -1)
        rows.append(np.concatenate([A * Sc[c] for c in range(nc)]))
    E = np.zeros((nf, nc * m, nf, shape[0] * shape[1]), dtype=np.complex128)
    for f in range(nf):
        E[f, :, f, :] = rows[f]
    E = E.reshape(nf * nc * m, -1)
    dense = dense_matrix(comp, comp.ishape).numpy()
    assert np.linalg.norm(dense - E) / np.linalg.norm(E) < 1e-5
    G = E.conj().T @ E
    toep = dense_matrix(named.normal, named.ishape).numpy()            # Toeplitz embedding
    assert np.linalg.norm(toep - G) / np.linalg.norm(G) < 1e-5
    plain = dense_matrix(comp.normal, comp.ishape).numpy()             # Bᴴ (W·NUFFT).N B
    assert np.linalg.norm(plain - G) / np.linalg.norm(G) < 1e-5
