"""gadgets.external driven the way Gadgetron drives it: ``python -m gadgetron PORT gadgets.external TARGET``.

The test plays the Gadgetron core side with its own code, following PROTOCOL.md §10: it listens,
starts the module, sends CONFIG (2, the ``<configuration>`` element), HEADER (3), data and CLOSE (4),
and reads images (1022), image arrays (1024), ERROR (8) and CLOSE back. Its own BucketToBuffer turns
phantom acquisitions into ReconData (1023) the way Gadgetron's does (E1 centred at Ny/2, headers
[E1, E2, N, S, LOC], calibration lines in the reference buffer).
"""

from __future__ import annotations

import ctypes
import io
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
import torch

pytest.importorskip("gadgetron")

from gadgets.ismrmrd_io import scan_to_ismrmrd, write_ismrmrd  # noqa: E402
from gadgets.offline import run_offline  # noqa: E402
from recon_core import metrics  # noqa: E402
from recon_core.phantoms import simulate_scan  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
U16, U32, U64, BOOL = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<?")
_PIXEL = {1: np.uint16, 2: np.int16, 3: np.uint32, 4: np.int32, 5: np.float32, 6: np.float64, 7: np.complex64,
          8: np.complex128}


# ------------------------------------------------------------------------------ the core's wire side
def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", GADGETRON_EXTERNAL_LOG_LEVEL="INFO")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def text_msg(mid: int, text: str) -> bytes:
    raw = text.encode()
    return U16.pack(mid) + U32.pack(len(raw)) + raw


def acq_msg(acq: ismrmrd.Acquisition) -> bytes:
    out = io.BytesIO()
    acq.serialize_into(out.write)
    return U16.pack(1008) + out.getvalue()


def image_msg(img: ismrmrd.Image) -> bytes:
    out = io.BytesIO()
    img.serialize_into(out.write)
    return U16.pack(1022) + out.getvalue()


def _array(a: np.ndarray) -> bytes:
    return U64.pack(a.ndim) + b"".join(U64.pack(d) for d in a.shape) + a.tobytes(order="F")


def _records(a: np.ndarray) -> bytes:
    dims = U64.pack(a.ndim) + b"".join(U64.pack(d) for d in a.shape)
    return dims + b"".join(bytes(h) for h in a.ravel(order="F"))


class Sampling(ctypes.Structure):
    _fields_ = [("encoded_FOV", ctypes.c_float * 3), ("recon_FOV", ctypes.c_float * 3),
                ("encoded_matrix", ctypes.c_uint16 * 3), ("recon_matrix", ctypes.c_uint16 * 3),
                ("limits", ctypes.c_uint16 * 9)]


assert ctypes.sizeof(Sampling) == 56


