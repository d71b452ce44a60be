"""Datasets of reconstruction problems with ground truth, for training learned methods.

A :class:`TrainingSample` is a :class:`~recon_core.methods.base.ReconProblem` plus its ground truth
``[F, Ny, Nx]`` (consistent with the problem's coil maps: ``E(gt)`` is the noise-free data).
Two sources:

* :class:`PhantomDataset` — generated: the analytic cardiac phantom (:mod:`recon_core.phantoms`)
  with drawn heart rate, respiration, background phase, matrix, frames and coils, augmented by
  flips / transposition / a global phase, encoded with the problem's operator (Cartesian masks of
  drawn acceleration, golden-angle radial or spiral) plus complex Gaussian noise. Sample ``i`` is a
  pure function of ``(seed, i)``.
* :class:`IsmrmrdDataset` — fully sampled Cartesian ISMRMRD files in a folder, read with the
  ``ismrmrd`` package (noise readouts skipped, readout oversampling removed): coil maps by ESPIRiT
  from the fully sampled centre (:mod:`recon_core.coils`), ground truth = the SENSE combination of
  the fully sampled coil images, then retrospective undersampling with a chosen mask or trajectory.

Never point these at ``tests``' real data or the project's benchmark data: they are for testing.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from recon_core.fft import fft1c, fft2c, ifft1c, ifft2c
from recon_core.methods.base import ReconProblem, make_problem

Tensor = torch.Tensor

__all__ = ["TrainingSample", "SamplingSpec", "PhantomDataset", "IsmrmrdDataset", "undersample", "load_slices", "split_datasets"]


@dataclass
class TrainingSample:
    """One reconstruction problem with its ground truth ``[F, Ny, Nx]`` complex64."""

    problem: ReconProblem
    ground_truth: Tensor
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplingSpec:
    """How to undersample: ``kind`` ∈ cartesian | radial | spiral and its parameters.

    Ranges (``(lo, hi)``) are drawn per sample; a single number is fixed. Cartesian: ``mask``
    ∈ uniform | variable_density | poisson, ``accel``, ``acs_lines``. Radial: ``spokes`` per frame.
    Spiral: ``interleaves_per_frame`` (a divisor of ``interleaves``, drawn from the range) of ``interleaves``."""

    kinds: tuple[str, ...] = ("cartesian",)
    masks: tuple[str, ...] = ("uniform", "variable_density")
    accel: tuple[float, float] = (3.0, 8.0)
    #: a set of accelerations drawn from instead of the ``accel`` range (multi-ratio training at fixed
    #: ratios, as CGPD-CSNet's paper does; then ratios between them are unseen in training)
    accel_choices: tuple[float, ...] = ()
    acs_lines: tuple[int, int] = (4, 10)
    spokes: tuple[int, int] = (8, 24)
    interleaves: int = 16
    interleaves_per_frame: tuple[int, int] = (2, 6)


def _draw(rng: random.Random, v: Any, integer: bool = False) -> Any:
    if isinstance(v, (tuple, list)):
        lo, hi = v
        return rng.randint(int(lo), int(hi)) if integer else rng.uniform(float(lo), float(hi))
    return int(v) if integer else float(v)


def undersample(ground_truth: Tensor, coil_maps: Tensor, spec: SamplingSpec, rng: random.Random,
                noise: float = 0.0, coil_images: Optional[Tensor] = None, seed: int = 0) -> tuple[ReconProblem, dict]:
    """Simulate an undersampled acquisition of ``ground_truth`` (or of given ``coil_images``).

    The data are ``E(gt)`` (or the coil images encoded directly, for real fully sampled data) plus
    complex Gaussian noise of standard deviation ``noise · mean|gt|``. Returns the problem and a
    description of the sampling drawn."""
    from recon_core import trajectories as tr

    F, ny, nx = ground_truth.shape
    dev = ground_truth.device
    kind = rng.choice(list(spec.kinds))
    gen = torch.Generator().manual_seed(seed)
    sigma = float(noise) * float(ground_truth.abs().mean())
    info: dict[str, Any] = {"kind": kind, "noise": float(noise)}
    if coil_images is None:
        coil_images = ground_truth.unsqueeze(1) * coil_maps
    if kind == "cartesian":
        mk = rng.choice(list(spec.masks))
        accel = float(rng.choice(list(spec.accel_choices))) if spec.accel_choices else _draw(rng, spec.accel)
        acs = min(_draw(rng, spec.acs_lines, integer=True), ny)
        s = rng.randrange(1 << 30)
        if mk == "uniform":
            accel = max(1, int(round(accel)))
            mask = tr.uniform_mask(ny, nx, accel, acs, n_frames=F)
        elif mk == "variable_density":
            acs = max(1, min(acs, round(ny / accel) - 2))  # leave lines outside the centre
            mask = tr.variable_density_mask(ny, nx, accel, acs, n_frames=F, seed=s)
        elif mk == "poisson":
            side = int(min(acs, math.floor(math.sqrt(ny * nx / accel))))
            mask = tr.poisson_disc_mask(ny, nx, accel, acs=(side, side), n_frames=F, seed=s)
        else:
            raise ValueError(f"unknown mask {mk!r}; allowed: uniform, variable_density, poisson")
        mask = mask.to(dev)
        k = fft2c(coil_images)
        if sigma > 0:
            k = k + sigma * torch.randn(k.shape, generator=gen, dtype=torch.complex64).to(dev)
        k = (k * mask.unsqueeze(1)).to(torch.complex64)
        info.update(mask=mk, accel=float(accel), acs_lines=int(acs))
        return make_problem(k, coil_maps, mask=mask, seed=seed), info
    from recon_core.operators import Nufft

    if kind == "radial":
        spokes = _draw(rng, spec.spokes, integer=True)
        traj = tr.golden_angle_radial(spokes, 2 * ny, n_frames=F, readout_oversampling=2.0)
        dcf = tr.ramp_dcf(traj, (ny, nx))
        info.update(spokes=int(spokes))
    elif kind == "spiral":
        lo, hi = (spec.interleaves_per_frame if isinstance(spec.interleaves_per_frame, (tuple, list))
                  else (spec.interleaves_per_frame,) * 2)
        choices = [d for d in range(int(lo), int(hi) + 1) if int(spec.interleaves) % d == 0]
        if not choices:
            raise ValueError(f"no interleaves_per_frame in {lo}..{hi} divides interleaves={spec.interleaves}")
        ipf = rng.choice(choices)
        traj = tr.spiral_trajectory(int(spec.interleaves), 4 * ny, n_frames=F, interleaves_per_frame=ipf,
                                    matrix_size=ny)
        dcf = tr.pipe_menon_dcf(traj, (ny, nx))
        info.update(interleaves_per_frame=int(ipf), interleaves=int(spec.interleaves))
    else:
        raise ValueError(f"unknown sampling kind {kind!r}; allowed: cartesian, radial, spiral")
    traj = traj.to(dev)
    k = Nufft(traj, (ny, nx)).to(dev).forward(coil_images)
    if sigma > 0:
        k = k + sigma * torch.randn(k.shape, generator=gen, dtype=torch.complex64).to(dev)
    return make_problem(k.to(torch.complex64), coil_maps, trajectory=traj, dcf=dcf.to(dev), seed=seed), info


class _Cached:
    """Index → sample with an in-memory cache (samples are deterministic in their index)."""

    def __init__(self, n: int) -> None:
        self.n = int(n)
        self._cache: dict[int, TrainingSample] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> TrainingSample:
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} out of range 0..{self.n - 1}")
        if i not in self._cache:
            self._cache[i] = self._make(i)
        return self._cache[i]

    def __iter__(self) -> Iterator[TrainingSample]:
        return (self[i] for i in range(self.n))

    def _make(self, i: int) -> TrainingSample:  # pragma: no cover - abstract
        raise NotImplementedError


def _augment(gt: Tensor, maps: Tensor, rng: random.Random) -> tuple[Tensor, Tensor]:
    """Same random flips / transposition for image and maps, and a random global phase."""
    if rng.random() < 0.5:
        gt, maps = gt.flip(-1), maps.flip(-1)
    if rng.random() < 0.5:
        gt, maps = gt.flip(-2), maps.flip(-2)
    if gt.shape[-1] == gt.shape[-2] and rng.random() < 0.5:
        gt, maps = gt.transpose(-1, -2), maps.transpose(-1, -2)
    phase = complex(math.cos(a := rng.uniform(0, 2 * math.pi)), math.sin(a))
    return (gt * phase).contiguous(), maps.contiguous()


class PhantomDataset(_Cached):
    """``n`` generated phantom problems; sample ``i`` depends only on ``(seed, i)``.

    Parameters (ranges drawn per sample): ``matrix`` sizes, ``frames``, ``coils``, ``noise``
    (relative to the mean object magnitude) and the :class:`SamplingSpec`."""

    def __init__(self, n: int, seed: int = 0, matrix: Sequence[int] = (32,), frames: tuple[int, int] = (4, 8),
                 coils: tuple[int, int] = (4, 8), noise: tuple[float, float] = (0.0, 0.03),
                 sampling: SamplingSpec | None = None, augment: bool = True, variety: float = 0.0) -> None:
        super().__init__(n)
        self.seed = int(seed)
        self.matrix = tuple(int(m) for m in matrix)
        self.frames, self.coils, self.noise = frames, coils, noise
        self.sampling = sampling or SamplingSpec()
        self.augment = augment
        #: Strength of the drawn anatomy / contrast / wall-motion / coil-array variation
        #: (:class:`recon_core.phantoms.AnatomyVariation`); 0 = the standard anatomy (the default).
        self.variety = float(variety)

    def _make(self, i: int) -> TrainingSample:
        from recon_core.phantoms import AnatomyVariation, CardiacPhantom

        rng = random.Random(self.seed * 1_000_003 + i)
        n = rng.choice(self.matrix)
        frames, coils = _draw(rng, self.frames, integer=True), _draw(rng, self.coils, integer=True)
        hr, resp, phase = rng.uniform(50, 90), rng.uniform(0.0, 0.03), rng.uniform(0.0, 1.5)
        variation = None
        if self.variety > 0:  # drawn after the standard draws, so variety = 0 gives the old samples
            variation = AnatomyVariation.random(rng.randrange(1 << 30), strength=self.variety)
        ph = CardiacPhantom(n, frames, coils, heart_rate_bpm=hr, resp_amplitude=resp, phase_strength=phase,
                            variation=variation)
        gt, maps = ph.ground_truth(), ph.coil_maps()
        if self.augment:
            gt, maps = _augment(gt, maps, rng)
        noise = _draw(rng, self.noise)
        problem, info = undersample(gt, maps, self.sampling, rng, noise=noise, seed=self.seed * 1_000_003 + i)
        info.update(source="phantom", matrix=n, frames=ph.n_frames, coils=ph.n_coils, variety=self.variety)
        return TrainingSample(problem, gt.to(torch.complex64), info)


def _read_fully_sampled(path: Path) -> list[Tensor]:
    """Coil k-space ``[F, C, Ny, Nx]`` per slice of a fully sampled Cartesian ISMRMRD file."""
    import ismrmrd
    import ismrmrd.xsd as xsd

    ds = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    try:
        hdr = xsd.CreateFromDocument(ds.read_xml_header())
        enc = hdr.encoding[0]
        if str(enc.trajectory.value if hasattr(enc.trajectory, "value") else enc.trajectory).lower() != "cartesian":
            raise ValueError(f"{path}: trajectory {enc.trajectory} is not Cartesian; training reads fully "
                             "sampled Cartesian files")
        ex, ey = int(enc.encodedSpace.matrixSize.x), int(enc.encodedSpace.matrixSize.y)
        rx = int(enc.reconSpace.matrixSize.x)
        ny = ey
        acqs = []
        for j in range(ds.number_of_acquisitions()):
            a = ds.read_acquisition(j)
            if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                continue
            acqs.append(a)
    finally:
        ds.close()
    if not acqs:
        raise ValueError(f"{path}: no imaging acquisitions")
    n_frames = 1 + max(int(a.idx.phase) for a in acqs)
    n_slices = 1 + max(int(a.idx.slice) for a in acqs)
    n_coils, n_ro = acqs[0].data.shape
    k = torch.zeros(n_slices, n_frames, n_coils, ny, n_ro, dtype=torch.complex64)
    seen = torch.zeros(n_slices, n_frames, ny, dtype=torch.bool)
    for a in acqs:
        s, f, line = int(a.idx.slice), int(a.idx.phase), int(a.idx.kspace_encode_step_1)
        k[s, f, :, line] = torch.from_numpy(a.data.astype("complex64"))
        seen[s, f, line] = True
    if not bool(seen.all()):
        missing = int((~seen).sum())
        raise ValueError(f"{path}: not fully sampled ({missing} of {seen.numel()} (slice, frame, line) rows "
                         "missing); training needs fully sampled files (e.g. torchgadgets phantom --accel 1)")
    if n_ro != rx and n_ro == ex and ex > rx:  # remove readout oversampling
        img = ifft1c(k, dim=-1)
        x0 = n_ro // 2 - rx // 2
        k = fft1c(img[..., x0:x0 + rx], dim=-1)
    return [k[s] for s in range(n_slices)]


def load_slices(folder: str | Path, calib_size: int = 24) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``(ground truth [F, Ny, Nx], ESPIRiT maps [C, Ny, Nx], coil images [F, C, Ny, Nx])`` for every
    slice of the fully sampled ISMRMRD files (``*.h5``, sorted by name) in ``folder``."""
    from recon_core.coils import calibration_region, espirit_maps

    files = sorted(Path(folder).glob("*.h5"))
    if not files:
        raise FileNotFoundError(f"no ISMRMRD files (*.h5) in {folder}")
    out = []
    for f in files:
        for k in _read_fully_sampled(f):
            ny, nx = k.shape[-2:]
            calib = calibration_region(k.mean(dim=0), size=(min(calib_size, ny), min(calib_size, nx)))
            maps = espirit_maps(calib, (ny, nx)).to(torch.complex64)
            coil_imgs = ifft2c(k)
            den = (maps.abs() ** 2).sum(0)
            num = (maps.conj() * coil_imgs).sum(1)
            gt = torch.where(den > 1e-8, num / den.clamp_min(1e-8), torch.zeros_like(num))
            out.append((gt.to(torch.complex64), maps, coil_imgs))
    return out


