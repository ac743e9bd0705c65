"""The write-ahead log's on-disk format: frames, bodies and the hash chain.

hazardous: use :class:`appliance.wal.Wal`.  This module only encodes and checks bytes;
it knows nothing about files, locks or durability.

Format (DESIGN §5)
==================

``wal.log`` is a plain concatenation of frames, with no file header::

    offset  size  field
    0       4     body length L, unsigned 32-bit big-endian, 1 <= L <= MAX_BODY
    4       4     CRC-32 (zlib.crc32, the ISO-HDLC polynomial) of the body, u32 big-endian
    8       L     body: one canonical CBOR map with text keys

The frame header is :data:`FRAME` (``struct.Struct(">II")``, 8 bytes).  A frame is
written with a single ``write(2)`` so a crash can only leave a *prefix* of the last
frame behind (a torn write), which the CRC or the length catches.

Every body holds at least these keys; the appliance adds its own next to them:

``seq``  (unsigned int)  0 for the first record (genesis), then +1 per record, no gaps.
``prev`` (32 bytes)      SHA3-256 of the previous record's body; 32 zero bytes for seq 0.
``ts``   (unsigned int)  milliseconds since the Unix epoch (UTC), from the writer's clock.
``type`` (text)          what the record means, e.g. ``"transition"``; never empty.

The record hash is SHA3-256 of the body bytes.  ``prev`` chains the records: changing
any byte of any record breaks every later link, so the head hash (which checkpoints sign
and the token's anti-rollback object stores) commits to the whole history.

Values are restricted to what replays identically everywhere: integers in the CBOR range
``-2**64 .. 2**64-1`` (no bignum tags), text, byte strings, ``true``/``false``/``null``,
arrays, and maps with text keys; arrays and maps nest at most :data:`MAX_DEPTH` deep (the
body map is depth 0) and the body map has fewer than 256 keys.  No floats, no tags, no
indefinite lengths, no duplicate keys.  A body
must be *canonical* (RFC 8949 §4.2.1 core deterministic encoding, which is what
:func:`appliance.codec.dumps` produces): re-encoding the decoded map must give back exactly
the stored bytes.  That means the shortest head for every integer and length, and map keys
in canonical order, which for text keys is shorter key first, then bytewise (RFC 7049 and
RFC 8949 agree there).

Security: the CRC only detects accidents (torn writes, bit rot).  The hash chain and the
signed checkpoints detect tampering.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from appliance import codec
from appliance.errors import CallerError

__all__ = [
    "FRAME",
    "HASH_SIZE",
    "MAX_BODY",
    "MAX_DEPTH",
    "RESERVED",
    "ZERO_HASH",
    "BodyError",
    "WalRecord",
    "check_body",
    "decode_body",
    "encode_body",
    "encode_frame",
    "encode_record",
    "record_hash",
]

FRAME: Final = struct.Struct(">II")  # body length, CRC-32 of body
assert FRAME.size == 8  # noqa: S101 - a format constant, as ZODB's format.py asserts its sizes

MAX_BODY: Final = 16 * 1024 * 1024
"""Largest body a frame may carry; a larger length field marks a bad frame."""

HASH_SIZE: Final = 32
ZERO_HASH: Final = bytes(HASH_SIZE)
"""``prev`` of the genesis record, and the head hash of an empty log."""

MAX_DEPTH: Final = 32
"""Arrays and maps may sit at depths 1 .. MAX_DEPTH-1 (the body map is depth 0, its values
depth 1); a container at depth MAX_DEPTH is refused."""

RESERVED: Final = frozenset({"seq", "prev", "ts", "type"})
"""Body keys the log sets itself; callers may not pass them."""

_U64_LIMIT: Final = 1 << 64
_MAX_FIELDS: Final = 255 - len(RESERVED)  # the body map has fewer than 256 keys


class BodyError(ValueError):
    """A body that is not a valid WAL body.  Internal: the log turns it into
    :class:`~appliance.errors.WalCorrupted` (reading) or
    :class:`~appliance.errors.CallerError` (writing).

    ``undecodable`` is true when the bytes are not CBOR at all (which, in the last
    frame, counts as a torn write); false when they decode but break a rule.
    """

    def __init__(self, why: str, *, undecodable: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.undecodable = undecodable


@dataclass(frozen=True, slots=True)
class WalRecord:
    """One record as read back from (or just written to) the log.

    :ivar seq: position in the log, from 0.
    :ivar prev: SHA3-256 of the previous record's body (32 zero bytes for seq 0).
    :ivar ts: milliseconds since the Unix epoch (UTC).
    :ivar type: the record type.
    :ivar fields: the whole decoded body map, including ``seq``, ``prev``, ``ts`` and
        ``type`` (a read-only view).
    :ivar body: the canonical CBOR bytes that were hashed and written.
    :ivar hash: SHA3-256 of :attr:`body`; the next record's ``prev``.
    :ivar offset: byte offset of the frame in ``wal.log``.
    """

    seq: int
    prev: bytes
    ts: int
    type: str
    fields: Mapping[str, Any]
    body: bytes
    hash: bytes
    offset: int


def record_hash(body: bytes) -> bytes:
    """SHA3-256 of a body: the record hash and the next record's ``prev``."""
    return hashlib.sha3_256(body).digest()


