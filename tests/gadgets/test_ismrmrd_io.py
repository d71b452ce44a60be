"""ISMRMRD files: phantom → header + acquisitions → HDF5 → back; real and Debian files; errors."""

from __future__ import annotations

import math
import shutil
import subprocess

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import pytest
import torch

from gadgets.ismrmrd_io import (TICK_S, IsmrmrdFileError, iter_ismrmrd, read_coil_maps,
                                read_ground_truth, read_ismrmrd, scan_to_ismrmrd, write_ismrmrd)
from recon_core.phantoms import CardiacPhantom, simulate_scan

N, F, C = 32, 3, 4
KW = dict(accel=2, acs_lines=8, mask_kind="uniform", spokes_per_frame=5, interleaves=8,
          interleaves_per_frame=2, noise_std=0.05)


@pytest.fixture(scope="module")
def phantom() -> CardiacPhantom:
    return CardiacPhantom(N, F, C)


@pytest.fixture(scope="module", params=["cartesian", "radial", "spiral"])
def written(request, phantom, tmp_path_factory):
    scan = simulate_scan(request.param, N, F, C, phantom=phantom, **KW)
    xml, acqs = scan_to_ismrmrd(scan, protocol_name="cine_test", measurement_id="123_4_5_6")
    path = tmp_path_factory.mktemp("io") / f"{request.param}.h5"
    write_ismrmrd(path, xml, acqs, ground_truth=scan.ground_truth, coil_maps=scan.coil_maps)
    return scan, xml, acqs, path


def _flag_rows(acqs, flag):
    return [i for i, a in enumerate(acqs) if a.is_flag_set(flag)]


def test_round_trip_header(written):
    scan, xml, _, path = written
    header_xml, acqs, wavs = read_ismrmrd(path)
    assert header_xml == xml and wavs == []
    hdr = xsd.CreateFromDocument(header_xml)
    assert hdr.measurementInformation.protocolName == "cine_test"
    assert hdr.measurementInformation.measurementID == "123_4_5_6"
    assert hdr.acquisitionSystemInformation.receiverChannels == C
    enc = hdr.encoding[0]
    assert (enc.reconSpace.matrixSize.x, enc.reconSpace.matrixSize.y) == (N, N)
    assert enc.encodingLimits.phase.maximum == F - 1
    assert enc.encodingLimits.slice.maximum == 0
    if scan.kind == "cartesian":
        assert enc.trajectory == xsd.trajectoryType.CARTESIAN
        assert enc.encodedSpace.matrixSize.x == 2 * N
        assert enc.encodedSpace.fieldOfView_mm.x == pytest.approx(2 * enc.reconSpace.fieldOfView_mm.x)
        assert enc.encodingLimits.kspace_encoding_step_1.center == N // 2
        assert enc.parallelImaging.accelerationFactor.kspace_encoding_step_1 == 2
        assert enc.parallelImaging.calibrationMode == xsd.calibrationModeType.EMBEDDED
    else:
        expected = xsd.trajectoryType.GOLDENANGLE if scan.kind == "radial" else xsd.trajectoryType.SPIRAL
        assert enc.trajectory == expected
        assert enc.encodedSpace.matrixSize.x == N
        assert enc.parallelImaging is None


