"""Tests of the ``remove_oversampling`` and ``buffer`` gadgets on real and simulated ISMRMRD streams."""

from __future__ import annotations

import shutil
import subprocess

import ismrmrd
import numpy as np
import pytest
import torch

from gadgets.base import ChainError, GadgetError
from gadgets.buffer import TICK_S, BufferGadget, BufferParams
from gadgets.ismrmrd_io import scan_to_ismrmrd
from gadgets.messages import KSpaceBuffer
from gadgets.noise import NoiseGadget
from gadgets.oversampling import RemoveOversamplingGadget
from recon_core.phantoms import simulate_scan
from tests.gadgets.harness import Harness, make_context, read_acquisitions, run_gadgets

BRAIN = "brain_invivo_16ch_128_cartesian.h5"
GRE = "phantom_gre_2ch_160_cartesian.h5"


def header_xml(enc=(64, 32), rec=(64, 32), limits=(0, 31, 16), trajectory="cartesian", enc_z=1,
               extra_limits="", traj_desc="") -> str:
    lim = ""
    if limits is not None:
        lim = (f"<kspace_encoding_step_1><minimum>{limits[0]}</minimum><maximum>{limits[1]}</maximum>"
               f"<center>{limits[2]}</center></kspace_encoding_step_1>")
    return f"""<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace><matrixSize><x>{enc[0]}</x><y>{enc[1]}</y><z>{enc_z}</z></matrixSize>
      <fieldOfView_mm><x>300</x><y>300</y><z>6</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>{rec[0]}</x><y>{rec[1]}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>300</x><y>300</y><z>6</z></fieldOfView_mm></reconSpace>
    <encodingLimits>{lim}{extra_limits}</encodingLimits>
    <trajectory>{trajectory}</trajectory>{traj_desc}
  </encoding>
</ismrmrdHeader>"""


def line(e1: int, n: int = 64, channels: int = 2, center: int | None = None, scan: int = 0,
         flags: tuple[int, ...] = (), seed: int | None = None, **idx: int) -> ismrmrd.Acquisition:
    rng = np.random.default_rng(scan if seed is None else seed)
    data = (rng.standard_normal((channels, n)) + 1j * rng.standard_normal((channels, n))).astype(np.complex64)
    a = ismrmrd.Acquisition.from_array(data, None, scan_counter=scan,
                                       center_sample=n // 2 if center is None else center,
                                       acquisition_time_stamp=1000 + 4 * scan)
    a.idx.kspace_encode_step_1 = e1
    for k, v in idx.items():
        setattr(a.idx, k, v)
    for f in flags:
        a.set_flag(f)
    return a


# ------------------------------------------------------------------------------------ oversampling


def np_crop(d: np.ndarray, n_out: int) -> np.ndarray:
    """Reference readout crop with numpy: centred orthonormal iFFT, central crop, FFT back."""
    n = d.shape[-1]
    img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(d, axes=-1), axis=-1, norm="ortho"), axes=-1)
    img = img[..., n // 2 - n_out // 2: n // 2 - n_out // 2 + n_out]
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(img, axes=-1), axis=-1, norm="ortho"), axes=-1)


def test_remove_oversampling_on_real_gre(shared_data):
    xml, acqs = read_acquisitions(shared_data / GRE)
    raw = [a.data.copy() for a in acqs]
    ctx = make_context(xml)
    h = Harness([RemoveOversamplingGadget(ctx=ctx), BufferGadget(ctx=ctx)])
    for a in acqs:
        h.push(a)
    assert all(a.number_of_samples == 160 and a.center_sample == 80 for a in acqs)
    assert all(a.data.shape == (2, 160) for a in acqs)
    for i in (0, 37, 80, 159):
        ref = np_crop(raw[i].astype(np.complex128), 160)
        np.testing.assert_allclose(acqs[i].data, ref, atol=1e-6 * np.abs(ref).max())
    # orthonormal transforms: the energy of the kept field of view is preserved
    img = np.fft.ifft(raw[80], axis=-1, norm="ortho")
    assert np.sum(np.abs(acqs[80].data) ** 2) <= np.sum(np.abs(img) ** 2) * (1 + 1e-5)
    assert ctx.options["readout_oversampling_removed"] is True
    (buf,) = h.outputs
    assert tuple(buf.kspace.shape) == (1, 2, 160, 160)
    assert buf.matrix == (160, 160) and buf.encoded_matrix == (160, 320)
    assert float(buf.mask.min()) == 1.0


