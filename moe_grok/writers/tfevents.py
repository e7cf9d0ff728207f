"""The TensorBoard event-file format for scalars, encoded by hand: TFRecord framing around `Event` protocol
buffers (tensorflow/core/util/event.proto, tensorboard's copy of it).

Only what scalars need is encoded:
  Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
  Summary { repeated Value value = 1; }
  Value   { string tag = 1; float simple_value = 2; }
TensorBoard reads `simple_value` as a scalar (its data-compatibility layer turns it into the scalars
plugin's form). A record is: length (uint64 LE), masked CRC-32C of the length (uint32 LE), the data,
masked CRC-32C of the data (uint32 LE).
"""
from __future__ import annotations

import math
import struct
from collections.abc import Mapping

FILE_VERSION = "brain.Event:2"


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, reflected
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotated right by 15 bits plus a constant (a CRC of CRCs stays informative)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """`data` framed as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
    """`value` as float32; beyond float32's range it becomes +-Inf (as a cast does), NaN stays NaN."""
    try:
        return struct.pack("<f", value)
    except OverflowError:
        return struct.pack("<f", math.copysign(math.inf, value))


def header_event(wall_time: float) -> bytes:
    """The Event that opens every event file (its file_version), serialized."""
    return b"\x09" + struct.pack("<d", wall_time) + _length_delimited(3, FILE_VERSION.encode())


def scalars_event(wall_time: float, step: int, scalars: Mapping[str, float]) -> bytes:
    """One Event holding `scalars` (tag -> value, stored as float32) at `step` (int >= 0), serialized."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    values = b"".join(_length_delimited(1, _length_delimited(1, tag.encode()) + b"\x15" + _float32(value))
                      for tag, value in scalars.items())
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + _length_delimited(5, values)