def encode_frame(body: bytes) -> bytes:
    """Prefix ``body`` with its frame header (length and CRC-32)."""
    return FRAME.pack(len(body), zlib.crc32(body)) + body


# -- reading: a validator that walks the bytes ---------------------------------------------
#
# Writing goes through appliance.codec.dumps (cbor2).  Reading must check that a stored body is
# canonical CBOR of the restricted value set.  Decoding with cbor2 and re-encoding to compare
# costs two full passes, and cbor2's canonical encoder sorts keys by encoding each one: together
# they cost more than the rest of a replay, which has to stay under 2 s for 100,000 records.  So
# the scan walks the bytes once, without building objects, and accepts only the canonical form
# of the restricted set: every head the shortest possible, definite lengths, valid UTF-8, text
# keys in strictly increasing (so also duplicate-free) canonical order, no tags, no floats.
# Anything it does not recognise is rejected, so it fails closed.  Records that are handed out
# are decoded by cbor2 after this check.  tests/unit/test_wal.py checks, on generated values and
# on random byte mutations, that this accepts exactly what cbor2 decodes *and* re-encodes
# byte-for-byte.

_U16: Final = struct.Struct(">H").unpack_from
_U32: Final = struct.Struct(">I").unpack_from
_U64: Final = struct.Struct(">Q").unpack_from
_PREV_HEAD: Final = b"\x58\x20"  # byte string of 32
_SEQ, _PREV, _TS, _TYPE = 1, 2, 3, 4
# Encoded map keys already seen valid (they repeat from record to record), each mapped to 0,
# or for the reserved keys of the body map to one of the codes above.
_good_keys: dict[bytes, int] = {b"cseq": _SEQ, b"dprev": _PREV, b"bts": _TS, b"dtype": _TYPE}
_GOOD_KEYS_MAX: Final = 4096


class _Reject(Exception):
    """The body is not canonical CBOR of the restricted set; args[0] says why."""