def test_round_trip_acquisitions(written):
    scan, _, sent, path = written
    _, acqs, _ = read_ismrmrd(path)
    assert len(acqs) == len(sent)
    # noise first, with the noise scan's samples
    noise = acqs[0]
    assert noise.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    np.testing.assert_array_equal(noise.data, scan.noise.numpy())
    assert noise.sample_time_us > 0
    img = acqs[1:]
    n_readouts = (int((scan.mask.amax(-1) > 0).sum()) if scan.kind == "cartesian"
                  else scan.encode_index.numel())
    assert len(img) == n_readouts
    assert not any(a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in img)
    assert _flag_rows(img, ismrmrd.ACQ_LAST_IN_MEASUREMENT) == [len(img) - 1]
    assert _flag_rows(img, ismrmrd.ACQ_LAST_IN_SLICE) == [len(img) - 1]
    assert _flag_rows(img, ismrmrd.ACQ_FIRST_IN_SLICE) == [0]
    phases = [a.idx.phase for a in img]
    assert phases == sorted(phases) and set(phases) == set(range(F))
    last_in_phase = _flag_rows(img, ismrmrd.ACQ_LAST_IN_PHASE)
    assert [img[i].idx.phase for i in last_in_phase] == list(range(F))
    assert all(i + 1 == len(img) or img[i + 1].idx.phase == img[i].idx.phase + 1 for i in last_in_phase)
    # time stamps: non-decreasing, 2.5 ms ticks, frame starts at the frame times
    ts = [a.acquisition_time_stamp for a in img]
    assert ts == sorted(ts)
    starts = [img[i + 1].acquisition_time_stamp for i in [-1] + last_in_phase[:-1]]
    for f in range(F):
        got = (starts[f] - starts[0]) * TICK_S
        assert got == pytest.approx(float(scan.frame_times_s[f]), abs=TICK_S)
    assert img[0].physiology_time_stamp[0] == 0
    assert all(a.active_channels == C and a.available_channels == C for a in acqs)
    if scan.kind == "cartesian":
        nx = scan.kspace.shape[-1]
        for a in img:
            assert a.number_of_samples == nx and a.center_sample == nx // 2
            assert a.trajectory_dimensions == 0
            line = scan.kspace[a.idx.phase, :, a.idx.kspace_encode_step_1]
            np.testing.assert_array_equal(a.data, line.numpy())
        calib = [a.idx.kspace_encode_step_1 for a in img
                 if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)]
        acs = set(range(N // 2 - 4, N // 2 + 4))
        assert set(calib) == acs and len(calib) == F * len(acs)
    else:
        s = scan.samples_per_readout
        for f in range(F):
            frame = [a for a in img if a.idx.phase == f]
            assert [a.idx.kspace_encode_step_1 for a in frame] == scan.encode_index[f].tolist()
            data = np.concatenate([a.data for a in frame], axis=1)
            np.testing.assert_array_equal(data, scan.kspace[f].numpy())
            traj = np.concatenate([a.traj for a in frame], axis=0)  # [M, 2] (kx, ky) cycles/FOV
            assert all(a.trajectory_dimensions == 2 and a.number_of_samples == s for a in frame)
            assert np.abs(traj).max() <= N / 2 + 1e-3
            rad = torch.from_numpy(traj[:, ::-1].T.copy()) * (2 * math.pi / N)
            torch.testing.assert_close(rad, scan.trajectory[f], atol=1e-5, rtol=0)


def test_truth_is_stored(written):
    scan, _, _, path = written
    torch.testing.assert_close(read_ground_truth(path), scan.ground_truth)
    torch.testing.assert_close(read_coil_maps(path), scan.coil_maps)


def test_iter_streams_and_merges_waveforms(phantom, tmp_path):
    scan = simulate_scan("radial", N, F, C, phantom=phantom, **KW)
    xml, acqs = scan_to_ismrmrd(scan)
    wav_ts = acqs[3].acquisition_time_stamp
    wav = ismrmrd.Waveform.from_array(np.arange(12, dtype=np.uint32).reshape(2, 6))
    wav.time_stamp = wav_ts
    wav.waveform_id = 0
    path = tmp_path / "w.h5"
    write_ismrmrd(path, xml, acqs + [wav])
    items = list(iter_ismrmrd(path))
    assert isinstance(items[0], str)
    kinds = [type(x).__name__ for x in items[1:]]
    assert kinds.count("Waveform") == 1 and kinds.count("Acquisition") == len(acqs)
    w = kinds.index("Waveform")
    # after every acquisition stamped at or before it, before every later one
    before, after = items[1:w + 1], items[w + 2:]
    assert all(a.acquisition_time_stamp <= wav_ts for a in before)
    assert all(a.acquisition_time_stamp > wav_ts for a in after)
    np.testing.assert_array_equal(items[w + 1].data, wav.data)
    # a generator: nothing beyond the header is read until asked for
    it = iter_ismrmrd(path)
    assert isinstance(next(it), str)
    it.close()


def test_poisson_mask_is_refused(phantom):
    scan = simulate_scan("cartesian", N, F, C, phantom=phantom, accel=2, acs_lines=6, mask_kind="poisson")
    with pytest.raises(ValueError, match="parts of readout lines"):
        scan_to_ismrmrd(scan)


def test_existing_group_needs_overwrite(written, tmp_path):
    scan, xml, acqs, _ = written
    path = tmp_path / "twice.h5"
    write_ismrmrd(path, xml, acqs[:3])
    with pytest.raises(ValueError, match="already exists"):
        write_ismrmrd(path, xml, acqs[:3])
    write_ismrmrd(path, xml, acqs[:2], overwrite=True)
    assert len(read_ismrmrd(path)[1]) == 2


@pytest.mark.skipif(shutil.which("ismrmrd_generate_cartesian_shepp_logan") is None,
                    reason="ismrmrd_generate_cartesian_shepp_logan not installed")
def test_reads_debian_shepp_logan(tmp_path):
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "32", "-c", "4", "-C",
                    "-o", str(tmp_path / "sl.h5")], cwd=tmp_path, check=True, capture_output=True)
    header_xml, acqs, wavs = read_ismrmrd(tmp_path / "sl.h5")
    hdr = xsd.CreateFromDocument(header_xml)
    enc = hdr.encoding[0]
    assert enc.encodedSpace.matrixSize.x == 64 and enc.reconSpace.matrixSize.x == 32
    noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    lines = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    assert len(noise) >= 1 and len(lines) == 32 and wavs == []
    assert all(a.active_channels == 4 and a.number_of_samples == 64 for a in lines)
    assert sorted(a.idx.kspace_encode_step_1 for a in lines) == list(range(32))
    assert float(np.abs(np.stack([a.data for a in lines])).max()) > 0


