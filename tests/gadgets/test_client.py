"""Client tests against small scripted servers on 127.0.0.1 (ephemeral ports, timeouts, cleanup)."""

from __future__ import annotations

import argparse
import io
import itertools
import socket
import struct
import threading
from pathlib import Path
from typing import Callable

import h5py
import ismrmrd
import numpy as np
import pytest

from gadgets.stream.client import add_client_arguments, interleave_by_time, main_from_args, run_client
from gadgets.stream.h5out import IMAGE_HEADER_DTYPE, ImageH5Writer, ImageLayoutError, read_images
from gadgets.stream.protocol import (Close, ConfigFile, ConfigText, DependencyQuery, DicomWithName, Header,
                                     MessageReader, MessageWriter, Query, Response, Text, meta_from_xml,
                                     socket_read_exact, socket_write_all)

HEADER_XML = ('<?xml version="1.0"?>\n<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
              '<studyInformation><studyDescription>Grüße</studyDescription></studyInformation>'
              '</ismrmrdHeader>\n')
TIMEOUT = 10.0


class ScriptedServer:
    """Accepts one connection on 127.0.0.1:0 and runs ``script(reader, writer, sock, log)``."""

    def __init__(self, script: Callable) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.script = script
        self.received: list = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                reader = MessageReader(socket_read_exact(conn))
                writer = MessageWriter(socket_write_all(conn))
                self.script(reader, writer, conn, self.received)
        except Exception as exc:  # reported by the test through .error
            self.error = exc

    def __enter__(self) -> "ScriptedServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join(TIMEOUT)
        self.listener.close()
        assert not self.thread.is_alive(), "server thread did not finish"


def read_until_close(reader: MessageReader, log: list) -> None:
    while True:
        msg = reader.read_message()
        log.append(msg)
        if isinstance(msg, Close):
            return


def ids(msgs: list) -> list[int]:
    names = {ConfigFile: 1, ConfigText: 2, Header: 3, Close: 4, Text: 5, Query: 6,
             ismrmrd.Acquisition: 1008, ismrmrd.Waveform: 1026}
    return [names[type(m)] for m in msgs]


def make_image(series: int, index: int, shape=(1, 1, 6, 8)) -> ismrmrd.Image:
    arr = (np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 100 * index)
    img = ismrmrd.Image.from_array(arr)
    img.image_series_index = series
    img.image_index = index
    img.slice = index
    img.meta = {"ImageComment": f"image {index}", "DataRole": ["Image", "Magnitude"]}
    return img


def write_dataset(path: Path, n_acq: int = 4, acq_stamps=None, wave_stamps=(), nc=2, ns=16) -> Path:
    ds = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    ds.write_xml_header(HEADER_XML.encode("utf-8"))
    rng = np.random.default_rng(0)
    stamps = list(acq_stamps) if acq_stamps is not None else list(range(n_acq))
    for i, t in enumerate(stamps):
        data = (rng.standard_normal((nc, ns)) + 1j * rng.standard_normal((nc, ns))).astype(np.complex64)
        acq = ismrmrd.Acquisition.from_array(data, np.full((ns, 2), i, np.float32))
        acq.scan_counter = i
        acq.acquisition_time_stamp = t
        ds.append_acquisition(acq)
    for j, t in enumerate(wave_stamps):
        wav = ismrmrd.Waveform.from_array(np.full((2, 5), j, np.uint32))
        wav.time_stamp = t
        ds.append_waveform(wav)
    ds.close()
    return path


def reply_images_text_close(reader, writer, conn, log):
    # reply while the client is still sending (full duplex), then drain and close
    for _ in range(2):
        log.append(reader.read_message())  # config, header
    writer.write_message(make_image(0, 0))
    read_until_close(reader, log)
    writer.write_message(make_image(0, 1))
    writer.write_message(Text("[recon] done"))
    writer.write_message(Close())