def test_remove_oversampling_passes_noise_and_noncartesian():
    ctx = make_context(header_xml(enc=(64, 32), rec=(32, 32)))
    noise = line(0, flags=(ismrmrd.ACQ_IS_NOISE_MEASUREMENT,))
    ro = line(3, scan=1)
    out = run_gadgets([RemoveOversamplingGadget(ctx=ctx)], [noise, ro])
    assert out[0].number_of_samples == 64 and out[1].number_of_samples == 32 and out[1].center_sample == 16
    ctx = make_context(header_xml(enc=(64, 32), rec=(32, 32), trajectory="radial"))
    traj = np.zeros((64, 2), np.float32)
    traj[:, 0] = np.linspace(-16, 16, 64, endpoint=False)
    a = ismrmrd.Acquisition.from_array(np.ones((2, 64), np.complex64), traj)
    (b,) = run_gadgets([RemoveOversamplingGadget(ctx=ctx)], [a])
    assert b.number_of_samples == 64 and np.array_equal(b.traj, traj)


def test_remove_oversampling_rejects_fractional_samples():
    ctx = make_context(header_xml(enc=(64, 32), rec=(32, 32)))
    with pytest.raises(GadgetError, match=r"acquisition 5: number_of_samples 63"):
        run_gadgets([RemoveOversamplingGadget(ctx=ctx)], [line(0, n=63, scan=5)])


# ---------------------------------------------------------------------------------------- Cartesian


def test_brain_fully_sampled(shared_data):
    xml, acqs = read_acquisitions(shared_data / BRAIN)
    ctx = make_context(xml)
    out = run_gadgets([NoiseGadget(ctx=ctx), BufferGadget(ctx=ctx)], acqs)
    assert len(out) == 1
    buf = out[0]
    assert isinstance(buf, KSpaceBuffer) and buf.is_cartesian
    assert tuple(buf.kspace.shape) == (1, 16, 128, 128) and buf.kspace.dtype == torch.complex64
    expected = np.zeros((16, 128, 128), np.complex64)
    for a in acqs:
        expected[:, a.idx.kspace_encode_step_1] = a.data
    np.testing.assert_array_equal(buf.kspace[0].numpy(), expected)
    assert tuple(buf.mask.shape) == (1, 128, 128) and bool((buf.mask == 1).all())
    assert buf.calibration is None and not buf.prewhitened
    assert buf.matrix == (128, 128) and buf.fov_mm == (256.0, 256.0, 3.0)
    assert len(buf.ref_headers) == 1 and buf.ref_headers[0].idx.kspace_encode_step_1 == 64
    stamps = np.array([a.acquisition_time_stamp for a in acqs], dtype=np.float64)
    assert buf.frame_times_s.tolist() == pytest.approx([stamps.mean() * TICK_S])
    # the k-space centre (largest energy) is at (Ny//2, Nx//2), within a sample (real echo timing)
    e = (buf.kspace[0].abs() ** 2).sum(0)
    peak = divmod(int(e.argmax()), 128)
    assert abs(peak[0] - 64) <= 1 and abs(peak[1] - 64) <= 1


@pytest.mark.skipif(shutil.which("ismrmrd_generate_cartesian_shepp_logan") is None,
                    reason="ismrmrd-tools not installed")