def test_reads_shared_brain_file(shared_data):
    path = shared_data / "brain_invivo_16ch_128_cartesian.h5"
    if not path.exists():
        pytest.skip(f"{path} not present")
    it = iter_ismrmrd(path)
    hdr = xsd.CreateFromDocument(next(it))
    assert hdr.acquisitionSystemInformation.receiverChannels == 16
    assert hdr.encoding[0].encodedSpace.matrixSize.y == 128
    assert hdr.encoding[0].trajectory == xsd.trajectoryType.CARTESIAN
    acqs = list(it)
    assert len(acqs) == 128
    assert all(a.active_channels == 16 for a in acqs)
    assert sorted(a.idx.kspace_encode_step_1 for a in acqs) == list(range(128))


# ----------------------------------------------------------------------------------------------
# errors name the file and the problem


def test_missing_file(tmp_path):
    p = tmp_path / "nope.h5"
    with pytest.raises(FileNotFoundError, match="nope.h5.*does not exist"):
        read_ismrmrd(p)


def test_not_hdf5(tmp_path):
    p = tmp_path / "text.h5"
    p.write_text("hello")
    with pytest.raises(IsmrmrdFileError, match="text.h5: not an HDF5 file"):
        read_ismrmrd(p)


def test_group_not_found(written):
    path = written[3]
    msg = r"group 'other' not found \(groups in the file: \['dataset'\]\)"
    with pytest.raises(IsmrmrdFileError, match=msg):
        read_ismrmrd(path, group="other")


def test_no_xml_header(tmp_path):
    p = tmp_path / "noxml.h5"
    with h5py.File(p, "w") as fh:
        fh.create_group("dataset")
    with pytest.raises(IsmrmrdFileError, match="noxml.h5: no ISMRMRD header"):
        read_ismrmrd(p)


def test_bad_header_reports_parser_message(tmp_path):
    bad = '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><bogusElement/></ismrmrdHeader>'
    with pytest.raises(Exception) as parser_exc:
        xsd.CreateFromDocument(bad)
    p = tmp_path / "badxml.h5"
    with ismrmrd.Dataset(str(p), "dataset") as ds:
        ds.write_xml_header(bad.encode())
    with pytest.raises(IsmrmrdFileError, match="badxml.h5: the ISMRMRD header .* does not parse") as exc:
        read_ismrmrd(p)
    assert str(parser_exc.value) in str(exc.value)


def test_no_acquisitions(written, tmp_path):
    p = tmp_path / "empty.h5"
    with ismrmrd.Dataset(str(p), "dataset") as ds:
        ds.write_xml_header(written[1].encode())
    with pytest.raises(IsmrmrdFileError, match="empty.h5: no acquisitions in group 'dataset'"):
        read_ismrmrd(p)
    with pytest.raises(IsmrmrdFileError, match="no ground_truth stored"):
        read_ground_truth(p)


def test_write_rejects_bad_input(written, tmp_path):
    _, xml, acqs, _ = written
    with pytest.raises(ValueError, match="header_xml is not a valid ISMRMRD header"):
        write_ismrmrd(tmp_path / "x.h5", "<notismrmrd/>", acqs)
    with pytest.raises(TypeError, match=r"acquisitions\[1\] must be an ismrmrd.Acquisition"):
        write_ismrmrd(tmp_path / "y.h5", xml, [acqs[0], "junk"])
    with pytest.raises(TypeError, match="scan must be a PhantomScan"):
        scan_to_ismrmrd({"kind": "radial"})


def test_shared_context_header_parser_is_strict_equal_and_thread_safe(written):
    """parse_header's parser (one shared binding context) gives the header ismrmrd.xsd's own parser
    gives, refuses an unknown element as strictly, and gives equal headers from 4 threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    from gadgets.ismrmrd_io import parse_header, warm_header_parser

    _, xml, _, _ = written
    warm_header_parser()
    assert parse_header(xml, "x") == xsd.CreateFromDocument(xml)
    bad = xml.replace("<encoding>", "<encoding><notAnIsmrmrdField>1</notAnIsmrmrdField>", 1)
    with pytest.raises(IsmrmrdFileError, match="src: the ISMRMRD header does not parse"):
        parse_header(bad, "src")
    with pytest.raises(Exception):
        xsd.CreateFromDocument(bad)
    with ThreadPoolExecutor(4) as pool:
        headers = list(pool.map(lambda _: parse_header(xml, "t"), range(16)))
    assert all(h == headers[0] for h in headers) and headers[0] == xsd.CreateFromDocument(xml)