class IsmrmrdDataset(_Cached):
    """Problems from the fully sampled Cartesian ISMRMRD files (``*.h5``, sorted) in ``folder``.

    Each slice of each file is one ground truth; sample ``i`` uses slice ``i mod n_slices`` with the
    ``i``-th undersampling draw (so ``n`` may exceed the number of slices: several masks per image).
    Coil maps: ESPIRiT from the central ``calib_size`` lines of the frame-averaged k-space."""

    def __init__(self, folder: str | Path, n: int | None = None, seed: int = 0, sampling: SamplingSpec | None = None,
                 noise: tuple[float, float] | float = 0.0, calib_size: int = 24,
                 slice_indices: Sequence[int] | None = None,
                 slices: list[tuple[Tensor, Tensor, Tensor]] | None = None) -> None:
        self.slices = list(slices) if slices is not None else load_slices(folder, calib_size)
        #: Number of slices in the folder, before ``slice_indices`` picks some (train/validation split).
        self.n_slices_total = len(self.slices)
        if slice_indices is not None:
            self.slices = [self.slices[j] for j in slice_indices]
            if not self.slices:
                raise ValueError("slice_indices selects no slices")
        super().__init__(len(self.slices) if n is None else n)
        self.seed = int(seed)
        self.sampling = sampling or SamplingSpec()
        self.noise = noise

    def _make(self, i: int) -> TrainingSample:
        rng = random.Random(self.seed * 1_000_003 + i)
        gt, maps, coil_imgs = self.slices[i % len(self.slices)]
        noise = _draw(rng, self.noise)
        problem, info = undersample(gt, maps, self.sampling, rng, noise=noise, coil_images=coil_imgs,
                                    seed=self.seed * 1_000_003 + i)
        info.update(source="ismrmrd", slice_index=i % len(self.slices))
        return TrainingSample(problem, gt, info)


