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


def private_key_template(cka_id: bytes) -> bytes:
    """An ``aA`` template's two attributes: CKA_CLASS = CKO_PRIVATE_KEY, CKA_ID = ``cka_id``
    (a find's template: each value with its valid byte, length and bytes)."""
    cka_class, cka_id_type, cko_private_key = 0x000, 0x102, 3
    return (
        u32(cka_class)
        + b"\x01"
        + u32(8)
        + u64(cko_private_key)
        + u32(cka_id_type)
        + b"\x01"
        + u32(len(cka_id))
        + u32(len(cka_id))
        + cka_id
    )
