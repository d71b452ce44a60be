"""The Gadgetron / MRD TCP wire protocol: message ids, message objects, a reader and a writer.

Framing (PROTOCOL.md §1): a message is a little-endian ``u16`` id followed by a payload whose size
is implied by the id and by length fields inside the payload. There is no outer length prefix, so
an unknown id cannot be skipped and ends the session.

Acquisitions, images and waveforms travel as the ``ismrmrd`` package's ``Acquisition``, ``Image``
and ``Waveform`` (their ``serialize_into``/``deserialize_from`` produce the §5 payloads); control
messages are the small dataclasses below. Every length field is checked against
:class:`ProtocolLimits` *before* anything is allocated or read, and every failure is a
:class:`ProtocolError` subclass naming the message, the field and the problem.

This module depends only on the standard library, numpy and ismrmrd (no torch).
"""

from __future__ import annotations

import ctypes
import enum
import io
import socket
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import ismrmrd
import numpy as np

__all__ = [
    "MessageId", "ProtocolLimits",
    "ConfigFile", "ConfigText", "Header", "Close", "Text", "Query", "Response", "Error",
    "DicomWithName", "DependencyQuery", "Message",
    "ProtocolError", "UnknownMessageError", "UnsupportedMessageError", "MessageTooLargeError",
    "MalformedMessageError", "ConnectionClosedError", "TruncatedMessageError", "PeerTimeoutError",
    "MessageReader", "MessageWriter", "encode_message", "message_id_of", "message_name",
    "socket_read_exact", "socket_write_all", "RecvBuffer", "meta_to_xml", "meta_from_xml",
    "ACQUISITION_HEADER_SIZE", "IMAGE_HEADER_SIZE", "WAVEFORM_HEADER_SIZE", "CONFIG_FILE_SIZE",
    "FLAG_COMPRESSION1", "FLAG_COMPRESSION2", "IMAGE_DATA_TYPES", "control_frame_length",
]


class MessageId(enum.IntEnum):
    """Message ids shared by Gadgetron 4, its C++ client and the MRD python server (PROTOCOL.md §2)."""

    CONFIG_FILE = 1
    CONFIG_TEXT = 2
    HEADER = 3
    CLOSE = 4
    TEXT = 5
    QUERY = 6
    RESPONSE = 7
    ERROR = 8
    ACQUISITION = 1008
    DICOM_WITHNAME = 1018
    DEPENDENCY_QUERY = 1019
    IMAGE = 1022
    WAVEFORM = 1026


ACQUISITION_HEADER_SIZE = ctypes.sizeof(ismrmrd.AcquisitionHeader)   # 340
IMAGE_HEADER_SIZE = ctypes.sizeof(ismrmrd.ImageHeader)               # 198
WAVEFORM_HEADER_SIZE = ctypes.sizeof(ismrmrd.WaveformHeader)         # 40
CONFIG_FILE_SIZE = 1024

#: 1-based ISMRMRD flag numbers of the two compression flags (bit n-1 of the u64 flags).
FLAG_COMPRESSION1 = 53   # ZFP
FLAG_COMPRESSION2 = 54   # NHLBI
_COMPRESSION_MASK = (1 << (FLAG_COMPRESSION1 - 1)) | (1 << (FLAG_COMPRESSION2 - 1))

#: ISMRMRD image data_type → numpy dtype (PROTOCOL.md §5.3).
IMAGE_DATA_TYPES: dict[int, np.dtype] = {
    1: np.dtype("<u2"), 2: np.dtype("<i2"), 3: np.dtype("<u4"), 4: np.dtype("<i4"),
    5: np.dtype("<f4"), 6: np.dtype("<f8"), 7: np.dtype("<c8"), 8: np.dtype("<c16"),
}

_MiB = 1 << 20
_NO_COPY_BYTES = 1 << 16


# ---------------------------------------------------------------------------------------------
# errors


class ProtocolError(Exception):
    """Base class of every wire-protocol failure (bad bytes, limits, closed or stalled peers)."""


class UnknownMessageError(ProtocolError):
    """A message id that this implementation does not know; the stream cannot be resynchronised."""

    def __init__(self, message: str, message_id: int) -> None:
        super().__init__(message)
        self.message_id = message_id


class UnsupportedMessageError(ProtocolError):
    """A known message using a feature this implementation refuses (e.g. compressed acquisitions)."""


class MessageTooLargeError(ProtocolError):
    """A length or size field exceeds :class:`ProtocolLimits`; refused before reading the payload."""


class MalformedMessageError(ProtocolError):
    """A field has an invalid value (bad UTF-8, non-zero reserved field, unknown data type, bad XML)."""


class ConnectionClosedError(ProtocolError):
    """The peer closed the connection (EOF). ``received`` = bytes of the pending read already seen."""

    def __init__(self, message: str, received: int = 0) -> None:
        super().__init__(message)
        self.received = received