def test_shepp_logan_accelerated_with_calibration(tmp_path):
    out_file = tmp_path / "sl.h5"
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "64", "-c", "4", "-a", "2", "-w", "16",
                    "-C", "-o", str(out_file)], check=True, capture_output=True, cwd=tmp_path)
    xml, acqs = read_acquisitions(out_file)
    by_scan = {}
    for a in acqs:
        if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            by_scan.setdefault(a.idx.repetition, {})[a.idx.kspace_encode_step_1] = (
                a.data.copy(), a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION))
    ctx = make_context(xml)
    h = Harness([RemoveOversamplingGadget(ctx=ctx), BufferGadget(ctx=ctx)])
    emitted_at = []
    for i, a in enumerate(acqs):
        if h.push(a):
            emitted_at.append(i)
    assert len(emitted_at) >= 1 and emitted_at[0] < len(acqs) - 1   # repetition 0 before the end
    h.close()
    bufs = h.outputs
    assert [b.repetition for b in bufs] == [0, 1]
    for b in bufs:
        assert tuple(b.kspace.shape) == (1, 4, 64, 64)
        rows = b.mask[0].amax(dim=1).numpy()
        lines = by_scan[b.repetition]
        img_rows = sorted(e for e, (_, cal_only) in lines.items() if not cal_only)
        assert np.flatnonzero(rows).tolist() == img_rows              # every 2nd line + cal-and-imaging
        assert len(img_rows) == 32                                    # even lines, 8 of them also calibration
        for e, (d, cal_only) in lines.items():
            if cal_only:
                assert float(b.kspace[0, :, e].abs().max()) == 0.0    # calibration-only: not in image k-space
        assert tuple(b.calibration.shape) == (4, 16, 64)              # 16 central lines, full readout
        for e in range(24, 40):
            ref = np_crop(lines[e][0].astype(np.complex128), 64)
            np.testing.assert_allclose(b.calibration[:, e - 24].numpy(), ref, atol=1e-5 * np.abs(ref).max())


def test_partial_fourier_asymmetric_echo_and_reverse():
    # Ny 32 with centre 16 but lines only 8..31 (partial Fourier); readouts of 48 of 64 samples, echo at 16
    ctx = make_context(header_xml(limits=(8, 31, 16)))
    acqs = [line(e1, n=48, center=16, scan=e1, flags=(ismrmrd.ACQ_IS_REVERSE,) if e1 % 2 else ())
            for e1 in range(8, 32)]
    raw = {a.idx.kspace_encode_step_1: a.data.copy() for a in acqs}
    (buf,) = run_gadgets([BufferGadget(ctx=ctx)], acqs)
    k, m = buf.kspace[0].numpy(), buf.mask[0].numpy()
    assert not m[:8].any()                                            # partial Fourier rows stay empty
    assert m[8::2, 16:].all() and not m[8::2, :16].any()              # echo (sample 16) at column 32
    assert m[9::2, 1:49].all() and not m[9::2, 49:].any() and not m[9::2, :1].any()
    np.testing.assert_array_equal(k[:, 10, 16:], raw[10])
    np.testing.assert_array_equal(k[:, 11, 1:49], raw[11][:, ::-1])   # flipped: echo 16 → 31 → col 32
    assert buf.ref_headers[0].idx.kspace_encode_step_1 == 16


def test_trigger_per_slice_before_flush():
    ctx = make_context(header_xml(limits=(0, 7, 4), enc=(16, 8), rec=(16, 8)))
    msgs = []
    for s in range(2):
        for e1 in range(8):
            flags = (ismrmrd.ACQ_LAST_IN_SLICE,) if e1 == 7 else ()
            msgs.append(line(e1, n=16, scan=8 * s + e1, flags=flags, slice=s))
    h = Harness([BufferGadget(ctx=ctx)])
    got = [h.push(m) for m in msgs]
    assert [i for i, g in enumerate(got) if g] == [7, 15]
    assert [b.slice for g in got for b in g] == [0, 1]
    assert h.close() == []
    first = got[7][0]
    np.testing.assert_array_equal(first.kspace[0, :, 0].numpy(), msgs[0].data)   # e1 0 → row 0 (centre 4)


def test_frames_along_phase_and_trigger_none():
    ctx = make_context(header_xml(limits=(0, 7, 4), enc=(16, 8), rec=(16, 8)))
    msgs = []
    for ph in range(3):
        for e1 in range(8):
            flags = (ismrmrd.ACQ_LAST_IN_SLICE,) if (ph == 2 and e1 == 7) else ()
            msgs.append(line(e1, n=16, scan=8 * ph + e1, flags=flags, phase=ph))
    h = Harness([BufferGadget(BufferParams(trigger="none"), ctx)])
    assert all(h.push(m) == [] for m in msgs)
    (buf,) = h.close()
    assert tuple(buf.kspace.shape) == (3, 2, 8, 16) and buf.frame_axis == "phase"
    np.testing.assert_array_equal(buf.kspace[2, :, 3].numpy(), msgs[2 * 8 + 3].data)
    assert len(buf.ref_headers) == 3 and buf.ref_headers[1].idx.phase == 1
    assert buf.frame_times_s.shape == (3,) and bool((buf.frame_times_s.diff() > 0).all())
    # frames="none": one buffer per phase
    ctx = make_context(header_xml(limits=(0, 7, 4), enc=(16, 8), rec=(16, 8)))
    bufs = run_gadgets([BufferGadget(BufferParams.from_mapping({"frames": "none"}), ctx)], msgs)
    assert len(bufs) == 3 and all(b.n_frames == 1 for b in bufs)


