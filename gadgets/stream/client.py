"""A streaming client that behaves like Gadgetron's ``gadgetron_ismrmrd_client`` (PROTOCOL.md §7).

One session: CONFIG (1 with a chain name, or 2 with a local chain file's text), HEADER (the input
file's ``<group>/xml`` verbatim), acquisitions and waveforms interleaved by time stamp, CLOSE.
A reader thread receives the replies at the same time (images → HDF5 via :mod:`.h5out`, TEXT and
RESPONSE → printed, DICOM → ``<out_group>_NNNNNN.dcm``, dependency replies → the output file)
until the server's CLOSE. A server that closes without CLOSE, or sends an id the client does not
accept, makes the session fail with a non-zero exit code and a clear message.

Differences to the C++ client: errors give exit code 1 with a message on stderr instead of an
abort (134); a session in which the server answered an ``ERROR`` TEXT and sent nothing back (no
image, DICOM, dependency reply or query answer) also exits 1;
``-F hdr``, ``-P``, ``-T``, ``-Z`` and ``-l`` are not provided (compression is refused by
the protocol layer anyway).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional, Sequence, TextIO, Union

import h5py
import ismrmrd
import ismrmrd.hdf5
import numpy as np

from .h5out import ImageH5Writer
from .protocol import (Close, ConfigFile, ConfigText, DependencyQuery, DicomWithName, Header, Message,
                       MessageId, MessageReader, MessageWriter, ProtocolError, ProtocolLimits, Query,
                       Response, Text, message_id_of, socket_read_exact, socket_write_all)

__all__ = ["run_client", "add_client_arguments", "main_from_args", "interleave_by_time", "ClientError",
           "ClientStats", "read_input", "InputData", "default_out_group"]

EXIT_OK = 0
EXIT_ERROR = 1
QUERY_CORRELATION_ID = 1
_CHUNK = 256
_SEND_ERROR_GRACE_S = 5.0


class ClientError(Exception):
    """Bad client arguments or input file (reported before or instead of a session)."""


@dataclass
class ClientStats:
    """What one session sent and received (printed with ``-v``)."""

    acquisitions_sent: int = 0
    waveforms_sent: int = 0
    bytes_sent: int = 0
    images_received: int = 0
    texts_received: int = 0
    responses_received: int = 0
    dicoms_received: int = 0
    dependencies_received: int = 0
    errors_received: int = 0
    elapsed_s: float = 0.0

    @property
    def results_received(self) -> int:
        """Images, DICOM files, dependency replies and query answers received."""
        return (self.images_received + self.dicoms_received + self.dependencies_received
                + self.responses_received)


def default_out_group() -> str:
    """The C++ client's default output group: the local date-time ``YYYY-MM-DD hh:mm:ss``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())


# ---------------------------------------------------------------------------------------------
# input file


@dataclass
class InputData:
    """An opened ISMRMRD input: header XML text, acquisition count, waveforms (loaded), file handle."""

    file: h5py.File
    group: str
    xml: str
    n_acquisitions: int
    waveforms: list[ismrmrd.Waveform]
    fileobj: Optional[BinaryIO] = None

    def acquisitions(self) -> Iterator[ismrmrd.Acquisition]:
        """Acquisitions in file order, read in chunks (memory stays bounded for large files)."""
        if self.n_acquisitions == 0:
            return
        dset = self.file[f"{self.group}/data"]
        for start in range(0, self.n_acquisitions, _CHUNK):
            rows = dset[start:start + _CHUNK]
            heads = np.asarray(rows["head"]).astype(ismrmrd.hdf5.acquisition_header_dtype)
            for i in range(len(rows)):
                acq = ismrmrd.Acquisition(heads[i].tobytes())
                ns, nc, nt = acq.number_of_samples, acq.active_channels, acq.trajectory_dimensions
                data = np.asarray(rows["data"][i], dtype=np.float32)
                traj = np.asarray(rows["traj"][i], dtype=np.float32)
                if data.size != 2 * ns * nc or traj.size != ns * nt:
                    raise ClientError(
                        f"{self.file.filename}:{self.group}/data[{start + i}]: data has {data.size} floats "
                        f"and traj {traj.size}, header says {ns} samples x {nc} channels x "
                        f"{nt} trajectory dimensions")
                acq.data[:] = data.view(np.complex64).reshape(nc, ns)
                if nt:
                    acq.traj[:] = traj.reshape(ns, nt)
                yield acq

    def close(self) -> None:
        """Close the HDF5 file and the Python file object under it."""
        self.file.close()
        if self.fileobj is not None:
            self.fileobj.close()