class TruncatedMessageError(ConnectionClosedError):
    """The stream ended in the middle of a message."""


class PeerTimeoutError(ProtocolError):
    """The peer sent nothing for longer than the socket timeout while a read was pending."""


# ---------------------------------------------------------------------------------------------
# limits and message objects


@dataclass(frozen=True)
class ProtocolLimits:
    """Upper bounds checked against length fields before any allocation.

    Parameters
    ----------
    max_text_bytes
        CONFIG_TEXT, HEADER, TEXT, QUERY/RESPONSE text, ERROR, DEPENDENCY_QUERY, DICOM name.
    max_acquisition_values
        ``number_of_samples × active_channels`` and ``number_of_samples × trajectory_dimensions``.
    max_image_bytes
        Pixel bytes of one image (``x·y·z·channels·itemsize``); 256 MiB by default (a received image
        costs about twice its size while it is decoded).
    max_attribute_bytes
        Image / DICOM attribute XML.
    max_waveform_values
        ``number_of_samples × channels`` of one waveform.
    max_dicom_bytes
        DICOM blob of one DICOM_WITHNAME message.
    """

    max_text_bytes: int = 16 * _MiB
    max_acquisition_values: int = 1 << 24
    max_image_bytes: int = 256 * _MiB
    max_attribute_bytes: int = 16 * _MiB
    max_waveform_values: int = 1 << 24
    max_dicom_bytes: int = 256 * _MiB


@dataclass(frozen=True)
class ConfigFile:
    """id 1: name of a chain known to the server (NUL-padded to 1024 bytes on the wire)."""

    name: str


@dataclass(frozen=True)
class ConfigText:
    """id 2: a whole chain definition sent inline."""

    text: str


@dataclass(frozen=True)
class Header:
    """id 3: the ISMRMRD XML header, kept as text (parsing is the receiver's business)."""

    xml: str


@dataclass(frozen=True)
class Close:
    """id 4: end of this side's stream."""


@dataclass(frozen=True)
class Text:
    """id 5: free text (log lines, errors ``"[loc] ERROR: ..."``, MRD JSON config)."""

    text: str


@dataclass(frozen=True)
class Query:
    """id 6: an information query such as ``gadgetron::version``; ``reserved`` must be 0."""

    correlation_id: int
    text: str
    reserved: int = 0


@dataclass(frozen=True)
class Response:
    """id 7: the answer to the :class:`Query` with the same correlation id."""

    correlation_id: int
    text: str


@dataclass(frozen=True)
class Error:
    """id 8: an error reported by an external module to the Gadgetron core (PROTOCOL.md §10)."""

    text: str


@dataclass(frozen=True)
class DicomWithName:
    """id 1018: a DICOM file produced by the server, with a file name and attribute XML."""

    blob: bytes
    name: str
    attributes: str = ""


@dataclass(frozen=True)
class DependencyQuery:
    """id 1019: a serialized MetaContainer answering a dependency (noise) query."""

    meta_xml: str


Message = Union[ConfigFile, ConfigText, Header, Close, Text, Query, Response, Error, DicomWithName,
                DependencyQuery, ismrmrd.Acquisition, ismrmrd.Image, ismrmrd.Waveform]

_ID_OF_TYPE: dict[type, MessageId] = {
    ConfigFile: MessageId.CONFIG_FILE, ConfigText: MessageId.CONFIG_TEXT, Header: MessageId.HEADER,
    Close: MessageId.CLOSE, Text: MessageId.TEXT, Query: MessageId.QUERY,
    Response: MessageId.RESPONSE, Error: MessageId.ERROR, DicomWithName: MessageId.DICOM_WITHNAME,
    DependencyQuery: MessageId.DEPENDENCY_QUERY, ismrmrd.Acquisition: MessageId.ACQUISITION,
    ismrmrd.Image: MessageId.IMAGE, ismrmrd.Waveform: MessageId.WAVEFORM,
}


def message_id_of(msg: Message) -> MessageId:
    """The wire id of a message object (TypeError for objects that are not messages)."""
    mid = _ID_OF_TYPE.get(type(msg))        # exact type first: one dict lookup per message
    if mid is not None:
        return mid
    for cls, mid in _ID_OF_TYPE.items():
        if isinstance(msg, cls):
            return mid
    raise TypeError(f"{type(msg).__name__} is not a protocol message "
                    f"(expected one of {', '.join(c.__name__ for c in _ID_OF_TYPE)})")


def message_name(message_id: int) -> str:
    """``"1022 IMAGE"`` for known ids, ``"1001 (unknown)"`` otherwise; used in error messages."""
    try:
        return f"{message_id} {MessageId(message_id).name}"
    except ValueError:
        return f"{message_id} (unknown)"


# ---------------------------------------------------------------------------------------------
# reader