def bucket_to_buffer(header: ismrmrd.xsd.ismrmrdHeader, acqs: list) -> bytes:
    """RECON_DATA (1023) with one bit: imaging lines in ``data``, calibration lines in ``ref``.

    Cartesian: E1 = kspace_encode_step_1 + Ny/2 - centre (k-space centre at Ny/2). Non-Cartesian
    (trajectory_dimensions >= 2): E1 = kspace_encode_step_1 as it is, trajectory [D, RO, E1, E2, N, S, LOC].
    """
    enc = header.encoding[0]
    imaging = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    noncart = imaging[0].trajectory_dimensions >= 2
    nx = imaging[0].number_of_samples
    if noncart:
        ny, shift = max(a.idx.kspace_encode_step_1 for a in imaging) + 1, 0
    else:
        ny = enc.encodedSpace.matrixSize.y
        shift = ny // 2 - enc.encodingLimits.kspace_encoding_step_1.center
    n_c, n_n = imaging[0].active_channels, max(a.idx.phase for a in imaging) + 1

    def buffer(selected: list) -> bytes:
        data = np.zeros((nx, ny, 1, n_c, n_n, 1, 1), np.complex64)
        traj = np.zeros((2, nx, ny, 1, n_n, 1, 1), np.float32)
        heads = np.empty((ny, 1, n_n, 1, 1), dtype=object)
        for i in np.ndindex(heads.shape):
            heads[i] = ismrmrd.AcquisitionHeader()
        for a in selected:
            e1 = a.idx.kspace_encode_step_1 + shift
            data[:, e1, 0, :, a.idx.phase, 0, 0] = a.data.T
            if noncart:
                traj[:, :, e1, 0, a.idx.phase, 0, 0] = a.traj.T
            heads[e1, 0, a.idx.phase, 0, 0] = a.getHead()
        s = Sampling()
        s.encoded_FOV[:] = [enc.encodedSpace.fieldOfView_mm.x, enc.encodedSpace.fieldOfView_mm.y,
                            enc.encodedSpace.fieldOfView_mm.z]
        s.recon_FOV[:] = [enc.reconSpace.fieldOfView_mm.x, enc.reconSpace.fieldOfView_mm.y,
                          enc.reconSpace.fieldOfView_mm.z]
        space = enc.encodedSpace if noncart else enc.reconSpace      # RemoveROOversampling: recon x
        s.encoded_matrix[:] = [space.matrixSize.x, ny, 1]
        s.recon_matrix[:] = [enc.reconSpace.matrixSize.x, enc.reconSpace.matrixSize.y, 1]
        s.limits[:] = [0, nx // 2, nx - 1, 0, ny // 2, ny - 1, 0, 0, 0]
        trajectory = BOOL.pack(True) + _array(traj) if noncart else BOOL.pack(False)
        return _array(data) + trajectory + BOOL.pack(False) + _records(heads) + bytes(s)

    ref = [a for a in imaging if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
           or a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)]
    img = [a for a in imaging if not a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)]
    return U16.pack(1023) + U64.pack(1) + buffer(img) + BOOL.pack(bool(ref)) + (buffer(ref) if ref else b"")


def remove_ro_oversampling(acq: ismrmrd.Acquisition) -> ismrmrd.Acquisition:
    """Gadgetron's RemoveROOversampling: centred orthonormal FFT along the readout, keep the middle half."""
    x = acq.data                                                          # [C, 2N]
    n = x.shape[1]
    img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(x, axes=1), axis=1, norm="ortho"), axes=1)
    k = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(img[:, n // 4: n // 4 + n // 2], axes=1), axis=1,
                                   norm="ortho"), axes=1).astype(np.complex64)
    head = acq.getHead()
    head.number_of_samples, head.center_sample = n // 2, acq.center_sample // 2
    out = ismrmrd.Acquisition(head)
    out.data[:] = k
    return out


def image_array_msg(x: np.ndarray, heads: list) -> bytes:
    """IMAGE_ARRAY (1024): x ``[N, Y, X]`` complex64 → data [X, Y, 1, 1, N, 1, 1], headers [N, 1, 1]."""
    data = x.transpose(2, 1, 0)[:, :, None, None, :, None, None].astype(np.complex64)
    h = np.empty((len(heads), 1, 1), dtype=object)
    for i, hd in enumerate(heads):
        h[i, 0, 0] = hd
    meta = b"".join(U64.pack(len(m)) + m for m in [b"<ismrmrdMeta/>"] * len(heads))
    return U16.pack(1024) + _array(data) + _records(h) + U64.pack(len(heads)) + meta + BOOL.pack(False) \
        + BOOL.pack(False)