def test_session_writes_cpp_client_hdf5_layout(tmp_path, capsys):
    src = write_dataset(tmp_path / "in.h5", n_acq=5)
    out = tmp_path / "out.h5"
    with ScriptedServer(reply_images_text_close) as srv:
        rc = run_client(port=srv.port, filename=str(src), outfile=str(out), out_group="grp",
                        read_timeout_s=TIMEOUT)
    assert srv.error is None
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "[recon] done" in captured.out
    assert ids(srv.received) == [1, 3] + [1008] * 5 + [4]
    assert srv.received[0] == ConfigFile("default.xml")
    assert srv.received[1].xml == HEADER_XML                       # verbatim, non-ASCII included
    with ismrmrd.Dataset(str(src), "dataset", mode="r") as ds:
        for i, acq in enumerate(srv.received[2:-1]):
            ref = ds.read_acquisition(i)
            assert bytes(acq.getHead()) == bytes(ref.getHead())
            np.testing.assert_array_equal(acq.data, ref.data)
            np.testing.assert_array_equal(acq.traj, ref.traj)
    with h5py.File(out, "r") as f:
        g = f["grp/image_0"]
        assert set(g.keys()) == {"data", "header", "attributes"}
        assert g["data"].shape == (2, 1, 1, 6, 8) and g["data"].dtype == np.float32
        assert g["header"].dtype == IMAGE_HEADER_DTYPE and g["header"].shape == (2,)
        assert h5py.check_string_dtype(g["attributes"].dtype) is not None
    series = read_images(out, "grp")
    assert list(series) == [0]
    s = series[0]
    for k in range(2):
        np.testing.assert_array_equal(s.data[k], make_image(0, k).data)
        assert s.headers["image_index"][k] == k and s.headers["slice"][k] == k
        assert tuple(s.headers["matrix_size"][k]) == (8, 6, 1)
        assert meta_from_xml(s.attributes[k]) == {"ImageComment": [f"image {k}"], "DataRole": ["Image", "Magnitude"]}
    # the ismrmrd package reads our file back
    with ismrmrd.Dataset(str(out), "grp", mode="r") as ds:
        im = ds.read_image("image_0", 1)
        np.testing.assert_array_equal(im.data, make_image(0, 1).data)
        assert im.image_index == 1


def test_shared_phantom_file_is_streamed_completely(tmp_path, shared_data, capsys):
    src = shared_data / "phantom_gre_2ch_160_cartesian.h5"

    def script(reader, writer, conn, log):
        read_until_close(reader, log)
        writer.write_message(Close())

    with ScriptedServer(script) as srv:
        rc = run_client(port=srv.port, filename=str(src), outfile=str(tmp_path / "o.h5"), out_group="g",
                        read_timeout_s=TIMEOUT, verbose=True)
    assert rc == 0 and srv.error is None
    with h5py.File(src, "r") as f:
        xml = f["dataset/xml"][0]
        n = f["dataset/data"].shape[0]
    assert srv.received[1].xml.encode("utf-8") == xml
    assert ids(srv.received) == [1, 3] + [1008] * n + [4]
    out = capsys.readouterr().out
    assert f"sent {n} acquisitions and 0 waveforms" in out and "MB/s" in out
    assert not (tmp_path / "o.h5").exists()   # no images → no output file


def test_waveforms_are_interleaved_by_time_stamp(tmp_path):
    acq_stamps = [10 * i for i in range(64)]
    wave_stamps = [5, 105, 205, 305, 405]
    src = write_dataset(tmp_path / "wav.h5", acq_stamps=acq_stamps, wave_stamps=wave_stamps, ns=4)

    def script(reader, writer, conn, log):
        read_until_close(reader, log)
        writer.write_message(Close())

    with ScriptedServer(script) as srv:
        rc = run_client(port=srv.port, filename=str(src), outfile=str(tmp_path / "o.h5"), out_group="g",
                        read_timeout_s=TIMEOUT)
    assert rc == 0 and srv.error is None
    runs = [(k, len(list(g))) for k, g in itertools.groupby(ids(srv.received))]
    assert runs == [(1, 1), (3, 1), (1008, 1), (1026, 1), (1008, 10), (1026, 1), (1008, 10), (1026, 1),
                    (1008, 10), (1026, 1), (1008, 10), (1026, 1), (1008, 23), (4, 1)]
    # each waveform precedes the first acquisition whose time stamp exceeds its own
    seq = srv.received[2:-1]
    for pos, m in enumerate(seq):
        if isinstance(m, ismrmrd.Waveform):
            nxt = next(a for a in seq[pos:] if isinstance(a, ismrmrd.Acquisition))
            prev = [a for a in seq[:pos] if isinstance(a, ismrmrd.Acquisition)]
            assert nxt.acquisition_time_stamp > m.time_stamp >= prev[-1].acquisition_time_stamp
    assert [int(w.data[0, 0]) for w in seq if isinstance(w, ismrmrd.Waveform)] == [0, 1, 2, 3, 4]