def read_input(filename: Union[str, Path], in_group: str = "/dataset") -> InputData:
    """Open an ISMRMRD HDF5 file for streaming: ``<g>/xml``, ``<g>/data``, ``<g>/waveforms``.

    Raises
    ------
    ClientError
        Missing file, group or header, with the names that were looked for.
    """
    path = Path(filename)
    if not path.is_file():
        raise ClientError(f"input file {path} does not exist")
    # Through a Python file object: HDF5 shares one file handle between all opens of the same path in a
    # process, so several clients in one process (tests, the in-process demo) closing and reading the
    # same file at once corrupted each other's reads ("address of object past end of allocation").
    fobj = open(path, "rb")
    try:
        f = h5py.File(fobj, "r")
    except OSError as exc:
        fobj.close()
        raise ClientError(f"input file {path} is not an HDF5 file: {exc}") from None
    group = "/" + in_group.strip("/")
    try:
        if group not in f:
            raise ClientError(f"input file {path} has no group {group} (top level: {sorted(f.keys())})")
        g = f[group]
        if "xml" not in g:
            raise ClientError(f"input file {path} has no ISMRMRD header {group}/xml")
        raw = g["xml"][0]
        xml = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        n_acq = int(g["data"].shape[0]) if "data" in g else 0
        waveforms: list[ismrmrd.Waveform] = []
        for name in ("waveforms", "waveform"):
            if name in g:
                for row in g[name][()]:
                    head = np.asarray(row["head"]).astype(ismrmrd.hdf5.waveform_header_dtype)
                    wav = ismrmrd.Waveform(head.tobytes())
                    wav.data[:] = np.asarray(row["data"], dtype=np.uint32).reshape(wav.channels,
                                                                                  wav.number_of_samples)
                    waveforms.append(wav)
                break
    except Exception:
        f.close()
        fobj.close()
        raise
    return InputData(f, group, xml, n_acq, waveforms, fobj)


def interleave_by_time(acquisitions: Iterable[ismrmrd.Acquisition],
                       waveforms: Sequence[ismrmrd.Waveform]
                       ) -> Iterator[Union[ismrmrd.Acquisition, ismrmrd.Waveform]]:
    """Merge waveforms into the acquisition stream by time stamp, as the C++ client does.

    Both keep their file order; a waveform is sent just before the first acquisition whose
    ``acquisition_time_stamp`` exceeds the waveform's ``time_stamp``; leftovers go last.
    """
    k = 0
    for acq in acquisitions:
        while k < len(waveforms) and waveforms[k].time_stamp < acq.acquisition_time_stamp:
            yield waveforms[k]
            k += 1
        yield acq
    yield from waveforms[k:]


# ---------------------------------------------------------------------------------------------
# reply reader thread


_ACCEPTED = (MessageId.IMAGE, MessageId.TEXT, MessageId.RESPONSE, MessageId.DICOM_WITHNAME,
             MessageId.DEPENDENCY_QUERY, MessageId.CLOSE)


class _ReplyReceiver(threading.Thread):
    """Reads server messages until CLOSE; any failure is stored in ``error`` for the main thread."""

    def __init__(self, sock: socket.socket, writer: ImageH5Writer, out_group: str, out: TextIO,
                 stats: ClientStats, limits: ProtocolLimits) -> None:
        super().__init__(name="torchgadgets-client-reader", daemon=True)
        self.sock = sock
        self.reader = MessageReader(socket_read_exact(sock), limits)
        self.writer = writer
        self.out_group = out_group
        self.out = out
        self.stats = stats
        self.error: Optional[BaseException] = None
        self.got_close = False
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            while True:
                msg = self.reader.read_message()
                if isinstance(msg, Close):
                    self.got_close = True
                    return
                self._handle(msg)
        except Exception as exc:  # noqa: BLE001 - handed to the main thread, which reports it
            self.error = exc
        if self.error is not None:
            # stop the sender too: the session cannot succeed any more
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _handle(self, msg: Message) -> None:
        mid = message_id_of(msg)
        if mid not in _ACCEPTED:
            raise ClientError(
                f"server sent message {mid.value} {mid.name}, which the client does not accept "
                f"(accepted: {', '.join(f'{m.value} {m.name}' for m in _ACCEPTED)})")
        if isinstance(msg, ismrmrd.Image):
            self.writer.append(msg)
            self.stats.images_received += 1
        elif isinstance(msg, Text):
            self.stats.texts_received += 1
            if "ERROR" in msg.text:
                self.stats.errors_received += 1
            print(msg.text, file=self.out, flush=True)
        elif isinstance(msg, Response):
            self.stats.responses_received += 1
            print(msg.text, file=self.out, flush=True)
        elif isinstance(msg, DicomWithName):
            stem = f"{self.out_group}_{self.stats.dicoms_received:06d}"
            Path(stem + ".dcm").write_bytes(msg.blob)
            if msg.attributes:
                Path(stem + "_attrib.xml").write_text(msg.attributes, encoding="utf-8")
            self.stats.dicoms_received += 1
        elif isinstance(msg, DependencyQuery):
            self.writer.append_text("dependency_query", msg.meta_xml)
            self.stats.dependencies_received += 1


