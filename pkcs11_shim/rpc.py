"""p11-kit RPC message codec (DESIGN §8).

Hazardous: this is the wire format only; serve clients through :mod:`pkcs11_shim.server`.

Frame (all integers big-endian)::

    u32 code | u32 options_len | u32 body_len      12-byte header (:data:`HEADER`)
    options                                         client's module name; replies: none
    body = u32 call_id | u32 siglen + signature | fields...

Fields follow the call's signature string: ``u`` u64, ``y`` u8, ``v`` two bytes
(major, minor), ``s``/``z`` a byte array (u32 length + bytes, 0xffffffff = NULL),
``ay`` u8 valid + (byte array | u32 length only), ``au`` u8 valid + u32 n (+ n x u64),
``fy``/``fu`` u32 buffer size (0 = size query), ``fA`` u32 n + n x (u32 type, u32 len),
``aA`` u32 n + n x attribute, ``M`` u32 mechanism + parameter.  An attribute is
``u32 type | u8 valid | u32 C length | value``, the value encoded by the type table of the
p11-kit 0.24 client (:func:`value_kind`).  An error reply is call id 0, signature ``u``
and the CKR as u64.

Every decoder is strict and bounded: malformed input raises :class:`ProtocolError` and
nothing else.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeAlias

from appliance.errors import CKR, CallerError
from appliance.secret import SecretBytes

__all__ = [
    "HANDSHAKE",
    "HEADER",
    "MAX_ARRAY",
    "MAX_MESSAGE",
    "NULL_LEN",
    "AttrValue",
    "Attribute",
    "Header",
    "Mechanism",
    "ProtocolError",
    "Reader",
    "ValueKind",
    "Writer",
    "decode_fields",
    "encode_frame",
    "error_body",
    "read_sign",
    "read_sign_init",
    "split_signature",
    "value_kind",
]

HEADER: Final = struct.Struct(">III")
MAX_MESSAGE: Final = 1 << 20  # body and options, each
MAX_ARRAY: Final = 4096  # elements in any counted array
MAX_DEPTH: Final = 2  # nested attribute templates
NULL_LEN: Final = 0xFFFFFFFF
HANDSHAKE: Final = b"PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"

_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")

CKM_RSA_PKCS_OAEP: Final = 0x09
CKM_RSA_PKCS_PSS: Final = 0x0D


class ProtocolError(CallerError):
    """A message that does not follow the p11-kit RPC format (or exceeds its limits)."""

    ckr = CKR.DEVICE_ERROR


class ValueKind(Enum):
    """How the 0.24 client encodes an attribute value."""

    BYTE = 0
    ULONG = 1
    ATTRIBUTE_ARRAY = 2
    MECHANISM_ARRAY = 3
    DATE = 4
    BYTE_ARRAY = 5


_BYTE_ATTRS: Final = frozenset(
    {
        0x001,  # TOKEN
        0x002,  # PRIVATE
        0x086,  # TRUSTED
        0x103,  # SENSITIVE
        0x104,  # ENCRYPT
        0x105,  # DECRYPT
        0x106,  # WRAP
        0x107,  # UNWRAP
        0x108,  # SIGN
        0x109,  # SIGN_RECOVER
        0x10A,  # VERIFY
        0x10B,  # VERIFY_RECOVER
        0x10C,  # DERIVE
        0x162,  # EXTRACTABLE
        0x163,  # LOCAL
        0x164,  # NEVER_EXTRACTABLE
        0x165,  # ALWAYS_SENSITIVE
        0x170,  # MODIFIABLE
        0x171,  # COPYABLE
        0x200,  # SECONDARY_AUTH
        0x202,  # ALWAYS_AUTHENTICATE
        0x210,  # WRAP_WITH_TRUSTED
        0x301,  # RESET_ON_INIT
        0x302,  # HAS_RESET
        0x405,  # COLOR
    }
)
_ULONG_ATTRS: Final = frozenset(
    {
        0x000,  # CLASS
        0x080,  # CERTIFICATE_TYPE
        0x087,  # CERTIFICATE_CATEGORY
        0x088,  # JAVA_MIDP_SECURITY_DOMAIN
        0x100,  # KEY_TYPE
        0x121,  # MODULUS_BITS
        0x133,  # PRIME_BITS
        0x134,  # SUB_PRIME_BITS
        0x160,  # VALUE_BITS
        0x161,  # VALUE_LEN
        0x166,  # KEY_GEN_MECHANISM
        0x201,  # AUTH_PIN_FLAGS
        0x300,  # HW_FEATURE_TYPE
        0x400,  # PIXEL_X
        0x401,  # PIXEL_Y
        0x402,  # RESOLUTION
        0x403,  # CHAR_ROWS
        0x404,  # CHAR_COLUMNS
        0x406,  # BITS_PER_PIXEL
        0x500,  # MECHANISM_TYPE
    }
)
_TEMPLATE_ATTRS: Final = frozenset({0x40000211, 0x40000212, 0x40000213})
_MECH_ARRAY_ATTRS: Final = frozenset({0x40000600})
_DATE_ATTRS: Final = frozenset({0x110, 0x111})


def value_kind(attr_type: int) -> ValueKind:
    """The encoding p11-kit 0.24 uses for ``attr_type`` (unknown types: byte array)."""
    if attr_type in _BYTE_ATTRS:
        return ValueKind.BYTE
    if attr_type in _ULONG_ATTRS:
        return ValueKind.ULONG
    if attr_type in _TEMPLATE_ATTRS:
        return ValueKind.ATTRIBUTE_ARRAY
    if attr_type in _MECH_ARRAY_ATTRS:
        return ValueKind.MECHANISM_ARRAY
    if attr_type in _DATE_ATTRS:
        return ValueKind.DATE
    return ValueKind.BYTE_ARRAY


AttrValue: TypeAlias = "bool | int | bytes | tuple[int, ...] | tuple[Attribute, ...] | None"


@dataclass(frozen=True, slots=True)
class Attribute:
    """One attribute: ``value`` None means unavailable (length -1 on the C side).

    Booleans are ``bool``, CK_ULONG values ``int``, templates tuples of attributes,
    mechanism lists tuples of ints, everything else ``bytes``.
    """

    type: int
    value: AttrValue


@dataclass(frozen=True, slots=True)
class Mechanism:
    """A mechanism and its parameter (raw bytes, or the decoded u64 fields for PSS/OAEP)."""

    type: int
    param: bytes | tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Header:
    """The 12-byte frame header."""

    code: int
    options_len: int
    body_len: int

    @classmethod
    def parse(cls, data: bytes) -> Header:
        """Decode and bound-check a header.

        :raises ProtocolError: wrong size or a length over :data:`MAX_MESSAGE`.
        """
        if len(data) != HEADER.size:
            raise ProtocolError("short header")
        code, olen, blen = HEADER.unpack(data)
        if olen > MAX_MESSAGE or blen > MAX_MESSAGE:
            raise ProtocolError("message too large")
        if blen < 8:
            raise ProtocolError("body too short")
        return cls(code, olen, blen)


def encode_frame(code: int, body: bytes) -> bytes:
    """A complete reply frame: header (no options) and body."""
    return HEADER.pack(code, 0, len(body)) + body


def split_signature(sig: str) -> list[str]:
    """Split a signature string into field codes (``"uayfy"`` -> ``["u", "ay", "fy"]``).

    :raises ProtocolError: an unknown code.
    """
    out: list[str] = []
    i = 0
    while i < len(sig):
        c = sig[i]
        if c in "af":
            code = sig[i : i + 2]
            if code not in ("ay", "au", "aA", "fy", "fu", "fA"):
                raise ProtocolError("bad signature")
            out.append(code)
            i += 2
        elif c in "uyvszM":
            out.append(c)
            i += 1
        else:
            raise ProtocolError("bad signature")
    return out


@functools.lru_cache(maxsize=128)
def _reply_start(call_id: int, signature: str) -> tuple[bytes, tuple[str, ...]]:
    """A reply body's first bytes (call id, signature) and its field codes, last first
    (replies use a few fixed ones; every reply starts here)."""
    sig = signature.encode("ascii")
    return _U32.pack(call_id) + _U32.pack(len(sig)) + sig, tuple(
        reversed(split_signature(signature))
    )


class Reader:
    """Reads one request body field by field.  Every method raises only ProtocolError."""

    __slots__ = ("_buf", "_pos", "call_id", "signature")

    def __init__(self, body: bytes | bytearray) -> None:
        if len(body) > MAX_MESSAGE:
            raise ProtocolError("message too large")
        # A bytearray body (one that carries a PIN) is read in place, never copied into an
        # immutable object; its owner wipes it once the call is done.
        self._buf: bytes | bytearray = body if isinstance(body, bytearray) else bytes(body)
        self._pos = 0
        self.call_id = self._u32()
        sig = self._bytes()
        if sig is None or len(sig) > 64:
            raise ProtocolError("bad signature")
        try:
            self.signature = sig.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("bad signature") from None

    def _take(self, n: int) -> bytes | bytearray:
        end = self._pos + n
        if n < 0 or end > len(self._buf):
            raise ProtocolError("truncated message")
        out = self._buf[self._pos : end]
        self._pos = end
        return out

    # The fixed-size readers unpack in place (no slice, no extra call): they run a few
    # dozen times per signature on the server's one loop thread.
    def _u32(self) -> int:
        pos = self._pos
        if pos + 4 > len(self._buf):
            raise ProtocolError("truncated message")
        self._pos = pos + 4
        v: int = _U32.unpack_from(self._buf, pos)[0]
        return v

    def _count(self) -> int:
        n = self._u32()
        if n > MAX_ARRAY:
            raise ProtocolError("array too long")
        return n

    def _length(self) -> int | None:
        n = self._u32()
        if n == NULL_LEN:
            return None
        if n >= 0x7FFFFFFF:
            raise ProtocolError("bad length")
        return n

    def _bytes(self) -> bytes | None:
        n = self._length()
        return None if n is None else bytes(self._take(n))

    def u(self) -> int:
        """A CK_ULONG (u64)."""
        pos = self._pos
        if pos + 8 > len(self._buf):
            raise ProtocolError("truncated message")
        self._pos = pos + 8
        v: int = _U64.unpack_from(self._buf, pos)[0]
        return v

    def y(self) -> int:
        """One byte."""
        pos = self._pos
        if pos >= len(self._buf):
            raise ProtocolError("truncated message")
        self._pos = pos + 1
        return self._buf[pos]

    def v(self) -> tuple[int, int]:
        """A CK_VERSION."""
        b = self._take(2)
        return b[0], b[1]

    def z(self) -> bytes | None:
        """A length-prefixed string (``s`` or ``z``); None for NULL."""
        return self._bytes()

    s = z

    def _array_length(self) -> int | None:
        """A byte array's validity byte and length: None for NULL or length-only."""
        valid = self.y()
        if valid == 0:
            if self._u32() > MAX_MESSAGE:
                raise ProtocolError("bad length")
            return None
        if valid != 1:
            raise ProtocolError("bad validity byte")
        return self._length()

    def ay(self) -> bytes | None:
        """A byte array; None for a NULL array or a length-only array."""
        n = self._array_length()
        return None if n is None else bytes(self._take(n))

    def secret_ay(self) -> SecretBytes | None:
        """A byte array that holds a secret (a PIN): copied once, from the body, into a
        buffer the caller wipes; None as :meth:`ay`."""
        n = self._array_length()
        if n is None:
            return None
        start, end = self._pos, self._pos + n
        if end > len(self._buf):
            raise ProtocolError("truncated message")
        self._pos = end
        with memoryview(self._buf) as view:
            return SecretBytes(view[start:end])

    def au(self) -> tuple[int, ...] | None:
        """An array of CK_ULONG; None when only the count is sent."""
        valid = self.y()
        n = self._count()
        if valid == 0:
            return None
        if valid != 1:
            raise ProtocolError("bad validity byte")
        return tuple(self.u() for _ in range(n))

    def fy(self) -> int | None:
        """A byte output buffer's size: None for a size query (NULL buffer)."""
        n = self._u32()
        if n == 0:
            return None
        return 0 if n == NULL_LEN else n

    fu = fy

    def fa(self) -> list[tuple[int, int]]:
        """An attribute buffer template (``fA``): (type, requested length) pairs."""
        return [(self._u32(), self._u32()) for _ in range(self._count())]

    def _attribute(self, depth: int) -> Attribute:
        atype = self._u32()
        valid = self.y()
        if valid == 0:
            return Attribute(atype, None)
        if valid != 1:
            raise ProtocolError("bad validity byte")
        clen = self._u32()
        kind = value_kind(atype)
        value: AttrValue
        if kind is ValueKind.BYTE:
            value = bool(self.y())
        elif kind is ValueKind.ULONG:
            value = self.u()
        elif kind is ValueKind.ATTRIBUTE_ARRAY:
            if depth >= MAX_DEPTH:
                raise ProtocolError("attribute templates nested too deep")
            value = tuple(self._attribute(depth + 1) for _ in range(self._count()))
        elif kind is ValueKind.MECHANISM_ARRAY:
            value = tuple(self.u() for _ in range(self._count()))
        else:
            raw = self._bytes()
            value = b"" if raw is None else raw
            if kind is ValueKind.DATE and len(value) not in (0, 8):
                raise ProtocolError("bad date")
        if clen > MAX_MESSAGE:
            raise ProtocolError("bad attribute length")
        return Attribute(atype, value)

    def aa(self) -> list[Attribute]:
        """An attribute array with values (``aA``)."""
        return [self._attribute(0) for _ in range(self._count())]

    def m(self) -> Mechanism:
        """A mechanism (``M``)."""
        mtype = self._u32()
        if mtype == CKM_RSA_PKCS_PSS:
            return Mechanism(mtype, (self.u(), self.u(), self.u()))
        if mtype == CKM_RSA_PKCS_OAEP:
            fields = (self.u(), self.u(), self.u())
            self._bytes()
            return Mechanism(mtype, fields)
        return Mechanism(mtype, self._bytes())

    def done(self) -> None:
        """Check that the whole body was consumed.

        :raises ProtocolError: trailing bytes.
        """
        if self._pos != len(self._buf):
            raise ProtocolError("trailing bytes")


