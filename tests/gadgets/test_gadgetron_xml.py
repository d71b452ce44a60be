"""Gadgetron's own chain files: loading (property by property), <parallel>/<external>, the standard
chain names, the generic-recon image stage, and images through the server by file (-C) and name (-c)."""

from __future__ import annotations

import io
import logging
import math
import shutil
import subprocess
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest
import torch

from bench.gadgetron_chains import (DEFAULT_REPO, bart_psnrs, chain_psnrs, classify, dir_chain_files, phantom_of,
                                    psnr_vs_phantom, repo_chain_files)
from gadgets.base import ChainContext, ChainError
from gadgets.image_ops import (AutoScaleGadget, AutoScaleParams, ComplexToFloatGadget, EigenChannelGadget,
                               EigenChannelParams, ExtractGadget, ExtractParams, FloatToUShortGadget,
                               FloatToUShortParams, KSpaceFilterGadget, KSpaceFilterParams, PartialFourierGadget,
                               PartialFourierParams, symmetric_filter)
from gadgets.messages import ImageSeries, KSpaceBuffer
from gadgets.stream.chain import build_chain, chain_context, load_chain, parse_chain_text

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "gadgetron_chains"
HAVE_GEN = shutil.which("ismrmrd_generate_cartesian_shepp_logan") is not None
HAVE_BART = shutil.which("bart") is not None
needs_gen = pytest.mark.skipif(not HAVE_GEN, reason="Debian ismrmrd-tools not installed")

#: Gadgetron's standard chain names, each shipped in gadgets/chains
STANDARD = ("default.xml", "default_short.xml", "default_optimized.xml", "Generic_Cartesian_Grappa.xml",
            "Generic_Cartesian_Grappa_SNR.xml", "Generic_Cartesian_Grappa_Complex.xml",
            "Generic_Cartesian_Grappa_ImageArray.xml", "Generic_Cartesian_Grappa_T2W.xml",
            "Generic_Cartesian_Grappa_RealTimeCine.xml", "grappa_cpu.xml", "NoiseSummary.xml")
#: the Cartesian core set among Gadgetron's files (fixtures and the fetched mirror)
CORE = ("default.xml", "default_short.xml", "Generic_Cartesian_Grappa.xml", "Generic_Cartesian_Grappa_SNR.xml",
        "Generic_Cartesian_Grappa_RealTimeCine.xml", "grappa_cpu.xml", "NoiseSummary.xml")


def _v2(stream: str) -> str:
    return ("<configuration><version>2</version>\n<stream>\n" + stream + "\n</stream></configuration>\n")


def _g(cls: str, **props: str) -> str:
    p = "".join(f'<property name="{k}" value="{v}"/>' for k, v in props.items())
    return f"<gadget><dll>gadgetron_mricore</dll><classname>{cls}</classname>{p}</gadget>"


# -- loading Gadgetron's files -------------------------------------------------------------------


def test_fixture_chain_files_load_or_are_refused_with_a_reason():
    rows = {Path(r["file"]).name: r for r in (classify(n, t, build=True) for n, t in dir_chain_files(FIXTURES))}
    assert not [r for r in rows.values() if r["status"] == "CRASH"], rows
    for name in CORE:
        assert rows[name]["status"] == "loaded", rows[name]
    expect_refused = {"Generic_Cartesian_Spirit.xml": "GenericReconCartesianSpiritGadget",
                      "parallel_bypass_example.xml": "ImageLayerer",
                      "external_python_buffer_example.xml": "'gadgetron.examples' is not run",
                      "external_connect_example.xml": "<connect",
                      "distributed_default.xml": "<distributed>"}
    for name, reason in expect_refused.items():
        assert rows[name]["status"] == "refused" and reason in rows[name]["detail"], rows[name]


@pytest.mark.skipif(not DEFAULT_REPO.exists(), reason="Gadgetron mirror not fetched")
def test_every_chain_file_gadgetron_ships():
    rows = [classify(n, t) for n, t in repo_chain_files(DEFAULT_REPO)]
    print("\n".join(f"{r['file']:<90} {r['status']:<8} {r['detail'][:120]}" for r in rows))
    assert len(rows) >= 100
    assert not [r for r in rows if r["status"] == "CRASH"]
    loaded = {Path(r["file"]).name for r in rows if r["status"] == "loaded"}
    assert set(CORE) <= loaded
    assert {"Generic_Cartesian_Grappa_T2W.xml", "Generic_Cartesian_Grappa_Complex.xml",
            "Generic_Cartesian_Grappa_ImageArray.xml", "default_optimized.xml", "grappa.xml"} <= loaded