# ---------------------------------------------------------------------------------------------
# session


def _print_err(err: TextIO, text: str) -> None:
    print(f"torchgadgets client: error: {text}", file=err, flush=True)


def run_client(address: str = "localhost", port: int = 9002, filename: Optional[str] = None,
               in_group: str = "/dataset", outfile: str = "out.h5", out_group: Optional[str] = None,
               config: str = "default.xml", config_local: Optional[str] = None, timeout_ms: int = 10000,
               query: bool = False, info_key: Optional[str] = None, verbose: bool = False,
               out: Optional[TextIO] = None, *, err: Optional[TextIO] = None,
               read_timeout_s: Optional[float] = None,
               limits: ProtocolLimits = ProtocolLimits()) -> int:
    """Run one client session against a Gadgetron-compatible server; returns the exit code.

    Parameters
    ----------
    address, port
        Server address (default ``localhost:9002``).
    filename, in_group
        ISMRMRD input file and group (required unless ``query`` or ``info_key``).
    outfile, out_group
        Output HDF5 file and group (default group: local date-time, as the C++ client).
    config, config_local
        Remote chain name (message 1) or a local chain file sent as text (message 2, wins).
    timeout_ms
        Connect timeout.
    query
        ``-q``: dependency query (config + CLOSE, no data); 1019 replies go into ``outfile``.
    info_key
        ``-Q``: send QUERY(key) + CLOSE and print the RESPONSE.
    verbose
        Print counts, elapsed time and throughput.
    out, err
        Where replies/statistics and error messages are printed (None: the current ``sys.stdout`` /
        ``sys.stderr`` at call time).
    read_timeout_s
        Give up when the server is silent this long (None: wait, as the C++ client does).
    limits
        Protocol limits for the replies.

    Returns
    -------
    int
        0 when the server ended the session with CLOSE, 1 otherwise (message on ``err``).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    group = out_group if out_group else default_out_group()
    stats = ClientStats()
    # -- what to send ----------------------------------------------------------------------------
    data: Optional[InputData] = None
    try:
        if info_key is not None:
            preamble: list[Message] = [Query(QUERY_CORRELATION_ID, info_key)]
        else:
            if config_local:
                try:
                    cfg: Message = ConfigText(Path(config_local).read_text(encoding="utf-8"))
                except OSError as exc:
                    raise ClientError(f"cannot read local chain file {config_local} (-C): {exc}") from None
            else:
                cfg = ConfigFile(config)
            preamble = [cfg]
            if not query:
                if not filename:
                    raise ClientError("an input file is required (-f FILE) unless -q or -Q is given")
                data = read_input(filename, in_group)
                preamble.append(Header(data.xml))
    except ClientError as exc:
        _print_err(err, str(exc))
        return EXIT_ERROR

    # -- connect ---------------------------------------------------------------------------------
    try:
        sock = socket.create_connection((address, int(port)), timeout=timeout_ms / 1000.0)
    except OSError as exc:
        if data is not None:
            data.close()
        _print_err(err, f"cannot connect to {address}:{port} within {timeout_ms} ms: {exc}")
        return EXIT_ERROR

    writer = ImageH5Writer(outfile, group)
    t0 = time.perf_counter()
    send_error: Optional[BaseException] = None
    with sock:
        sock.settimeout(read_timeout_s)
        receiver = _ReplyReceiver(sock, writer, group, out, stats, limits)
        receiver.start()
        msg_writer = MessageWriter(socket_write_all(sock))
        try:
            for msg in preamble:
                msg_writer.write_message(msg)
            if data is not None:
                for item in interleave_by_time(data.acquisitions(), data.waveforms):
                    msg_writer.write_message(item)
                    if isinstance(item, ismrmrd.Acquisition):
                        stats.acquisitions_sent += 1
                    else:
                        stats.waveforms_sent += 1
            msg_writer.write_message(Close())
        except (ProtocolError, OSError, ClientError) as exc:
            send_error = exc
        finally:
            stats.bytes_sent = msg_writer.bytes_written
            if data is not None:
                data.close()
        if send_error is not None:
            # give the server a moment to deliver its error TEXT + CLOSE, then stop waiting
            receiver.join(_SEND_ERROR_GRACE_S)
            if receiver.is_alive():
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        receiver.join()
    writer.close()
    stats.elapsed_s = time.perf_counter() - t0

    if verbose:
        mb = stats.bytes_sent / 1e6
        rate = mb / stats.elapsed_s if stats.elapsed_s > 0 else float("inf")
        print(f"sent {stats.acquisitions_sent} acquisitions and {stats.waveforms_sent} waveforms "
              f"({mb:.3f} MB) in {stats.elapsed_s:.3f} s ({rate:.1f} MB/s); received "
              f"{stats.images_received} images, {stats.texts_received} texts, "
              f"{stats.responses_received} responses, {stats.dicoms_received} DICOM files, "
              f"{stats.dependencies_received} dependency replies", file=out, flush=True)

    if receiver.error is not None:
        _print_err(err, f"while receiving from {address}:{port}: {receiver.error}")
        return EXIT_ERROR
    if not receiver.got_close:  # pragma: no cover - receiver ends only by CLOSE or with an error
        _print_err(err, f"connection to {address}:{port} ended without CLOSE")
        return EXIT_ERROR
    if send_error is not None:
        sent = stats.acquisitions_sent
        total = data.n_acquisitions if data is not None else 0
        _print_err(err, f"server {address}:{port} stopped reading before the client finished "
                        f"sending ({sent} of {total} acquisitions sent): {send_error}")
        return EXIT_ERROR
    if stats.errors_received and not stats.results_received:
        _print_err(err, f"server {address}:{port} answered {stats.errors_received} error(s) and sent no "
                        f"images")
        return EXIT_ERROR
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# command line


def add_client_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``gadgetron_ismrmrd_client`` options (-a -p -f -g -o -G -c -C -q -Q -t -v -F)."""
    parser.add_argument("-a", "--address", default="localhost", help="server host (default localhost)")
    parser.add_argument("-p", "--port", type=int, default=9002, help="server port (default 9002)")
    parser.add_argument("-f", "--filename", default=None, help="input ISMRMRD HDF5 file")
    parser.add_argument("-g", "--in-group", dest="in_group", default="/dataset",
                        help="input group (default /dataset)")
    parser.add_argument("-o", "--outfile", default="out.h5", help="output HDF5 file (default out.h5)")
    parser.add_argument("-G", "--out-group", dest="out_group", default=None,
                        help="output group (default: local date-time YYYY-MM-DD hh:mm:ss)")
    parser.add_argument("-c", "--config", default="default.xml",
                        help="chain name known to the server (default default.xml)")
    parser.add_argument("-C", "--config-local", dest="config_local", default=None,
                        help="local chain file sent as text (overrides -c)")
    parser.add_argument("-F", "--outformat", choices=["h5"], default="h5", help="output format (h5)")
    parser.add_argument("-t", "--timeout", dest="timeout_ms", type=int, default=10000,
                        help="connect timeout in ms (default 10000)")
    parser.add_argument("-q", "--query", action="store_true",
                        help="dependency query: send the config and CLOSE only")
    parser.add_argument("-Q", "--info", dest="info_key", default=None, metavar="KEY",
                        help="send an info query (e.g. gadgetron::version) and print the answer")
    parser.add_argument("-v", "--verbose", action="store_true", help="print counts, time and MB/s")
    return parser


def main_from_args(args: argparse.Namespace) -> int:
    """Run :func:`run_client` with a namespace produced by :func:`add_client_arguments`."""
    return run_client(address=args.address, port=args.port, filename=args.filename,
                      in_group=args.in_group, outfile=args.outfile, out_group=args.out_group,
                      config=args.config, config_local=args.config_local, timeout_ms=args.timeout_ms,
                      query=args.query, info_key=args.info_key, verbose=args.verbose)
