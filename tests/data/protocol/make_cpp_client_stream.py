"""Build ``cpp_client_stream.bin`` by hand with ``struct``: the stream of PROTOCOL.md §3.1/§11.

CONFIG_FILE ``default.xml`` (NUL-padded to 1024), HEADER (u32 length, no NUL), three
acquisitions (2 channels, 4 samples, trajectory_dimensions 2, flags: first has
FIRST_IN_SLICE (7), last has LAST_IN_SLICE (8) and LAST_IN_MEASUREMENT (25)), CLOSE.
Deliberately independent of gadgets.stream.protocol and of ismrmrd: offsets follow the
§5.1 table. Values are simple formulas so the test can recompute them.

Run ``python3 tests/data/protocol/make_cpp_client_stream.py`` to regenerate the .bin file.
"""

from __future__ import annotations

import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "cpp_client_stream.bin"

HEADER_XML = ('<?xml version="1.0"?>\n<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
              '<experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz>'
              '</experimentalConditions></ismrmrdHeader>\n')
N_ACQ, N_SAMPLES, N_CHANNELS, TRAJ_DIMS = 3, 4, 2, 2


def flags_for(i: int) -> int:
    f = 0
    if i == 0:
        f |= 1 << (7 - 1)
    if i == N_ACQ - 1:
        f |= (1 << (8 - 1)) | (1 << (25 - 1))
    return f


def traj_value(i: int, s: int, d: int) -> float:
    return float(i) + 0.25 * s - 0.5 * d          # exact in float32


def data_value(i: int, c: int, s: int) -> complex:
    return complex(100 * i + 10 * c + s, -(s + 0.5))  # exact in float32


def acquisition_header(i: int) -> bytes:
    h = bytearray(340)
    struct.pack_into("<H", h, 0, 1)                       # version
    struct.pack_into("<Q", h, 2, flags_for(i))            # flags
    struct.pack_into("<I", h, 10, 4242)                   # measurement_uid
    struct.pack_into("<I", h, 14, i + 1)                  # scan_counter
    struct.pack_into("<I", h, 18, 1000 + 10 * i)          # acquisition_time_stamp
    struct.pack_into("<3I", h, 22, 7, 8, 9)               # physiology_time_stamp
    struct.pack_into("<HHH", h, 34, N_SAMPLES, N_CHANNELS, N_CHANNELS)
    struct.pack_into("<Q", h, 40, 0b11)                   # channel_mask[0]
    struct.pack_into("<HHHHH", h, 168, 0, 0, N_SAMPLES // 2, 0, TRAJ_DIMS)
    struct.pack_into("<f", h, 178, 2.5)                   # sample_time_us
    struct.pack_into("<3f", h, 182, 1.0, 2.0, 3.0)        # position
    struct.pack_into("<3f", h, 194, 1.0, 0.0, 0.0)        # read_dir
    struct.pack_into("<3f", h, 206, 0.0, 1.0, 0.0)        # phase_dir
    struct.pack_into("<3f", h, 218, 0.0, 0.0, 1.0)        # slice_dir
    struct.pack_into("<H", h, 242, i)                     # idx.kspace_encode_step_1
    struct.pack_into("<H", h, 242 + 6, 5)                 # idx.slice
    struct.pack_into("<i", h, 276, -i)                    # user_int[0]
    struct.pack_into("<f", h, 308 + 4 * 7, 0.5)           # user_float[7]
    return bytes(h)


def build() -> bytes:
    out = bytearray()
    out += struct.pack("<H", 1) + b"default.xml".ljust(1024, b"\0")
    xml = HEADER_XML.encode("utf-8")
    out += struct.pack("<HI", 3, len(xml)) + xml
    for i in range(N_ACQ):
        out += struct.pack("<H", 1008) + acquisition_header(i)
        for s in range(N_SAMPLES):                        # dimension index fastest
            for d in range(TRAJ_DIMS):
                out += struct.pack("<f", traj_value(i, s, d))
        for c in range(N_CHANNELS):                       # sample index fastest, then channel
            for s in range(N_SAMPLES):
                z = data_value(i, c, s)
                out += struct.pack("<ff", z.real, z.imag)
    out += struct.pack("<H", 4)
    return bytes(out)


if __name__ == "__main__":
    OUT.write_bytes(build())
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