def test_interleave_keeps_late_waveforms_at_the_end():
    acqs = [ismrmrd.Acquisition() for _ in range(3)]
    for a, t in zip(acqs, (0, 10, 20)):
        a.acquisition_time_stamp = t
    wavs = [ismrmrd.Waveform() for _ in range(3)]
    for w, t in zip(wavs, (10, 15, 99)):
        w.time_stamp = t
    order = [("a", m.acquisition_time_stamp) if isinstance(m, ismrmrd.Acquisition) else ("w", m.time_stamp)
             for m in interleave_by_time(acqs, wavs)]
    assert order == [("a", 0), ("a", 10), ("w", 10), ("w", 15), ("a", 20), ("w", 99)]


def test_server_closing_without_close_fails_clearly(tmp_path, capsys):
    src = write_dataset(tmp_path / "in.h5", n_acq=2)

    def script(reader, writer, conn, log):
        read_until_close(reader, log)
        writer.write_message(Text("partial"))
        conn.shutdown(socket.SHUT_RDWR)

    with ScriptedServer(script) as srv:
        rc = run_client(port=srv.port, filename=str(src), outfile=str(tmp_path / "o.h5"), out_group="g",
                        read_timeout_s=TIMEOUT)
    captured = capsys.readouterr()
    assert rc != 0
    assert "without a CLOSE" in captured.err and f"localhost:{srv.port}" in captured.err
    assert "partial" in captured.out


def test_unknown_or_unaccepted_message_from_server_fails(tmp_path, capsys):
    src = write_dataset(tmp_path / "in.h5", n_acq=2)

    def unknown(reader, writer, conn, log):
        read_until_close(reader, log)
        conn.sendall(struct.pack("<H", 1001) + bytes(16))

    def acquisition_back(reader, writer, conn, log):
        read_until_close(reader, log)
        writer.write_message(log[2])
        writer.write_message(Close())

    for script, expect in ((unknown, "unknown message id 1001"), (acquisition_back, "1008 ACQUISITION")):
        with ScriptedServer(script) as srv:
            rc = run_client(port=srv.port, filename=str(src), outfile=str(tmp_path / "o.h5"), out_group="g",
                            read_timeout_s=TIMEOUT)
        assert rc != 0
        assert expect in capsys.readouterr().err


def test_info_query_prints_response(tmp_path, capsys):
    def script(reader, writer, conn, log):
        read_until_close(reader, log)
        q = log[0]
        writer.write_message(Response(q.correlation_id, f"answer to {q.text}"))
        writer.write_message(Close())

    with ScriptedServer(script) as srv:
        args = add_client_arguments(argparse.ArgumentParser()).parse_args(
            ["-a", "127.0.0.1", "-p", str(srv.port), "-Q", "gadgetron::version"])
        rc = main_from_args(args)
    assert rc == 0 and srv.error is None
    assert ids(srv.received) == [6, 4] and srv.received[0].reserved == 0
    assert "answer to gadgetron::version" in capsys.readouterr().out


