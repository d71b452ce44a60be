"""Wire-protocol tests: round trips, a hand-built byte fixture, ismrmrd interop, limits and errors."""

from __future__ import annotations

import importlib.util
import io
import socket
import struct
import threading
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
from ismrmrd.meta import Meta
from ismrmrd.serialization import ConfigFile as MrdConfigFile
from ismrmrd.serialization import ConfigText as MrdConfigText
from ismrmrd.serialization import ProtocolSerializer

from gadgets.stream.protocol import (
    ACQUISITION_HEADER_SIZE, IMAGE_HEADER_SIZE, WAVEFORM_HEADER_SIZE, Close, ConfigFile, ConfigText,
    ConnectionClosedError, DependencyQuery, DicomWithName, Error, Header, MalformedMessageError,
    MessageId, MessageReader, MessageTooLargeError, MessageWriter, PeerTimeoutError, ProtocolError,
    ProtocolLimits, Query, Response, Text, TruncatedMessageError, UnknownMessageError,
    UnsupportedMessageError, encode_message, meta_from_xml, meta_to_xml, socket_read_exact,
)

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "protocol"


# ---------------------------------------------------------------------------------------------
# helpers


class CountingSource:
    """A read_exact over bytes that records every requested size (to prove nothing huge is read)."""

    def __init__(self, data: bytes) -> None:
        self.stream = io.BytesIO(data)
        self.requests: list[int] = []

    def __call__(self, n: int) -> bytes:
        self.requests.append(n)
        return self.stream.read(n)


def parse_all(data: bytes, limits: ProtocolLimits = ProtocolLimits()) -> list:
    src = CountingSource(data)
    msgs = list(MessageReader(src, limits))
    assert src.stream.read() == b"", "bytes left after CLOSE"
    return msgs


def make_acquisition(ns=6, nc=3, nt=2, seed=0, stamp=0) -> ismrmrd.Acquisition:
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((nc, ns)) + 1j * rng.standard_normal((nc, ns))).astype(np.complex64)
    traj = rng.standard_normal((ns, nt)).astype(np.float32) if nt else None
    acq = ismrmrd.Acquisition.from_array(data, traj)
    acq.scan_counter = 7 + seed
    acq.acquisition_time_stamp = stamp
    acq.idx.kspace_encode_step_1 = 3
    acq.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    acq.position[:] = (1.5, -2.0, 3.25)
    return acq


def make_image(dtype=np.float32, meta: dict | None = None, shape=(2, 1, 5, 4), series=0, index=0) -> ismrmrd.Image:
    rng = np.random.default_rng(index)
    arr = rng.standard_normal(shape)
    if np.issubdtype(dtype, np.complexfloating):
        arr = arr + 1j * rng.standard_normal(shape)
    img = ismrmrd.Image.from_array(arr.astype(dtype))
    img.image_series_index = series
    img.image_index = index
    img.field_of_view[:] = (220.0, 200.0, 5.0)
    if meta:
        img.meta = meta
    return img


def make_waveform(nc=2, ns=9, stamp=0, seed=0) -> ismrmrd.Waveform:
    rng = np.random.default_rng(seed)
    wav = ismrmrd.Waveform.from_array(rng.integers(0, 2**32 - 1, (nc, ns), dtype=np.uint32))
    wav.time_stamp = stamp
    wav.waveform_id = 1025
    return wav


def assert_same_acquisition(a: ismrmrd.Acquisition, b: ismrmrd.Acquisition) -> None:
    assert bytes(a.getHead()) == bytes(b.getHead())
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.traj, b.traj)


def assert_same_image(a: ismrmrd.Image, b: ismrmrd.Image) -> None:
    ha, hb = a.getHead(), b.getHead()
    ha.attribute_string_len = hb.attribute_string_len = 0  # differs by convention (NUL counted or not)
    assert bytes(ha) == bytes(hb)
    assert a.data.dtype == b.data.dtype
    np.testing.assert_array_equal(a.data, b.data)
    assert dict(a.meta) == dict(b.meta)


def id_of(raw: bytes) -> int:
    return struct.unpack_from("<H", raw)[0]


