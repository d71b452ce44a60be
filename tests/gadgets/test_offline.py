"""End to end offline: ISMRMRD file → chain → HDF5 images, on phantoms and on the real brain."""

import shutil
import subprocess

import h5py
import ismrmrd
import numpy as np
import pytest
import torch

from gadgets.cli import main as cli_main
from gadgets.ismrmrd_io import IsmrmrdFileError, read_ismrmrd, scan_to_ismrmrd, write_ismrmrd
from gadgets.offline import run_offline
from gadgets.stream.chain import load_chain
from gadgets.stream.h5out import read_images
from recon_core import metrics
from recon_core.phantoms import simulate_scan
from tests.brain_data import (BART_PICS_L2_NRMSE_R4, BRAIN, load_brain_kspace, r4_mask, reference_and_support,
                              support_nrmse)


def _method(spec, **params):
    for g in spec.gadgets:
        if g.gadget == "recon":
            g.params = dict(params)
    return spec


def _psnr(images, scan):
    gt = scan.ground_truth.abs()
    x = metrics.scale_to_reference(torch.from_numpy(np.stack([im.data[0, 0] for im in images])), gt,
                                   scan.body_mask)
    return float(metrics.psnr(x, gt))


@pytest.fixture(scope="module")
def cart_file(tmp_path_factory):
    scan = simulate_scan("cartesian", matrix=48, n_frames=3, n_coils=6, accel=2, acs_lines=12,
                         mask_kind="uniform", seed=1)
    path = tmp_path_factory.mktemp("cart") / "cart.h5"
    header, acqs = scan_to_ismrmrd(scan)
    write_ismrmrd(path, header, acqs, ground_truth=scan.ground_truth)
    return path, scan


def test_default_chain_on_cartesian_phantom_writes_client_layout(cart_file, tmp_path):
    path, scan = cart_file
    out = tmp_path / "out.h5"
    res = run_offline("default", path, out, "grp")
    zf = run_offline(_method(load_chain("default"), method="zero_filled"), path, None)
    assert len(res.images) == 3 and not res.result.errors
    series = read_images(out, "grp")
    assert list(series) == [0]
    data = series[0].data
    assert data.shape == (3, 1, 1, 48, 48) and data.dtype == np.float32
    hdrs = series[0].headers
    assert [int(h["phase"]) for h in hdrs] == [0, 1, 2]
    assert np.allclose(hdrs[0]["field_of_view"][:2], [scan.fov_mm, scan.fov_mm])
    p_cg, p_zf = _psnr(res.images, scan), _psnr(zf.images, scan)
    assert p_cg > 30.0 and p_cg > p_zf + 5.0, (p_cg, p_zf)


@pytest.mark.parametrize("kind,chain,kw", [
    ("radial", "radial_cine_cg_sense", dict(spokes_per_frame=16)),
    ("spiral", "spiral_cine_cg_sense", dict(interleaves=16, interleaves_per_frame=4)),
])
def test_noncartesian_cine_cg_sense_clearly_above_zero_filled(kind, chain, kw, tmp_path):
    scan = simulate_scan(kind, matrix=40, n_frames=3, n_coils=6, seed=2, **kw)
    path = tmp_path / f"{kind}.h5"
    header, acqs = scan_to_ismrmrd(scan)
    write_ismrmrd(path, header, acqs)
    cg = run_offline(_method(load_chain(chain), method="cg_sense", max_iter=15), path, None)
    zf = run_offline(_method(load_chain(chain), method="zero_filled"), path, None)
    p_cg, p_zf = _psnr(cg.images, scan), _psnr(zf.images, scan)
    assert p_cg > p_zf + 3.0, (kind, p_cg, p_zf)


def test_brain_fully_sampled_and_r4_through_default_chain(shared_data, tmp_path):
    header, acqs, _ = read_ismrmrd(shared_data / BRAIN)
    k = load_brain_kspace(shared_data)
    ref, supp = reference_and_support(k)
    full = run_offline("default", shared_data / BRAIN, None)
    assert len(full.images) == 1
    nrmse_full = support_nrmse(torch.from_numpy(full.images[0].data[0, 0]), ref, supp)
    mask = r4_mask()
    keep = [a for a in acqs if mask[a.idx.kspace_encode_step_1, 0] > 0]
    path = tmp_path / "brain_r4.h5"
    write_ismrmrd(path, header, keep)
    r4 = run_offline("default", path, None)
    nrmse_r4 = support_nrmse(torch.from_numpy(r4.images[0].data[0, 0]), ref, supp)
    assert nrmse_full < 0.02, nrmse_full          # SENSE combination vs RSS of the same data
    assert nrmse_r4 <= 1.1 * BART_PICS_L2_NRMSE_R4, nrmse_r4


@pytest.mark.skipif(shutil.which("ismrmrd_generate_cartesian_shepp_logan") is None,
                    reason="Debian ismrmrd-tools not installed")
