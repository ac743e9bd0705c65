"""Canonical CBOR, the one encoding of WAL bodies, keystore headers and blob headers.

This is the only module that imports ``cbor2``.  Encoding is deterministic (RFC 8949
§4.2.1 core deterministic encoding: shortest forms, map keys sorted bytewise), so a
record hashes the same on every appliance.  Decoding refuses anything but the small set
of types the formats use, and trailing bytes.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from appliance.errors import CallerError

__all__ = ["CodecError", "dumps", "loads", "loads_map"]


class CodecError(CallerError):
    """Bytes that are not the canonical CBOR a format expects."""


def dumps(value: Any) -> bytes:
    """Encode ``value`` as canonical CBOR."""
    return cbor2.dumps(value, canonical=True)


def loads(data: bytes | bytearray | memoryview) -> Any:
    """Decode exactly one CBOR item; trailing bytes or bad encodings raise CodecError."""
    raw = bytes(data)
    buf = io.BytesIO(raw)
    try:
        value = cbor2.CBORDecoder(buf).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, EOFError, OverflowError) as exc:
        raise CodecError(f"malformed CBOR: {type(exc).__name__}") from None
    if buf.tell() != len(raw):
        raise CodecError("malformed CBOR: trailing bytes")
    return value


def loads_map(data: bytes | bytearray | memoryview, what: str) -> dict[str, Any]:
    """Decode a CBOR map with text keys; ``what`` names the format in errors."""
    value = loads(data)
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CodecError(f"{what}: not a CBOR map with text keys")
    return value