# ---------------------------------------------------------------------------------------------
# round trips


CONTROL = [
    ConfigFile("default.xml"),
    ConfigText("<chain>\n  <gadget name='x'/> é\n</chain>"),
    Header('<?xml version="1.0"?><ismrmrdHeader/>'),
    Close(),
    Text("[Gadget] ERROR: something ✓"),
    Query(123456789012, "gadgetron::version"),
    Response(123456789012, "4.4.1"),
    Error("external module failed"),
    DicomWithName(bytes(range(256)) * 3, "img_0001.dcm", "<ismrmrdMeta/>"),
    DependencyQuery(meta_to_xml({"status": "success", "channels": 8, "min_sigma": 0.5})),
]


@pytest.mark.parametrize("msg", CONTROL, ids=lambda m: type(m).__name__)
def test_control_messages_round_trip(msg):
    raw = encode_message(msg)
    assert id_of(raw) == MessageId[{"ConfigFile": "CONFIG_FILE", "ConfigText": "CONFIG_TEXT",
                                    "Header": "HEADER", "Close": "CLOSE", "Text": "TEXT", "Query": "QUERY",
                                    "Response": "RESPONSE", "Error": "ERROR",
                                    "DicomWithName": "DICOM_WITHNAME",
                                    "DependencyQuery": "DEPENDENCY_QUERY"}[type(msg).__name__]]
    src = CountingSource(raw)
    back = MessageReader(src).read_message()
    assert back == msg
    assert src.stream.read() == b"", "reader did not consume exactly one message"


def test_data_messages_round_trip_and_sizes():
    acq, wav = make_acquisition(), make_waveform()
    img = make_image(np.complex64, meta={"DataRole": "Image", "ImageComment": ["a", "b"]})
    raw = b"".join(encode_message(m) for m in (acq, wav, img, Close()))
    got = parse_all(raw)
    assert [type(m) for m in got] == [ismrmrd.Acquisition, ismrmrd.Waveform, ismrmrd.Image, Close]
    assert_same_acquisition(got[0], acq)
    assert bytes(got[1].getHead()) == bytes(wav.getHead())
    np.testing.assert_array_equal(got[1].data, wav.data)
    assert_same_image(got[2], img)
    # header sizes and total payload sizes of PROTOCOL.md §5
    assert (ACQUISITION_HEADER_SIZE, IMAGE_HEADER_SIZE, WAVEFORM_HEADER_SIZE) == (340, 198, 40)
    assert len(encode_message(acq)) == 2 + 340 + 4 * 6 * 2 + 8 * 6 * 3
    assert len(encode_message(wav)) == 2 + 40 + 4 * 2 * 9


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint32, np.float32, np.float64,
                                   np.complex64, np.complex128])
def test_every_supported_image_dtype_round_trips(dtype):
    img = make_image(dtype, shape=(1, 2, 3, 4))
    (back, _) = parse_all(encode_message(img) + encode_message(Close()))
    assert_same_image(back, img)


def test_writer_counts_and_single_write_per_message():
    chunks: list[bytes] = []
    w = MessageWriter(chunks.append)
    for m in (ConfigFile("x.xml"), Text("hi"), Close()):
        w.write_message(m)
    assert len(chunks) == 3 and w.messages_written == 3
    assert w.bytes_written == sum(map(len, chunks)) == (2 + 1024) + (2 + 4 + 2) + 2


# ---------------------------------------------------------------------------------------------
# byte-level layouts