#: C_SignInit and C_Sign in the shape every classical signature sends them: a mechanism
#: without a parameter (NULL or empty); one byte array (the digest or message) and an
#: output buffer size.  :func:`read_sign_init` and :func:`read_sign` read them with one
#: unpack each, field for field what :class:`Reader` reads (the server answers these two
#: requests for every signature).
_SIGN_INIT_BODY: Final = struct.Struct(">II3sQIIQ")
_SIGN_HEAD: Final = struct.Struct(">II5sQBI")
_PLAIN_SIGN_INIT: Final = (3, b"uMu")
_PLAIN_SIGN: Final = (5, b"uayfy")


def read_sign_init(body: bytes) -> tuple[int, Mechanism, int] | None:
    """A ``C_SignInit`` body (call id 42) with a parameterless mechanism: its session,
    mechanism and key handle; None for any other body (read it with :class:`Reader`)."""
    if len(body) != _SIGN_INIT_BODY.size:
        return None
    call_id, n, sig, session, mtype, plen, key = _SIGN_INIT_BODY.unpack(body)
    if (
        call_id != 42
        or (n, sig) != _PLAIN_SIGN_INIT
        or plen not in (0, NULL_LEN)
        or mtype in (CKM_RSA_PKCS_PSS, CKM_RSA_PKCS_OAEP)
    ):
        return None
    return session, Mechanism(mtype, None if plen else b""), key