class MessageReader:
    """Reads one message at a time from a byte source.

    Parameters
    ----------
    read_exact
        ``read_exact(n)`` returns ``n`` bytes. It may return fewer bytes (e.g. ``BytesIO.read`` at
        the end) or raise :class:`ConnectionClosedError`; both are reported as end of stream.
    limits
        Bounds for length fields, checked before a payload is read.
    """

    def __init__(self, read_exact: Callable[[int], bytes], limits: ProtocolLimits = ProtocolLimits()) -> None:
        self._read_exact = read_exact
        # a source that can fill a caller's buffer (``read_exact.read_into(view)``, as socket_read_exact
        # has) receives a payload straight into the array it becomes: one copy from the kernel's buffer
        self._read_into: Optional[Callable[[memoryview], object]] = getattr(read_exact, "read_into", None)
        self.limits = limits
        self._context = ""
        self.messages_read = 0
        #: ``(acquisition, its wire bytes with the id)`` when the last message read was an acquisition,
        #: else None; the acquisition's header and arrays are views of those bytes (``_read_acquisition``)
        self.last_wire: Optional[tuple[ismrmrd.Acquisition, memoryview]] = None
        self._dispatch: dict[int, Callable[[], Message]] = {
            int(k): getattr(self, f"_read_{k.name.lower()}") for k in MessageId}

    # -- low level --------------------------------------------------------------------------

    def _read(self, n: int, field: str) -> bytes:
        if n == 0:
            return b""
        try:
            data = self._read_exact(n)
        except TruncatedMessageError:
            raise
        except ConnectionClosedError as exc:
            got = exc.received
            raise TruncatedMessageError(
                f"message {self._context}: stream ended while reading {field}: got {got} of {n} bytes "
                f"({n - got} bytes missing)", received=got) from None
        if len(data) != n:
            raise TruncatedMessageError(
                f"message {self._context}: stream ended while reading {field}: got {len(data)} of {n} "
                f"bytes ({n - len(data)} bytes missing)", received=len(data))
        return data

    def _fill(self, view: memoryview, shape: tuple[int, int, int]) -> None:
        """Fill an acquisition's trajectory and data (``shape`` = samples, trajectory dimensions,
        channels) from the source: straight into ``view`` when the source can, else one copy."""
        n = len(view)
        try:
            if self._read_into is None:
                data = self._read_exact(n)
                if len(data) != n:
                    raise ConnectionClosedError("short read", received=len(data))
                view[:] = data
            else:
                self._read_into(view)
        except ConnectionClosedError as exc:
            got = exc.received
            ns, nt, nc = shape
            raise TruncatedMessageError(
                f"message {self._context}: stream ended while reading trajectory ({ns}x{nt} float32) and "
                f"data ({nc}x{ns} complex64): got {got} of {n} bytes ({n - got} bytes missing)",
                received=got) from None

    def _unpack(self, fmt: str, field: str) -> int:
        return struct.unpack(fmt, self._read(struct.calcsize(fmt), field))[0]

    def _check(self, value: int, limit: int, field: str, unit: str = "bytes") -> None:
        if value > limit:
            raise MessageTooLargeError(
                f"message {self._context}: field {field} claims {value} {unit}, above the limit of "
                f"{limit} {unit}; refused without reading it")

    def _text(self, fmt: str, field: str, limit: int | None = None) -> str:
        n = self._unpack(fmt, f"{field} length")
        self._check(n, self.limits.max_text_bytes if limit is None else limit, f"{field} length")
        return self._decode(self._read(n, field), field)

    def _decode(self, raw: bytes, field: str) -> str:
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedMessageError(
                f"message {self._context}: field {field} is not valid UTF-8 ({exc.reason} at byte "
                f"{exc.start})") from None

    # -- public ---------------------------------------------------------------------------------

    def read_message_id(self) -> int:
        """Read the next 2-byte id. EOF exactly at a message boundary raises ConnectionClosedError."""
        try:
            raw = self._read_exact(2)
        except TruncatedMessageError:
            raise
        except ConnectionClosedError as exc:
            raw = b"\0" * exc.received  # only the length matters below
        if len(raw) == 0:
            raise ConnectionClosedError(
                f"connection closed by the peer after {self.messages_read} messages without a CLOSE (4)")
        if len(raw) != 2:
            raise TruncatedMessageError(
                f"stream ended inside a message id after {self.messages_read} messages: got 1 of 2 "
                f"bytes (1 byte missing)", received=len(raw))
        return struct.unpack("<H", raw)[0]

    def read_message(self) -> Message:
        """Read and return one complete message.

        Raises
        ------
        UnknownMessageError
            Unknown id (the stream cannot be resynchronised).
        ConnectionClosedError / TruncatedMessageError
            EOF at a message boundary / inside a message.
        MessageTooLargeError, MalformedMessageError, UnsupportedMessageError
            Bad length fields, bad field values, compressed acquisitions.
        """
        mid = self.read_message_id()
        read = self._dispatch.get(mid)
        if read is None:
            raise UnknownMessageError(
                f"unknown message id {mid} (0x{mid:04x}) after {self.messages_read} messages; "
                f"known ids: {', '.join(f'{m.value} {m.name}' for m in MessageId)}", mid)
        self._context = _CONTEXT[mid]
        self.last_wire = None
        msg = read()
        self.messages_read += 1
        return msg

    def __iter__(self) -> Iterator[Message]:
        """Yield messages up to and including the first :class:`Close`."""
        while True:
            msg = self.read_message()
            yield msg
            if isinstance(msg, Close):
                return

    # -- per message ----------------------------------------------------------------------------

    def _read_config_file(self) -> ConfigFile:
        raw = self._read(CONFIG_FILE_SIZE, "name (char[1024])")
        return ConfigFile(self._decode(raw.split(b"\0", 1)[0], "name"))

    def _read_config_text(self) -> ConfigText:
        return ConfigText(self._text("<I", "text"))

    def _read_header(self) -> Header:
        return Header(self._text("<I", "xml"))

    def _read_close(self) -> Close:
        return Close()

    def _read_text(self) -> Text:
        return Text(self._text("<I", "text"))

    def _read_query(self) -> Query:
        reserved = self._unpack("<Q", "reserved")
        if reserved != 0:
            raise MalformedMessageError(
                f"message {self._context}: field reserved must be 0, got {reserved}")
        corr = self._unpack("<Q", "correlation_id")
        return Query(corr, self._text("<Q", "text"))

    def _read_response(self) -> Response:
        corr = self._unpack("<Q", "correlation_id")
        return Response(corr, self._text("<Q", "text"))

    def _read_error(self) -> Error:
        return Error(self._text("<Q", "text"))

    def _read_dicom_withname(self) -> DicomWithName:
        size = self._unpack("<I", "blob size")
        self._check(size, self.limits.max_dicom_bytes, "blob size")
        blob = self._read(size, "blob")
        name = self._text("<Q", "name")
        attributes = self._text("<Q", "attributes", self.limits.max_attribute_bytes)
        return DicomWithName(blob, name, attributes)

    def _read_dependency_query(self) -> DependencyQuery:
        return DependencyQuery(self._text("<Q", "meta_xml"))

    def _replay(self, chunks: Sequence[bytes]) -> Callable[[int], bytes]:
        """A read function handing already-validated chunks to ismrmrd's ``deserialize_from``."""
        queue = list(chunks)

        def read(n: int) -> bytes:
            chunk = queue.pop(0) if queue else b""
            if len(chunk) != n:  # would mean our size computation disagrees with ismrmrd's
                raise MalformedMessageError(
                    f"message {self._context}: internal size mismatch ({len(chunk)} vs {n} bytes)")
            return chunk

        return read

    def _read_acquisition(self) -> ismrmrd.Acquisition:
        head_bytes = self._read(ACQUISITION_HEADER_SIZE, "AcquisitionHeader")
        flags, ns, nc, nt = _acq_fields(head_bytes)
        if flags & _COMPRESSION_MASK:
            head = ismrmrd.AcquisitionHeader.from_buffer_copy(head_bytes)
            raise UnsupportedMessageError(
                f"message {self._context} (scan_counter {head.scan_counter}): field flags has "
                f"compression flag {FLAG_COMPRESSION1 if head.flags & (1 << 52) else FLAG_COMPRESSION2} "
                f"set; compressed acquisitions (NHLBI/ZFP) are not supported; send uncompressed data "
                f"(omit -P/-T)")
        self._check(ns * nc, self.limits.max_acquisition_values,
                    "number_of_samples*active_channels", "samples")
        self._check(ns * nt, self.limits.max_acquisition_values,
                    "number_of_samples*trajectory_dimensions", "values")
        # The whole message lands in one writable buffer, laid out as on the wire (id, header,
        # trajectory, data; 2 bytes of padding in front align the arrays); the header and the arrays
        # are views of it. One copy from the kernel's buffer, no element-wise copies (as
        # deserialize_from makes), gadgets may write into acq.data, and ``last_wire`` is the message's
        # encoding for as long as nobody replaces its header or arrays (the echo chain sends it back).
        n_traj, n_data = ns * nt, ns * nc
        wire = bytearray(_WIRE_PAD + _ACQ_PREFIX + 4 * n_traj + 8 * n_data)
        wire[_WIRE_PAD:_WIRE_PAD + 2] = _ACQ_ID
        wire[_WIRE_PAD + 2:_WIRE_PAD + _ACQ_PREFIX] = head_bytes
        start = _WIRE_PAD + _ACQ_PREFIX
        if len(wire) > start:
            self._fill(memoryview(wire)[start:], (ns, nt, nc))
        head = ismrmrd.AcquisitionHeader.from_buffer(wire, _WIRE_PAD + 2)
        traj = np.frombuffer(wire, _F4, n_traj, start).reshape(ns, nt)
        data = np.frombuffer(wire, _C8, n_data, start + 4 * n_traj).reshape(nc, ns)
        acq = ismrmrd.Acquisition(head, data, traj)
        self.last_wire = (acq, memoryview(wire)[_WIRE_PAD:])
        return acq

    def _read_waveform(self) -> ismrmrd.Waveform:
        head_bytes = self._read(WAVEFORM_HEADER_SIZE, "WaveformHeader")
        head = ismrmrd.WaveformHeader.from_buffer_copy(head_bytes)
        n = head.number_of_samples * head.channels
        self._check(n, self.limits.max_waveform_values, "number_of_samples*channels", "values")
        data = self._read(4 * n, f"data ({head.channels}x{head.number_of_samples} uint32)")
        return ismrmrd.Waveform.deserialize_from(self._replay([head_bytes, data]))

    def _read_image(self) -> ismrmrd.Image:
        head_bytes = self._read(IMAGE_HEADER_SIZE, "ImageHeader")
        head = ismrmrd.ImageHeader.from_buffer_copy(head_bytes)
        dt = IMAGE_DATA_TYPES.get(head.data_type)
        if dt is None:
            raise MalformedMessageError(
                f"message {self._context}: field data_type is {head.data_type}; expected 1..8")
        if head.data_type == 4:
            raise UnsupportedMessageError(
                f"message {self._context}: field data_type is 4 (int32), which ismrmrd-python cannot "
                f"represent; send float32/complex64 images")
        attr_len_raw = self._read(8, "attribute length (u64)")
        attr_len = struct.unpack("<Q", attr_len_raw)[0]
        self._check(attr_len, self.limits.max_attribute_bytes, "attribute length")
        nx, ny, nz = head.matrix_size
        nbytes = nx * ny * nz * head.channels * dt.itemsize
        self._check(nbytes, self.limits.max_image_bytes,
                    f"matrix_size*channels ({nx}x{ny}x{nz}x{head.channels} {dt.name})")
        attrs = self._read(attr_len, "attributes")
        meta_from_xml(self._decode(attrs, "attributes"), what=f"message {self._context} field attributes")
        pixels = self._read(nbytes, f"data ({nbytes} bytes)")
        return ismrmrd.Image.deserialize_from(self._replay([head_bytes, attr_len_raw, attrs, pixels]))