def _load_fixture_module():
    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURES / "make_cpp_client_stream.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hand_built_cpp_client_stream_is_parsed():
    fx = _load_fixture_module()
    raw = (FIXTURES / "cpp_client_stream.bin").read_bytes()
    assert raw == fx.build(), "fixture file and its generator disagree"
    msgs = parse_all(raw)
    assert [type(m) for m in msgs] == [ConfigFile, Header] + [ismrmrd.Acquisition] * fx.N_ACQ + [Close]
    assert msgs[0].name == "default.xml"
    assert msgs[1].xml == fx.HEADER_XML
    for i, acq in enumerate(msgs[2:-1]):
        assert acq.flags == fx.flags_for(i)
        assert acq.is_flag_set(ismrmrd.ACQ_FIRST_IN_SLICE) == (i == 0)
        assert acq.is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT) == (i == fx.N_ACQ - 1)
        assert (acq.measurement_uid, acq.scan_counter, acq.acquisition_time_stamp) == (4242, i + 1, 1000 + 10 * i)
        assert tuple(acq.physiology_time_stamp) == (7, 8, 9)
        assert (acq.number_of_samples, acq.active_channels, acq.trajectory_dimensions) == (4, 2, 2)
        assert acq.center_sample == 2 and acq.sample_time_us == 2.5
        assert tuple(acq.position) == (1.0, 2.0, 3.0) and tuple(acq.slice_dir) == (0.0, 0.0, 1.0)
        assert acq.idx.kspace_encode_step_1 == i and acq.idx.slice == 5
        assert acq.user_int[0] == -i and acq.user_float[7] == 0.5
        for s in range(4):
            for d in range(2):
                assert acq.traj[s, d] == fx.traj_value(i, s, d)
            for c in range(2):
                assert acq.data[c, s] == fx.data_value(i, c, s)
    # our writer reproduces the hand-built bytes exactly
    assert b"".join(encode_message(m) for m in msgs) == raw


def test_config_file_is_nul_padded_to_1024_and_too_long_names_are_refused():
    raw = encode_message(ConfigFile("default.xml"))
    assert len(raw) == 2 + 1024 and raw[2:13] == b"default.xml" and set(raw[13:]) == {0}
    with pytest.raises(MalformedMessageError, match="CONFIG_FILE.*name"):
        encode_message(ConfigFile("x" * 1024))
    # the server reads up to the first NUL, even with garbage after it
    payload = b"chain.xml\0junk".ljust(1024, b"\0")
    assert parse_all(struct.pack("<H", 1) + payload + struct.pack("<H", 4))[0] == ConfigFile("chain.xml")


def test_texts_are_written_without_nul_and_query_layout():
    raw = encode_message(Text("abc"))
    assert raw == struct.pack("<HI", 5, 3) + b"abc"
    raw = encode_message(Query(9, "k"))
    assert raw == struct.pack("<HQQQ", 6, 0, 9, 1) + b"k"
    assert encode_message(Response(9, "v")) == struct.pack("<HQQ", 7, 9, 1) + b"v"


def test_image_attributes_are_written_gadgetron_style():
    img = make_image(meta={"GADGETRON_ImageNumber": "3"})
    raw = encode_message(img)
    (alen,) = struct.unpack_from("<Q", raw, 2 + IMAGE_HEADER_SIZE)
    attrs = raw[2 + IMAGE_HEADER_SIZE + 8: 2 + IMAGE_HEADER_SIZE + 8 + alen]
    assert attrs.endswith(b"\0") and attrs.count(b"\0") == 1
    assert meta_from_xml(attrs[:-1].decode()) == {"GADGETRON_ImageNumber": ["3"]}
    (hdr_len,) = struct.unpack_from("<I", raw, 2 + 194)
    assert hdr_len == alen
    assert len(raw) == 2 + IMAGE_HEADER_SIZE + 8 + alen + 2 * 5 * 4 * 4
    plain = encode_message(make_image())
    assert struct.unpack_from("<Q", plain, 2 + IMAGE_HEADER_SIZE)[0] == 0


def test_mrd_style_nul_terminated_texts_are_stripped():
    xml = b"<ismrmrdHeader/>\0"
    attrs = meta_to_xml({"a": "1"}).encode() + b"\0\0"
    img = make_image(shape=(1, 1, 1, 2))
    head = img.getHead()
    head.attribute_string_len = len(attrs)
    stream = (struct.pack("<HI", 2, 6) + b"<c/>\0\0"
              + struct.pack("<HI", 3, len(xml)) + xml
              + struct.pack("<HI", 5, 6) + b"hello\0"
              + struct.pack("<H", 1022) + bytes(head) + struct.pack("<Q", len(attrs)) + attrs
              + img.data.tobytes() + struct.pack("<H", 4))
    cfg, hdr, txt, im, _ = parse_all(stream)
    assert cfg == ConfigText("<c/>") and hdr == Header("<ismrmrdHeader/>") and txt == Text("hello")
    assert dict(im.meta) == {"a": "1"}