def test_generic_grappa_maps_property_by_property(caplog):
    with caplog.at_level(logging.INFO, logger="torchgadgets.chain"):
        spec = load_chain(FIXTURES / "Generic_Cartesian_Grappa.xml", allow_paths=True)
    assert spec.gadget_names == ["noise", "remove_oversampling", "buffer", "eigen_channel", "coil_estimate",
                                 "recon", "partial_fourier", "kspace_filter", "fov_adjust", "image_scale",
                                 "image_export", "complex_to_float", "float_to_ushort"]
    p = {s.gadget: s.params for s in spec.gadgets}
    # N_dimension=contrast: one buffer per contrast; S_dimension=average: averages kept apart
    assert p["buffer"] == {"trigger": "none", "frames": "none", "separate": ["average"], "acs_in_data": True}
    assert p["eigen_channel"] == {"threshold": 0.002, "modes": 0}
    assert p["recon"]["method"] in ("grappa", "cg_sense") and p["coil_estimate"] == {"method": "walsh"}
    assert p["kspace_filter"]["ro"] == p["kspace_filter"]["e1"] == "gaussian"
    assert p["image_scale"] == {"constant": True, "factor": 10.0, "min_value": 64.0, "max_value": 4095.0,
                                "once": True}
    assert p["image_export"] == {"output": "complex", "series_index": 1}      # image_series 0 → series 1
    assert p["float_to_ushort"] == {"max_intensity": 32767.0, "min_intensity": 0.0, "intensity_offset": 0.0}
    # ignored with a reason, absorbed with a reason
    assert "ignoring Gadgetron property 'debug_folder'" in caplog.text
    assert "'downstream_coil_compression' of GenericReconCartesianGrappaGadget: GRAPPA unmixes" in caplog.text
    assert "AsymmetricEchoAdjustROGadget needs no step here" in caplog.text
    build_chain(spec, ChainContext())


def test_refused_properties_name_class_property_and_value():
    with pytest.raises(ChainError, match=r"<inline>:4: Gadgetron property 'ignore_segment' = 'false' of "
                                         r"BucketToBufferGadget: segments are always combined"):
        parse_chain_text(_v2(_g("AcquisitionAccumulateTriggerGadget") + "\n" +
                             _g("BucketToBufferGadget", ignore_segment="false")))
    with pytest.raises(ChainError, match=r"Gadgetron property 'filterRO' = 'Kaiser' of "
                                         r"GenericReconKSpaceFilteringGadget: unknown filter"):
        parse_chain_text(_v2(_g("GenericReconKSpaceFilteringGadget", filterRO="Kaiser")))
    with pytest.raises(ChainError, match=r"Gadgetron property 'coil_mask' of CoilReductionGadget .* has no "
                                         r"equivalent here"):
        parse_chain_text(_v2(_g("CoilReductionGadget", coils_out="8", coil_mask="1111")))


def test_coil_reduction_moves_after_the_buffer_and_stages_are_checked():
    spec = parse_chain_text(_v2("\n".join([_g("NoiseAdjustGadget"), _g("PCACoilGadget"),
                                          _g("CoilReductionGadget", coils_out="4"), _g("RemoveROOversamplingGadget"),
                                          _g("AcquisitionAccumulateTriggerGadget", trigger_dimension="repetition"),
                                          _g("BucketToBufferGadget"), _g("SimpleReconGadget"),
                                          _g("ImageArraySplitGadget"), _g("ExtractGadget"),
                                          _g("ImageFinishGadget")])))
    assert spec.gadget_names == ["noise", "remove_oversampling", "buffer", "coil_compress", "simple_recon",
                                 "image_export", "extract"]
    assert spec.gadgets[3].params == {"method": "svd", "n_virtual": 4}
    with pytest.raises(ChainError, match=r"BucketToBufferGadget \(buffer\) works on acquisitions, but the "
                                         r"stream carries images"):
        parse_chain_text(_v2(_g("ImageArraySplitGadget") + _g("BucketToBufferGadget")))
    # a chain may start later (image chains after an image reader): no buffer needed before SimpleRecon
    assert parse_chain_text(_v2(_g("ComplexToFloatGadget"))).gadget_names == ["complex_to_float"]