_WIRE_PAD = 2                                   # (2 + id + header) % 8 == 0: aligned arrays
_ACQ_PREFIX = 2 + ACQUISITION_HEADER_SIZE       # id + AcquisitionHeader
_AH = ismrmrd.AcquisitionHeader
_ACQ_FIELDS = struct.Struct("<" + "".join(
    f"{pad}x{code}" if pad else code for pad, code in (
        (_AH.flags.offset, "Q"),
        (_AH.number_of_samples.offset - _AH.flags.offset - 8, "H"),
        (_AH.active_channels.offset - _AH.number_of_samples.offset - 2, "H"),
        (_AH.trajectory_dimensions.offset - _AH.active_channels.offset - 2, "H"))))
_acq_fields = _ACQ_FIELDS.unpack_from     # (flags, number_of_samples, active_channels, trajectory_dimensions)
_F4 = np.dtype("<f4")
_C8 = np.dtype("<c8")
#: ``"1008 ACQUISITION"`` per id: the context of a reader's error messages
_CONTEXT: dict[int, str] = {int(k): f"{k.value} {k.name}" for k in MessageId}


# ---------------------------------------------------------------------------------------------
# framing of control messages without blocking (the server's accept phase)

#: id → (bytes before the length field, length-field format) for the length-prefixed control messages.
_CONTROL_LENGTH: dict[int, tuple[int, str]] = {
    MessageId.CONFIG_TEXT: (0, "<I"), MessageId.HEADER: (0, "<I"), MessageId.TEXT: (0, "<I"),
    MessageId.QUERY: (16, "<Q"),
}