def test_shepp_logan_from_ismrmrd_tools(tmp_path):
    """`default` on `ismrmrd_generate_cartesian_shepp_logan -a 2 -C` (two interleaved repetitions,
    even / odd lines, header calibrationMode interleaved; noise 0.05, no calibration lines):
    Gadgetron's semantics — one image per repetition (calibration pooled over both). Merging the
    repetitions into one k-space is the explicit buffer option for static scans (`merge:
    [interleaved]`): one image, >= 30 dB and well above the per-repetition images."""
    import copy

    from gadgets.stream.chain import load_chain

    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-a", "2", "-C", "-o", str(tmp_path / "sl.h5")],
                   check=True, capture_output=True, cwd=tmp_path)
    with h5py.File(tmp_path / "sl.h5", "r") as f:
        ph = f["dataset/phantom"][:]
    gt = torch.from_numpy(np.abs(ph["real"] + 1j * ph["imag"])[0].astype(np.float32))

    def psnr_of(im) -> float:
        return float(metrics.psnr(metrics.scale_to_reference(torch.from_numpy(im.data[0, 0]), gt), gt))

    per_rep = run_offline("default", tmp_path / "sl.h5", tmp_path / "out.h5", "sl")
    assert len(per_rep.images) == 2 and per_rep.images[0].data.shape[-2:] == gt.shape == (256, 256)
    assert [im.repetition for im in per_rep.images] == [0, 1]
    psnrs = [psnr_of(im) for im in per_rep.images]
    assert min(psnrs) > 24.0, psnrs
    merged_spec = copy.deepcopy(load_chain("default"))
    for g in merged_spec.gadgets:
        if g.gadget == "buffer":
            g.params = {**(g.params or {}), "merge": ["interleaved"]}
    merged = run_offline(merged_spec, tmp_path / "sl.h5", None)
    assert len(merged.images) == 1
    p_merged = psnr_of(merged.images[0])
    assert p_merged >= 30.0 and p_merged > max(psnrs) + 2.0, (p_merged, psnrs)


def _cli(args, capsys):
    code = cli_main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_bad_input_files_give_one_clear_message(tmp_path, capsys, cart_file):
    path, _ = cart_file
    # no header
    nohdr = tmp_path / "nohdr.h5"
    with h5py.File(path, "r") as src, h5py.File(nohdr, "w") as dst:
        src.copy("dataset/data", dst, "dataset/data")
    code, text = _cli(["run", "default", str(nohdr), "-o", str(tmp_path / "o.h5"), "-q"], capsys)
    assert code == 2 and "xml" in text.lower() and "nohdr.h5" in text
    # empty data
    header, acqs, _ = read_ismrmrd(path)
    empty = tmp_path / "empty.h5"
    ds = ismrmrd.Dataset(str(empty), "dataset", create_if_needed=True)
    ds.write_xml_header(header)
    ds.close()
    code, text = _cli(["run", "default", str(empty), "-o", str(tmp_path / "o.h5"), "-q"], capsys)
    assert code == 2 and "no acquisitions" in text
    # inconsistent encoding limits
    bad = tmp_path / "badlimits.h5"
    import re
    bad_header = re.sub(r"(<kspace_encoding_step_1>\s*<minimum>)0(</minimum>\s*<maximum>)\d+",
                        r"\g<1>40\g<2>10", header, count=1)
    assert bad_header != header
    write_ismrmrd(bad, bad_header, acqs)
    code, text = _cli(["run", "default", str(bad), "-o", str(tmp_path / "o.h5"), "-q"], capsys)
    assert code == 2 and "kspace_encoding_step_1" in text and "inconsistent" in text
    # unknown chain
    code, text = _cli(["run", "no_such_chain", str(path), "-q"], capsys)
    assert code == 2 and "no_such_chain" in text


def test_cli_phantom_run_chains(tmp_path, capsys):
    raw = tmp_path / "p.h5"
    code, text = _cli(["phantom", str(raw), "--kind", "cartesian", "--matrix", "32", "--frames", "2",
                       "--coils", "4", "--accel", "2", "--acs", "8"], capsys)
    assert code == 0 and raw.exists()
    code, text = _cli(["run", "default", str(raw), "-o", str(tmp_path / "o.h5"), "-G", "g", "-q"], capsys)
    assert code == 0 and "2 image(s)" in text
    assert read_images(tmp_path / "o.h5", "g")[0].data.shape[0] == 2
    code, text = _cli(["chains"], capsys)
    assert code == 0 and "default" in text and "radial_cine_cg_sense" in text


def test_missing_file_message(tmp_path, capsys):
    code, text = _cli(["run", "default", str(tmp_path / "absent.h5"), "-q"], capsys)
    assert code == 2 and "absent.h5" in text


def test_ismrmrd_file_error_type():
    assert issubclass(IsmrmrdFileError, ValueError)
