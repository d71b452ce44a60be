"""image_export gadget: ISMRMRD image headers, uint16 scaling, DICOM validity, PNG/GIF views."""

import shutil
import subprocess

import ismrmrd
import numpy as np
import pytest
import torch

from gadgets.base import ChainContext, ChainError
from gadgets.export import ImageExportGadget, ImageExportParams
from gadgets.messages import ImageSeries


def _series(n_frames=3, ny=12, nx=16):
    refs = []
    for f in range(n_frames):
        h = ismrmrd.AcquisitionHeader()
        h.position[:] = [1.0, 2.0, 3.0 + f]
        h.read_dir[:] = [1.0, 0.0, 0.0]
        h.phase_dir[:] = [0.0, 1.0, 0.0]
        h.slice_dir[:] = [0.0, 0.0, 1.0]
        h.acquisition_time_stamp = 100 + 20 * f
        h.measurement_uid = 7
        refs.append(h)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(n_frames, ny, nx, generator=g) + 1j * torch.randn(n_frames, ny, nx, generator=g)
    return ImageSeries(images=imgs.to(torch.complex64), fov_mm=(240.0, 180.0, 8.0), slice=2, ref_headers=refs,
                       frame_times_s=torch.arange(n_frames) * 0.05, method="cg_sense")


def test_float_magnitude_headers():
    series = _series()
    out = list(ImageExportGadget(ImageExportParams(), ChainContext()).handle(series))
    assert len(out) == 3 and all(isinstance(o, ismrmrd.Image) for o in out)
    for f, img in enumerate(out):
        assert img.data.shape == (1, 1, 12, 16) and img.data.dtype == np.float32
        assert tuple(img.matrix_size) == (16, 12, 1)
        assert np.allclose(img.field_of_view, (240.0, 180.0, 8.0))
        assert img.phase == f and img.slice == 2
        assert np.allclose(img.position, (1.0, 2.0, 3.0 + f))
        assert img.acquisition_time_stamp == 100 + 20 * f and img.measurement_uid == 7
        assert img.image_type == ismrmrd.IMTYPE_MAGNITUDE and img.image_index == f + 1
        assert np.allclose(img.data[0, 0], series.images[f].abs().numpy(), rtol=1e-6)
        assert "<name>DataRole</name><value>Image</value>" in img.attribute_string
        assert "TriggerTime_ms" in img.attribute_string


def test_uint16_scaling_and_phase_series():
    series = _series(n_frames=2)
    g = ImageExportGadget(ImageExportParams(output="magnitude_phase", dtype="uint16"), ChainContext())
    out = list(g.handle(series))
    mags = [o for o in out if o.image_type == ismrmrd.IMTYPE_MAGNITUDE]
    phases = [o for o in out if o.image_type == ismrmrd.IMTYPE_PHASE]
    assert len(mags) == 2 and len(phases) == 2
    assert all(o.data.dtype == np.uint16 for o in out)
    assert max(int(o.data.max()) for o in mags) == 4095
    assert {o.image_series_index for o in phases} == {1} and {o.image_series_index for o in mags} == {0}
    ratio = mags[0].data[0, 0].astype(float) / np.maximum(series.images[0].abs().numpy(), 1e-9)
    assert np.std(ratio[series.images[0].abs().numpy() > 1]) / np.mean(ratio) < 0.01


def test_bad_params_rejected():
    with pytest.raises(ChainError, match="uint16"):
        ImageExportParams.from_mapping({"output": "complex", "dtype": "uint16"}, "x.yaml:4")
    with pytest.raises(ChainError, match="'output' must be one of"):
        ImageExportParams.from_mapping({"output": "mag"}, "x.yaml:4")


def test_png_gif_and_dicom(tmp_path):
    from PIL import Image

    series = _series(n_frames=4)
    params = ImageExportParams(png=str(tmp_path / "m.png"), gif=str(tmp_path / "c.gif"),
                               dicom_dir=str(tmp_path / "dcm"))
    list(ImageExportGadget(params, ChainContext()).handle(series))
    pngs = list(tmp_path.glob("m_*.png"))
    gifs = list(tmp_path.glob("c_*.gif"))
    assert len(pngs) == 1 and len(gifs) == 1
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 4
    files = sorted((tmp_path / "dcm").glob("*.dcm"))
    assert len(files) == 4
    import pydicom

    ds = [pydicom.dcmread(f) for f in files]
    assert len({d.SeriesInstanceUID for d in ds}) == 1 and len({d.SOPInstanceUID for d in ds}) == 4
    assert ds[0].Rows == 12 and ds[0].Columns == 16
    assert [float(v) for v in ds[0].PixelSpacing] == pytest.approx([15.0, 15.0])
    assert [float(d.TriggerTime) for d in ds] == pytest.approx([0, 50, 100, 150])
    # first pixel centre: position − (N//2)·spacing along read and phase
    assert [float(v) for v in ds[0].ImagePositionPatient] == pytest.approx([1 - 8 * 15, 2 - 6 * 15, 3])
    if shutil.which("dciodvfy") is None:
        pytest.skip("dicom3tools (dciodvfy) not installed")
    for f in files[:2]:
        res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
        errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, errors