def test_parallel_grappa_pattern_runs_and_other_branches_are_refused():
    spec = load_chain(FIXTURES / "grappa_cpu.xml", allow_paths=True)
    assert spec.gadget_names == ["noise", "remove_oversampling", "buffer", "coil_compress", "coil_estimate", "recon",
                                 "image_export", "extract", "auto_scale", "float_to_ushort"]
    assert spec.gadgets[3].params["n_virtual"] == 8
    with pytest.raises(ChainError, match=r"<parallel> with branch 'ImageFanout'.*merge 'ImageLayerer' is not "
                                          "run "
                                         r"by this server; only Gadgetron's GRAPPA pattern"):
        load_chain(FIXTURES / "parallel_bypass_example.xml", allow_paths=True)


def test_external_gadgets_external_runs_in_process_others_are_never_imported():
    head = "\n".join([_g("NoiseAdjustGadget"), _g("RemoveROOversamplingGadget"),
                      _g("AcquisitionAccumulateTriggerGadget", trigger_dimension="slice"), _g("BucketToBufferGadget")])
    ext = ('<external><execute name="gadgets.external" target="recon_buffers" type="python"/>'
           '<configuration><property name="chain" value="default"/>'
           '<property name="recon.max_iter" value="5"/></configuration></external>')
    spec = parse_chain_text(_v2(head + "\n" + ext))
    assert spec.gadget_names == ["noise", "remove_oversampling", "buffer", "coil_estimate", "recon", "image_export"]
    assert spec.gadgets[4].params["max_iter"] == "5"
    whole = parse_chain_text(_v2('<external><execute name="gadgets.external" target="recon_acquisitions" '
                                 'type="python"/></external>'))
    assert whole.gadget_names == load_chain("default").gadget_names
    after_noise = parse_chain_text(_v2(_g("NoiseAdjustGadget") + '<external><execute name="gadgets.external" '
                                       'target="recon_acquisitions" type="python"/></external>'))
    assert after_noise.gadget_names == whole.gadget_names                 # prewhitened once, not twice
    with pytest.raises(ChainError, match=r"takes k-space buffers, but the stream carries acquisitions"):
        parse_chain_text(_v2(ext))
    for module in ("os", "gadgets.external.subprocess", "gadgetron.examples"):
        with pytest.raises(ChainError, match=rf"external python module '{module}' is not run by this server"):
            parse_chain_text(_v2(f'<external><execute name="{module}" target="recon" type="python"/></external>'))
    legacy_python = ("<gadgetronStreamConfiguration><gadget><dll>gadgetron_python</dll><classname>PythonGadget"
                     "</classname><property><name>python_module</name><value>evil</value></property>"
                     "<property><name>python_class</name><value>Run</value></property></gadget>"
                     "</gadgetronStreamConfiguration>")
    with pytest.raises(ChainError, match=r"external python module 'evil' is not run"):
        parse_chain_text(legacy_python)


# -- standard names ------------------------------------------------------------------------------


def test_standard_chain_names_resolve_to_shipped_chains():
    for name in STANDARD:
        spec = load_chain(name)
        assert spec.source.endswith(f"chains/{name}"), (name, spec.source)
        build_chain(spec, chain_context(spec, "cpu"))
    assert load_chain("default").source.endswith("default.yaml")
    assert load_chain("default").gadgets == load_chain("default.xml").gadgets == load_chain("default_v2").gadgets
    grappa = [load_chain(n) for n in STANDARD if "rappa" in n]
    assert all("recon" in s.gadget_names for s in grappa)
    assert load_chain("Generic_Cartesian_Grappa_Complex.xml").gadget_names[-1] == "image_export"
    assert load_chain("NoiseSummary.xml").gadget_names == ["noise_summary"]


# -- image stage ---------------------------------------------------------------------------------


def _image(data: np.ndarray, image_type: int = ismrmrd.IMTYPE_MAGNITUDE, series: int = 1) -> ismrmrd.Image:
    img = ismrmrd.Image.from_array(data[None, None], transpose=False)
    head = img.getHead()
    head.image_type = image_type
    head.image_series_index = series
    img.setHead(head)
    return img


