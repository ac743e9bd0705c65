"""The p11-kit RPC codec: round trips, strict rejection, and a decoder fuzz property."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import CKR
from pkcs11_shim.dispatch import REQUEST_SIGNATURES
from pkcs11_shim.rpc import (
    HANDSHAKE,
    MAX_ARRAY,
    MAX_MESSAGE,
    Attribute,
    Header,
    ProtocolError,
    Reader,
    Writer,
    decode_fields,
    encode_frame,
    error_body,
    read_sign,
    read_sign_init,
    request_body,
    split_signature,
)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def arr(data: bytes | None) -> bytes:
    return u32(0xFFFFFFFF) if data is None else u32(len(data)) + data


def test_header_roundtrip_and_limits() -> None:
    frame = encode_frame(7, b"x" * 9)
    h = Header.parse(frame[:12])
    assert (h.code, h.options_len, h.body_len) == (7, 0, 9)
    with pytest.raises(ProtocolError):
        Header.parse(struct.pack(">III", 1, 0, MAX_MESSAGE + 1))
    with pytest.raises(ProtocolError):
        Header.parse(struct.pack(">III", 1, MAX_MESSAGE + 1, 10))
    with pytest.raises(ProtocolError):
        Header.parse(b"\x00" * 11)
    with pytest.raises(ProtocolError):
        Header.parse(struct.pack(">III", 1, 0, 3))


def test_error_body() -> None:
    r = Reader(error_body(CKR.PIN_INCORRECT))
    assert (r.call_id, r.signature) == (0, "u")
    assert r.u() == CKR.PIN_INCORRECT
    r.done()


def test_split_signature() -> None:
    assert split_signature("uayfyaAfAMvszyau") == [
        "u",
        "ay",
        "fy",
        "aA",
        "fA",
        "M",
        "v",
        "s",
        "z",
        "y",
        "au",
    ]
    for bad in ("q", "ax", "f", "a"):
        with pytest.raises(ProtocolError):
            split_signature(bad)


def test_request_fields_decode() -> None:
    fields = (
        u64(5)  # session
        + b"\x01"
        + arr(b"digest")  # ay
        + u32(0)  # fy size query
    )
    r = Reader(request_body(43, "uayfy", fields))
    assert (r.call_id, r.signature) == (43, "uayfy")
    assert r.u() == 5
    assert r.ay() == b"digest"
    assert r.fy() is None
    r.done()
    r = Reader(request_body(43, "uayfy", u64(1) + b"\x00" + u32(4) + u32(0xFFFFFFFF)))
    r.u()
    assert r.ay() is None
    assert r.fy() == 0  # a buffer of length 0, not a size query


def test_attribute_array_decode() -> None:
    fields = (
        u32(3)
        + u32(0x000)
        + b"\x01"
        + u32(8)
        + u64(3)  # CKA_CLASS = CKO_PRIVATE_KEY
        + u32(0x108)
        + b"\x01"
        + u32(1)
        + b"\x01"  # CKA_SIGN = true
        + u32(0x102)
        + b"\x01"
        + u32(2)
        + arr(b"\xab\xcd")  # CKA_ID
    )
    r = Reader(request_body(26, "uaA", u64(1) + fields))
    r.u()
    assert r.aa() == [Attribute(0, 3), Attribute(0x108, True), Attribute(0x102, b"\xab\xcd")]
    r.done()


def test_attribute_array_limits() -> None:
    r = Reader(request_body(26, "uaA", u64(1) + u32(MAX_ARRAY + 1)))
    r.u()
    with pytest.raises(ProtocolError):
        r.aa()
    nested = u32(1) + u32(0x40000211) + b"\x01" + u32(24)
    deep = nested * 4 + u32(0)
    r = Reader(request_body(26, "uaA", u64(1) + deep))
    r.u()
    with pytest.raises(ProtocolError):
        r.aa()


def test_writer_attribute_encoding_matches_reader() -> None:
    attrs = [
        Attribute(0x000, 3),
        Attribute(0x108, True),
        Attribute(0x102, b"id"),
        Attribute(0x011, None),
        Attribute(0x40000600, (0x1041,)),
    ]
    body = Writer(24, "aAu").aa(attrs).u(0).body()
    r = Reader(body)
    assert r.aa() == attrs
    assert r.u() == 0
    r.done()


def test_writer_checks_signature_order() -> None:
    w = Writer(43, "ay")
    with pytest.raises(AssertionError):
        w.u(1)
    with pytest.raises(AssertionError):
        Writer(43, "ay").body()


def test_writer_space_strings_are_padded() -> None:
    body = Writer(3, "vsusv").v(2, 40).s("pqhsm", 32).u(0).s("x" * 40, 32).v(0, 1).body()
    r = Reader(body)
    assert r.v() == (2, 40)
    assert r.s() == b"pqhsm".ljust(32)
    assert r.u() == 0
    assert r.s() == b"x" * 32


def test_mechanism_decode() -> None:
    r = Reader(request_body(42, "uMu", u64(1) + u32(0x1041) + u32(0xFFFFFFFF) + u64(9)))
    assert r.u() == 1
    m = r.m()
    assert (m.type, m.param) == (0x1041, None)
    assert r.u() == 9
    r.done()


def test_decode_fields_full_request() -> None:
    body = request_body(1, "ayyay", b"\x01" + arr(HANDSHAKE) + b"\x00" + b"\x01" + arr(None))
    call_id, fields = decode_fields(body, REQUEST_SIGNATURES)
    assert call_id == 1
    assert fields == [HANDSHAKE, 0, None]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        u32(43),
        u32(43) + u32(5) + b"uay",  # truncated signature
        u32(43) + u32(0xFFFFFFFF),  # NULL signature
        request_body(43, "uayfy", u64(1)),  # truncated fields
        request_body(43, "uayfy", u64(1) + b"\x02" + u32(0) + u32(0)),  # bad validity
        request_body(43, "uayfy", u64(1) + b"\x01" + u32(0x7FFFFFFF)),  # huge length
        request_body(43, "uayfy", u64(1) + b"\x01" + arr(b"") + u32(0) + b"!"),  # trailing
        request_body(43, "uay", u64(1)),  # signature differs from the table
        request_body(999, "u", u64(1)),  # unknown call
        u32(1) + u32(2) + b"\xff\xfe",  # non-ASCII signature
    ],
)
def test_malformed_requests_raise_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_fields(body, REQUEST_SIGNATURES)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256), st.sampled_from(sorted(REQUEST_SIGNATURES)))
def test_decoder_only_raises_protocol_error(tail: bytes, call_id: int) -> None:
    """Random bytes after a valid call id and signature: parse or ProtocolError."""
    body = request_body(call_id, REQUEST_SIGNATURES[call_id], tail)
    try:
        decode_fields(body, REQUEST_SIGNATURES)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decoder_only_raises_protocol_error_on_random_bodies(body: bytes) -> None:
    try:
        decode_fields(body, REQUEST_SIGNATURES)
    except ProtocolError:
        pass
    try:
        Header.parse(body[:12])
    except ProtocolError:
        pass


def _read_slowly(body: bytes, call_id: int, signature: str) -> tuple[object, ...] | None:
    """The fields of a C_SignInit (``uMu``) or C_Sign (``uayfy``) body read with Reader,
    one method per field code; None for another call."""
    r = Reader(body)
    if (r.call_id, r.signature) != (call_id, signature):
        return None
    fields = tuple(getattr(r, code.lower())() for code in split_signature(signature))
    r.done()
    return fields


_MECHS = st.sampled_from([0x1041, 0x1057, 0x1D, 0x09, 0x0D, 0x250, 0xFFFFFFFF])
_U32S = st.sampled_from([0, 1, 10, 64, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF])


@st.composite
def _signing_bodies(draw: st.DrawFn) -> bytes:
    """C_SignInit and C_Sign bodies near the plain shape, then maybe mutated."""
    if draw(st.booleans()):
        param = draw(st.one_of(st.none(), st.binary(max_size=3)))
        body = request_body(
            42,
            "uMu",
            u64(draw(st.integers(0, 2**64 - 1)))
            + u32(draw(_MECHS))
            + arr(param)
            + u64(draw(st.integers(0, 2**64 - 1))),
        )
    else:
        data = draw(st.one_of(st.none(), st.binary(max_size=80)))
        valid = draw(st.sampled_from([b"\x01", b"\x01", b"\x00", b"\x02"]))
        body = request_body(
            43, "uayfy", u64(draw(st.integers(0, 9))) + valid + arr(data) + u32(draw(_U32S))
        )
    for _ in range(draw(st.integers(0, 2))):  # flip, drop or add a byte
        at = draw(st.integers(0, len(body)))
        how = draw(st.sampled_from(["flip", "drop", "add"]))
        if how == "flip" and at < len(body):
            body = body[:at] + bytes((body[at] ^ draw(st.integers(1, 255)),)) + body[at + 1 :]
        elif how == "drop":
            body = body[:at] + body[at + 1 :]
        else:
            body = body[:at] + bytes((draw(st.integers(0, 255)),)) + body[at:]
    return body


@settings(max_examples=1500, deadline=None)
@given(_signing_bodies())
def test_plain_signing_readers_agree_with_the_reader(body: bytes) -> None:
    """read_sign_init / read_sign (the server's one-unpack path for every signature) read
    exactly what Reader reads, and accept every plain-shaped body Reader accepts: a
    parameterless mechanism other than PSS/OAEP; present data."""
    for fast, call_id, signature in ((read_sign_init, 42, "uMu"), (read_sign, 43, "uayfy")):
        try:
            want = _read_slowly(body, call_id, signature)
        except ProtocolError:
            want = None
        got = fast(body)
        if got is not None:
            assert want is not None
            assert got == want  # Mechanism compares by type and param
        elif want is not None:  # the general path's: a parameter, PSS/OAEP or no data
            if fast is read_sign_init:
                mech = want[1]
                assert getattr(mech, "param", None) or getattr(mech, "type", 0) in (0x09, 0x0D)
            else:
                assert want[1] is None