def read_sign(body: bytes) -> tuple[int, bytes, int | None] | None:
    """A ``C_Sign`` body (call id 43) with its data present: session, data and output
    size (None: a size query, as :meth:`Reader.fy`); None for any other body."""
    head = _SIGN_HEAD.size
    if not head + 4 <= len(body) <= MAX_MESSAGE:
        return None
    call_id, n, sig, session, valid, dlen = _SIGN_HEAD.unpack_from(body)
    if call_id != 43 or (n, sig) != _PLAIN_SIGN or valid != 1 or head + dlen + 4 != len(body):
        return None
    size = _U32.unpack_from(body, head + dlen)[0]
    return (
        session,
        body[head : head + dlen],
        None if size == 0 else (0 if size == NULL_LEN else size),
    )


def decode_fields(body: bytes, signatures: dict[int, str]) -> tuple[int, list[object]]:
    """Decode a whole request generically against the expected signature table.

    :raises ProtocolError: unknown call id, signature mismatch, or malformed fields.
    """
    r = Reader(body)
    expected = signatures.get(r.call_id)
    if expected is None or expected != r.signature:
        raise ProtocolError("unknown call or signature mismatch")
    readers = {
        "u": r.u,
        "y": r.y,
        "v": r.v,
        "s": r.s,
        "z": r.z,
        "ay": r.ay,
        "au": r.au,
        "fy": r.fy,
        "fu": r.fu,
        "fA": r.fa,
        "aA": r.aa,
        "M": r.m,
    }
    fields: list[object] = [readers[code]() for code in split_signature(expected)]
    r.done()
    return r.call_id, fields