def test_float_to_ushort_extract_complex_to_float_autoscale_follow_gadgetron():
    z = np.array([[3 + 4j, -1 - 1j], [0.2j, 100000.0]], dtype=np.complex64)
    (mag,) = ComplexToFloatGadget().process(_image(z, ismrmrd.IMTYPE_COMPLEX))
    assert mag.data.dtype == np.float32 and mag.image_type == ismrmrd.IMTYPE_MAGNITUDE
    np.testing.assert_allclose(mag.data[0, 0], np.abs(z), rtol=1e-6)
    outs = list(ExtractGadget(ExtractParams(magnitude=True, phase=True, real=True)).process(_image(z)))
    assert [(o.image_type, o.image_series_index) for o in outs] == [
        (ismrmrd.IMTYPE_MAGNITUDE, 1), (ismrmrd.IMTYPE_REAL, 1001), (ismrmrd.IMTYPE_PHASE, 3001)]
    np.testing.assert_allclose(outs[2].data[0, 0], np.angle(z) + np.pi, rtol=1e-6)
    (u,) = FloatToUShortGadget(FloatToUShortParams(max_intensity=4095)).process(mag)
    assert u.data.dtype == np.uint16 and u.getHead().data_type == ismrmrd.DATATYPE_USHORT
    assert u.data[0, 0].tolist() == [[5, 1], [0, 4095]]              # rounded, clamped
    (ph,) = FloatToUShortGadget(FloatToUShortParams(intensity_offset=2048)).process(
        _image(np.array([[0.0, np.pi / 2]], dtype=np.float32), ismrmrd.IMTYPE_PHASE))
    assert ph.data[0, 0].tolist() == [[2048, 3072]]                  # x·offset/π + offset
    ramp = np.linspace(0, 1, 10000, dtype=np.float32).reshape(100, 100)
    (s,) = AutoScaleGadget(AutoScaleParams(max_value=2048)).process(_image(ramp))
    assert 2048 / 1.02 < float(np.percentile(s.data, 99)) < 2048 * 1.02