class Reader:
    """Reads what the module sends back: 1022, 1024, 1008, 8, 4."""

    def __init__(self, read):
        self.read = read

    def _u(self, s):
        return s.unpack(self.read(s.size))[0]

    def _array(self, dtype):
        nd = self._u(U64)
        dims = [self._u(U64) for _ in range(nd)]
        n = int(np.prod(dims))
        return np.frombuffer(self.read(n * np.dtype(dtype).itemsize), dtype).reshape(dims, order="F")

    def _records(self, cls):
        nd = self._u(U64)
        dims = [self._u(U64) for _ in range(nd)]
        out = np.empty(dims, dtype=object)
        for i in range(int(np.prod(dims))):                      # first dimension fastest
            idx = np.unravel_index(i, dims, order="F")
            out[idx] = cls.from_buffer_copy(self.read(ctypes.sizeof(cls)))
        return out

    def message(self):
        mid = self._u(U16)
        if mid == 4:
            return mid, None
        if mid == 8:
            return mid, self.read(self._u(U64)).decode()
        if mid == 1022:
            head = ismrmrd.ImageHeader.from_buffer_copy(self.read(198))
            attr = self.read(self._u(U64)).rstrip(b"\x00").decode()
            shape = (head.channels, head.matrix_size[2], head.matrix_size[1], head.matrix_size[0])
            dtype = _PIXEL[head.data_type]
            raw = self.read(int(np.prod(shape)) * np.dtype(dtype).itemsize)
            data = np.frombuffer(raw, dtype).reshape(shape)
            return mid, (head, attr, data)
        if mid == 1024:
            data = self._array(np.complex64)
            heads = self._records(ismrmrd.ImageHeader)
            meta = [self.read(self._u(U64)).decode() for _ in range(self._u(U64))]
            assert not self._u(BOOL) and not self._u(BOOL)      # no waveforms, no acquisition headers
            return mid, (data, heads, meta)
        raise AssertionError(f"module sent message id {mid}")


def _read_exact(sock):
    def read(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"socket closed with {n - len(buf)} bytes missing")
            buf += chunk
        return buf
    return read


def play_core(sock: socket.socket, config: str, header_xml: str, payloads: list[bytes]) -> list:
    """The core's session: config, header, data, CLOSE out (in a thread); replies in until CLOSE."""
    def send():
        sock.sendall(text_msg(2, config) + text_msg(3, header_xml))
        for p in payloads:
            sock.sendall(p)
        sock.sendall(U16.pack(4))

    t = threading.Thread(target=send, daemon=True)
    t.start()
    reader, replies = Reader(_read_exact(sock)), []
    while True:
        mid, item = reader.message()
        replies.append((mid, item))
        if mid == 4:
            break
    t.join(60)
    return replies


def run_module(target: str, config: str, header_xml: str, payloads: list[bytes]) -> list:
    """Listen, start ``python -m gadgetron PORT gadgets.external TARGET`` as Gadgetron does, serve it."""
    with socket.create_server(("localhost", 0), family=socket.AF_INET) as srv:
        srv.settimeout(120)
        port = srv.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "gadgetron", str(port), "gadgets.external", target],
                                cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            sock, _ = srv.accept()
            sock.settimeout(120)
            with sock:
                replies = play_core(sock, config, header_xml, payloads)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return replies