def test_local_config_dependency_query_and_dicom(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chain = tmp_path / "chain.xml"
    chain.write_text("<configuration><stream/></configuration>", encoding="utf-8")
    dep = "<ismrmrdMeta><meta><name>status</name><value>success</value></meta></ismrmrdMeta>"

    def script(reader, writer, conn, log):
        read_until_close(reader, log)
        writer.write_message(DependencyQuery(dep))
        writer.write_message(DicomWithName(b"DICM-bytes", "x.dcm", "<ismrmrdMeta/>"))
        writer.write_message(Close())

    with ScriptedServer(script) as srv:
        rc = run_client(port=srv.port, config_local=str(chain), query=True, outfile="dep.h5",
                        out_group="q", read_timeout_s=TIMEOUT, out=io.StringIO())
    assert rc == 0 and srv.error is None
    assert ids(srv.received) == [2, 4]
    assert srv.received[0].text == chain.read_text()
    with h5py.File(tmp_path / "dep.h5", "r") as f:
        assert f["q/dependency_query"][0].decode() == dep
    assert (tmp_path / "q_000000.dcm").read_bytes() == b"DICM-bytes"
    assert (tmp_path / "q_000000_attrib.xml").read_text() == "<ismrmrdMeta/>"


def test_connection_refused_and_missing_input(tmp_path, capsys):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))          # bound but not listening: connect is refused
    port = s.getsockname()[1]
    with s:
        src = write_dataset(tmp_path / "in.h5", n_acq=1)
        assert run_client(port=port, address="127.0.0.1", filename=str(src), timeout_ms=2000) != 0
    assert f"cannot connect to 127.0.0.1:{port}" in capsys.readouterr().err
    assert run_client(port=port, filename=str(tmp_path / "nope.h5")) != 0
    assert "nope.h5 does not exist" in capsys.readouterr().err
    assert run_client(port=port) != 0
    assert "-f FILE" in capsys.readouterr().err


def test_client_arguments():
    p = add_client_arguments(argparse.ArgumentParser())
    a = p.parse_args(["-a", "h", "-p", "9003", "-f", "in.h5", "-g", "/g", "-o", "o.h5", "-G", "grp", "-c",
                      "c.xml", "-C", "l.xml", "-q", "-Q", "key", "-t", "50", "-v", "-F", "h5"])
    assert (a.address, a.port, a.filename, a.in_group, a.outfile, a.out_group, a.config, a.config_local,
            a.query, a.info_key, a.timeout_ms, a.verbose) == ("h", 9003, "in.h5", "/g", "o.h5", "grp", "c.xml",
                                                             "l.xml", True, "key", 50, True)
    d = p.parse_args([])
    assert (d.address, d.port, d.in_group, d.outfile, d.out_group, d.config, d.timeout_ms) == (
        "localhost", 9002, "/dataset", "out.h5", None, "default.xml", 10000)
    with pytest.raises(SystemExit):
        p.parse_args(["-F", "hdr"])


def test_h5_writer_refuses_mixed_matrix_sizes_and_keeps_series_apart(tmp_path):
    path = tmp_path / "x.h5"
    with ImageH5Writer(path, "/grp/") as w:
        w.append(make_image(0, 0, shape=(1, 1, 6, 8)))
        w.append(make_image(3, 0, shape=(2, 1, 4, 4)))
        with pytest.raises(ImageLayoutError, match=r"image_0.*\[1, 1, 4, 4\].*\[1, 1, 6, 8\]"):
            w.append(make_image(0, 1, shape=(1, 1, 4, 4)))
        w.append(make_image(0, 2, shape=(1, 1, 6, 8)))
    s = read_images(path, "grp")
    assert sorted(s) == [0, 3]
    assert s[0].data.shape == (2, 1, 1, 6, 8) and list(s[0].headers["image_index"]) == [0, 2]
    assert s[3].data.shape == (1, 2, 1, 4, 4)
    # complex data use the ISMRMRD {real, imag} compound and come back complex
    img = ismrmrd.Image.from_array((np.arange(6) * (1 + 2j)).astype(np.complex64).reshape(2, 3))
    with ImageH5Writer(path, "c") as w:
        w.append(img)
    with h5py.File(path, "r") as f:
        assert f["c/image_0/data"].dtype.names == ("real", "imag")
    np.testing.assert_array_equal(read_images(path, "c")[0].data[0], img.data)


def test_server_that_stops_reading_early_gives_nonzero_exit(tmp_path, shared_data, capsys):
    src = shared_data / "brain_invivo_16ch_128_cartesian.h5"    # ~2 MB: more than socket buffers hold

    def script(reader, writer, conn, log):
        log.append(reader.read_message())
        log.append(reader.read_message())
        writer.write_message(Text("[recon] ERROR: refusing data"))
        writer.write_message(Close())

    with ScriptedServer(script) as srv:
        rc = run_client(port=srv.port, filename=str(src), outfile=str(tmp_path / "o.h5"), out_group="g",
                        read_timeout_s=TIMEOUT)
    err = capsys.readouterr().err
    assert rc != 0 and srv.error is None
    assert "stopped reading before the client finished sending" in err or "reset" in err.lower(), err