def test_symmetric_filters_have_gadgetrons_shape():
    for n in (32, 33):
        for kind in ("gaussian", "hanning", "tapered_hanning"):
            f = symmetric_filter(n, kind, 1.0, 5)
            assert math.isclose(float(np.sqrt((f ** 2).mean())), 1.0, rel_tol=1e-9)    # unit RMS
            off = 1 if n % 2 == 0 else 0                                               # even: f[0] = 0
            np.testing.assert_allclose(f[off:], f[off:][::-1], atol=1e-12)             # symmetric about n//2
            assert int(np.argmax(f)) in (n // 2, n // 2 - 1) or kind == "tapered_hanning"
    g = symmetric_filter(33, "gaussian", 1.0)
    assert math.isclose(g[0] / g[16], math.exp(-0.5), rel_tol=1e-9)                 # exp(-σ²x²/2) at x = ±1


def _series(images: torch.Tensor, sampled: tuple[int, int, int, int]) -> ImageSeries:
    ny, nx = images.shape[-2:]
    return ImageSeries(images=images, meta={"kspace_sampled": [*sampled, ny, nx]})


def _fft2c(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def test_partial_fourier_pocs_recovers_the_missing_lines_and_filters_leave_symmetric_data():
    n = 64
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    obj = ((yy ** 2 / 0.7 + xx ** 2 / 0.5) < 0.8).float() + 0.5 * ((yy - 0.2) ** 2 + xx ** 2 < 0.05).float()
    truth = (obj * torch.exp(1j * 0.8 * (xx + 0.5 * yy))).to(torch.complex64)[None]          # smooth phase
    k = _fft2c(truth)
    k[..., :12, :] = 0                                                                       # 5/8-ish PF
    zf = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
    (pocs,) = PartialFourierGadget(PartialFourierParams(mode="pocs", iterations=20)).process(
        _series(zf, (12, n - 1, 0, n - 1)))
    err = lambda x: float((x.abs() - truth.abs()).norm() / truth.abs().norm())  # noqa: E731
    assert err(pocs.images) < 0.6 * err(zf), (err(pocs.images), err(zf))
    same = _series(truth, (0, n - 1, 0, n - 1))
    assert next(iter(PartialFourierGadget().process(same))) is same                       # symmetric: no-op
    (filt,) = KSpaceFilterGadget(KSpaceFilterParams(ro="gaussian", e1="gaussian")).process(same)
    assert float(filt.images.abs().sum()) > 0 and not torch.equal(filt.images, truth)
    skip = _series(truth, (0, n - 1, 0, n - 1))
    skip.meta["Skip_processing_after_recon"] = 1
    assert next(iter(KSpaceFilterGadget(KSpaceFilterParams(ro="gaussian")).process(skip))) is skip


def test_noise_summary_answers_with_the_stored_dependency(tmp_path):
    from gadgets.gadgetron_compat import NoiseSummaryGadget, NoiseSummaryParams
    from gadgets.stream.protocol import DependencyQuery

    g = NoiseSummaryGadget(NoiseSummaryParams(noise_file="GadgetronNoiseCovarianceMatrix_none"),
                           ChainContext(storage_dir=tmp_path))
    assert list(g.handle(object())) == []
    (reply,) = list(g.flush())
    assert isinstance(reply, DependencyQuery) and "failed" in reply.meta_xml     # nothing stored under that ID


def test_eigen_channel_keeps_the_signal_modes():
    torch.manual_seed(0)
    c, ny, nx = 8, 16, 16
    mix = torch.randn(c, 3, dtype=torch.complex64)                                  # rank-3 coil array
    k = torch.einsum("cr,ryx->cyx", mix, torch.randn(3, ny, nx, dtype=torch.complex64))
    k = k + 1e-4 * torch.randn(c, ny, nx, dtype=torch.complex64)
    buf = KSpaceBuffer(kspace=k[None].clone(), matrix=(ny, nx))
    (out,) = EigenChannelGadget(EigenChannelParams(threshold=0.002)).process(buf)
    assert out.n_coils == 3
    assert float(out.kspace.abs().pow(2).sum()) == pytest.approx(float(k.abs().pow(2).sum()), rel=1e-4)
    (keep,) = EigenChannelGadget(EigenChannelParams(threshold=-1)).process(
        KSpaceBuffer(kspace=k[None].clone(), matrix=(ny, nx)))
    assert keep.n_coils == c


# -- images ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    if not HAVE_GEN:
        pytest.skip("Debian ismrmrd-tools not installed")
    from bench.gadgetron_chains import shepp_logan

    root = tmp_path_factory.mktemp("sl")
    return {r: shepp_logan(root, r) for r in (2, 4)}


@needs_gen
def test_default_gives_one_image_per_repetition_at_30_db(phantoms):
    """Issue 12: ``-m 128 -c 8 -a 2 -w 24 -C -n 0.02`` → 2 images, each ≥ 30 dB, near BART pics."""
    res = chain_psnrs("default", phantoms[2])
    assert [r for r, _, _ in res] == [0, 1]
    assert min(p for _, _, p in res) >= 30.0, res
    if HAVE_BART:
        bart = bart_psnrs(phantoms[2])
        assert all(p >= b - 1.0 for (_, _, p), b in zip(res, bart)), (res, bart)


def _client(port: int, data: Path, out: Path, **kw) -> tuple[int, str]:
    from gadgets.stream.client import run_client

    buf = io.StringIO()
    rc = run_client("127.0.0.1", port, str(data), outfile=str(out), out_group="g", timeout_ms=10000, out=buf,
                    err=buf, read_timeout_s=120.0, **kw)
    return rc, buf.getvalue()


@needs_gen
def test_gadgetron_grappa_chain_through_the_server_by_file_and_by_name(phantoms, tmp_path):
    """``torchgadgets client -C Generic_Cartesian_Grappa.xml`` (Gadgetron's file) and ``-c`` its name: one
    uint16 image per repetition in series 1 (Gadgetron's image_series + 1), R = 2 and 4, each within
    1 dB of BART pics SENSE with the same Gaussian k-space filter."""
    from gadgets.stream.server import ReconServer

    srv = ReconServer(port=0, device="cpu", max_sessions=1, read_timeout_s=60.0).start()
    try:
        for r, path in phantoms.items():
            gt = phantom_of(path)
            bart = bart_psnrs(path, filtered=True) if HAVE_BART else None
            for how, kw in (("file", {"config_local": str(FIXTURES / "Generic_Cartesian_Grappa.xml")}),
                            ("name", {"config": "Generic_Cartesian_Grappa.xml"})):
                out = tmp_path / f"r{r}_{how}.h5"
                rc, text = _client(srv.port, path, out, **kw)
                assert rc == 0, text
                with h5py.File(out, "r") as f:
                    assert list(f["g"]) == ["image_1"], list(f["g"])
                    data = f["g/image_1/data"][:]
                    heads = f["g/image_1/header"][:]
                assert data.dtype == np.uint16 and data.shape[0] == r            # N repetitions in, N images out
                assert sorted(heads["repetition"].tolist()) == list(range(r))
                psnrs = [psnr_vs_phantom(data[i, 0, 0].astype(np.float32), gt) for i in range(r)]
                assert min(psnrs) > (27.0 if r == 2 else 24.0), (r, how, psnrs)
                if bart is not None:
                    order = np.argsort(heads["repetition"])
                    assert all(psnrs[i] >= bart[j] - 1.0 for j, i in enumerate(order)), (r, how, psnrs, bart)
    finally:
        srv.shutdown(graceful=False, timeout=30.0)