def configuration(**props: str) -> str:
    body = "".join(f'<property name="{k}" value="{v}"/>' for k, v in props.items())
    return f'<?xml version="1.0"?>\n<configuration>{body}</configuration>'


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A small Cartesian cine (R=2, 8 ACS lines, no readout oversampling), its offline images, and the
    offline images of the same file without its noise scan (what Gadgetron's buffers carry, unwhitened)."""
    scan = simulate_scan("cartesian", matrix=32, n_frames=2, n_coils=4, accel=2, acs_lines=8,
                         mask_kind="uniform", readout_oversampling=1, seed=3)
    header_xml, acqs = scan_to_ismrmrd(scan)
    folder = tmp_path_factory.mktemp("external")
    write_ismrmrd(folder / "cart.h5", header_xml, acqs, ground_truth=scan.ground_truth)
    no_noise = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    write_ismrmrd(folder / "cart_no_noise.h5", header_xml, no_noise)
    offline = run_offline("default", folder / "cart.h5", device="cpu").images
    unwhitened = run_offline("default", folder / "cart_no_noise.h5", device="cpu").images
    return scan, header_xml, acqs, offline, unwhitened


def _images(replies):
    assert replies[-1][0] == 4, "the module's last message must be CLOSE"
    errors = [item for mid, item in replies if mid == 8]
    assert not errors, errors
    return [item for mid, item in replies if mid == 1022]


def _psnr(mags, scan):
    gt = scan.ground_truth.abs()
    x = metrics.scale_to_reference(torch.from_numpy(np.stack(mags)), gt, scan.body_mask)
    return float(metrics.psnr(x, gt))


# ------------------------------------------------------------------------------------------ tests
def test_recon_acquisitions_runs_the_named_chain(phantom):
    scan, header_xml, acqs, offline, _ = phantom
    replies = run_module("recon_acquisitions", configuration(chain="default", device="cpu"), header_xml,
                         [acq_msg(a) for a in acqs])
    images = _images(replies)
    assert len(images) == len(offline) == scan.n_frames
    for (head, attr, data), ref in zip(images, offline):
        atol = 1e-5 * float(np.abs(ref.data).max())
        np.testing.assert_allclose(data[0, 0], ref.data[0, 0], rtol=0, atol=atol)
        want = (ref.getHead().phase, 0, ref.getHead().image_index)
        assert (head.phase, head.slice, head.image_index) == want
        assert tuple(head.matrix_size) == (32, 32, 1) and head.data_type == 5
        assert "ReconMethod" in attr


def test_recon_buffers_gives_the_chains_images_and_passes_other_messages_back(phantom):
    scan, header_xml, acqs, _, ref = phantom
    header = ismrmrd.xsd.CreateFromDocument(header_xml)
    no_noise = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    stray = ismrmrd.Image.from_array(np.arange(12, dtype=np.float32).reshape(1, 3, 4), transpose=False)
    replies = run_module("recon_buffers", configuration(device="cpu"), header_xml,
                         [bucket_to_buffer(header, no_noise), image_msg(stray)])
    images = _images(replies)
    assert len(images) == scan.n_frames + 1
    back = [im for im in images if tuple(im[0].matrix_size) == (4, 3, 1)]
    assert len(back) == 1 and np.array_equal(back[0][2][0, 0], stray.data[0, 0])     # passed back unchanged
    recon = [im for im in images if tuple(im[0].matrix_size) == (32, 32, 1)]
    # Gadgetron's buffer of the same lines gives the images our own buffer gadget gives
    assert len(recon) == len(ref) == scan.n_frames
    for (_, _, data), r in zip(recon, ref):
        np.testing.assert_allclose(data[0, 0], r.data[0, 0], rtol=0, atol=1e-4 * float(np.abs(r.data).max()))
    assert _psnr([data[0, 0] for _, _, data in recon], scan) > 30.0
    for f, (head, _, _) in enumerate(recon):
        assert (head.phase, head.slice, head.repetition) == (f, 0, 0)
        assert abs(head.field_of_view[0] - header.encoding[0].reconSpace.fieldOfView_mm.x) < 1e-3
        src = next(a for a in no_noise if a.idx.phase == f)
        np.testing.assert_allclose(list(head.slice_dir), list(src.slice_dir), atol=1e-6)


def test_recon_buffers_radial_matches_the_radial_chain(tmp_path):
    """Non-Cartesian ReconData (trajectory in cycles/FOV, spokes numbered across frames) gives the
    images of our own radial chain on the same readouts."""
    scan = simulate_scan("radial", matrix=32, n_frames=2, n_coils=4, spokes_per_frame=12, seed=1)
    header_xml, acqs = scan_to_ismrmrd(scan)
    no_noise = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    write_ismrmrd(tmp_path / "radial.h5", header_xml, no_noise)
    ref = run_offline("radial_cine_cg_sense", tmp_path / "radial.h5", device="cpu").images
    header = ismrmrd.xsd.CreateFromDocument(header_xml)
    replies = run_module("recon_buffers", configuration(chain="radial_cine_cg_sense", device="cpu"),
                         header_xml, [bucket_to_buffer(header, no_noise)])
    images = _images(replies)
    assert len(images) == len(ref) == scan.n_frames
    for (head, _, data), r in zip(images, ref):
        np.testing.assert_allclose(data[0, 0], r.data[0, 0], rtol=0, atol=1e-3 * float(np.abs(r.data).max()))
        assert head.phase == r.getHead().phase
    assert _psnr([data[0, 0] for _, _, data in images], scan) > 20.0


def test_recon_buffers_image_array_output(phantom):
    scan, header_xml, acqs, _, _ = phantom
    header = ismrmrd.xsd.CreateFromDocument(header_xml)
    no_noise = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    replies = run_module("recon_buffers", configuration(device="cpu", output="image_array",
                                                        **{"recon.max_iter": "10"}),
                         header_xml, [bucket_to_buffer(header, no_noise)])
    assert replies[-1][0] == 4 and not [i for m, i in replies if m == 8]
    arrays = [item for mid, item in replies if mid == 1024]
    assert len(arrays) == 1
    data, heads, meta = arrays[0]
    assert data.shape == (32, 32, 1, 1, scan.n_frames, 1, 1) and data.dtype == np.complex64
    assert heads.shape == (scan.n_frames, 1, 1) and len(meta) == scan.n_frames
    assert [heads[f, 0, 0].phase for f in range(scan.n_frames)] == list(range(scan.n_frames))
    assert _psnr([np.abs(data[:, :, 0, 0, f, 0, 0]).T for f in range(scan.n_frames)], scan) > 28.0
    bright = data[np.abs(data) > 0.1 * np.abs(data).max()]
    assert np.abs(np.angle(bright)).max() > 0.1                                    # complex, not magnitude


def test_recon_image_arrays_keeps_the_arrays_headers(phantom):
    header = phantom[1]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 6, 8)) + 1j * rng.standard_normal((2, 6, 8))).astype(np.complex64)
    heads = []
    for n in range(2):
        h = ismrmrd.ImageHeader()
        h.matrix_size[:] = [8, 6, 1]
        h.field_of_view[:] = [240.0, 180.0, 8.0]
        h.channels, h.data_type, h.image_type = 1, 7, 5
        h.phase, h.slice, h.image_index, h.image_series_index = n, 3, 11 + n, 7
        h.position[:] = [1.0, 2.0, 3.0 + n]
        h.read_dir[:], h.phase_dir[:], h.slice_dir[:] = [1, 0, 0], [0, 1, 0], [0, 0, 1]
        h.user_int[0] = 42
        heads.append(h)
    replies = run_module("recon_image_arrays", configuration(device="cpu"), header,
                         [image_array_msg(x, heads)])
    images = _images(replies)
    assert len(images) == 2
    for n, (head, attr, data) in enumerate(images):
        np.testing.assert_allclose(data[0, 0], np.abs(x[n]), rtol=1e-6)
        assert (head.phase, head.slice, head.image_index, head.image_series_index) == (n, 3, 11 + n, 7)
        assert list(head.position) == [1.0, 2.0, 3.0 + n] and head.user_int[0] == 42
        assert head.data_type == 5 and head.image_type == 1