def _phantom_variety(data: str) -> float | None:
    """``phantom`` → 0, ``phantom:varied[=S]`` → S (default 1); None for anything else (a folder)."""
    if data == "phantom":
        return 0.0
    head, sep, rest = data.partition(":")
    if head != "phantom" or not sep:
        return None
    key, eq, val = rest.partition("=")
    if key != "varied":
        raise ValueError(f"unknown phantom option {rest!r} in --data {data!r}; allowed: phantom, "
                         "phantom:varied, phantom:varied=STRENGTH")
    try:
        strength = float(val) if eq else 1.0
    except ValueError:
        raise ValueError(f"--data {data!r}: variety strength must be a number, got {val!r}") from None
    if strength < 0:
        raise ValueError(f"--data {data!r}: variety strength must be >= 0")
    return strength


def split_datasets(data: str, n_train: int, n_val: int, seed: int, sampling: SamplingSpec | None = None,
                   **phantom_kw: Any) -> tuple[_Cached, _Cached, str]:
    """Disjoint training and validation sets, and a sentence saying what they are.

    ``data="phantom"``: two :class:`PhantomDataset` s with different seeds (``seed``, ``seed + 1``
    × 10⁶ offset); ``"phantom:varied"`` (or ``"phantom:varied=S"``) draws varied anatomy shapes,
    contrast, wall motion and coil arrays (:class:`recon_core.phantoms.AnatomyVariation`, strength
    ``S``, default 1) for every sample. A folder: the last ``max(1, 20 %)`` of its slices validate,
    the rest train (a single slice is used for both, with different undersampling draws, which the sentence says).
    """
    variety = _phantom_variety(data)
    if variety is not None:
        phantom_kw = {**phantom_kw, "variety": variety}
        tr = PhantomDataset(n_train, seed=seed, sampling=sampling, **phantom_kw)
        va = PhantomDataset(n_val, seed=seed + 1_000_000, sampling=sampling, **phantom_kw)
        kind = "cardiac-phantom" if variety == 0 else f"varied cardiac-phantom (variety {variety:g})"
        what = (f"{n_train} generated {kind} problems (matrix {tr.matrix}, frames {tr.frames}, coils "
                f"{tr.coils}, noise {tr.noise}, sampling {sampling or SamplingSpec()}), seed {seed}; "
                f"{n_val} validation problems, seed {seed + 1_000_000}")
        return tr, va, what
    noise = phantom_kw.get("noise", 0.0)
    slices = load_slices(data)
    total = len(slices)
    if total == 1:
        tr_idx, va_idx = [0], [0]
    else:
        n_v = max(1, round(0.2 * total))
        tr_idx, va_idx = list(range(total - n_v)), list(range(total - n_v, total))
    tr = IsmrmrdDataset(data, n=n_train, seed=seed, sampling=sampling, noise=noise, slice_indices=tr_idx,
                        slices=slices)
    va = IsmrmrdDataset(data, n=n_val, seed=seed + 1_000_000, sampling=sampling, noise=noise, slice_indices=va_idx,
                        slices=slices)
    same = " (the folder has one slice: training and validation share it, with different undersampling)" \
        if total == 1 else ""
    what = (f"fully sampled ISMRMRD slices from {data}: {len(tr_idx)} training, {len(va_idx)} validation "
            f"slice(s){same}, retrospectively undersampled ({sampling or SamplingSpec()}), noise {noise}")
    return tr, va, what