# ---------------------------------------------------------------------------------------------
# interoperability with ismrmrd.serialization


def test_ismrmrd_protocol_serializer_stream_is_parsed():
    acq, wav, img = make_acquisition(nt=0), make_waveform(), make_image(np.complex64, meta={"k": "v"})
    buf = io.BytesIO()
    ser = ProtocolSerializer(buf)
    ser.serialize(MrdConfigFile("default.xml"))
    ser.serialize(MrdConfigText("<chain/>"))
    ser.serialize("log line")
    for m in (acq, wav, img):
        ser.serialize(m)
    ser.close()
    got = parse_all(buf.getvalue())
    assert got[:3] == [ConfigFile("default.xml"), ConfigText("<chain/>"), Text("log line")]
    assert_same_acquisition(got[3], acq)
    np.testing.assert_array_equal(got[4].data, wav.data)
    assert_same_image(got[5], img)
    assert got[6] == Close()


def _mrd_bytes(obj) -> bytes:
    buf = io.BytesIO()
    ProtocolSerializer(buf).serialize(obj)
    return buf.getvalue()


def test_our_data_bytes_equal_ismrmrd_serializer_bytes():
    for obj in (make_acquisition(), make_acquisition(nt=0, seed=3), make_waveform(),
                make_image(np.complex64), make_image(np.uint16)):
        assert encode_message(obj) == _mrd_bytes(obj), type(obj).__name__
    # with meta the only difference is Gadgetron's trailing NUL (+1 in both length fields)
    img = make_image(meta={"DataRole": "Image"})
    ours, theirs = encode_message(img), _mrd_bytes(img)
    assert len(ours) == len(theirs) + 1
    off = 2 + IMAGE_HEADER_SIZE
    (la,), (lb,) = struct.unpack_from("<Q", ours, off), struct.unpack_from("<Q", theirs, off)
    assert la == lb + 1
    assert ours[off + 8: off + 8 + lb] == theirs[off + 8: off + 8 + lb]
    assert ours[off + 8 + la:] == theirs[off + 8 + lb:]


# ---------------------------------------------------------------------------------------------
# limits and errors


def test_absurd_text_length_is_refused_before_reading():
    stream = struct.pack("<HI", 5, 2**31) + b"x" * 100
    src = CountingSource(stream)
    with pytest.raises(MessageTooLargeError, match=r"5 TEXT.*text length.*2147483648"):
        MessageReader(src).read_message()
    assert max(src.requests) <= 4 and sum(src.requests) == 6


@pytest.mark.parametrize("prefix", [
    struct.pack("<HQQQ", 6, 0, 1, 2**40),          # QUERY text
    struct.pack("<HQQ", 7, 1, 2**62),              # RESPONSE text
    struct.pack("<HI", 1018, 2**32 - 1),           # DICOM blob
    struct.pack("<HQ", 1019, 2**63),               # DEPENDENCY_QUERY
], ids=["query", "response", "dicom", "dependency"])
def test_absurd_u64_lengths_are_refused(prefix):
    src = CountingSource(prefix + bytes(100))
    with pytest.raises(MessageTooLargeError, match="above the limit"):
        MessageReader(src).read_message()
    assert max(src.requests) <= 8