def test_failures_are_reported_as_error_then_close(phantom):
    scan, header_xml, acqs, _, _ = phantom
    header = ismrmrd.xsd.CreateFromDocument(header_xml)
    no_noise = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    replies = run_module("recon_buffers", configuration(**{"recon.method": "no_such_method"}), header_xml,
                         [bucket_to_buffer(header, no_noise)])
    assert [m for m, _ in replies] == [8, 4]
    assert "ERROR" in replies[0][1] and "no_such_method" in replies[0][1]
    replies = run_module("recon_acquisitions", configuration(chain="../etc/passwd"), header_xml, [])
    assert [m for m, _ in replies] == [8, 4] and "invalid chain name" in replies[0][1]


def test_connect_mode_serves_one_core(phantom):
    scan, header_xml, acqs, _, _ = phantom
    header = ismrmrd.xsd.CreateFromDocument(header_xml)
    no_noise = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    proc = subprocess.Popen([sys.executable, "-m", "gadgets.cli", "external", "--port", "0"], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "waiting for a Gadgetron core on 127.0.0.1:" in line, line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:   # <connect port=P/>
            replies = play_core(sock, configuration(device="cpu"), header_xml,
                                [bucket_to_buffer(header, no_noise)])
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    images = _images(replies)
    assert len(images) == scan.n_frames
    assert _psnr([data[0, 0] for _, _, data in images], scan) > 30.0


def test_image_array_writer_converts_dtypes_under_numpy2():
    """gadgetron 1.4.1's writer raises on a dtype change under numpy 2; ours converts."""
    from gadgetron.types import ImageArray

    from gadgets.external import write_image_array

    x = (np.arange(24).reshape(4, 3, 1, 1, 2, 1, 1) * (1 + 0.5j)).astype(np.complex128)
    heads = np.empty((2, 1, 1), dtype=object)
    for n in range(2):
        heads[n, 0, 0] = ismrmrd.ImageHeader()
        heads[n, 0, 0].image_index = n + 1
    out = io.BytesIO()
    write_image_array(out, ImageArray(data=x, headers=heads, meta=["<a/>", "<b/>"]))
    mid, (data, h, meta) = Reader(io.BytesIO(out.getvalue()).read).message()
    assert mid == 1024 and data.dtype == np.complex64 and np.array_equal(data, x.astype(np.complex64))
    assert [h[n, 0, 0].image_index for n in range(2)] == [1, 2] and meta == ["<a/>", "<b/>"]


# ------------------------------------------------- the same Gadgetron chain files in our own server
CHAINS = REPO / "gadgets" / "chains" / "gadgetron"


@pytest.mark.skipif(__import__("shutil").which("ismrmrd_generate_cartesian_shepp_logan") is None,
                    reason="Debian ismrmrd-tools not installed")
def test_shipped_gadgetron_chains_run_in_our_server(tmp_path):
    """`torchgadgets client -C <chain>.xml` against our server: the <external> nodes naming
    gadgets.external run in-process; Gadgetron's per-repetition trigger gives one image per repetition
    (R=2 with 24 calibration lines, noise 0.02: each >= 30 dB against the generator's phantom)."""
    import h5py

    from gadgets.stream.client import run_client
    from gadgets.stream.h5out import read_images
    from gadgets.stream.server import ReconServer

    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "128", "-c", "8", "-a", "2", "-w", "24",
                    "-C", "-n", "0.02", "-o", str(tmp_path / "sl.h5")], check=True, capture_output=True,
                   cwd=tmp_path)
    with h5py.File(tmp_path / "sl.h5", "r") as f:
        ph = f["dataset/phantom"][:]
    gt = torch.from_numpy(np.abs(ph["real"] + 1j * ph["imag"])[0].astype(np.float32))
    default = run_offline("default", tmp_path / "sl.h5", device="cpu").images
    srv = ReconServer(port=0, device="cpu", max_sessions=1, read_timeout_s=60.0).start()
    try:
        for name in ("external_acquisitions.xml", "external_buffers.xml"):
            out = tmp_path / f"{name}.h5"
            rc = run_client(port=srv.port, filename=str(tmp_path / "sl.h5"), outfile=str(out), out_group="g",
                            config_local=str(CHAINS / name), out=io.StringIO(), err=io.StringIO())
            assert rc == 0, name
            series = read_images(out, "g")
            images = [x[0, 0] for s in series.values() for x in s.data]           # data [N, CHA, Z, Y, X]
            if name == "external_acquisitions.xml":     # the whole `default` chain, as in Gadgetron
                assert len(images) == len(default)
            else:
                assert len(images) == 2, (name, len(images))
                for im in images:
                    x = torch.from_numpy(np.asarray(im, dtype=np.float32))
                    assert float(metrics.psnr(metrics.scale_to_reference(x, gt), gt)) >= 30.0, name
    finally:
        srv.shutdown(graceful=False, timeout=30)