def _item(b: bytes, pos: int, depth: int) -> int:
    """Check the data item at ``pos`` (nested ``depth`` deep); return the offset after it.

    Raises :class:`_Reject`, or IndexError/struct.error when the bytes end too soon, or
    UnicodeDecodeError for bad text.
    """
    ib = b[pos]
    pos += 1
    info = ib & 0x1F
    if ib >= 0xC0:  # tags (major 6) and simple values / floats (major 7)
        if ib == 0xF4 or ib == 0xF5 or ib == 0xF6:  # false, true, null
            return pos
        raise _Reject("tag, float or simple value")
    if info < 24:
        if ib < 0x40:  # small integer
            return pos
        arg = info
    elif info == 24:
        arg = b[pos]
        pos += 1
        if arg < 24:
            raise _Reject("non-canonical integer or length")
    elif info == 25:
        arg = _U16(b, pos)[0]
        pos += 2
        if arg < 0x100:
            raise _Reject("non-canonical integer or length")
    elif info == 26:
        arg = _U32(b, pos)[0]
        pos += 4
        if arg < 0x10000:
            raise _Reject("non-canonical integer or length")
    elif info == 27:
        arg = _U64(b, pos)[0]
        pos += 8
        if arg < 0x100000000:
            raise _Reject("non-canonical integer or length")
    else:
        raise _Reject("indefinite length or reserved value")
    major = ib >> 5
    if major < 2:  # integer
        return pos
    if major < 4:  # byte string, text string
        end = pos + arg
        if end > len(b):
            raise IndexError
        if major == 3:
            b[pos:end].decode("utf-8")
        return end
    if depth >= MAX_DEPTH:
        raise _Reject(f"nested deeper than {MAX_DEPTH}")
    if major == 4:  # array
        for _ in range(arg):
            pos = _item(b, pos, depth + 1)
        return pos
    return _entries(b, pos, arg, depth + 1)


def _entries(b: bytes, pos: int, count: int, depth: int) -> int:
    """Check ``count`` map entries from ``pos`` (values ``depth`` deep); return the offset
    after them.

    The common cases (short text keys seen before, small integers, short strings) are
    inlined: this loop is most of the cost of opening the log.  :func:`_check_top` is the
    same loop for the body map, plus the reserved keys.
    """
    size = len(b)
    good = _good_keys
    last = b""
    for _ in range(count):
        kpos = pos
        ib = b[pos]
        if 0x60 <= ib < 0x78:  # text key shorter than 24 bytes
            pos += ib - 0x5F
            key = b[kpos:pos]
            if key not in good:
                _item(b, kpos, depth)  # bounds and UTF-8
                if len(good) < _GOOD_KEYS_MAX:
                    good[key] = 0
        elif 0x78 <= ib < 0x7C:  # longer text key
            pos = _item(b, kpos, depth)
            key = b[kpos:pos]
        else:
            raise _Reject("map key that is not text")
        if key <= last:  # strictly increasing: canonical order, no duplicates
            raise _Reject("map keys out of canonical order")
        last = key
        ib = b[pos]
        if ib < 0x18:  # small unsigned integer
            pos += 1
        elif 0x60 <= ib < 0x78:  # short text
            end = pos + ib - 0x5F
            if end > size:
                raise IndexError
            b[pos + 1 : end].decode("utf-8")
            pos = end
        elif 0x40 <= ib < 0x58:  # short byte string
            pos += ib - 0x3F
            if pos > size:
                raise IndexError
        else:
            pos = _item(b, pos, depth)
    return pos


def _uint_at(b: bytes, pos: int) -> tuple[int, int]:
    """The unsigned integer at ``pos`` and the offset after it; (-1, pos) if the item
    there is not an unsigned integer.

    :raises _Reject: a non-canonical head.
    """
    ib = b[pos]
    if ib < 0x18:
        return ib, pos + 1
    if ib == 0x18:
        n, end, low = b[pos + 1], pos + 2, 0x18
    elif ib == 0x19:
        n, end, low = _U16(b, pos + 1)[0], pos + 3, 0x100
    elif ib == 0x1A:
        n, end, low = _U32(b, pos + 1)[0], pos + 5, 0x10000
    elif ib == 0x1B:
        n, end, low = _U64(b, pos + 1)[0], pos + 9, 0x100000000
    else:
        return -1, pos
    if n < low:
        raise _Reject("non-canonical integer or length")
    return n, end