def test_image_and_acquisition_sizes_are_checked_against_limits():
    img = make_image(shape=(1, 1, 16, 16))
    raw = encode_message(img)
    src = CountingSource(raw)
    with pytest.raises(MessageTooLargeError, match=r"1022 IMAGE.*matrix_size"):
        MessageReader(src, ProtocolLimits(max_image_bytes=1000)).read_message()
    assert max(src.requests) <= IMAGE_HEADER_SIZE
    bad = bytearray(raw)
    struct.pack_into("<Q", bad, 2 + IMAGE_HEADER_SIZE, 2**50)
    with pytest.raises(MessageTooLargeError, match="attribute length"):
        MessageReader(CountingSource(bytes(bad))).read_message()
    acq = encode_message(make_acquisition(ns=64, nc=4))
    with pytest.raises(MessageTooLargeError, match=r"1008 ACQUISITION.*number_of_samples\*active_channels"):
        MessageReader(CountingSource(acq), ProtocolLimits(max_acquisition_values=255)).read_message()
    wav = encode_message(make_waveform(nc=4, ns=100))
    with pytest.raises(MessageTooLargeError, match="1026 WAVEFORM"):
        MessageReader(CountingSource(wav), ProtocolLimits(max_waveform_values=399)).read_message()
    # exactly at the limit is fine
    MessageReader(CountingSource(wav), ProtocolLimits(max_waveform_values=400)).read_message()


def test_truncated_acquisition_names_message_and_missing_bytes():
    raw = encode_message(make_acquisition(ns=6, nc=3, nt=2))
    cut = raw[:-10]
    with pytest.raises(TruncatedMessageError) as info:
        MessageReader(io.BytesIO(cut).read).read_message()
    text = str(info.value)
    assert "1008 ACQUISITION" in text and "data" in text and "10 bytes missing" in text
    with pytest.raises(TruncatedMessageError, match=r"3 HEADER.*5 bytes missing"):
        MessageReader(io.BytesIO(struct.pack("<HI", 3, 10) + b"abcde").read).read_message()
    with pytest.raises(TruncatedMessageError, match="message id"):
        MessageReader(io.BytesIO(b"\x05").read).read_message()


def test_eof_at_message_boundary_is_connection_closed_not_truncation():
    reader = MessageReader(io.BytesIO(encode_message(Text("a"))).read)
    assert reader.read_message() == Text("a")
    with pytest.raises(ConnectionClosedError) as info:
        reader.read_message()
    assert not isinstance(info.value, TruncatedMessageError)
    assert "after 1 messages" in str(info.value)
    assert "without a CLOSE" in str(info.value)


@pytest.mark.parametrize("mid", [0, 1001, 1023, 1030, 9999])
def test_unknown_id_is_refused(mid):
    with pytest.raises(UnknownMessageError, match=f"unknown message id {mid}") as info:
        MessageReader(io.BytesIO(struct.pack("<H", mid) + bytes(64)).read).read_message()
    assert info.value.message_id == mid


@pytest.mark.parametrize("flag", [53, 54])
def test_compressed_acquisitions_are_refused(flag):
    acq = make_acquisition()
    raw = bytearray(encode_message(acq))
    flags = struct.unpack_from("<Q", raw, 2 + 2)[0] | (1 << (flag - 1))
    struct.pack_into("<Q", raw, 2 + 2, flags)
    src = CountingSource(bytes(raw))
    with pytest.raises(UnsupportedMessageError, match=r"compressed acquisitions \(NHLBI/ZFP\).*omit -P/-T"):
        MessageReader(src).read_message()
    assert sum(src.requests) == 2 + ACQUISITION_HEADER_SIZE
    acq.set_flag(flag)
    with pytest.raises(UnsupportedMessageError):
        encode_message(acq)


def test_query_with_nonzero_reserved_is_refused():
    raw = struct.pack("<HQQQ", 6, 1, 5, 3) + b"abc"
    with pytest.raises(MalformedMessageError, match="6 QUERY.*reserved.*1"):
        MessageReader(io.BytesIO(raw).read).read_message()


def test_bad_field_values_are_malformed_errors():
    with pytest.raises(MalformedMessageError, match="5 TEXT.*UTF-8"):
        MessageReader(io.BytesIO(struct.pack("<HI", 5, 2) + b"\xff\xfe").read).read_message()
    raw = bytearray(encode_message(make_image()))
    struct.pack_into("<H", raw, 2 + 2, 77)
    with pytest.raises(MalformedMessageError, match="data_type is 77"):
        MessageReader(io.BytesIO(bytes(raw)).read).read_message()
    struct.pack_into("<H", raw, 2 + 2, 4)
    with pytest.raises(UnsupportedMessageError, match="int32"):
        MessageReader(io.BytesIO(bytes(raw)).read).read_message()
    attrs = b"<ismrmrdMeta><meta>"
    img = make_image(shape=(1, 1, 1, 1))
    stream = struct.pack("<H", 1022) + bytes(img.getHead()) + struct.pack("<Q", len(attrs)) + attrs + bytes(4)
    with pytest.raises(MalformedMessageError, match="1022 IMAGE field attributes: not well-formed"):
        MessageReader(io.BytesIO(stream).read).read_message()
    assert issubclass(MalformedMessageError, ProtocolError)