# ------------------------------------------------------------------------- the <configuration> element
def test_configuration_properties_inline_chains_and_untrusted_overrides():
    import xml.etree.ElementTree as ET

    from gadgets.base import ChainContext, ChainError
    from gadgets.external import ExternalError, parse_configuration
    from gadgets.stream.chain import build_chain

    cfg = parse_configuration(ET.fromstring(
        '<configuration><property name="chain" value="cartesian_sense"/>'
        '<property><name>recon.max_iter</name><value>7</value></property>'      # Gadgetron's legacy form
        '<property name="device" value="cpu"/></configuration>'))
    spec = cfg.chain_spec()
    assert (spec.name, cfg.device, spec.trusted) == ("cartesian_sense", "cpu", False)
    assert next(g for g in spec.gadgets if g.gadget == "recon").params["max_iter"] == "7"
    assert parse_configuration(None).chain == "default" and parse_configuration(None).chain_spec().trusted

    inline = parse_configuration(ET.fromstring(
        "<configuration><chain>chain:\n  - gadget: coil_estimate\n  - gadget: recon\n"
        "    params: {method: zero_filled}\n  - gadget: image_export\n</chain></configuration>"))
    spec = inline.chain_spec()
    assert spec.gadget_names == ["coil_estimate", "recon", "image_export"] and not spec.trusted

    tdip = parse_configuration(ET.fromstring(
        '<configuration><property name="chain" value="radial_cine_tdip"/>'
        '<property name="recon.checkpoint" value="/etc/passwd"/></configuration>')).chain_spec()
    with pytest.raises(ChainError, match="checkpoint"):
        build_chain(tdip, ChainContext())                    # no file names from a Gadgetron chain
    with pytest.raises(ChainError, match="does not have"):
        parse_configuration(ET.fromstring('<configuration><property name="grappa.kernel" value="5"/>'
                                          '</configuration>')).chain_spec()
    with pytest.raises(ExternalError, match="unknown property"):
        parse_configuration(ET.fromstring('<configuration><property name="colour" value="red"/>'
                                          '</configuration>'))


