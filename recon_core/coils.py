"""Coil tools: noise prewhitening, coil compression (SVD, GCC) and coil sensitivities (Walsh, Inati, ESPIRiT).

Everything works on torch tensors on the device of the inputs and keeps their complex dtype
(complex64 in this project). Shapes follow the project conventions: coil images and coil maps
``[C, Ny, Nx]``, centred k-space ``[C, Ny, Nx]`` (DC at index ``N // 2``, see :mod:`recon_core.fft`).

References
----------
* Roemer et al., MRM 16:192 (1990); Kellman & McVeigh, MRM 54:1439 (2005) — noise prewhitening.
* Buehrer et al., MRM 57:1131 (2007); Huang et al., MRI 26:133 (2008) — SVD/PCA coil compression.
* Zhang et al., MRM 69:571 (2013) — geometric-decomposition coil compression (GCC).
* Walsh et al., MRM 43:682 (2000); Inati et al., ISMRM 2014 p. 4407 — adaptive coil maps.
* Uecker et al., MRM 71:990 (2014) — ESPIRiT.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from recon_core.fft import fft1c, fft2c, ifft1c, ifft2c
from recon_core.nufft import DEFAULT_BACKEND

Tensor = torch.Tensor

__all__ = [
    "noise_covariance",
    "prewhitening_matrix",
    "prewhiten",
    "noise_bandwidth_scale",
    "svd_compression_matrix",
    "apply_compression",
    "gcc_compression_matrices",
    "apply_gcc",
    "walsh_maps",
    "inati_maps",
    "espirit_maps",
    "calibration_region",
    "lowres_coil_images",
    "gridded_coil_images",
    "object_mask",
    "map_coverage",
    "calib_from_images",
    "normalize_maps",
]


# --------------------------------------------------------------------------------------------
# argument checks and small helpers
# --------------------------------------------------------------------------------------------

def _check_complex(x: object, name: str, ndim: int | None = None, min_ndim: int | None = None) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_complex():
        raise TypeError(f"{name} must be a complex tensor (complex64), got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def _check_int(v: object, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _pair(v: int | Sequence[int], name: str, minimum: int = 1) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (_check_int(v, name, minimum),) * 2
    vals = tuple(v)
    if len(vals) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return (_check_int(vals[0], name, minimum), _check_int(vals[1], name, minimum))


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.complex128 else torch.float32


def _apply_coil_matrix(data: Tensor, matrix: Tensor, coil_dim: int, name: str) -> Tensor:
    """``out[..., v, ...] = Σ_c matrix[v, c] · data[..., c, ...]`` along ``coil_dim``."""
    _check_complex(data, "data", min_ndim=1)
    _check_complex(matrix, name, ndim=2)
    if not -data.ndim <= coil_dim < data.ndim:
        raise ValueError(f"coil_dim={coil_dim} is out of range for data of shape {tuple(data.shape)}")
    n_coils = data.shape[coil_dim]
    if matrix.shape[1] != n_coils:
        raise ValueError(
            f"{name} has shape {tuple(matrix.shape)} but data has {n_coils} coils along coil_dim={coil_dim}"
        )
    x = torch.movedim(data, coil_dim, -1)
    y = torch.matmul(x, matrix.to(device=data.device, dtype=data.dtype).transpose(0, 1))
    return torch.movedim(y, -1, coil_dim)


# --------------------------------------------------------------------------------------------
# noise
# --------------------------------------------------------------------------------------------

def noise_covariance(noise: Tensor, remove_mean: bool = True) -> Tensor:
    """Sample covariance ``Ψ[i, j] = E{n_i conj(n_j)}`` of noise samples, unbiased.

    Parameters
    ----------
    noise : ``[C, N]`` (or ``[C, ...]``, flattened) complex noise samples, coil axis first.
    remove_mean : subtract the per-coil mean first (a receiver DC offset is not noise). The
        estimate divides by ``N - 1`` in either case, which is unbiased with the mean removed
        and differs from the zero-mean estimator by ``N/(N-1)`` otherwise.

    Returns
    -------
    ``[C, C]`` Hermitian covariance matrix, same dtype and device as ``noise``.
    """
    _check_complex(noise, "noise", min_ndim=2)
    x = noise.reshape(noise.shape[0], -1)
    n = x.shape[1]
    if n < 2:
        raise ValueError(f"noise must hold at least 2 samples per coil, got shape {tuple(noise.shape)}")
    if remove_mean:
        x = x - x.mean(dim=1, keepdim=True)
    cov = (x @ x.conj().transpose(0, 1)) / (n - 1)
    return 0.5 * (cov + cov.conj().transpose(0, 1))


def prewhitening_matrix(cov: Tensor) -> Tensor:
    """Prewhitening matrix ``W = L⁻¹`` with ``Ψ = L Lᴴ`` (Cholesky) of a noise covariance ``Ψ``.

    Applied along the coil axis (``y = W x``, see :func:`prewhiten`) it decorrelates the coils
    and scales them so that the whitened noise has identity covariance:
    ``W Ψ Wᴴ = L⁻¹ L Lᴴ L⁻ᴴ = I``. ``W`` is lower triangular, so coil ``c`` of the result depends
    only on coils ``0..c`` of the input.

    Parameters
    ----------
    cov : ``[C, C]`` Hermitian positive definite noise covariance (e.g. :func:`noise_covariance`).

    Returns
    -------
    ``[C, C]`` lower-triangular prewhitening matrix, dtype and device of ``cov``.

    Raises
    ------
    ValueError
        When ``cov`` is not square, not Hermitian, or not positive definite.
    """
    _check_complex(cov, "cov", ndim=2)
    c = cov.shape[0]
    if cov.shape[1] != c:
        raise ValueError(f"cov must be square [C, C], got shape {tuple(cov.shape)}")
    c128 = cov.to(torch.complex128)
    scale = float(c128.abs().max())
    if scale == 0.0 or not math.isfinite(scale):
        raise ValueError("cov must be finite and non-zero")
    if float((c128 - c128.conj().T).abs().max()) > 1e-4 * scale:
        raise ValueError("cov must be Hermitian (cov == cov.conj().T)")
    L, info = torch.linalg.cholesky_ex(0.5 * (c128 + c128.conj().T))
    if int(info) != 0:
        raise ValueError("cov must be positive definite (Cholesky factorisation failed)")
    eye = torch.eye(c, dtype=torch.complex128, device=cov.device)
    W = torch.linalg.solve_triangular(L, eye, upper=False)
    return W.to(cov.dtype)


def prewhiten(data: Tensor, W: Tensor, coil_dim: int = 0) -> Tensor:
    """Apply a prewhitening matrix along the coil axis: ``out_c = Σ_d W[c, d] data_d``.

    Parameters
    ----------
    data : complex tensor of any shape with the coils along ``coil_dim``.
    W : ``[C, C]`` matrix from :func:`prewhitening_matrix` (optionally scaled by
        :func:`noise_bandwidth_scale`).
    coil_dim : axis of ``data`` that holds the coils.
    """
    if isinstance(W, torch.Tensor) and W.ndim == 2 and W.shape[0] != W.shape[1]:
        raise ValueError(f"W must be square [C, C], got shape {tuple(W.shape)}")
    return _apply_coil_matrix(data, W, coil_dim, "W")


def noise_bandwidth_scale(noise_dwell_us: float, data_dwell_us: float,
                          receiver_noise_bandwidth: float = 0.793) -> float:
    """Scale factor for a prewhitening matrix estimated from noise sampled at another bandwidth.

    Thermal noise variance per sample grows with the sampling bandwidth, i.e. as ``1/dwell``. A
    covariance measured with dwell time ``noise_dwell_us`` therefore overestimates (or under-)
    the data noise by ``data_dwell/noise_dwell``; multiplying ``W`` by the square root of that
    ratio corrects it. Following Gadgetron's NoiseAdjustGadget, the factor also includes the
    receiver's relative noise bandwidth (``relativeReceiverNoiseBandwidth`` in the ISMRMRD header,
    0.793 on Siemens systems, whose anti-aliasing filter is not flat across the sampled band;
    Kellman & McVeigh 2005) and a factor 2, so that whitened noise has unit variance in the
    real and in the imaginary part separately::

        scale = sqrt(2 · data_dwell_us / noise_dwell_us · receiver_noise_bandwidth)

    Use it as ``W * scale``. With equal dwell times and ``receiver_noise_bandwidth=0.5`` it is 1.

    Raises
    ------
    ValueError
        When a dwell time or the bandwidth is not a positive finite number (a gadget whose
        header lacks them should skip the scaling explicitly rather than pass zeros).
    """
    vals = {"noise_dwell_us": noise_dwell_us, "data_dwell_us": data_dwell_us,
            "receiver_noise_bandwidth": receiver_noise_bandwidth}
    for name, v in vals.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(v).__name__}")
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be positive and finite, got {v}")
    return math.sqrt(2.0 * data_dwell_us / noise_dwell_us * receiver_noise_bandwidth)


# --------------------------------------------------------------------------------------------
# coil compression
# --------------------------------------------------------------------------------------------

def svd_compression_matrix(data: Tensor, n_virtual: int | None = None, energy: float | None = None,
                           return_energy: bool = False) -> Tensor | tuple[Tensor, float]:
    """PCA (SVD) coil-compression matrix from calibration data or all data.

    The rows of the result are the leading left singular vectors (conjugated) of the ``[C, N]``
    data matrix, so ``matrix @ data`` keeps the largest possible share of the signal energy in
    ``n_virtual`` virtual coils, and ``matrix`` has orthonormal rows.

    Parameters
    ----------
    data : ``[C, ...]`` complex data, coil axis first (k-space or images; flattened behind it).
    n_virtual : number of virtual coils (``1 <= n_virtual <= C``).
    energy : alternatively, the smallest number of virtual coils that keeps at least this
        fraction (0 < energy <= 1) of the energy is used. Give exactly one of the two.
    return_energy : also return the fraction of the energy of ``data`` that the matrix keeps,
        ``‖matrix @ data‖² / ‖data‖²``.

    Returns
    -------
    ``[n_virtual, C]`` compression matrix (dtype/device of ``data``), or ``(matrix, retained)``
    when ``return_energy`` is true.
    """
    _check_complex(data, "data", min_ndim=2)
    c = data.shape[0]
    if (n_virtual is None) == (energy is None):
        raise ValueError("give exactly one of n_virtual and energy")
    if n_virtual is not None:
        _check_int(n_virtual, "n_virtual")
        if n_virtual > c:
            raise ValueError(f"n_virtual={n_virtual} exceeds the number of coils C={c}")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    x = data.reshape(c, -1)
    # The C×C Gram matrix is cheap even for all data; eigh in double precision keeps small modes exact.
    gram = (x @ x.conj().transpose(0, 1)).to(torch.complex128)
    evals, evecs = torch.linalg.eigh(0.5 * (gram + gram.conj().T))
    evals = evals.flip(0).clamp_min(0.0)
    evecs = evecs.flip(1)
    total = float(evals.sum())
    if total <= 0.0:
        raise ValueError("data is all zeros: cannot derive a compression matrix")
    frac = torch.cumsum(evals, 0) / total
    if n_virtual is None:
        n_virtual = int(torch.searchsorted(frac, torch.tensor(float(energy) - 1e-12, dtype=frac.dtype)).item()) + 1
        n_virtual = min(n_virtual, c)
    matrix = evecs[:, :n_virtual].conj().transpose(0, 1).to(data.dtype)
    return (matrix, float(frac[n_virtual - 1])) if return_energy else matrix


def apply_compression(data: Tensor, matrix: Tensor, coil_dim: int = 0) -> Tensor:
    """Compress the coil axis of ``data`` with a ``[V, C]`` matrix: ``out_v = Σ_c matrix[v, c] data_c``.

    Works for any shape (k-space, images, non-Cartesian samples); the coil axis is ``coil_dim``.
    """
    return _apply_coil_matrix(data, matrix, coil_dim, "matrix")


def _window_sum(r: Tensor, window: int) -> Tensor:
    """Sum ``r[x - w//2 : x + w//2 + 1]`` along axis 0 (positions beyond the edges count as zero)."""
    if window == 1:
        return r
    half = window // 2
    out = r.clone()
    n = r.shape[0]
    for s in range(1, min(half, n - 1) + 1):
        out[s:] += r[:-s]
        out[:-s] += r[s:]
    return out


def gcc_compression_matrices(calib: Tensor, n_virtual: int, window: int = 5, n_readout: int | None = None,
                             return_energy: bool = False) -> Tensor | tuple[Tensor, float]:
    """Geometric-decomposition coil compression (GCC, Zhang et al. 2013) along the readout.

    The readout (last axis) is fully sampled, so an inverse FFT along it splits the data into
    independent x positions. For each position an SVD of the ``C × (ky · window)`` hybrid data
    (the position and its ``window - 1`` neighbours, which stabilises the estimate) gives the
    best ``n_virtual`` virtual coils for that position. Because each SVD is only unique up to a
    unitary rotation of the virtual coils, neighbouring matrices are then aligned by an
    orthogonal Procrustes step (``P = V Uᴴ`` from the SVD ``A_x A_{x-1}ᴴ = U Σ Vᴴ``), starting at
    the position with the most energy and moving outwards, so that virtual coil profiles vary
    smoothly along x and the compressed k-space stays compact.

    Parameters
    ----------
    calib : ``[C, ky, kx]`` centred calibration k-space with the full readout (e.g. the ACS lines).
    n_virtual : number of virtual coils.
    window : odd number of neighbouring x positions pooled in each SVD.
    n_readout : readout length of the data the matrices will be applied to; the calibration
        readout is zero-padded (centred) to it before the inverse FFT. Default: ``kx``.
    return_energy : also return the fraction of the energy of ``calib`` the matrices keep.

    Returns
    -------
    ``[Nx, n_virtual, C]`` per-position compression matrices with orthonormal rows (use with
    :func:`apply_gcc`), or ``(matrices, retained)`` when ``return_energy`` is true.
    """
    _check_complex(calib, "calib", ndim=3)
    c, _, kx = calib.shape
    _check_int(n_virtual, "n_virtual")
    if n_virtual > c:
        raise ValueError(f"n_virtual={n_virtual} exceeds the number of coils C={c}")
    _check_int(window, "window")
    if window % 2 == 0:
        raise ValueError(f"window must be odd, got {window}")
    if n_readout is not None:
        _check_int(n_readout, "n_readout")
        if n_readout < kx:
            raise ValueError(f"n_readout={n_readout} is smaller than the calibration readout kx={kx}")
        if n_readout > kx:
            lo = n_readout // 2 - kx // 2
            calib = F.pad(calib, (lo, n_readout - kx - lo))
    h = ifft1c(calib, dim=-1)                                   # [C, ky, Nx]
    # per-position C×C Gram matrices (double precision for the eigen-decomposition)
    gram = torch.einsum("cyx,dyx->xcd", h, h.conj()).to(torch.complex128)
    gram_w = _window_sum(gram, window)
    gram_w = 0.5 * (gram_w + gram_w.conj().transpose(-2, -1))
    _, evecs = torch.linalg.eigh(gram_w)                        # ascending
    A = evecs.flip(-1)[..., :n_virtual].conj().transpose(-2, -1).contiguous()   # [Nx, V, C]

    nx = A.shape[0]
    energy_x = gram.diagonal(dim1=-2, dim2=-1).real.sum(-1)
    x0 = int(torch.argmax(energy_x))
    for order in (range(x0 + 1, nx), range(x0 - 1, -1, -1)):
        for x in order:
            prev = A[x - 1] if x > x0 else A[x + 1]
            u, _, vh = torch.linalg.svd(A[x] @ prev.conj().T)
            A[x] = (vh.conj().T @ u.conj().T) @ A[x]

    total = float(energy_x.sum())
    if total <= 0.0:
        raise ValueError("calib is all zeros: cannot derive compression matrices")
    A = A.to(calib.dtype)
    if not return_energy:
        return A
    a128 = A.to(gram.dtype)
    kept = float(torch.einsum("xvc,xcd,xvd->", a128, gram, a128.conj()).real)
    return A, kept / total


def apply_gcc(kspace: Tensor, matrices: Tensor) -> Tensor:
    """Apply GCC matrices to centred k-space ``[..., C, ky, kx]`` → ``[..., V, ky, kx]``.

    Inverse FFT along the readout, ``out[v, :, x] = Σ_c matrices[x, v, c] · data[c, :, x]``,
    FFT back. ``matrices`` comes from :func:`gcc_compression_matrices` with ``Nx == kx``.
    """
    _check_complex(kspace, "kspace", min_ndim=3)
    _check_complex(matrices, "matrices", ndim=3)
    nx, _, c = matrices.shape
    if kspace.shape[-3] != c:
        raise ValueError(f"kspace has {kspace.shape[-3]} coils (axis -3) but matrices expect {c}")
    if kspace.shape[-1] != nx:
        raise ValueError(
            f"kspace readout length {kspace.shape[-1]} != matrices positions {nx}; "
            "derive the matrices with n_readout equal to the readout length"
        )
    h = ifft1c(kspace, dim=-1)
    y = torch.einsum("xvc,...cyx->...vyx", matrices.to(device=kspace.device, dtype=kspace.dtype), h)
    return fft1c(y, dim=-1)


# --------------------------------------------------------------------------------------------
# sensitivities
# --------------------------------------------------------------------------------------------

def normalize_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale coil maps ``[..., C, Ny, Nx]`` so that ``Σ_c |S_c|² = 1`` at every pixel with signal.

    Pixels where all coils are (numerically) zero stay zero.
    """
    _check_complex(maps, "maps", min_ndim=3)
    norm = torch.linalg.vector_norm(maps, dim=-3, keepdim=True)
    return torch.where(norm > eps, maps / norm.clamp_min(eps), torch.zeros_like(maps))


def _reference_phase(v: Tensor) -> Tensor:
    """Remove the arbitrary per-pixel phase of unit eigenvectors ``v`` ``[C, P]``.

    Each pixel is rotated so that its projection onto one global direction ``w`` (the dominant
    eigenvector of ``Σ_p v_p v_pᴴ``, i.e. a 'virtual body coil') is real and positive. Because
    ``wᴴ v`` is a smooth function of the underlying smooth maps, the result is smooth as well,
    unlike referencing to a single coil that may have no sensitivity somewhere.
    """
    m = (v @ v.conj().transpose(0, 1)).to(torch.complex128)
    _, evecs = torch.linalg.eigh(0.5 * (m + m.conj().T))
    w = evecs[:, -1]
    # fix the global phase deterministically: largest component of w real positive
    k = int(torch.argmax(w.abs()))
    w = (w * (w[k].conj() / w[k].abs())).to(v.dtype)
    p = w.conj() @ v                                        # [P]
    mag = p.abs()
    phase = torch.where(mag > 0, p / mag.clamp_min(1e-30), torch.ones_like(p))
    return v * phase.conj()


def _box_smooth(x: Tensor, kernel_size: int) -> Tensor:
    """Mean over a ``k × k`` window of complex images ``[B, Ny, Nx]`` (edges: mean of what exists)."""
    re = torch.cat([x.real, x.imag], 0).unsqueeze(0)
    out = F.avg_pool2d(re, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=False)[0]
    b = x.shape[0]
    return torch.complex(out[:b], out[b:])


def _check_kernel(kernel_size: int, ny: int, nx: int) -> None:
    _check_int(kernel_size, "kernel_size")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if kernel_size > min(ny, nx):
        raise ValueError(f"kernel_size={kernel_size} is larger than the image {ny}x{nx}")


def walsh_maps(coil_images: Tensor, kernel_size: int = 7) -> Tensor:
    """Adaptive (Walsh) coil maps from coil images ``[C, Ny, Nx]``.

    At each pixel the local signal correlation matrix ``R = mean_window(I Iᴴ)`` (a ``k × k`` box
    around the pixel) is formed; its dominant eigenvector is the coil sensitivity up to a phase
    and a scale (Walsh et al. 2000). The phase is referenced to a global virtual coil so the
    maps are smooth, and each pixel has ``Σ_c |S_c|² = 1``.

    Parameters
    ----------
    coil_images : ``[C, Ny, Nx]`` complex coil images (e.g. ``ifft2c`` of low-resolution or full
        k-space; noise should be prewhitened).
    kernel_size : odd side of the smoothing window in pixels.

    Returns
    -------
    ``[C, Ny, Nx]`` unit-norm coil maps, dtype and device of the input.
    """
    _check_complex(coil_images, "coil_images", ndim=3)
    c, ny, nx = coil_images.shape
    _check_kernel(kernel_size, ny, nx)
    prod = (coil_images[:, None] * coil_images[None].conj()).reshape(c * c, ny, nx)
    r = _box_smooth(prod, kernel_size).reshape(c, c, ny * nx).permute(2, 0, 1)
    r = 0.5 * (r + r.conj().transpose(-2, -1))
    _, evecs = torch.linalg.eigh(r)
    v = evecs[..., -1].transpose(0, 1)                      # [C, P]
    return _reference_phase(v).reshape(c, ny, nx)


def inati_maps(coil_images: Tensor, kernel_size: int = 7, n_iter: int = 5) -> Tensor:
    """Fast adaptive coil maps by Inati's power iteration, without per-pixel eigen-decompositions.

    Instead of forming ``R(x) = Σ_window I Iᴴ`` and decomposing it, one power step
    ``v ← R v`` is approximated by ``v ← smooth(I · conj(vᴴ I))``, normalised per pixel, which
    only needs one ``C``-channel box filter per iteration. Starting from the global dominant
    coil direction a few iterations suffice (Inati, Hansen & Kellman, ISMRM 2014).

    Parameters
    ----------
    coil_images : ``[C, Ny, Nx]`` complex coil images.
    kernel_size : odd side of the smoothing window in pixels.
    n_iter : number of power iterations.

    Returns
    -------
    ``[C, Ny, Nx]`` unit-norm coil maps with smooth phase.
    """
    _check_complex(coil_images, "coil_images", ndim=3)
    c, ny, nx = coil_images.shape
    _check_kernel(kernel_size, ny, nx)
    _check_int(n_iter, "n_iter")
    img = coil_images
    # start: one global direction (the dominant eigenvector of the image-wide correlation)
    flat = img.reshape(c, -1)
    g = (flat @ flat.conj().transpose(0, 1)).to(torch.complex128)
    _, evecs = torch.linalg.eigh(0.5 * (g + g.conj().T))
    v = evecs[:, -1].to(img.dtype)[:, None, None].expand(c, ny, nx)
    for _ in range(n_iter):
        rho = torch.sum(v.conj() * img, dim=0)              # combined image vᴴ I
        v = _box_smooth(img * rho.conj()[None], kernel_size)
        v = v / torch.linalg.vector_norm(v, dim=0, keepdim=True).clamp_min(1e-30)
    return _reference_phase(v.reshape(c, -1)).reshape(c, ny, nx)


def _espirit_gram(calib: Tensor, image_shape: tuple[int, int], kernel_size: int,
                  threshold: float) -> Tensor:
    """Per-pixel ESPIRiT matrices ``G(x) = (1/k²) Σ_r h_r(x) h_r(x)ᴴ`` as ``[C, C, Ny, Nx]``.

    ``h_r`` is the image-domain version of the r-th signal-space kernel. Rather than transform
    every kernel to the full image size (``r · C · Ny · Nx`` values), note that ``G`` is the
    inverse DFT of the summed kernel cross-correlations, which live on a ``(2k-1)²`` grid: they
    are computed on a small ``2k × 2k`` grid, zero-padded to the image size and transformed once.
    """
    c, ny, nx = calib.shape
    k = kernel_size
    # calibration matrix: one row per k×k patch position, columns ordered (coil, ky, kx)
    patches = calib.unfold(1, k, 1).unfold(2, k, 1)         # [C, py, px, k, k]
    a = patches.permute(1, 2, 0, 3, 4).reshape(-1, c * k * k)
    # Rows of Vᴴ (A = U S Vᴴ) span the patch space, since a_p = Σ_i U[p, i] s_i Vᴴ[i, :]; they are the
    # eigenvectors of the small Gram matrix Aᵀ conj(A) = conj(AᴴA), which is much cheaper to
    # decompose (in double precision) than to take the SVD of A itself.
    gram = (a.transpose(0, 1) @ a.conj()).to(torch.complex128)
    ev, evec = torch.linalg.eigh(0.5 * (gram + gram.conj().T))
    s = ev.flip(0).clamp_min(0.0).sqrt()
    vh = evec.flip(1).transpose(0, 1).to(calib.dtype)
    n_keep = int((s > threshold * s[0]).sum())
    if n_keep == 0:
        raise ValueError("calib has no signal above the threshold")
    kernels = vh[:n_keep].reshape(n_keep, c, k, k)
    m = 2 * k
    kpad = F.pad(kernels, (0, m - k, 0, m - k))
    hk = torch.fft.ifft2(kpad) * (m * m)                    # Σ_t K[t] e^{+i2π j t / m}
    gm = torch.einsum("rcyx,rdyx->cdyx", hk, hk.conj())
    corr = torch.fft.fftshift(torch.fft.fft2(gm) / (m * m * k * k), dim=(-2, -1))   # lag d at m/2 + d
    ty, tx = image_shape
    # place lag d at N//2 + d (only lags |d| <= k-1 are non-zero; lag -k at index 0 is dropped if needed)
    big = torch.zeros((c, c, ty, tx), dtype=calib.dtype, device=calib.device)
    oy, ox = ty // 2 - m // 2, tx // 2 - m // 2
    sy, sx = max(0, -oy), max(0, -ox)
    big[:, :, oy + sy:oy + m, ox + sx:ox + m] = corr[:, :, sy:, sx:]
    return ifft2c(big) * math.sqrt(ty * tx)


def espirit_maps(calib: Tensor, image_shape: Sequence[int] | None = None, kernel_size: int = 6,
                 threshold: float = 0.02, crop: float = 0.95, n_maps: int = 1) -> Tensor:
    """ESPIRiT coil maps (Uecker et al. 2014) from centred calibration (ACS) k-space.

    Steps: the calibration matrix of all ``k × k`` patches of the ACS is decomposed by SVD; the
    right singular vectors with ``σ > threshold · σ_max`` span the signal space (the 'kernels').
    Transformed to the image domain at the target size, they define at every pixel a ``C × C``
    matrix ``G(x)`` whose eigenvectors with eigenvalue ≈ 1 are the coil sensitivities. The
    dominant eigenvector(s) are kept where the eigenvalue is at least ``crop`` (else 0), and their
    phase is referenced to a global virtual coil so the maps are smooth.

    Parameters
    ----------
    calib : ``[C, ny, nx]`` centred, fully sampled calibration k-space (see
        :func:`calibration_region`, :func:`calib_from_images`).
    image_shape : ``(Ny, Nx)`` of the maps; the calibration k-space spacing must match the
        image field of view. Default: the calibration size.
    kernel_size : side of the k-space kernel (patch).
    threshold : relative singular-value threshold that selects the signal space.
    crop : eigenvalue threshold (0..1) below which a pixel gets no sensitivity.
    n_maps : number of sets of maps (eigenvectors) returned.

    Returns
    -------
    ``[C, Ny, Nx]`` for ``n_maps == 1``, else ``[n_maps, C, Ny, Nx]``; unit norm where kept.

    Notes
    -----
    The per-pixel matrix is built from the kernels' cross-correlations (``C² · (2k)²`` values)
    and one inverse FFT per coil pair, then decomposed by batched ``torch.linalg.eigh`` at the
    pixels whose trace reaches ``crop`` (the trace bounds the eigenvalues); memory is
    ``O(C² · Ny · Nx)``.
    """
    _check_complex(calib, "calib", ndim=3)
    c, ny, nx = calib.shape
    _check_int(kernel_size, "kernel_size", minimum=2)
    if kernel_size > min(ny, nx):
        raise ValueError(f"kernel_size={kernel_size} is larger than the calibration region {ny}x{nx}")
    if image_shape is None:
        image_shape = (ny, nx)
    ty, tx = _pair(tuple(image_shape), "image_shape")
    if min(ty, tx) < 2 * kernel_size - 1:
        raise ValueError(f"image_shape {(ty, tx)} must be at least 2*kernel_size-1 = {2 * kernel_size - 1}")
    if not (0.0 <= float(threshold) < 1.0):
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
    if not (0.0 <= float(crop) <= 1.0):
        raise ValueError(f"crop must lie in [0, 1], got {crop}")
    _check_int(n_maps, "n_maps")
    if n_maps > c:
        raise ValueError(f"n_maps={n_maps} exceeds the number of coils C={c}")
    if not torch.isfinite(torch.view_as_real(calib)).all():
        raise ValueError("calib contains NaN or Inf")

    g = _espirit_gram(calib, (ty, tx), kernel_size, float(threshold))
    g = g.reshape(c, c, ty * tx)
    # G is positive semi-definite, so its trace bounds every eigenvalue: pixels whose trace is
    # below crop get no map, and the (costly) per-pixel eigen-decomposition can skip them.
    cand = torch.nonzero(g.diagonal(dim1=0, dim2=1).real.sum(-1) >= crop).squeeze(1)
    gc = g[:, :, cand].permute(2, 0, 1)
    gc = 0.5 * (gc + gc.conj().transpose(-2, -1))
    evals, evecs = torch.linalg.eigh(gc)                   # ascending: [P', C], [P', C, C]
    maps = []
    for i in range(n_maps):
        v = evecs[..., c - 1 - i].transpose(0, 1)          # [C, P']
        keep = evals[:, c - 1 - i] >= crop
        v = torch.zeros((c, ty * tx), dtype=calib.dtype, device=calib.device).index_copy_(
            1, cand, v * keep[None].to(v.dtype))
        maps.append(_reference_phase(v).reshape(c, ty, tx))
    return maps[0] if n_maps == 1 else torch.stack(maps, 0)


def calibration_region(kspace: Tensor, mask: Tensor | None = None,
                       size: int | Sequence[int] | None = None,
                       max_size: int | Sequence[int] | None = None) -> Tensor:
    """Cut the fully sampled calibration block around the k-space centre out of k-space ``[C, Ny, Nx]``.

    The block is found by :func:`recon_core.trajectories.acs_region` (the project's one rule for
    the fully sampled centre) on ``mask``; ``size`` instead cuts a fixed centred block.

    Parameters
    ----------
    kspace : ``[C, Ny, Nx]`` centred k-space (unsampled points zero).
    mask : ``[Ny, Nx]`` sampling mask (non-zero = sampled). Default: points where any coil is
        non-zero.
    size : ``(ny, nx)`` (or an int for both) of a fixed block centred at DC (DC at
        ``(ny//2, nx//2)``), regardless of the mask.
    max_size : cap ``(ny, nx)`` on the block found from the mask (clipped around DC).

    Returns
    -------
    ``[C, ny, nx]`` calibration k-space (a copy).

    Raises
    ------
    ValueError
        When the k-space centre is not sampled, or ``size`` does not fit.
    """
    from recon_core.trajectories import acs_region

    _check_complex(kspace, "kspace", ndim=3)
    _, n_y, n_x = kspace.shape
    cy, cx = n_y // 2, n_x // 2
    if size is not None:
        sy, sx = _pair(size, "size")
        if sy > n_y or sx > n_x:
            raise ValueError(f"size {(sy, sx)} exceeds the k-space matrix {(n_y, n_x)}")
        return kspace[:, cy - sy // 2:cy - sy // 2 + sy, cx - sx // 2:cx - sx // 2 + sx].clone()
    if mask is None:
        sampled = (kspace.abs() > 0).any(dim=0)
    else:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != (n_y, n_x):
            raise ValueError(f"mask must have shape {(n_y, n_x)}, got {tuple(mask.shape)}")
        sampled = mask != 0
    region = acs_region(sampled, max_size=None if max_size is None else _pair(max_size, "max_size"))
    if region is None:
        raise ValueError("the k-space centre is not sampled: no calibration region")
    (y0, y1), (x0, x1) = region
    return kspace[:, y0:y1, x0:x1].clone()


def lowres_coil_images(calib: Tensor, image_shape: Sequence[int]) -> Tensor:
    """Low-resolution coil images ``[C, Ny, Nx]`` from calibration k-space ``[C, ny, nx]``.

    The block is zero-padded (centred) to ``image_shape`` and transformed with ``ifft2c``: smooth,
    alias-free coil images for Walsh/Inati maps and for the object mask of :func:`map_coverage`.
    """
    _check_complex(calib, "calib", ndim=3)
    ty, tx = _pair(tuple(image_shape), "image_shape")
    _, ny, nx = calib.shape
    if ny > ty or nx > tx:
        raise ValueError(f"calib {ny}x{nx} is larger than image_shape {(ty, tx)}")
    py, px = ty - ny, tx - nx
    full = F.pad(calib, (px // 2, px - px // 2, py // 2, py - py // 2))
    return ifft2c(full)


def gridded_coil_images(kspace: Tensor, trajectory: Tensor | None, dcf: Tensor | None,
                        image_shape: Sequence[int], mask: Tensor | None = None, pool_frames: bool = False,
                        backend: str = DEFAULT_BACKEND) -> Tensor:
    """Coil images by one adjoint: the zero-filled / gridding images every coil tool and baseline uses.

    Cartesian (``trajectory`` None): ``ifft2c`` of ``kspace [F, C, Ny, Nx]`` times ``mask`` (default:
    the non-zero samples). Non-Cartesian: the adjoint NUFFT of ``dcf``-weighted ``kspace [F, C, M]``
    on ``trajectory [F, 2, M]`` (``dcf`` None: no density compensation; use
    :func:`recon_core.trajectories.default_dcf` when one is wanted and missing).

    ``pool_frames``: one image ``[C, Ny, Nx]`` from all frames together — the time-averaged
    k-space (Cartesian: each k-space point averaged over the frames that sampled it; non-Cartesian:
    every frame's samples gridded at once, with each frame's own DCF, i.e. the sum of the frames'
    gridded images). Otherwise ``[F, C, Ny, Nx]``.
    """
    _check_complex(kspace, "kspace", min_ndim=3)
    shape = _pair(tuple(image_shape), "image_shape")
    if trajectory is None:
        if kspace.ndim != 4:
            raise ValueError(f"Cartesian kspace must be [F, C, Ny, Nx], got {tuple(kspace.shape)}")
        m = (kspace.abs().sum(1) > 0) if mask is None else (mask != 0)
        m = m.expand(kspace.shape[0], *kspace.shape[-2:]).to(kspace.real.dtype)
        y = kspace * m.unsqueeze(1).to(kspace.dtype)
        if pool_frames:
            counts = m.sum(0).clamp_min(1.0)
            return ifft2c(y.sum(0) / counts.to(y.dtype))
        return ifft2c(y)
    from recon_core.operators import Nufft

    if kspace.ndim != 3:
        raise ValueError(f"non-Cartesian kspace must be [F, C, M], got {tuple(kspace.shape)}")
    y = kspace if dcf is None else kspace * dcf.to(kspace.device).unsqueeze(1).to(kspace.dtype)
    traj = trajectory.to(kspace.device)
    if pool_frames:
        f, c, n = y.shape
        y = y.permute(1, 0, 2).reshape(1, c, f * n)
        traj = traj.permute(1, 0, 2).reshape(1, 2, f * n)
    out = Nufft(traj, shape, backend=backend).to(kspace.device).adjoint(y)
    return out[0] if pool_frames else out


def object_mask(coil_images: Tensor, level: float = 0.2) -> Tensor:
    """Boolean ``[Ny, Nx]`` object support: root-sum-of-squares of ``coil_images [C, Ny, Nx]`` above
    ``level`` times its 99th percentile (robust to a few bright pixels)."""
    _check_complex(coil_images, "coil_images", ndim=3)
    rss = torch.linalg.vector_norm(coil_images, dim=0)
    ref = torch.quantile(rss.reshape(-1).to(torch.float64), 0.99)
    return rss > level * float(ref)


def map_coverage(maps: Tensor, reference: Tensor, threshold: float = 0.5, level: float = 0.2) -> float:
    """Fraction of the object that coil maps ``[C, Ny, Nx]`` cover (Σ_c|S_c|² ≥ ``threshold``).

    ``reference`` is either ``[C, Ny, Nx]`` coil images (e.g. :func:`lowres_coil_images` of the
    calibration data): the object is their :func:`object_mask` and each object pixel counts with
    its root-sum-of-squares intensity, so the blurred rim of a low-resolution image weighs little;
    or a boolean ``[Ny, Nx]`` mask, every pixel counting the same. ESPIRiT sets maps to zero where
    the calibration does not explain the data (eigenvalue below ``crop``); a calibration that is
    too small does so inside the object, and a SENSE reconstruction is then zero there.

    Returns the covered fraction in [0, 1] (1 = the whole object); ``1 − coverage`` is uncovered.
    """
    _check_complex(maps, "maps", ndim=3)
    if isinstance(reference, torch.Tensor) and reference.dtype == torch.bool:
        obj, weight = reference, reference.to(torch.float32)
    else:
        _check_complex(reference, "reference", ndim=3)
        obj = object_mask(reference, level)
        weight = torch.linalg.vector_norm(reference, dim=0).to(torch.float32) * obj
    if tuple(obj.shape) != tuple(maps.shape[-2:]):
        raise ValueError(f"reference {tuple(obj.shape)} does not match maps {tuple(maps.shape[-2:])}")
    total = float(weight.sum())
    if not total > 0:
        raise ValueError("reference has no object pixels (all below the level)")
    covered = ((maps.abs() ** 2).sum(0) >= threshold).to(weight.device)
    return float((weight * covered).sum()) / total


def calib_from_images(coil_images: Tensor, calib_size: int | Sequence[int]) -> Tensor:
    """Centred calibration k-space ``[C, ny, nx]`` from (low-resolution) coil images ``[C, Ny, Nx]``.

    For data without a Cartesian ACS block, e.g. time-averaged gridded radial or spiral data:
    ``fft2c`` of the coil images, then the centred ``calib_size`` block, ready for
    :func:`espirit_maps` with ``image_shape=(Ny, Nx)``.
    """
    _check_complex(coil_images, "coil_images", ndim=3)
    return calibration_region(fft2c(coil_images), size=calib_size)