def test_trigger_repetition_and_phase():
    hdr = header_xml(limits=(0, 3, 2), enc=(16, 4), rec=(16, 4))
    msgs = []
    for rep in range(2):
        for ph in range(2):
            for e1 in range(4):
                flags = []
                if e1 == 3:
                    flags.append(ismrmrd.ACQ_LAST_IN_PHASE)
                    if ph == 1:
                        flags.append(ismrmrd.ACQ_LAST_IN_REPETITION)
                msgs.append(line(e1, n=16, scan=len(msgs), flags=tuple(flags), phase=ph, repetition=rep))
    # repetition trigger: one buffer (2 phase frames) at the end of each repetition
    h = Harness([BufferGadget(BufferParams(trigger="repetition"), make_context(hdr))])
    got = [h.push(m) for m in msgs]
    assert [i for i, g in enumerate(got) if g] == [7, 15]
    assert [(b.repetition, b.n_frames) for g in got for b in g] == [(0, 2), (1, 2)]
    # phase trigger with frames along phase: the bucket so far (one phase) at every LAST_IN_PHASE
    h = Harness([BufferGadget(BufferParams(trigger="phase"), make_context(hdr))])
    got = [h.push(m) for m in msgs]
    assert [i for i, g in enumerate(got) if g] == [3, 7, 11, 15]
    assert [b.meta["frame_indices"] for g in got for b in g] == [[0], [1], [0], [1]]
    # frames along repetition: one buffer per phase, two repetition frames each, at the end
    h = Harness([BufferGadget(BufferParams(trigger="none", frames="repetition"), make_context(hdr))])
    assert all(h.push(m) == [] for m in msgs)
    bufs = h.close()
    assert [(b.meta["phase"], b.n_frames, b.frame_axis) for b in bufs] == [(0, 2, "repetition"),
                                                                          (1, 2, "repetition")]
    np.testing.assert_array_equal(bufs[1].kspace[1, :, 0].numpy(), msgs[12].data)


def test_dropped_acquisitions_and_averages():
    ctx = make_context(header_xml(limits=(0, 7, 4), enc=(16, 8), rec=(16, 8)))
    msgs = [line(e1, n=16, scan=e1) for e1 in range(8)]
    dup = line(3, n=16, scan=50)
    msgs.append(dup)
    for s, f in enumerate((ismrmrd.ACQ_IS_NAVIGATION_DATA, ismrmrd.ACQ_IS_PHASECORR_DATA,
                           ismrmrd.ACQ_IS_DUMMYSCAN_DATA, ismrmrd.ACQ_IS_NOISE_MEASUREMENT)):
        msgs.append(line(5, n=16, scan=60 + s, flags=(f,)))
    (buf,) = run_gadgets([BufferGadget(ctx=ctx)], msgs)
    np.testing.assert_allclose(buf.kspace[0, :, 3].numpy(), (msgs[3].data + dup.data) / 2, rtol=1e-6)
    np.testing.assert_array_equal(buf.kspace[0, :, 5].numpy(), msgs[5].data)
    assert buf.meta["n_acquisitions"] == 9


# ------------------------------------------------------------------------------------ non-Cartesian


