"""NUFFT backends behind one selector.

Every backend implements the same two batched maps, with the project's convention
(DESIGN.md, BRIEFS §0):

* ``forward(images[B, C, Ny, Nx], traj[B, 2, M]) -> kdata[B, C, M]``
  ``y[b, c, m] = Σ_r x[b, c, r] · exp(-i k_m · (r - N//2)) / sqrt(Ny·Nx)``
* ``adjoint(kdata[B, C, M], traj[B, 2, M], image_shape) -> images[B, C, Ny, Nx]``, its exact adjoint.

``traj`` is float32 in radians/voxel in ``[-π, π)``; component 0 is ``ky`` (image axis -2),
component 1 is ``kx`` (image axis -1). A trajectory with batch size 1 is shared by all ``B`` items.
With these choices a NUFFT on the Cartesian grid ``k = 2π (i - N//2) / N`` equals ``fft2c``.

:func:`get_backend` is the one place a backend is chosen; :func:`available_backends` lists the
names usable on this installation. Unnamed, the backend is :data:`DEFAULT_BACKEND` (``"auto"``:
finufft, cufinufft on CUDA, when installed; torchkbnufft otherwise). All backends are differentiable with respect to the images /
k-space data (the gradient of the forward is the adjoint and vice versa); trajectories are treated
as constants.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

Tensor = torch.Tensor

__all__ = [
    "NufftBackend",
    "TorchKbNufftBackend",
    "FinufftBackend",
    "AutoBackend",
    "DEFAULT_BACKEND",
    "available_backends",
    "get_backend",
]


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


# ----------------------------------------------------------------------------------------------
# input checks shared by all backends
# ----------------------------------------------------------------------------------------------

def _check_traj(traj: Tensor, batch: int | None = None) -> None:
    if not isinstance(traj, Tensor):
        raise TypeError(f"traj must be a torch.Tensor, got {type(traj).__name__}")
    if traj.ndim != 3 or traj.shape[1] != 2:
        raise ValueError(f"traj must have shape [B, 2, M] (ky, kx in radians/voxel), got {tuple(traj.shape)}")
    if traj.is_complex() or not traj.is_floating_point():
        raise TypeError(f"traj must be a real floating tensor (float32), got {traj.dtype}")
    if batch is not None and traj.shape[0] not in (1, batch):
        raise ValueError(f"traj batch size {traj.shape[0]} must be 1 or match the data batch size {batch}")


def _check_complex(name: str, x: Tensor, ndim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.complex64:
        raise TypeError(f"{name} must be complex64, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def _check_forward(images: Tensor, traj: Tensor) -> None:
    _check_complex("images", images, 4)
    _check_traj(traj, images.shape[0])
    if traj.device != images.device:
        raise ValueError(f"traj is on {traj.device} but images are on {images.device}")


def _check_adjoint(kdata: Tensor, traj: Tensor, image_shape: Sequence[int]) -> tuple[int, int]:
    _check_complex("kdata", kdata, 3)
    _check_traj(traj, kdata.shape[0])
    if traj.device != kdata.device:
        raise ValueError(f"traj is on {traj.device} but kdata is on {kdata.device}")
    if traj.shape[2] != kdata.shape[2]:
        raise ValueError(f"kdata has {kdata.shape[2]} samples but traj has {traj.shape[2]}")
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"image_shape must be (Ny, Nx) with positive sizes, got {tuple(image_shape)}")
    return shape  # type: ignore[return-value]


class NufftBackend:
    """Interface of a NUFFT backend (see the module docstring for the exact maps)."""

    name: str = "base"

    def forward(self, images: Tensor, traj: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Type-2 NUFFT: images ``[B, C, Ny, Nx]`` → k-space ``[B, C, M]``."""
        raise NotImplementedError

    def adjoint(self, kdata: Tensor, traj: Tensor, image_shape: Sequence[int]) -> Tensor:  # pragma: no cover
        """Type-1 NUFFT (adjoint of :meth:`forward`): ``[B, C, M]`` → ``[B, C, Ny, Nx]``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ----------------------------------------------------------------------------------------------
# torchkbnufft
# ----------------------------------------------------------------------------------------------

class TorchKbNufftBackend(NufftBackend):
    """Kaiser-Bessel gridding NUFFT from ``torchkbnufft`` (CPU and CUDA, pure torch).

    Parameters
    ----------
    oversampling:
        Grid oversampling factor (grid size = ``ceil(oversampling · N)``), 2.0 by default.
    numpoints:
        Interpolation kernel width in grid points (torchkbnufft default 6).
    table_oversamp:
        Oversampling of the kernel look-up table. torchkbnufft's default 2**10 gives ~7e-4 relative
        error against an exact NUDFT (the table lookup dominates); our default 2**12 gives ~2e-4 at
        the same speed (the table is only ``numpoints · table_oversamp`` entries).

    The ``KbNufft``/``KbNufftAdjoint`` modules are built once per (image shape, device) and cached
    on this object; they are differentiable through torchkbnufft's own autograd functions.
    torchkbnufft's own ``norm="ortho"`` divides by the square root of the *grid* size (2× oversampled),
    which is half of the unitary-DFT scaling in 2-D; we therefore run it unnormalised and divide by
    ``sqrt(Ny·Nx)`` ourselves, so that on a Cartesian grid the result equals ``fft2c``.
    """

    name = "torchkbnufft"

    def __init__(self, oversampling: float = 2.0, numpoints: int = 6, table_oversamp: int = 2 ** 12) -> None:
        import torchkbnufft  # noqa: F401  (fail early with a clear ImportError)

        if oversampling < 1.0:
            raise ValueError(f"oversampling must be >= 1, got {oversampling}")
        self.oversampling = float(oversampling)
        self.numpoints = int(numpoints)
        self.table_oversamp = int(table_oversamp)
        self._cache: dict[tuple, Any] = {}

    def _modules(self, image_shape: tuple[int, int], device: torch.device):
        key = (image_shape, str(device))
        mods = self._cache.get(key)
        if mods is None:
            import torchkbnufft as tkbn

            grid = tuple(int(math.ceil(self.oversampling * n)) for n in image_shape)
            opts = dict(im_size=image_shape, grid_size=grid, numpoints=self.numpoints,
                        table_oversamp=self.table_oversamp, dtype=torch.complex64)
            mods = (tkbn.KbNufft(**opts).to(device), tkbn.KbNufftAdjoint(**opts).to(device))
            self._cache[key] = mods
        return mods

    @staticmethod
    def _omega(traj: Tensor) -> Tensor:
        traj = traj.to(torch.float32)
        return traj[0] if traj.shape[0] == 1 else traj

    def forward(self, images: Tensor, traj: Tensor) -> Tensor:
        _check_forward(images, traj)
        shape = tuple(images.shape[-2:])
        fwd, _ = self._modules(shape, images.device)
        return fwd(images, self._omega(traj)) * (1.0 / math.sqrt(shape[0] * shape[1]))

    def adjoint(self, kdata: Tensor, traj: Tensor, image_shape: Sequence[int]) -> Tensor:
        shape = _check_adjoint(kdata, traj, image_shape)
        _, adj = self._modules(shape, kdata.device)
        return adj(kdata, self._omega(traj)) * (1.0 / math.sqrt(shape[0] * shape[1]))

    def __repr__(self) -> str:
        return (f"TorchKbNufftBackend(oversampling={self.oversampling}, numpoints={self.numpoints}, "
                f"table_oversamp={self.table_oversamp})")


# ----------------------------------------------------------------------------------------------
# finufft / cufinufft
# ----------------------------------------------------------------------------------------------

class _FinufftForward(torch.autograd.Function):
    """Type-2 NUFFT whose backward is the type-1 adjoint."""

    @staticmethod
    def forward(ctx, images: Tensor, traj: Tensor,  # type: ignore[override]
                backend: "FinufftBackend") -> Tensor:
        ctx.backend = backend
        ctx.image_shape = tuple(images.shape[-2:])
        ctx.save_for_backward(traj)
        return backend._execute(2, images, traj, ctx.image_shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (traj,) = ctx.saved_tensors
        g = _FinufftAdjoint.apply(grad.contiguous(), traj, ctx.image_shape, ctx.backend)
        return g, None, None


class _FinufftAdjoint(torch.autograd.Function):
    """Type-1 NUFFT whose backward is the type-2 forward."""

    @staticmethod
    def forward(ctx, kdata: Tensor, traj: Tensor, image_shape: tuple[int, int],  # type: ignore[override]
                backend: "FinufftBackend") -> Tensor:
        ctx.backend = backend
        ctx.save_for_backward(traj)
        return backend._execute(1, kdata, traj, image_shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (traj,) = ctx.saved_tensors
        g = _FinufftForward.apply(grad.contiguous(), traj, ctx.backend)
        return g, None, None, None


#: Below these sizes (samples × channels, image pixels) finufft runs single-threaded by default.
_SMALL_POINTS = 2 ** 14
_SMALL_PIXELS = 2 ** 12


class FinufftBackend(NufftBackend):
    """Flatiron NUFFT: ``finufft`` on CPU tensors, ``cufinufft`` on CUDA tensors (when installed).

    Parameters
    ----------
    eps:
        Requested relative accuracy (default 1e-6, near the single-precision limit).
    nthreads:
        CPU threads for finufft; ``None`` uses ``torch.get_num_threads()`` at call time, so the
        caller's torch thread setting also governs the NUFFT, except for tiny problems (at most
        16384 samples × channels and 4096 pixels), which run on one thread: there OpenMP start-up
        and barrier waits cost 100× the work when other processes share the cores.
    upsampfac:
        Optional grid upsampling factor passed to finufft (``None`` = finufft's choice).

    Mapping to finufft's conventions: finufft's mode index ``k1`` of an ``(N1, N2)`` array runs over
    ``-N1//2 … (N1-1)//2`` in CMCL order (``modeord=0``), which is exactly our centred pixel index
    ``r - N//2``; our k-space "frequency" plays the role of finufft's non-uniform point, the first
    point coordinate pairs with the first (``Ny``) mode axis, and our forward sign ``exp(-i k·r)``
    is finufft's ``isign=-1`` (type 2); the adjoint is type 1 with ``isign=+1``. The ``ortho``
    factor ``1/sqrt(Ny·Nx)`` is applied to both.
    """

    name = "finufft"

    def __init__(self, eps: float = 1e-6, nthreads: int | None = None,
                 upsampfac: float | None = None) -> None:
        import finufft  # noqa: F401

        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if nthreads is not None and int(nthreads) < 1:
            raise ValueError(f"nthreads must be >= 1 or None, got {nthreads}")
        self.eps = float(eps)
        self.nthreads = None if nthreads is None else int(nthreads)
        self.upsampfac = upsampfac

    # -- public maps -------------------------------------------------------------------------
    def forward(self, images: Tensor, traj: Tensor) -> Tensor:
        _check_forward(images, traj)
        return _FinufftForward.apply(images.contiguous(), traj.detach(), self)

    def adjoint(self, kdata: Tensor, traj: Tensor, image_shape: Sequence[int]) -> Tensor:
        shape = _check_adjoint(kdata, traj, image_shape)
        return _FinufftAdjoint.apply(kdata.contiguous(), traj.detach(), shape, self)

    # -- implementation ----------------------------------------------------------------------
    def _opts(self) -> dict:
        opts: dict[str, Any] = {"modeord": 0}
        if self.upsampfac is not None:
            opts["upsampfac"] = float(self.upsampfac)
        return opts

    def threads_for(self, n_points: int, n_coils: int, image_shape: Sequence[int]) -> int:
        """finufft threads for ``n_coils`` transforms of ``n_points`` points (bench.operators uses it too)."""
        if self.nthreads is not None:
            return self.nthreads
        if n_points * n_coils <= _SMALL_POINTS and image_shape[0] * image_shape[1] <= _SMALL_PIXELS:
            return 1  # tiny problems: thread start-up and barriers cost far more than the work
        return torch.get_num_threads()

    def _execute(self, nufft_type: int, data: Tensor, traj: Tensor, image_shape: tuple[int, int]) -> Tensor:
        if data.is_cuda:
            return self._execute_cuda(nufft_type, data, traj, image_shape)
        if data.device.type != "cpu":
            raise ValueError(f"finufft backend supports CPU and CUDA tensors, got device {data.device}")
        import finufft
        import numpy as np

        B, C = data.shape[0], data.shape[1]
        Ny, Nx = image_shape
        scale = 1.0 / math.sqrt(Ny * Nx)
        M = traj.shape[2]
        nthreads = self.threads_for(M, C, (Ny, Nx))
        isign = -1 if nufft_type == 2 else 1
        plan = finufft.Plan(nufft_type, (Ny, Nx), n_trans=C, eps=self.eps, isign=isign,
                            dtype="complex64", nthreads=nthreads, **self._opts())
        pts = traj.detach().to(torch.float32).cpu().numpy()
        src = data.detach().resolve_conj().numpy()
        out_shape = (B, C, M) if nufft_type == 2 else (B, C, Ny, Nx)
        out = np.empty(out_shape, dtype=np.complex64)
        # the 1/sqrt(N) scaling on the smaller side: a scaled copy of a smaller input costs less than a
        # pass over a larger output (type 1: k-space in, images out)
        scale_input = B > 0 and src[0].size < math.prod(out_shape[1:])
        if scale_input:
            src = np.multiply(src, np.float32(scale), order="C")
        elif not src.flags.c_contiguous:
            src = np.ascontiguousarray(src)
        pts = np.ascontiguousarray(pts)
        for b in range(B):
            if b == 0 or pts.shape[0] > 1:
                p = pts[b if pts.shape[0] > 1 else 0]
                plan.setpts(p[0], p[1])
            plan.execute(src[b], out=out[b])      # written in place: no per-frame result copy
        result = torch.from_numpy(out)
        if not scale_input:
            result.mul_(scale)
        return result

    def _execute_cuda(self, nufft_type: int, data: Tensor, traj: Tensor,
                      image_shape: tuple[int, int]) -> Tensor:  # pragma: no cover - needs cufinufft + GPU
        try:
            import cufinufft
        except Exception as exc:
            raise ValueError(
                "finufft backend got CUDA tensors but cufinufft is not installed; "
                "use backend 'torchkbnufft' or 'auto' on CUDA") from exc
        B, C = data.shape[0], data.shape[1]
        Ny, Nx = image_shape
        scale = 1.0 / math.sqrt(Ny * Nx)
        isign = -1 if nufft_type == 2 else 1
        with torch.cuda.device(data.device):
            plan = cufinufft.Plan(nufft_type, (Ny, Nx), n_trans=C, eps=self.eps, isign=isign,
                                  dtype="complex64", modeord=0)
            pts = traj.detach().to(torch.float32)
            outs = []
            for b in range(B):
                if b == 0 or pts.shape[0] > 1:
                    p = pts[b if pts.shape[0] > 1 else 0]
                    ky, kx = p[0].contiguous(), p[1].contiguous()
                    plan.setpts(ky, kx)
                outs.append(plan.execute(data[b].detach().resolve_conj().contiguous()))
            out = torch.stack([torch.as_tensor(o, device=data.device) for o in outs])
        shape = (B, C, traj.shape[2]) if nufft_type == 2 else (B, C, Ny, Nx)
        return out.reshape(shape) * scale

    def __repr__(self) -> str:
        return f"FinufftBackend(eps={self.eps}, nthreads={self.nthreads}, upsampfac={self.upsampfac})"


# ----------------------------------------------------------------------------------------------
# auto
# ----------------------------------------------------------------------------------------------

class AutoBackend(NufftBackend):
    """Routes each call by the data's device: finufft on CPU (when installed), cufinufft on CUDA
    (when installed), torchkbnufft otherwise. Options are passed to the backend they apply to."""

    name = "auto"

    def __init__(self, eps: float = 1e-6, nthreads: int | None = None) -> None:
        self._finufft = FinufftBackend(eps=eps, nthreads=nthreads) if _importable("finufft") else None
        self._cufinufft_ok = _importable("cufinufft")
        self._tkbn: TorchKbNufftBackend | None = None

    def _pick(self, x: Tensor) -> NufftBackend:
        if self._finufft is not None and (x.device.type == "cpu" or (x.is_cuda and self._cufinufft_ok)):
            return self._finufft
        if self._tkbn is None:
            self._tkbn = TorchKbNufftBackend()
        return self._tkbn

    def forward(self, images: Tensor, traj: Tensor) -> Tensor:
        return self._pick(images).forward(images, traj)

    def adjoint(self, kdata: Tensor, traj: Tensor, image_shape: Sequence[int]) -> Tensor:
        return self._pick(kdata).adjoint(kdata, traj, image_shape)


_BACKENDS: dict[str, tuple[type, str | None]] = {
    "torchkbnufft": (TorchKbNufftBackend, "torchkbnufft"),
    "finufft": (FinufftBackend, "finufft"),
    "auto": (AutoBackend, None),
}


def available_backends() -> list[str]:
    """Names accepted by :func:`get_backend` whose libraries import on this installation."""
    return [name for name, (_, mod) in _BACKENDS.items() if mod is None or _importable(mod)]


#: the backend used when none is named (chains, :func:`recon_core.methods.make_problem`, the operators):
#: finufft on CPU and cufinufft on CUDA when installed, torchkbnufft otherwise
DEFAULT_BACKEND = "auto"


def get_backend(name: str | NufftBackend = DEFAULT_BACKEND, **options: Any) -> NufftBackend:
    """Return a NUFFT backend by name — the one place a backend is chosen.

    Parameters
    ----------
    name:
        ``"torchkbnufft"``, ``"finufft"`` (cufinufft for CUDA tensors) or ``"auto"`` (finufft on CPU
        when importable, else torchkbnufft; the default, :data:`DEFAULT_BACKEND`). A backend instance
        is returned unchanged.
    **options:
        Backend options, e.g. ``eps``/``nthreads`` for finufft, ``numpoints`` for torchkbnufft.

    Raises
    ------
    ValueError
        Unknown name (the message lists the known ones) or a backend whose library is missing.
    """
    if isinstance(name, NufftBackend):
        if options:
            raise ValueError("options cannot be given together with a backend instance")
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name or a NufftBackend, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in _BACKENDS:
        raise ValueError(f"unknown NUFFT backend {name!r}; known backends: {sorted(_BACKENDS)}")
    cls, mod = _BACKENDS[key]
    if mod is not None and not _importable(mod):
        raise ValueError(f"NUFFT backend {name!r} needs the {mod!r} package, which is not installed; "
                         f"available: {available_backends()}")
    try:
        return cls(**options)
    except TypeError as exc:
        raise ValueError(f"bad options for NUFFT backend {name!r}: {exc}") from exc