@pytest.mark.skipif(__import__("shutil").which("ismrmrd_generate_cartesian_shepp_logan") is None,
                    reason="Debian ismrmrd-tools not installed")
def test_recon_buffers_pools_interleaved_repetitions_for_calibration(tmp_path):
    """TSENSE-style: R=2 as two interleaved repetitions without calibration lines, one ReconData per
    repetition (Gadgetron's trigger_dimension=repetition). Neither buffer alone has a fully sampled
    centre; coil estimation pools both (buffers are flushed once, at CLOSE) and each repetition gets
    its image, as our own per-repetition chain gives on the same lines."""
    from gadgets.ismrmrd_io import read_ismrmrd

    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "64", "-c", "4", "-a", "2", "-n", "0.02",
                    "-o", str(tmp_path / "sl.h5")], check=True, capture_output=True, cwd=tmp_path)
    header_xml, acqs, _ = read_ismrmrd(tmp_path / "sl.h5")
    header = ismrmrd.xsd.CreateFromDocument(header_xml)
    acqs = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    write_ismrmrd(tmp_path / "sl_no_noise.h5", header_xml, acqs)
    ref = run_offline("cartesian_sense", tmp_path / "sl_no_noise.h5", device="cpu").images
    per_rep = [bucket_to_buffer(header, [remove_ro_oversampling(a) for a in acqs if a.idx.repetition == r])
               for r in (0, 1)]
    replies = run_module("recon_buffers", configuration(chain="cartesian_sense", device="cpu"), header_xml,
                         per_rep)
    images = _images(replies)
    assert [h.repetition for h, _, _ in images] == [0, 1] == [r.getHead().repetition for r in ref]
    for (_, _, data), r in zip(images, ref):
        np.testing.assert_allclose(data[0, 0], r.data[0, 0], rtol=0, atol=1e-4 * float(np.abs(r.data).max()))