def control_frame_length(buf: Union[bytes, bytearray, memoryview], limits: ProtocolLimits = ProtocolLimits()
                         ) -> Optional[int]:
    """Size in bytes of the first message in ``buf`` when it is a *complete* control message.

    Used to collect a session's CONFIG / HEADER phase from many connections without a thread each:
    returns the total length (id included) of a complete CONFIG_FILE, CONFIG_TEXT, HEADER, CLOSE,
    TEXT or QUERY at the start of ``buf``; ``None`` while more bytes are needed; ``-1`` when the
    first message is anything else, or its length field exceeds ``limits`` (the caller then hands
    the bytes to a :class:`MessageReader`, which reports the problem precisely).
    """
    if len(buf) < 2:
        return None
    mid = struct.unpack_from("<H", buf, 0)[0]
    if mid == MessageId.CLOSE:
        return 2
    if mid == MessageId.CONFIG_FILE:
        return 2 + CONFIG_FILE_SIZE if len(buf) >= 2 + CONFIG_FILE_SIZE else None
    shape = _CONTROL_LENGTH.get(mid)
    if shape is None:
        return -1
    skip, fmt = shape
    start = 2 + skip
    end = start + struct.calcsize(fmt)
    if len(buf) < end:
        return None
    n = struct.unpack_from(fmt, buf, start)[0]
    if n > limits.max_text_bytes:
        return -1
    return end + n if len(buf) >= end + n else None