@pytest.mark.parametrize("kind", ["radial", "spiral"])
def test_noncartesian_phantom_round_trip(kind):
    n = 32
    scan = simulate_scan(kind, matrix=n, n_frames=3, n_coils=4, spokes_per_frame=5, interleaves=8,
                         interleaves_per_frame=2, noise_std=0.0)
    xml, acqs = scan_to_ismrmrd(scan)
    ctx = make_context(xml)
    h = Harness([RemoveOversamplingGadget(ctx=ctx), BufferGadget(ctx=ctx)])
    got = [h.push(a) for a in acqs]
    assert [i for i, g in enumerate(got) if g] == [len(acqs) - 1]     # at LAST_IN_SLICE; noise dropped
    (buf,) = h.outputs
    assert not buf.is_cartesian and buf.frame_axis == "phase"
    assert tuple(buf.kspace.shape) == tuple(scan.kspace.shape)
    np.testing.assert_array_equal(buf.kspace.numpy(), scan.kspace.numpy())
    assert tuple(buf.trajectory.shape) == tuple(scan.trajectory.shape)
    assert buf.trajectory.dtype == torch.float32
    assert float((buf.trajectory - scan.trajectory).abs().max()) < 1e-5
    assert buf.meta["trajectory_units"] == "cycles/fov"
    assert tuple(buf.dcf.shape) == (3, scan.kspace.shape[-1]) and bool((buf.dcf > 0).all())
    assert buf.meta["dcf"] == ("ramp" if kind == "radial" else "pipe_menon")
    assert buf.matrix == (n, n) and len(buf.ref_headers) == 3
    assert buf.meta["frame_indices"] == [0, 1, 2]
    assert float((buf.frame_times_s.diff() - scan.frame_times_s.diff().double()).abs().max()) < 0.01


def test_phantom_stream_noise_and_buffer():
    """Phantom noise scan → prewhitened Cartesian buffer whose noise-only region is white."""
    scan = simulate_scan("cartesian", matrix=32, n_frames=2, n_coils=4, accel=2, acs_lines=8,
                         mask_kind="uniform", noise_std=0.05)
    xml, acqs = scan_to_ismrmrd(scan)
    ctx = make_context(xml)
    bufs = run_gadgets([NoiseGadget(ctx=ctx), RemoveOversamplingGadget(ctx=ctx), BufferGadget(ctx=ctx)], acqs)
    (buf,) = bufs
    assert buf.prewhitened and tuple(buf.kspace.shape) == (2, 4, 32, 32)
    np.testing.assert_array_equal(buf.mask.numpy(), scan.mask.amax(dim=-1, keepdim=True).expand(-1, -1, 32)
                                  .numpy())
    assert buf.calibration is not None and buf.calibration.shape[1] >= 8


def test_noncartesian_units_normalised_and_header_hint():
    traj = np.zeros((16, 2), np.float32)
    traj[:, 0] = np.linspace(-0.5, 0.5, 16, endpoint=False)
    acqs = [ismrmrd.Acquisition.from_array(np.ones((1, 16), np.complex64), traj.copy()) for _ in range(2)]
    ctx = make_context(header_xml(enc=(16, 16), rec=(16, 16), limits=None, trajectory="other"))
    (buf,) = run_gadgets([BufferGadget(BufferParams(dcf="none"), ctx)], acqs)
    assert buf.meta["trajectory_units"] == "cycles/sample" and buf.dcf is None
    np.testing.assert_allclose(buf.trajectory[0, 1, :16].numpy(), 2 * np.pi * traj[:, 0], rtol=1e-6)
    assert float(buf.trajectory[0, 0].abs().max()) == 0.0
    desc = ("<trajectoryDescription><identifier>x</identifier><userParameterString><name>units</name>"
            "<value>rad/voxel</value></userParameterString></trajectoryDescription>")
    ctx = make_context(header_xml(enc=(16, 16), rec=(16, 16), limits=None, trajectory="other",
                                  traj_desc=desc))
    (buf,) = run_gadgets([BufferGadget(BufferParams(dcf="ramp"), ctx)], acqs)
    assert buf.meta["trajectory_units"] == "rad/voxel"
    np.testing.assert_allclose(buf.trajectory[0, 1, :16].numpy(), traj[:, 0], rtol=1e-6)


# -------------------------------------------------------------------------------------- bad inputs


def test_encode_step_outside_limits():
    ctx = make_context(header_xml(limits=(0, 31, 16)))
    with pytest.raises(GadgetError) as exc:
        run_gadgets([BufferGadget(ctx=ctx)], [line(3, scan=1), line(40, scan=2)])
    msg = str(exc.value)
    assert msg == ("[buffer] acquisition 2: kspace_encode_step_1 40 is outside the header's "
                   "encodingLimits/kspace_encoding_step_1 [0, 31]")