def _check_top(b: bytes) -> tuple[int, bytes]:
    """Check a whole body; return its ``(seq, prev)``.  The loop is :func:`_entries`
    with the reserved keys checked (and consumed) on the way."""
    ib = b[0]
    if 0xA0 <= ib < 0xB8:
        count, pos = ib - 0xA0, 1
    elif ib == 0xB8 and b[1] >= 24:
        count, pos = b[1], 2
    else:  # 256 keys or more are legal CBOR but not a WAL body
        raise _Reject("body is not a map of fewer than 256 keys")
    size = len(b)
    good = _good_keys
    known = good.get
    seq = ts = -1
    prev = b""
    has_type = False
    last = b""
    for _ in range(count):
        kpos = pos
        ib = b[pos]
        if 0x60 <= ib < 0x78:
            pos += ib - 0x5F
            key = b[kpos:pos]
            code = known(key)
            if code is None:
                _item(b, kpos, 1)
                if len(good) < _GOOD_KEYS_MAX:
                    good[key] = 0
        elif 0x78 <= ib < 0x7C:
            pos = _item(b, kpos, 1)
            key = b[kpos:pos]
            code = 0
        else:
            raise _Reject("map key that is not text")
        if key <= last:
            raise _Reject("map keys out of canonical order")
        last = key
        if code:
            ib = b[pos]
            if code == _SEQ:
                if ib < 0x18:  # the first 24 records
                    seq = ib
                    pos += 1
                else:
                    seq, pos = _uint_at(b, pos)
                    if seq < 0:
                        raise _Reject("body without a valid seq")
            elif code == _TS:
                if ib == 0x1B and b[pos + 1 : pos + 5] != b"\0\0\0\0":  # any date after 1970-02
                    ts = _U64(b, pos + 1)[0]
                    pos += 9
                else:
                    ts, pos = _uint_at(b, pos)
                    if ts < 0:
                        raise _Reject("body without a valid ts")
            elif code == _PREV:
                if not b.startswith(_PREV_HEAD, pos):
                    raise _Reject("body without a valid prev")
                prev = b[pos + 2 : pos + 2 + HASH_SIZE]
                pos += 2 + HASH_SIZE
            else:
                if 0x61 <= ib < 0x78:  # non-empty short text
                    end = pos + ib - 0x5F
                    if end > size:
                        raise IndexError
                    b[pos + 1 : end].decode("utf-8")
                    pos = end
                elif 0x78 <= ib < 0x7C:
                    pos = _item(b, pos, 1)
                else:
                    raise _Reject("body without a valid type")
                has_type = True
            continue
        ib = b[pos]
        if 0x60 <= ib < 0x78:  # short text
            end = pos + ib - 0x5F
            if end > size:
                raise IndexError
            b[pos + 1 : end].decode("utf-8")
            pos = end
        elif ib < 0x18:  # small unsigned integer
            pos += 1
        elif 0x40 <= ib < 0x58:  # short byte string
            pos += ib - 0x3F
            if pos > size:
                raise IndexError
        else:
            pos = _item(b, pos, 1)
    if pos != size:
        raise _Reject("trailing bytes after the body" if pos < size else "malformed CBOR")
    if seq < 0:
        raise _Reject("body without a valid seq")
    if len(prev) != HASH_SIZE:
        raise _Reject("body without a valid prev")
    if ts < 0:
        raise _Reject("body without a valid ts")
    if not has_type:
        raise _Reject("body without a valid type")
    return seq, prev


def check_body(body: bytes) -> tuple[int, bytes]:
    """Check one stored body without decoding it; return its ``(seq, prev)``.

    :raises BodyError: naming the first rule broken, never the contents; ``undecodable``
        when cbor2 cannot decode the bytes at all.
    """
    try:
        return _check_top(body)
    except _Reject as exc:
        why = str(exc.args[0])
    except (IndexError, struct.error, UnicodeDecodeError):
        why = "malformed CBOR"
    try:  # rare path: is it CBOR at all?  (decides torn tail versus corruption)
        codec.loads(body)
    except codec.CodecError:
        raise BodyError("undecodable body", undecodable=True) from None
    raise BodyError(why)


def decode_body(body: bytes) -> dict[str, Any]:
    """Check one stored body (:func:`check_body`), then decode it.

    :raises BodyError: as :func:`check_body`.
    """
    check_body(body)
    try:
        return codec.loads_map(body, "WAL body")
    except codec.CodecError:  # cannot happen after check_body; fail closed anyway
        raise BodyError("undecodable body", undecodable=True) from None


