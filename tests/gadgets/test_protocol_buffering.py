"""socket_read_exact's receive-ahead buffer and the array-view codec: same messages, any split."""

from __future__ import annotations

import socket
import threading

import ismrmrd
import numpy as np
import pytest

from gadgets.stream.protocol import (Close, ConnectionClosedError, MessageReader, RecvBuffer, Text,
                                     encode_message, socket_read_exact)


def _acq(i: int, coils: int = 4, samples: int = 64, traj_dims: int = 0) -> ismrmrd.Acquisition:
    rng = np.random.default_rng(i)
    shape = (coils, samples)
    data = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    traj = rng.standard_normal((samples, traj_dims)).astype(np.float32) if traj_dims else None
    acq = ismrmrd.Acquisition.from_array(data, traj)
    acq.scan_counter = i
    return acq


def _send_in_pieces(sock: socket.socket, payload: bytes, sizes: list[int]) -> None:
    pos, k = 0, 0
    while pos < len(payload):
        n = sizes[k % len(sizes)]
        sock.sendall(payload[pos:pos + n])
        pos += n
        k += 1
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("sizes", [[1], [7, 333], [1 << 20], [70000, 3]])
def test_messages_survive_any_split(sizes: list[int]) -> None:
    msgs = [_acq(i, traj_dims=2 if i % 2 else 0) for i in range(6)] + [_acq(9, coils=16, samples=1024)]
    payload = (b"".join(encode_message(m) for m in msgs) + encode_message(Text("end"))
               + encode_message(Close()))
    a, b = socket.socketpair()
    with a, b:
        t = threading.Thread(target=_send_in_pieces, args=(a, payload, sizes))
        t.start()
        got = list(MessageReader(socket_read_exact(b)))
        t.join()
    assert isinstance(got[-1], Close) and got[-2].text == "end"
    for sent, recv in zip(msgs, got):
        assert bytes(sent.getHead()) == bytes(recv.getHead())
        np.testing.assert_array_equal(sent.data, recv.data)
        np.testing.assert_array_equal(sent.traj, recv.traj)
        recv.data[0, 0] = 0                      # decoded arrays are writable (gadgets edit in place)


def test_encode_is_byte_identical_to_ismrmrd() -> None:
    acq = _acq(3, traj_dims=3)
    assert encode_message(acq)[2:] == acq.to_bytes()


def test_eof_inside_a_buffered_message_reports_the_count() -> None:
    payload = encode_message(_acq(1))
    a, b = socket.socketpair()
    with a, b:
        a.sendall(payload[:-10])
        a.shutdown(socket.SHUT_WR)
        read = socket_read_exact(b)
        assert len(read(2)) == 2
        with pytest.raises(ConnectionClosedError):
            read(len(payload) - 2)


def test_recv_buffer_compacts_and_hands_out_in_order() -> None:
    rb = RecvBuffer(capacity=16)
    chunks = iter([b"abcdefghij", b"klmnop", b"qrstuvwxyz"])

    def recv_into(view: memoryview, n: int) -> int:
        c = next(chunks, b"")[:n]
        view[:len(c)] = c
        return len(c)

    assert rb.fill(recv_into) == 10 and rb.take(4) == b"abcd"
    assert rb.fill(recv_into) == 6 and rb.pending() == 12
    out = bytearray(12)
    assert rb.take_into(memoryview(out)) == 12 and bytes(out) == b"efghijklmnop"
    assert rb.fill(recv_into) == 10 and rb.take(10) == b"qrstuvwxyz"
    assert rb.fill(recv_into) == 0