# ---------------------------------------------------------------------------------------------
# writer


def _encode_text(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str, got {type(text).__name__}")
    return text.encode("utf-8")


def encode_message(msg: Message) -> bytes:
    """The complete wire bytes (id + payload) of one message.

    Texts (2, 3, 5) are written without a NUL, as Gadgetron does; image attributes Gadgetron-style
    (u64 length = XML bytes + 1 including a trailing NUL, 0 when there is no meta).
    """
    if type(msg) is ismrmrd.Acquisition:       # the bulk of a stream: straight to its encoder
        if msg._head.flags & _COMPRESSION_MASK:
            raise UnsupportedMessageError(
                "message 1008 ACQUISITION: field flags has a compression flag (53/54) set but the data are "
                "not compressed; clear the flag")
        return _encode_acquisition(msg)
    mid = message_id_of(msg)
    out = io.BytesIO()
    out.write(struct.pack("<H", mid))
    name = f"{mid.value} {mid.name}"
    if isinstance(msg, ConfigFile):
        raw = _encode_text(msg.name, f"message {name} name")
        if len(raw) >= CONFIG_FILE_SIZE or b"\0" in raw:
            raise MalformedMessageError(
                f"message {name}: field name must be at most {CONFIG_FILE_SIZE - 1} bytes without NUL, "
                f"got {len(raw)} bytes")
        out.write(raw.ljust(CONFIG_FILE_SIZE, b"\0"))
    elif isinstance(msg, (ConfigText, Text)):
        raw = _encode_text(msg.text, f"message {name} text")
        out.write(struct.pack("<I", len(raw)) + raw)
    elif isinstance(msg, Header):
        raw = _encode_text(msg.xml, f"message {name} xml")
        out.write(struct.pack("<I", len(raw)) + raw)
    elif isinstance(msg, Close):
        pass
    elif isinstance(msg, Query):
        raw = _encode_text(msg.text, f"message {name} text")
        out.write(struct.pack("<QQQ", msg.reserved, msg.correlation_id, len(raw)) + raw)
    elif isinstance(msg, Response):
        raw = _encode_text(msg.text, f"message {name} text")
        out.write(struct.pack("<QQ", msg.correlation_id, len(raw)) + raw)
    elif isinstance(msg, Error):
        raw = _encode_text(msg.text, f"message {name} text")
        out.write(struct.pack("<Q", len(raw)) + raw)
    elif isinstance(msg, DicomWithName):
        blob = bytes(msg.blob)
        if len(blob) > 0xFFFFFFFF:
            raise MessageTooLargeError(f"message {name}: field blob has {len(blob)} bytes, above u32")
        nm = _encode_text(msg.name, f"message {name} name")
        at = _encode_text(msg.attributes, f"message {name} attributes")
        out.write(struct.pack("<I", len(blob)) + blob + struct.pack("<Q", len(nm)) + nm
                  + struct.pack("<Q", len(at)) + at)
    elif isinstance(msg, DependencyQuery):
        raw = _encode_text(msg.meta_xml, f"message {name} meta_xml")
        out.write(struct.pack("<Q", len(raw)) + raw)
    elif isinstance(msg, ismrmrd.Acquisition):
        if msg.flags & _COMPRESSION_MASK:
            raise UnsupportedMessageError(
                f"message {name}: field flags has a compression flag (53/54) set but the data are not "
                f"compressed; clear the flag")
        return _encode_acquisition(msg)
    elif isinstance(msg, ismrmrd.Waveform):
        msg.serialize_into(out.write)
    elif isinstance(msg, ismrmrd.Image):
        parts: list[Union[bytes, memoryview]] = [struct.pack("<H", mid)]
        _write_image(msg, parts.append, name)
        return _gather(parts)
    return out.getvalue()


def _as_bytes(arr: np.ndarray, dtype: Union[type, np.dtype]) -> memoryview:
    """A byte view of ``arr`` as little-endian ``dtype`` (a copy only if it is not already so)."""
    want = _LE.get(dtype)
    if want is None:
        want = np.dtype(dtype).newbyteorder("<")
    a = np.ascontiguousarray(arr, dtype=want)
    return memoryview(a.reshape(-1).view(np.uint8))


_LE: dict[Any, np.dtype] = {np.float32: _F4, np.complex64: _C8}


def _gather(parts: Sequence[Union[bytes, memoryview]]) -> bytes:
    """Concatenate buffers with one copy of each (``bytes.join`` takes any buffer)."""
    return b"".join(parts)


def _encode_acquisition(acq: ismrmrd.Acquisition) -> bytes:
    """id + AcquisitionHeader + trajectory + data, each array copied once into the message."""
    head = acq._head                     # the ctypes header ismrmrd itself writes (serialize_into)
    data, traj = acq.data, acq.traj
    if data.shape != (head.active_channels, head.number_of_samples) or traj.shape != (
            head.number_of_samples, head.trajectory_dimensions):
        raise MalformedMessageError(
            f"message {MessageId.ACQUISITION.value} ACQUISITION: data {data.shape} / trajectory "
            f"{traj.shape} disagree with the header ({head.active_channels} channels, "
            f"{head.number_of_samples} samples, {head.trajectory_dimensions} trajectory dimensions)")
    return _gather([_ACQ_ID, bytes(head), _as_bytes(traj, np.float32),
                    _as_bytes(data, np.complex64)])


_ACQ_ID = struct.pack("<H", MessageId.ACQUISITION)


def _write_image(img: ismrmrd.Image, write: Callable[[bytes], object], name: str) -> None:
    head = img.getHead()
    if head.data_type not in IMAGE_DATA_TYPES or head.data_type == 4:
        raise UnsupportedMessageError(
            f"message {name}: field data_type {head.data_type} cannot be written (int32 images are "
            f"not representable in ismrmrd-python; use float32/complex64)")
    expected = IMAGE_DATA_TYPES[head.data_type]
    data = np.ascontiguousarray(img.data)
    if data.dtype.newbyteorder("<") != expected or data.size != (
            head.matrix_size[0] * head.matrix_size[1] * head.matrix_size[2] * head.channels):
        raise MalformedMessageError(
            f"message {name}: data ({data.dtype}, {data.shape}) disagree with header data_type "
            f"{head.data_type} / matrix_size {tuple(head.matrix_size)} / channels {head.channels}")
    xml = img.attribute_string if len(img.meta) else ""
    attrs = xml.encode("utf-8") + b"\0" if xml else b""
    head.attribute_string_len = len(attrs)
    write(bytes(head))
    write(struct.pack("<Q", len(attrs)))
    write(attrs)
    write(_as_bytes(data, expected.type))


class MessageWriter:
    """Writes messages through ``write(bytes)`` (e.g. ``socket.sendall``), one call per message."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write = write
        self.messages_written = 0
        self.bytes_written = 0

    def write_message(self, msg: Message) -> None:
        """Encode ``msg`` (see :func:`encode_message`) and write it in one call."""
        data = encode_message(msg)
        self._write(data)
        self.messages_written += 1
        self.bytes_written += len(data)


# ---------------------------------------------------------------------------------------------
# sockets


class RecvBuffer:
    """Bytes received ahead of what was asked for, so that many small fields cost one ``recv``.

    A stream of 16 KiB acquisitions is three exact reads per message (id, header, data); reading
    each with its own ``recv`` is a system call (and a poll) per field. :meth:`fill` receives as
    much as the kernel has (up to ``capacity``) and :meth:`take`/:meth:`take_into` hand it out.
    Only for a socket whose every read goes through this buffer.
    """

    def __init__(self, capacity: int = 1 << 18) -> None:
        self.capacity = capacity
        self._buf = bytearray(capacity)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def pending(self) -> int:
        """Bytes received and not yet handed out."""
        return self._end - self._start

    def take(self, n: int) -> bytes:
        """``n`` buffered bytes (``n <= pending()``): bytes up to 64 KiB, a bytearray above (one copy)."""
        s = self._start
        self._start = s + n
        out = self._view[s:s + n]
        return bytearray(out) if n > _NO_COPY_BYTES else bytes(out)

    def pending_view(self) -> memoryview:
        """The bytes received and not yet handed out (valid until the next :meth:`fill`)."""
        return self._view[self._start:self._end]

    def skip(self, n: int) -> None:
        """Hand out ``n`` pending bytes that the caller has consumed from :meth:`pending_view`."""
        if not 0 <= n <= self._end - self._start:
            raise ValueError(f"cannot skip {n} of {self._end - self._start} pending bytes")
        self._start += n

    def take_into(self, view: memoryview) -> int:
        """Copy up to ``len(view)`` buffered bytes into ``view``; the count."""
        k = min(len(view), self._end - self._start)
        if k:
            view[:k] = self._view[self._start:self._start + k]
            self._start += k
        return k

    def fill(self, recv_into: Callable[[memoryview, int], int]) -> int:
        """One ``recv_into`` into the free space (pending bytes moved to the front first); 0 = EOF."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start:
            k = self._end - self._start
            self._view[:k] = self._view[self._start:self._end]
            self._start, self._end = 0, k
        free = self.capacity - self._end
        k = recv_into(self._view[self._end:], free)
        self._end += k
        return k


def socket_read_exact(sock: socket.socket) -> Callable[[int], bytes]:
    """A ``read_exact(n)`` over a connected socket, for :class:`MessageReader`.

    EOF raises :class:`ConnectionClosedError` (with the number of bytes already received) instead
    of returning ``b''`` forever; a socket timeout (set by the caller with ``settimeout``) raises
    :class:`PeerTimeoutError`.
    """

    ahead = RecvBuffer()

    def read_exact(n: int) -> bytes:
        if ahead.pending() >= n:
            return ahead.take(n)                 # no system call
        buf = bytearray(n)
        read_into(memoryview(buf))
        # large payloads are handed on without a copy (bytearray is bytes-like for every consumer)
        return buf if n > _NO_COPY_BYTES else bytes(buf)

    def read_into(view: memoryview) -> None:
        """Fill ``view`` completely (buffered bytes first, then the socket)."""
        n = len(view)
        got = ahead.take_into(view)
        while got < n:
            direct = n - got >= ahead.capacity // 2      # large payloads straight into their buffer
            try:
                if direct:
                    k = sock.recv_into(view[got:], min(n - got, 1 << 20))
                else:
                    k = ahead.fill(sock.recv_into)
            except socket.timeout:
                raise PeerTimeoutError(
                    f"peer sent nothing for {sock.gettimeout()} s while {n - got} of {n} bytes were "
                    f"pending") from None
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
                raise ConnectionClosedError(
                    f"connection reset by the peer after {got} of {n} bytes ({exc})", received=got) from None
            if k == 0:
                raise ConnectionClosedError(
                    f"connection closed by the peer after {got} of {n} bytes", received=got)
            got += k if direct else ahead.take_into(view[got:])

    read_exact.read_into = read_into  # type: ignore[attr-defined]  # MessageReader fills payloads with it
    return read_exact


def socket_write_all(sock: socket.socket) -> Callable[[bytes], None]:
    """A ``write(bytes)`` for :class:`MessageWriter` that sends everything (``sendall``).

    A send timeout raises :class:`PeerTimeoutError`; a reset or closed peer raises
    :class:`ConnectionClosedError`.
    """

    def write(data: bytes) -> None:
        try:
            sock.sendall(data)
        except socket.timeout:
            raise PeerTimeoutError(
                f"peer did not accept data for {sock.gettimeout()} s ({len(data)} bytes pending)") from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionClosedError(f"connection closed by the peer while sending: {exc}") from None

    return write


# ---------------------------------------------------------------------------------------------
# MetaContainer XML (PROTOCOL.md §6)


MetaValue = Union[str, float, int, Sequence[Union[str, float, int]]]


def meta_to_xml(meta: Mapping[str, MetaValue]) -> str:
    """Serialize ``{name: value or [values]}`` as an ISMRMRD MetaContainer (``<ismrmrdMeta>``).

    Non-string values are written with ``str()``; an empty mapping gives ``""`` (no attributes).
    """
    if not meta:
        return ""
    root = ET.Element("ismrmrdMeta")
    for key, value in meta.items():
        item = ET.SubElement(root, "meta")
        ET.SubElement(item, "name").text = str(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            ET.SubElement(item, "value").text = str(v)
    return '<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode")


def meta_from_xml(xml: str, what: str = "MetaContainer") -> dict[str, list[str]]:
    """Parse a MetaContainer XML string into ``{name: [values]}`` (always lists, in order).

    Empty text (or only NULs/whitespace) gives ``{}``. Repeated names are merged.

    Raises
    ------
    MalformedMessageError
        Not well-formed XML, a root other than ``ismrmrdMeta``, or a ``meta`` without ``name``.
    """
    text = xml.rstrip("\0").strip()
    if not text:
        return {}
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise MalformedMessageError(f"{what}: not well-formed XML ({exc})") from None
    if root.tag != "ismrmrdMeta":
        raise MalformedMessageError(f"{what}: root element is <{root.tag}>, expected <ismrmrdMeta>")
    out: dict[str, list[str]] = {}
    for i, item in enumerate(root.findall("meta")):
        name = item.find("name")
        if name is None or not (name.text or "").strip():
            raise MalformedMessageError(f"{what}: <meta> element {i} has no <name>")
        out.setdefault(name.text.strip(), []).extend(v.text or "" for v in item.findall("value"))
    return out
