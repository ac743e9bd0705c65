"""Field encoders of the p11-kit RPC wire format, for tests that speak it by hand."""

from __future__ import annotations

import struct


def u32(v: int) -> bytes:
    """A big-endian u32 (lengths, counts, buffer sizes)."""
    return struct.pack(">I", v)


def u64(v: int) -> bytes:
    """A CK_ULONG field (``u``)."""
    return struct.pack(">Q", v)


def ay(data: bytes) -> bytes:
    """A present byte array (``ay``): valid byte, length, bytes."""
    return b"\x01" + u32(len(data)) + data