# ---------------------------------------------------------------------------------------------
# sockets


def test_socket_read_exact_reassembles_eof_and_timeout():
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        read = socket_read_exact(b)
        payload = encode_message(make_acquisition(ns=64, nc=8))

        def send_slowly():
            for i in range(0, len(payload), 777):
                a.sendall(payload[i:i + 777])

        t = threading.Thread(target=send_slowly)
        t.start()
        msg = MessageReader(read).read_message()
        t.join(5)
        assert msg.number_of_samples == 64 and msg.active_channels == 8
        b.settimeout(0.2)
        with pytest.raises(PeerTimeoutError, match="0.2 s"):
            read(10)
        a.sendall(b"xyz")
        a.shutdown(socket.SHUT_WR)
        b.settimeout(5)
        with pytest.raises(ConnectionClosedError) as info:
            read(10)
        assert info.value.received == 3
        with pytest.raises(ConnectionClosedError):      # again: raises, never returns b'' forever
            read(1)


def test_eof_inside_socket_message_is_truncation():
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        a.sendall(encode_message(Text("hello world"))[:-4])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(TruncatedMessageError, match=r"5 TEXT.*4 bytes missing"):
            MessageReader(socket_read_exact(b)).read_message()


# ---------------------------------------------------------------------------------------------
# MetaContainer


def test_meta_xml_round_trip_and_compatibility_with_ismrmrd_meta():
    meta = {"DataRole": "Image", "ImageComment": ["GT", "SENSE"], "GADGETRON_ImageNumber": 3,
            "ImageRowDir": [1.0, 0.0, -0.5]}
    xml = meta_to_xml(meta)
    back = meta_from_xml(xml)
    assert back == {"DataRole": ["Image"], "ImageComment": ["GT", "SENSE"],
                    "GADGETRON_ImageNumber": ["3"], "ImageRowDir": ["1.0", "0.0", "-0.5"]}
    assert dict(Meta.deserialize(xml)) == {"DataRole": "Image", "ImageComment": ["GT", "SENSE"],
                                           "GADGETRON_ImageNumber": "3", "ImageRowDir": ["1.0", "0.0", "-0.5"]}
    theirs = Meta({"a": "1", "b": ["x", "y"]}).serialize()
    assert meta_from_xml(theirs) == {"a": ["1"], "b": ["x", "y"]}
    assert meta_to_xml({}) == "" and meta_from_xml("") == {} and meta_from_xml("\0") == {}
    with pytest.raises(MalformedMessageError, match="root element is <foo>"):
        meta_from_xml("<foo/>")


def test_control_frame_length_frames_the_config_header_phase():
    """The server's accept phase frames CONFIG/HEADER-phase messages from partial bytes."""
    from gadgets.stream.protocol import ConfigFile, ConfigText, Header, Query, Text, control_frame_length

    limits = ProtocolLimits(max_text_bytes=1000)
    for msg in (ConfigFile("default"), ConfigText("chain: []"), Header("<ismrmrdHeader/>"), Text("hi"),
                Query(3, "gadgetron::version"), Close()):
        wire = encode_message(msg)
        assert control_frame_length(wire + b"\x01\x02", limits) == len(wire)     # complete, more follows
        for cut in range(len(wire)):
            assert control_frame_length(wire[:cut], limits) is None               # more bytes needed
    assert control_frame_length(encode_message(Header("x" * 1001)), limits) == -1   # over the limit
    assert control_frame_length((1008).to_bytes(2, "little") + b"\0" * 10, limits) == -1   # a data message
    assert control_frame_length((999).to_bytes(2, "little"), limits) == -1                 # unknown id
