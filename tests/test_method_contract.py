"""One contract test for every registered reconstruction method (``recon_core.methods.METHODS``).

Each method runs through the product's own path — a chain (noise → buffer → coil_estimate → recon →
image_export) run by ``run_offline`` on small Cartesian, radial and spiral 2D+t phantom files — and
through the ``recon`` gadget on the buffers that chain produces, and is checked for: images per
frame of the right matrix, complex64 on the chain's device, progress reaching its total, stop on
request, determinism for a fixed seed, and a time budget that is honoured and reported. A method
added to the registry is covered without a new test (its ``quick_params`` keep the runs short).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gadgets.base import ChainContext
from gadgets.ismrmrd_io import scan_to_ismrmrd, write_ismrmrd
from gadgets.messages import ImageSeries, KSpaceBuffer
from gadgets.offline import run_offline
from gadgets.recon import ReconGadget, ReconParams
from gadgets.stream.chain import build_chain, chain_context, parse_chain_text
from recon_core.methods import METHODS, StopRequested, get_method
from recon_core.phantoms import simulate_scan
from tests.gadgets.harness import read_acquisitions, run_gadgets

N, FRAMES, COILS = 32, 4, 4
KINDS = {
    "cartesian": dict(accel=2, acs_lines=12, mask_kind="uniform"),
    "radial": dict(spokes_per_frame=16),
    "spiral": dict(interleaves=16, interleaves_per_frame=4),
}
PREFIX = {
    "cartesian": "  - gadget: noise\n  - gadget: remove_oversampling\n  - gadget: buffer\n"
                 "  - gadget: coil_estimate\n",
    "radial": "  - gadget: noise\n  - gadget: buffer\n    params: {frames: phase}\n  - gadget: coil_estimate\n",
    "spiral": "  - gadget: noise\n  - gadget: buffer\n    params: {frames: phase}\n  - gadget: coil_estimate\n",
}


def _chain_text(kind: str, method: str, params: dict) -> str:
    items = ", ".join([f"method: {method}"] + [f"{k}: {v}" for k, v in params.items()])
    return (f"version: 1\nname: contract_{kind}_{method}\nchain:\n{PREFIX[kind]}"
            f"  - gadget: recon\n    params: {{{items}}}\n  - gadget: image_export\n")


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    files = {}
    for kind, kw in KINDS.items():
        scan = simulate_scan(kind, matrix=N, n_frames=FRAMES, n_coils=COILS, seed=3, **kw)
        header, acqs = scan_to_ismrmrd(scan, protocol_name=f"contract_{kind}")
        files[kind] = root / f"{kind}.h5"
        write_ismrmrd(files[kind], header, acqs, ground_truth=scan.ground_truth, coil_maps=scan.coil_maps)
    return files


@pytest.fixture(scope="module")
def buffers(phantom_files) -> dict[str, KSpaceBuffer]:
    """The k-space buffer (with coil maps) each kind's chain hands to the recon gadget."""
    out = {}
    for kind, path in phantom_files.items():
        spec = parse_chain_text(_chain_text(kind, "zero_filled", {}).replace(
            "  - gadget: recon\n    params: {method: zero_filled}\n  - gadget: image_export\n", ""))
        xml, acqs = read_acquisitions(path)
        import ismrmrd

        ctx = chain_context(spec, default_device="cpu", header=ismrmrd.xsd.CreateFromDocument(xml), header_xml=xml)
        bufs = [m for m in run_gadgets(build_chain(spec, ctx), acqs) if isinstance(m, KSpaceBuffer)]
        assert len(bufs) == 1 and bufs[0].coil_maps is not None
        out[kind] = bufs[0]
    return out


def _recon(buf: KSpaceBuffer, method: str, params: dict, device: str = "cpu",
           **ctx_fields) -> tuple[ImageSeries, list]:
    events: list = []
    ctx = ChainContext(device=torch.device(device), progress=lambda g, e: events.append(e), **ctx_fields)
    gadget = ReconGadget(ReconParams.from_mapping({"method": method, **params}, "contract"), ctx)
    (series,) = list(gadget.process(buf))
    return series, events


CASES = [(m, k) for m in sorted(METHODS) for k in KINDS]