def test_empty_stream():
    ctx = make_context(header_xml())
    with pytest.raises(GadgetError, match=r"^\[buffer\] no imaging acquisitions received$"):
        run_gadgets([BufferGadget(ctx=ctx)], [])
    # navigators only: still no imaging data
    ctx = make_context(header_xml())
    with pytest.raises(GadgetError, match="no imaging acquisitions received"):
        run_gadgets([BufferGadget(ctx=ctx)], [line(0, flags=(ismrmrd.ACQ_IS_NAVIGATION_DATA,))])


def test_noise_only_stream_is_not_an_error():
    ctx = make_context(header_xml())
    assert run_gadgets([BufferGadget(ctx=ctx)], [line(0, flags=(ismrmrd.ACQ_IS_NOISE_MEASUREMENT,))]) == []


def test_3d_rejected():
    ctx = make_context(header_xml(enc_z=8))
    with pytest.raises(GadgetError,
                       match=r"3D acquisitions are not supported yet \(header encodedSpace/matrixSize/z"):
        run_gadgets([BufferGadget(ctx=ctx)], [line(0)])
    ctx = make_context(header_xml())
    with pytest.raises(GadgetError, match=r"acquisition 4: kspace_encode_step_2 is 2; 3D"):
        run_gadgets([BufferGadget(ctx=ctx)], [line(0, scan=4, kspace_encode_step_2=2)])


def test_bad_header_matrix_and_limits():
    ctx = make_context(header_xml(enc=(64, 0)))
    with pytest.raises(GadgetError, match=r"encodedSpace/matrixSize/y is 0"):
        run_gadgets([BufferGadget(ctx=ctx)], [line(0)])
    ctx = make_context(header_xml(limits=(10, 5, 7)))
    with pytest.raises(GadgetError, match=r"kspace_encoding_step_1: minimum 10 > maximum 5"):
        run_gadgets([BufferGadget(ctx=ctx)], [line(0)])


def test_unequal_noncartesian_frames():
    ctx = make_context(header_xml(enc=(16, 16), rec=(16, 16), limits=None, trajectory="spiral"))
    traj = np.zeros((16, 2), np.float32)
    a0 = ismrmrd.Acquisition.from_array(np.ones((1, 16), np.complex64), traj)
    a1 = ismrmrd.Acquisition.from_array(np.ones((1, 16), np.complex64), traj)
    a1.idx.phase = 1
    a2 = ismrmrd.Acquisition.from_array(np.ones((1, 16), np.complex64), traj)
    a2.idx.phase = 1
    with pytest.raises(GadgetError, match=r"different sample counts \(phase 0: 16, phase 1: 32\)"):
        run_gadgets([BufferGadget(ctx=ctx)], [a0, a1, a2])


def test_params_validation():
    with pytest.raises(ChainError, match="trigger"):
        BufferParams.from_mapping({"trigger": "average"})
    with pytest.raises(ChainError, match="dcf_iterations"):
        BufferParams.from_mapping({"dcf_iterations": "0"})


_INTERLEAVED = ("<parallelImaging><accelerationFactor><kspace_encoding_step_1>2</kspace_encoding_step_1>"
                "<kspace_encoding_step_2>1</kspace_encoding_step_2></accelerationFactor>"
                "<calibrationMode>interleaved</calibrationMode></parallelImaging>")
_REP_LIMITS = "<repetition><minimum>0</minimum><maximum>1</maximum><center>0</center></repetition>"


def _interleaved_stream() -> list[ismrmrd.Acquisition]:
    """Even lines in repetition 0, odd lines in repetition 1, LAST_IN_SLICE closing each."""
    acqs = []
    for rep in (0, 1):
        lines = list(range(rep, 32, 2))
        for i, e1 in enumerate(lines):
            flags = (ismrmrd.ACQ_LAST_IN_SLICE,) if i == len(lines) - 1 else ()
            acqs.append(line(e1, scan=len(acqs), flags=flags, repetition=rep))
    return acqs