class Writer:
    """Builds one reply body; checks each field against the reply signature."""

    __slots__ = ("_codes", "_out")

    def __init__(self, call_id: int, signature: str) -> None:
        start, codes = _reply_start(call_id, signature)
        self._codes = list(codes)  # reversed: pop() takes the next
        self._out = bytearray(start)

    def _expect(self, code: str) -> None:
        if not self._codes or self._codes[-1] != code:
            raise AssertionError(f"reply field {code!r} out of signature order")
        self._codes.pop()

    def _bytes(self, data: bytes | None) -> None:
        if data is None:
            self._out += _U32.pack(NULL_LEN)
        else:
            self._out += _U32.pack(len(data)) + data

    def u(self, value: int) -> Writer:
        self._expect("u")
        self._out += _U64.pack(value)
        return self

    def y(self, value: int) -> Writer:
        self._expect("y")
        self._out.append(value)
        return self

    def v(self, major: int, minor: int) -> Writer:
        self._expect("v")
        self._out += bytes((major, minor))
        return self

    def s(self, text: str, width: int) -> Writer:
        """A blank-padded fixed-width string (truncated to ``width`` bytes)."""
        self._expect("s")
        raw = text.encode("utf-8")[:width]
        self._bytes(raw.ljust(width, b" "))
        return self

    def ay(self, data: bytes | None, length: int = 0) -> Writer:
        """A byte array, or (``data`` None) only the length the caller needs."""
        self._expect("ay")
        if data is None:
            self._out += b"\x00" + _U32.pack(length)
        else:
            self._out += b"\x01"
            self._bytes(data)
        return self

    def au(self, values: list[int] | None, count: int = 0) -> Writer:
        """An array of CK_ULONG, or (``values`` None) only the count."""
        self._expect("au")
        if values is None:
            self._out += b"\x00" + _U32.pack(count)
        else:
            self._out += b"\x01" + _U32.pack(len(values))
            for v in values:
                self._out += _U64.pack(v)
        return self

    def _attribute(self, attr: Attribute) -> None:
        self._out += _U32.pack(attr.type)
        value = attr.value
        if value is None:
            self._out.append(0)
            return
        self._out.append(1)
        kind = value_kind(attr.type)
        if kind is ValueKind.BYTE:
            self._out += _U32.pack(1) + bytes((1 if value else 0,))
        elif kind is ValueKind.ULONG:
            if not isinstance(value, int):
                raise TypeError("CK_ULONG attribute needs an int")
            self._out += _U32.pack(8) + _U64.pack(value)
        elif kind is ValueKind.MECHANISM_ARRAY:
            if not isinstance(value, tuple):
                raise TypeError("mechanism list needs a tuple")
            self._out += _U32.pack(8 * len(value)) + _U32.pack(len(value))
            for m in value:
                if not isinstance(m, int):
                    raise TypeError("mechanism list needs ints")
                self._out += _U64.pack(m)
        elif kind is ValueKind.ATTRIBUTE_ARRAY:
            if not isinstance(value, tuple):
                raise TypeError("template needs a tuple")
            self._out += _U32.pack(24 * len(value)) + _U32.pack(len(value))
            for a in value:
                if not isinstance(a, Attribute):
                    raise TypeError("template needs attributes")
                self._attribute(a)
        else:
            if not isinstance(value, bytes):
                raise TypeError("byte-array attribute needs bytes")
            self._out += _U32.pack(len(value))
            self._bytes(value)

    def aa(self, attrs: list[Attribute]) -> Writer:
        """An attribute array with values (``aA``)."""
        self._expect("aA")
        self._out += _U32.pack(len(attrs))
        for a in attrs:
            self._attribute(a)
        return self

    def body(self) -> bytes:
        """The finished body.

        :raises AssertionError: fields are missing (a bug in the caller).
        """
        if self._codes:
            raise AssertionError(f"reply is missing fields {self._codes[::-1]}")
        return bytes(self._out)


def error_body(ckr: int) -> bytes:
    """The body of an error reply: call id 0, signature ``u``, the CKR."""
    return Writer(0, "u").u(int(ckr)).body()


def request_body(call_id: int, signature: str, fields: bytes) -> bytes:
    """A request body (used by tests and tools): call id, signature, pre-encoded fields."""
    sig = signature.encode("ascii")
    return _U32.pack(call_id) + _U32.pack(len(sig)) + sig + fields