@pytest.mark.parametrize("method,kind", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_method_through_chain(method: str, kind: str, phantom_files) -> None:
    """The user's path: a chain file with this method, run by ``run_offline``, gives one finite image
    per frame of the encoded matrix, with the method and preset in the image meta."""
    if kind not in get_method(method).trajectories:
        pytest.skip(f"{method} reconstructs {get_method(method).trajectories} only")
    quick = get_method(method).quick_params
    res = run_offline(parse_chain_text(_chain_text(kind, method, quick)), phantom_files[kind], device="cpu")
    assert len(res.images) == FRAMES
    for im in res.images:
        data = np.asarray(im.data)
        assert data.shape[-2:] == (N, N)
        assert np.isfinite(data).all() and np.abs(data).max() > 0
        meta = im.attribute_string
        assert f"<value>{method}</value>" in meta and "ReconPreset" in meta


@pytest.mark.parametrize("method,kind", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_method_contract(method: str, kind: str, buffers) -> None:
    """Through the recon gadget: complex64 [F, N, N] on the device, progress reaches its total,
    the same seed gives the same images, another seed is allowed to differ."""
    cls = get_method(method)
    if kind not in cls.trajectories:
        pytest.skip(f"{method} reconstructs {cls.trajectories} only")
    buf = buffers[kind]
    series, events = _recon(buf, method, dict(cls.quick_params, seed=7))
    x = series.images
    assert x.dtype == torch.complex64 and x.device.type == "cpu"
    assert tuple(x.shape) == (FRAMES, N, N)
    assert torch.isfinite(torch.view_as_real(x)).all()
    assert events, f"{method} reported no progress"
    assert all(e.method == method for e in events)
    assert any(e.step == e.total for e in events), f"{method}: progress never reached its total"
    last = events[-1]
    assert last.step == last.total, f"{method}: last event {last.step}/{last.total}"
    again, _ = _recon(buf, method, dict(cls.quick_params, seed=7))
    assert torch.equal(again.images, x), f"{method}: not deterministic for a fixed seed"


#: CUDA ÷ CPU relative difference allowed: classical iterations (cuFFT, and torchkbnufft on CUDA where
#: cufinufft is not installed, against finufft on the CPU: ~1e-3), feed-forward networks (TF32
#: convolutions on recent GPUs), networks fitted for a few Adam steps from the same initialisation
CUDA_TOL = {"fitted": 0.3, "trained": 2e-2, "classical": 2e-2}
FITTED = {"gip", "inr", "convdecoder", "tdip"}
TRAINED = {"cgpd_csnet", "dc_cnn", "dc_cnn_lr", "slr_net"}


def test_cuda_tolerance_groups_name_registered_methods() -> None:
    assert FITTED | TRAINED <= set(METHODS) and not FITTED & TRAINED


@pytest.mark.cuda
@pytest.mark.parametrize("method,kind", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_method_on_cuda_agrees_with_cpu(method: str, kind: str, buffers) -> None:
    """Every method on every kind of data runs on CUDA through the recon gadget (the chain's device):
    complex64 images on the GPU, finite, and close to the CPU's with the same preset and seed."""
    cls = get_method(method)
    if kind not in cls.trajectories:
        pytest.skip(f"{method} reconstructs {cls.trajectories} only")
    params = dict(cls.quick_params, preset="fast", seed=7)
    cpu, _ = _recon(buffers[kind], method, params)
    gpu, events = _recon(buffers[kind], method, params, device="cuda")
    x = gpu.images
    assert x.device.type == "cuda" and x.dtype == torch.complex64
    assert torch.isfinite(torch.view_as_real(x)).all() and events
    ref = cpu.images
    rel = float(torch.linalg.vector_norm(x.cpu() - ref) / torch.linalg.vector_norm(ref))
    group = "fitted" if method in FITTED else "trained" if method in TRAINED else "classical"
    assert rel < CUDA_TOL[group], f"{method}/{kind}: CUDA differs from CPU by {rel:.2e} ({group})"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_stops_on_request(method: str, buffers) -> None:
    """A stop request (session cancelled) ends the method at its first progress report."""
    cls = get_method(method)
    kind = "radial" if "radial" in cls.trajectories else cls.trajectories[0]
    with pytest.raises(StopRequested):
        _recon(buffers[kind], method, dict(cls.quick_params), stop_requested=lambda: True)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_presets_and_budget(method: str, buffers) -> None:
    """Both presets resolve (``auto`` = ``fast`` on the CPU), explicit values beat presets, and a
    spent time budget is either honoured (reported in the image meta) or the method is one-shot."""
    cls = get_method(method)
    assert cls(device="cpu").preset == "fast" and cls(device="cuda").preset == cls.auto_preset("cuda")
    assert cls(preset="fast", device="cuda").preset == "fast" and cls.auto_preset("cuda") in ("paper", "fast")
    assert cls(preset="paper", device="cpu").params == cls.Params(preset="paper")
    for key, value in cls.presets.get("fast", {}).items():
        assert getattr(cls(device="cpu").params, key) == value
        assert getattr(cls(device="cpu", **{key: getattr(cls.Params(), key)}).params, key) == getattr(
            cls.Params(), key)
    series, events = _recon(buffers["cartesian"], method, dict(cls.quick_params, max_time_s=1e-9))
    planned = max(e.total for e in events)
    if planned > 1:
        assert "time budget" in series.meta.get("ReconStoppedEarly", ""), \
            f"{method}: a spent time budget was not honoured"
    assert torch.isfinite(torch.view_as_real(series.images)).all()