def test_merge_interleaved_repetitions_into_one_kspace():
    acqs = _interleaved_stream()
    raw = {a.idx.kspace_encode_step_1: a.data.copy() for a in acqs}
    xml = header_xml(extra_limits=_REP_LIMITS, traj_desc=_INTERLEAVED)
    h = Harness([BufferGadget(BufferParams(merge=["interleaved"]), ctx=make_context(xml))])
    emitted_at = [i for i, a in enumerate(acqs) if h.push(a)]
    h.close()
    assert emitted_at == [len(acqs) - 1]        # not at the end of repetition 0: its piece is incomplete
    (buf,) = h.outputs
    assert buf.repetition == 0 and buf.n_frames == 1
    assert bool(buf.mask[0].amax(dim=1).all())  # every line: the union of both repetitions
    for e1, d in raw.items():
        np.testing.assert_array_equal(buf.kspace[0, :, e1].numpy(), d)
    # without the merge (or when the header does not declare interleaving) one buffer per repetition
    for params, header in ((BufferParams(), xml), (BufferParams(merge=["interleaved"]),
                                                     header_xml(extra_limits=_REP_LIMITS))):
        bufs = run_gadgets([BufferGadget(params, ctx=make_context(header))], acqs)
        assert [b.repetition for b in bufs] == [0, 1]
        assert [int(b.mask[0].amax(dim=1).sum()) for b in bufs] == [16, 16]


def test_merge_explicit_counter_averages_repeated_lines_and_waits_without_limits():
    # two full repetitions of the same lines, no repetition limits: merged at the end of the stream, averaged
    acqs = [line(e1, scan=10 * rep + e1, repetition=rep,
                 flags=(ismrmrd.ACQ_LAST_IN_SLICE,) if e1 == 31 else ()) for rep in (0, 1) for e1 in range(32)]
    h = Harness([BufferGadget(BufferParams(merge=["repetition"]), ctx=make_context(header_xml()))])
    assert not any(h.push(a) for a in acqs)     # no limits: the last piece is only known at the end
    h.close()
    (buf,) = h.outputs
    mean = (acqs[5].data + acqs[32 + 5].data) / 2
    np.testing.assert_allclose(buf.kspace[0, :, 5].numpy(), mean, rtol=1e-6)


def test_merge_parameter_errors_name_the_problem():
    with pytest.raises(ChainError, match="merge.*'average'.*allowed"):
        BufferParams.from_mapping({"merge": "average"}, where="chain.yaml line 7 (buffer)")
    with pytest.raises(ChainError, match="merge.*'phase'.*frame axis"):
        BufferParams.from_mapping({"merge": "phase", "frames": "phase"}, where="chain.yaml line 7 (buffer)")
    assert BufferParams.from_mapping({"merge": "repetition, set"}, where="x").merge == ["repetition", "set"]


def test_calibration_block_follows_the_one_acs_rule(caplog):
    """Calibration lines e1 5..11 (centre 8), imaging lines elsewhere: the block is the fully sampled
    rectangle around the centre (recon_core.trajectories.acs_region); lines that miss the centre give none."""
    ctx = make_context(header_xml(limits=(0, 15, 8), enc=(16, 16), rec=(16, 16)))
    cal = (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING,)
    msgs = [line(e1, n=16, scan=e1, flags=cal) for e1 in range(5, 12)]
    msgs += [line(e1, n=16, scan=20 + e1) for e1 in (0, 2, 13, 14)]
    (buf,) = run_gadgets([BufferGadget(ctx=ctx)], msgs)
    assert tuple(buf.calibration.shape) == (2, 7, 16) and buf.meta["calibration_shape"] == [7, 16]
    np.testing.assert_array_equal(buf.calibration[:, 0].numpy(), msgs[0].data)  # row 5 first
    # calibration lines that do not include the k-space centre row: a warning, no calibration block
    off = [line(e1, n=16, scan=e1, flags=cal) for e1 in range(0, 4)] + [line(8, n=16, scan=9)]
    with caplog.at_level("WARNING"):
        (buf2,) = run_gadgets([BufferGadget(ctx=make_context(header_xml(limits=(0, 15, 8), enc=(16, 16),
                                                                         rec=(16, 16))))], off)
    assert buf2.calibration is None and buf2.meta["calibration_shape"] is None
    assert any("do not include the k-space centre" in r.getMessage() for r in caplog.records)