# -- writing --------------------------------------------------------------------------------


def _is_scalar(value: Any) -> bool:
    kind = type(value)
    return (
        kind is str
        or kind is bytes
        or kind is bool
        or value is None
        or (kind is int and -_U64_LIMIT <= value < _U64_LIMIT)
    )


def _checked(value: Any, depth: int) -> Any:
    """``value`` if it is in the restricted set, with every array and map copied (so that
    a caller changing its objects later cannot change a record already written).

    Exact types: a bool is not an int here, and a subclass of str or int would not read
    back as the same type.

    :raises BodyError: naming what is not allowed.
    """
    if _is_scalar(value):
        return value
    kind = type(value)
    if kind is int:
        raise BodyError("integer outside the CBOR 64-bit range")
    if kind is not dict and kind is not list:
        raise BodyError(f"value of type {kind.__name__} is not allowed")
    if depth >= MAX_DEPTH:
        raise BodyError(f"nested deeper than {MAX_DEPTH}")
    if kind is list:
        return [item if _is_scalar(item) else _checked(item, depth + 1) for item in value]
    out: dict[str, Any] = {}
    for key, item in value.items():
        if type(key) is not str:
            raise BodyError(f"map key of type {type(key).__name__}")
        out[key] = item if _is_scalar(item) else _checked(item, depth + 1)
    return out


def encode_record(
    seq: int,
    prev: bytes,
    ts: int,
    type_: str,
    fields: Mapping[str, Any],
    *,
    verify: bool = True,
) -> tuple[bytes, dict[str, Any]]:
    """Build the canonical body of a new record, and the map it encodes.

    Every value is checked against the restricted set first, so the reader's validator
    accepts whatever this returns (the property tests check that on generated values).
    ``verify=True`` runs the validator on the result as well, which catches an encoder
    that no longer agrees with it (a changed cbor2) before anything is written.

    :returns: the body, and the body map (arrays and maps copied from ``fields``); the
        map equals what decoding the body gives.
    :raises CallerError: ``fields`` sets a reserved key, holds a value outside the
        restricted set, or the body would exceed :data:`MAX_BODY`; or ``type_``/``ts``
        have the wrong type.
    """
    if type(type_) is not str or not type_:
        raise CallerError("WAL record type must be a non-empty str")
    if type(ts) is not int or not 0 <= ts < _U64_LIMIT:
        raise CallerError("WAL clock must return a non-negative int (milliseconds)")
    if type(fields) is not dict and not isinstance(fields, Mapping):
        raise CallerError("WAL record fields must be a mapping")
    if "seq" in fields or "prev" in fields or "ts" in fields or "type" in fields:
        clash = ", ".join(sorted(RESERVED.intersection(fields)))
        raise CallerError(f"WAL record fields may not set {clash}")
    if len(fields) > _MAX_FIELDS:
        raise CallerError(f"WAL record fields: more than {_MAX_FIELDS} fields")
    body_map: dict[str, Any] = {}
    try:
        for key, item in fields.items():
            if type(key) is not str:
                raise BodyError(f"map key of type {type(key).__name__}")
            body_map[key] = item if _is_scalar(item) else _checked(item, 1)
    except BodyError as exc:
        raise CallerError(f"WAL record fields: {exc.why}") from None
    body_map.update(seq=seq, prev=prev, ts=ts, type=type_)
    try:
        body = codec.dumps(body_map)
    except ValueError:  # UnicodeEncodeError: a str with lone surrogates
        raise CallerError("WAL record fields: text that is not valid UTF-8") from None
    if len(body) > MAX_BODY:
        raise CallerError(f"WAL record body of {len(body)} bytes exceeds {MAX_BODY}")
    if verify:
        try:
            check_body(body)
        except BodyError as exc:
            raise CallerError(f"WAL record fields: {exc.why}") from None
    return body, body_map


def encode_body(seq: int, prev: bytes, ts: int, type_: str, fields: Mapping[str, Any]) -> bytes:
    """:func:`encode_record`, body only (validated)."""
    return encode_record(seq, prev, ts, type_, fields)[0]
