"""appliance.signing.composite: IETF composite ML-DSA (draft-ietf-lamps-pq-composite-sigs-19).

Known answers come from two places:

* the draft's official test vectors (``tests/vectors/composite/testvectors.json``, an
  unmodified copy of ``src/testvectors.json`` at the ``-19`` tag of
  lamps-wg/draft-composite-sigs; see ``tests/vectors/PROVENANCE.md``): signatures with and
  without context verify, the public key and its SPKI match the vector certificate byte
  for byte, the certificate's own composite signature verifies, and the vector private
  keys sign again through :func:`sign`;
* the draft's byte-level definitions: Prefix and Label as hex, the AlgorithmIdentifier
  DER, and the M' construction examples of its appendix "Message Representative
  Examples".

No token is needed: the classical half uses ``cryptography`` software keys exactly the way
the service drives a token's raw mechanisms (``CKM_ECDSA`` on SHA-384(M'), ``CKM_EDDSA``
on M').
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
)

from appliance.errors import CallerError, DeviceError, SignatureInvalid
from appliance.pqc import MLDSA87_PUBLIC_LEN, MLDSA87_SIG_LEN, MlDsaSigner, active_backend
from appliance.signing import composite
from appliance.signing.composite import (
    DRAFT,
    PARAMS,
    PREFIX,
    ClassicalInput,
    CompositeAlg,
    CompositeParams,
    classical_digest,
    decode_public_key,
    decode_signature,
    encode_public_key,
    encode_signature,
    load_public_key_spki,
    message_representative,
    parse_composite_alg,
    public_key_pem,
    public_key_spki,
    sign,
    verify,
)

P384: Final = PARAMS[CompositeAlg.MLDSA87_ECDSA_P384_SHA512]
ED448: Final = PARAMS[CompositeAlg.MLDSA87_ED448_SHAKE256]
BOTH: Final = [
    pytest.param(CompositeAlg.MLDSA87_ECDSA_P384_SHA512, id="p384"),
    pytest.param(CompositeAlg.MLDSA87_ED448_SHAKE256, id="ed448"),
]
MSG: Final = b"composite test message"

# -- byte-level facts of the draft, written out by hand from its text -----------------------

#: "CompositeAlgorithmSignatures2025" (draft §2.2 gives this hex).
PREFIX_HEX: Final = "436f6d706f73697465416c676f726974686d5369676e61747572657332303235"
#: ASCII of the Labels in draft §6 (src/algParams.md): "COMPSIG-MLDSA87-ECDSA-P384-SHA512" and
#: "COMPSIG-MLDSA87-Ed448-SHAKE256".
LABEL_HEX: Final = {
    CompositeAlg.MLDSA87_ECDSA_P384_SHA512: (
        "434f4d505349472d4d4c44534138372d45434453412d503338342d534841353132"
    ),
    CompositeAlg.MLDSA87_ED448_SHAKE256: (
        "434f4d505349472d4d4c44534138372d45643434382d5348414b45323536"
    ),
}
#: AlgorithmIdentifier ::= SEQUENCE { OID 1.3.6.1.5.5.7.6.49 / .51 }, parameters absent.
ALG_ID_HEX: Final = {
    CompositeAlg.MLDSA87_ECDSA_P384_SHA512: "300a06082b06010505070631",
    CompositeAlg.MLDSA87_ED448_SHAKE256: "300a06082b06010505070633",
}

# -- the official vectors ------------------------------------------------------------------

VECTOR_FILE: Final = (
    Path(__file__).resolve().parents[1] / "vectors" / "composite" / "testvectors.json"
)
VECTOR_SHA256: Final = "a60f697f9fd94c3cd5e4501a40c4396d9a9ffc7cf0f8a1ddd87dedbb46a7abf0"
TCID: Final = {
    CompositeAlg.MLDSA87_ECDSA_P384_SHA512: "id-MLDSA87-ECDSA-P384-SHA512",
    CompositeAlg.MLDSA87_ED448_SHAKE256: "id-MLDSA87-Ed448-SHAKE256",
}


def _load_vectors() -> dict[str, Any]:
    raw = VECTOR_FILE.read_bytes()
    if hashlib.sha256(raw).hexdigest() != VECTOR_SHA256:
        raise AssertionError(f"{VECTOR_FILE.name} differs from the pinned copy")
    data: dict[str, Any] = json.loads(raw)
    return data


VECTORS: Final = _load_vectors()
V_MSG: Final = base64.b64decode(VECTORS["m"])
V_CTX: Final = base64.b64decode(VECTORS["ctx"])


def _vector(alg: CompositeAlg) -> dict[str, bytes]:
    (case,) = [t for t in VECTORS["tests"] if t["tcId"] == TCID[alg]]
    return {k: base64.b64decode(v) for k, v in case.items() if k != "tcId"}


# -- a minimal DER walker, independent of the module's own parser ---------------------------


def _tlv(data: bytes, pos: int = 0) -> tuple[int, int, int]:
    """(tag, content start, end) of the TLV at ``pos``."""
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first & 0x80:
        n = first & 0x7F
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    else:
        length = first
    return tag, pos, pos + length


def _children(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """Each child of a constructed value's content as (tag, whole TLV, content)."""
    out, pos = [], 0
    while pos < len(data):
        tag, start, end = _tlv(data, pos)
        out.append((tag, data[pos:end], data[start:end]))
        pos = end
    return out


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(body))) + body + content


# -- software keys standing in for the token ------------------------------------------------


@dataclass
class Key:
    """One composite key: ML-DSA from a seed, the classical half as a software key."""

    params: CompositeParams
    mldsa: MlDsaSigner
    classical: ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey

    @property
    def classical_public(self) -> bytes:
        pub = self.classical.public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            return pub.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
        return pub.public_bytes_raw()

    @property
    def public(self) -> bytes:
        return encode_public_key(self.params, self.mldsa.public_bytes(), self.classical_public)

    def classical_sign(self, data: bytes) -> bytes:
        """What the service's token closure does: raw mechanism on classical_digest()."""
        if isinstance(self.classical, ec.EllipticCurvePrivateKey):
            assert len(data) == 48  # SHA-384(M') for CKM_ECDSA
            return self.classical.sign(data, ec.ECDSA(Prehashed(hashes.SHA384())))
        return self.classical.sign(data)  # M' for CKM_EDDSA (pure Ed448)

    def sign(self, message: bytes, context: bytes = b"") -> bytes:
        return sign(self.params, self.mldsa, self.classical_sign, message, context)


def _new_key(alg: CompositeAlg) -> Key:
    params = PARAMS[alg]
    classical: ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey
    if params.classical == "ecdsa-p384":
        classical = ec.generate_private_key(ec.SECP384R1())
    else:
        classical = ed448.Ed448PrivateKey.generate()
    return Key(params, active_backend().mldsa87_from_seed(os.urandom(32)), classical)


_KEYS: dict[tuple[CompositeAlg, int], Key] = {}


def key(alg: CompositeAlg, n: int = 0) -> Key:
    """Key number ``n`` of ``alg``, made once per test session."""
    if (alg, n) not in _KEYS:
        _KEYS[(alg, n)] = _new_key(alg)
    return _KEYS[(alg, n)]


_SIGS: dict[tuple[CompositeAlg, int, bytes, bytes], bytes] = {}


def sig(alg: CompositeAlg, n: int = 0, message: bytes = MSG, context: bytes = b"") -> bytes:
    """A signature by key ``n`` of ``alg``, made once per test session."""
    k = (alg, n, message, context)
    if k not in _SIGS:
        _SIGS[k] = key(alg, n).sign(message, context)
    return _SIGS[k]


def other(alg: CompositeAlg) -> CompositeAlg:
    (o,) = [a for a in CompositeAlg if a is not alg]
    return o


# == the draft's constants ===================================================================


def test_draft_version() -> None:
    assert DRAFT == "draft-ietf-lamps-pq-composite-sigs-19"


def test_prefix_bytes() -> None:
    assert PREFIX.hex() == PREFIX_HEX
    assert PREFIX == b"CompositeAlgorithmSignatures2025"


@pytest.mark.parametrize("alg", BOTH)
def test_params_match_the_draft(alg: CompositeAlg) -> None:
    p = PARAMS[alg]
    assert p.alg is alg
    assert p.label.hex() == LABEL_HEX[alg]
    assert p.label == b"COMPSIG-" + p.name.encode("ascii")
    expected = {
        CompositeAlg.MLDSA87_ECDSA_P384_SHA512: (
            "1.3.6.1.5.5.7.6.49",
            "ecdsa-p384",
            "sha512",
            "sha384",
            97,
        ),
        CompositeAlg.MLDSA87_ED448_SHAKE256: (
            "1.3.6.1.5.5.7.6.51",
            "ed448",
            "shake256-64",
            None,
            57,
        ),
    }[alg]
    assert (p.oid, p.classical, p.prehash, p.classical_hash, p.classical_public_len) == expected
    assert p.public_len == MLDSA87_PUBLIC_LEN + p.classical_public_len


def test_parse_composite_alg() -> None:
    for alg, p in PARAMS.items():
        assert parse_composite_alg(alg.value) is p
        assert parse_composite_alg(alg.value.upper()) is p
        assert parse_composite_alg("id-" + p.name) is p
        assert parse_composite_alg(p.name) is p
        assert parse_composite_alg(p.oid) is p
    with pytest.raises(CallerError) as err:
        parse_composite_alg("mldsa87-ecdsa-p256")
    for alg in CompositeAlg:
        assert alg.value in str(err.value)


# == M' ==========================================================================================

# The draft's appendix "Message Representative Examples" (src/messageFormatSample_*.md at
# the -19 tag): id-MLDSA65-ECDSA-P256-SHA512, M = 00..09, without and with an 8-byte ctx.
# That algorithm's PH is SHA-512 like ours, so only the Label differs.
SAMPLE_M: Final = bytes(range(10))
SAMPLE_CTX: Final = bytes.fromhex("0813061205162623")
SAMPLE_PH: Final = (
    "0f89ee1fcb7b0a4f7809d1267a029719004c5a5e5ec323a7c3523a20974f9a3f"
    "202f56fadba4cd9e8d654ab9f2e96dc5c795ea176fa20ede8d854c342f903533"
)
SAMPLE_LABEL_HEX: Final = "434f4d505349472d4d4c44534136352d45434453412d503235362d534841353132"


@pytest.mark.parametrize(
    ("ctx", "expected"),
    [
        pytest.param(b"", PREFIX_HEX + SAMPLE_LABEL_HEX + "00" + SAMPLE_PH, id="no-ctx"),
        pytest.param(
            SAMPLE_CTX,
            PREFIX_HEX + SAMPLE_LABEL_HEX + "08" + SAMPLE_CTX.hex() + SAMPLE_PH,
            id="ctx",
        ),
    ],
)
def test_message_representative_draft_example(ctx: bytes, expected: str) -> None:
    sample = dataclasses.replace(P384, label=b"COMPSIG-MLDSA65-ECDSA-P256-SHA512")
    assert sample.label.hex() == SAMPLE_LABEL_HEX
    assert message_representative(sample, SAMPLE_M, ctx).hex() == expected


@pytest.mark.parametrize("alg", BOTH)
@pytest.mark.parametrize("ctx", [b"", b"x", bytes(range(255))], ids=["empty", "1", "255"])
def test_message_representative_layout(alg: CompositeAlg, ctx: bytes) -> None:
    p = PARAMS[alg]
    m_prime = message_representative(p, MSG, ctx)
    if alg is CompositeAlg.MLDSA87_ECDSA_P384_SHA512:
        ph = hashlib.sha512(MSG).digest()
    else:
        ph = hashlib.shake_256(MSG).digest(64)
    expected = bytes.fromhex(PREFIX_HEX + LABEL_HEX[alg]) + bytes((len(ctx),)) + ctx + ph
    assert m_prime == expected
    # buffers other than bytes give the same M'
    assert message_representative(p, bytearray(MSG), bytearray(ctx)) == expected
    assert message_representative(p, memoryview(MSG), memoryview(ctx)) == expected


@pytest.mark.parametrize("alg", BOTH)
def test_context_too_long(alg: CompositeAlg) -> None:
    p, k = PARAMS[alg], key(alg)
    with pytest.raises(CallerError):
        message_representative(p, MSG, bytes(256))
    with pytest.raises(CallerError):
        k.sign(MSG, bytes(256))
    with pytest.raises(CallerError):
        verify(p, k.public, MSG, sig(alg), bytes(256))


def test_classical_digest() -> None:
    mp = message_representative(P384, MSG, b"ctx")
    assert classical_digest(P384, mp) == ClassicalInput("sha384", hashlib.sha384(mp).digest())
    assert classical_digest(P384, mp) != ClassicalInput("sha512", hashlib.sha512(mp).digest())
    mp448 = message_representative(ED448, MSG, b"ctx")
    assert classical_digest(ED448, bytearray(mp448)) == ClassicalInput(None, mp448)
    hash_name, data = classical_digest(ED448, mp448)  # still a plain 2-tuple
    assert (hash_name, data) == (None, mp448)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(MSG, id="raw-message"),
        pytest.param(b"", id="empty"),
        pytest.param(PREFIX, id="prefix-only"),
    ],
)
@pytest.mark.parametrize("alg", BOTH)
def test_classical_digest_wants_m_prime(alg: CompositeAlg, bad: bytes) -> None:
    with pytest.raises(CallerError):
        classical_digest(PARAMS[alg], bad)


@pytest.mark.parametrize("alg", BOTH)
def test_classical_digest_refuses_the_other_algorithms_m_prime(alg: CompositeAlg) -> None:
    mp = message_representative(PARAMS[other(alg)], MSG)
    with pytest.raises(CallerError):
        classical_digest(PARAMS[alg], mp)
    with pytest.raises(CallerError):  # a length that does not add up
        classical_digest(PARAMS[alg], message_representative(PARAMS[alg], MSG) + b"\x00")


# == official vectors =========================================================================


def test_vector_file_is_pinned() -> None:
    assert hashlib.sha256(VECTOR_FILE.read_bytes()).hexdigest() == VECTOR_SHA256
    provenance = (VECTOR_FILE.parents[1] / "PROVENANCE.md").read_text(encoding="utf-8")
    assert f"| `composite/testvectors.json` | `{VECTOR_SHA256}` |" in provenance
    assert V_MSG == b"The quick brown fox jumps over the lazy dog."
    assert len(V_CTX) == 71


@pytest.mark.parametrize("alg", BOTH)
def test_vector_signatures_verify(alg: CompositeAlg) -> None:
    p, v = PARAMS[alg], _vector(alg)
    verify(p, v["pk"], V_MSG, v["s"])
    verify(p, v["pk"], V_MSG, v["sWithContext"], V_CTX)
    verify(p, bytearray(v["pk"]), memoryview(V_MSG), bytearray(v["s"]), b"")
    with pytest.raises(SignatureInvalid):
        verify(p, v["pk"], V_MSG, v["s"], V_CTX)
    with pytest.raises(SignatureInvalid):
        verify(p, v["pk"], V_MSG, v["sWithContext"])
    with pytest.raises(SignatureInvalid):
        verify(p, v["pk"], V_MSG + b" ", v["s"])


@pytest.mark.parametrize("alg", BOTH)
def test_vector_component_facts(alg: CompositeAlg) -> None:
    """What the vectors pin beyond verify(): who signs what, with which hash and context."""
    p, v = PARAMS[alg], _vector(alg)
    mldsa_pk, trad_pk = decode_public_key(p, v["pk"])
    mldsa_sig, trad_sig = decode_signature(p, v["s"])
    m_prime = message_representative(p, V_MSG)
    backend = active_backend()
    backend.mldsa87_verify(mldsa_pk, m_prime, mldsa_sig, p.label)  # ML-DSA: ctx = Label
    with pytest.raises(SignatureInvalid):
        backend.mldsa87_verify(mldsa_pk, m_prime, mldsa_sig, b"")
    if alg is CompositeAlg.MLDSA87_ECDSA_P384_SHA512:
        assert trad_pk[0] == 0x04
        assert len(trad_pk) == 97
        pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), trad_pk)
        decode_dss_signature(trad_sig)  # DER Ecdsa-Sig-Value
        pub.verify(trad_sig, m_prime, ec.ECDSA(hashes.SHA384()))  # ecdsa-with-SHA384 over M'
        with pytest.raises(InvalidSignature):
            pub.verify(trad_sig, m_prime, ec.ECDSA(hashes.SHA512()))
    else:
        assert len(trad_pk) == 57
        assert len(trad_sig) == 114
        ed448.Ed448PublicKey.from_public_bytes(trad_pk).verify(trad_sig, m_prime)


@pytest.mark.parametrize("alg", BOTH)
def test_vector_public_key_and_spki(alg: CompositeAlg) -> None:
    """Our SPKI equals the one in the vector's self-signed certificate, byte for byte,
    and the certificate's composite signature over its TBSCertificate verifies."""
    p, v = PARAMS[alg], _vector(alg)
    mldsa_pk, trad_pk = decode_public_key(p, v["pk"])
    assert encode_public_key(p, mldsa_pk, trad_pk) == v["pk"]

    cert = v["x5c"]
    tag, start, end = _tlv(cert)
    assert tag == 0x30
    assert end == len(cert)
    (tbs_tag, tbs, tbs_body), (_, sig_alg, _), (bits_tag, _, bits) = _children(cert[start:end])
    assert tbs_tag == 0x30
    assert bits_tag == 0x03
    assert bits[0] == 0
    fields = _children(tbs_body)
    assert fields[0][0] == 0xA0  # version [0] present, so the SPKI is field 6
    spki = fields[6][1]

    assert public_key_spki(p, v["pk"]) == spki
    assert load_public_key_spki(spki) == (p, v["pk"])
    assert sig_alg.hex() == ALG_ID_HEX[alg]  # signatureAlgorithm: our OID, no parameters
    verify(p, v["pk"], tbs, bits[1:])


@pytest.mark.parametrize("alg", BOTH)
def test_vector_private_keys_sign_again(alg: CompositeAlg) -> None:
    """sk = mldsaSeed (32) || tradSK: our sign() with those keys verifies under the vector pk."""
    p, v = PARAMS[alg], _vector(alg)
    signer = active_backend().mldsa87_from_seed(v["sk"][:32])
    assert signer.public_bytes() == v["pk"][:MLDSA87_PUBLIC_LEN]
    classical: ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey
    if alg is CompositeAlg.MLDSA87_ECDSA_P384_SHA512:
        loaded = serialization.load_der_private_key(v["sk"][32:], None)  # ECPrivateKey
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        classical = loaded
    else:
        classical = ed448.Ed448PrivateKey.from_private_bytes(v["sk"][32:])
    k = Key(p, signer, classical)
    assert k.public == v["pk"]
    for ctx in (b"", V_CTX):
        s = sign(p, signer, k.classical_sign, V_MSG, ctx, composite_public=v["pk"])
        verify(p, v["pk"], V_MSG, s, ctx)


# == round trips ================================================================================


@pytest.mark.parametrize("alg", BOTH)
@pytest.mark.parametrize("ctx", [b"", b"application ctx", bytes(255)], ids=["empty", "ctx", "255"])
def test_round_trip(alg: CompositeAlg, ctx: bytes) -> None:
    p, k = PARAMS[alg], key(alg)
    s = sign(p, k.mldsa, k.classical_sign, MSG, ctx, composite_public=k.public)
    assert len(s) > MLDSA87_SIG_LEN
    verify(p, k.public, MSG, s, ctx)
    mldsa_sig, trad_sig = decode_signature(p, s)
    assert encode_signature(mldsa_sig, trad_sig) == s


@pytest.mark.parametrize("alg", BOTH)
def test_round_trip_buffer_inputs(alg: CompositeAlg) -> None:
    p, k = PARAMS[alg], key(alg)
    s = sign(p, k.mldsa, k.classical_sign, bytearray(MSG), memoryview(b"ctx"))
    verify(p, memoryview(k.public), bytearray(MSG), memoryview(s), bytearray(b"ctx"))
    verify(p, bytearray(k.public), memoryview(MSG), bytearray(s), b"ctx")
    assert decode_signature(p, bytearray(s)) == decode_signature(p, s)
    assert encode_signature(bytearray(s[:MLDSA87_SIG_LEN]), memoryview(s[MLDSA87_SIG_LEN:])) == s


def test_empty_message() -> None:
    for alg in CompositeAlg:
        k = key(alg)
        verify(k.params, k.public, b"", k.sign(b""))


def test_signing_is_randomized() -> None:
    # hedged ML-DSA (and randomized ECDSA): two signatures of the same input differ
    for alg in CompositeAlg:
        assert key(alg).sign(MSG) != key(alg).sign(MSG)


# == rejections ===================================================================================


def _mutations(alg: CompositeAlg) -> dict[str, bytes]:
    s = sig(alg)
    same_key_other_msg = sig(alg, 0, b"another message")
    other_key_same_msg = sig(alg, 1)
    return {
        "mldsa-from-other-msg": same_key_other_msg[:MLDSA87_SIG_LEN] + s[MLDSA87_SIG_LEN:],
        "mldsa-from-other-key": other_key_same_msg[:MLDSA87_SIG_LEN] + s[MLDSA87_SIG_LEN:],
        "classical-from-other-msg": s[:MLDSA87_SIG_LEN] + same_key_other_msg[MLDSA87_SIG_LEN:],
        "classical-from-other-key": s[:MLDSA87_SIG_LEN] + other_key_same_msg[MLDSA87_SIG_LEN:],
        "truncated": s[:-1],
        "extended": s + b"\x00",
        "empty": b"",
        "mldsa-alone": s[:MLDSA87_SIG_LEN],
        "classical-alone": s[MLDSA87_SIG_LEN:],
        "mldsa-bit-flip": bytes((s[0] ^ 1,)) + s[1:],
        "classical-bit-flip": s[:-1] + bytes((s[-1] ^ 1,)),
        "zeros": bytes(len(s)),
    }


MUTATIONS: Final = [
    "mldsa-from-other-msg",
    "mldsa-from-other-key",
    "classical-from-other-msg",
    "classical-from-other-key",
    "truncated",
    "extended",
    "empty",
    "mldsa-alone",
    "classical-alone",
    "mldsa-bit-flip",
    "classical-bit-flip",
    "zeros",
]


@pytest.mark.parametrize("alg", BOTH)
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_rejects_tampered_signature(alg: CompositeAlg, mutation: str) -> None:
    k = key(alg)
    bad = _mutations(alg)[mutation]
    with pytest.raises(SignatureInvalid) as err:
        verify(k.params, k.public, MSG, bad)
    assert str(err.value) == "composite signature invalid"  # one message for every failure


@pytest.mark.parametrize("alg", BOTH)
def test_rejects_wrong_message_and_context(alg: CompositeAlg) -> None:
    k = key(alg)
    for message, ctx, s in [
        (MSG + b"!", b"", sig(alg)),
        (MSG[:-1], b"", sig(alg)),
        (MSG, b"ctx", sig(alg)),
        (MSG, b"", sig(alg, 0, MSG, b"ctx")),
        (MSG, b"ctX", sig(alg, 0, MSG, b"ctx")),
    ]:
        with pytest.raises(SignatureInvalid):
            verify(k.params, k.public, message, s, ctx)


@pytest.mark.parametrize("alg", BOTH)
def test_rejects_other_key(alg: CompositeAlg) -> None:
    with pytest.raises(SignatureInvalid):
        verify(PARAMS[alg], key(alg, 1).public, MSG, sig(alg))


@pytest.mark.parametrize("alg", BOTH)
def test_rejects_signature_of_the_other_algorithm(alg: CompositeAlg) -> None:
    o = other(alg)
    with pytest.raises(SignatureInvalid):
        verify(PARAMS[o], key(o).public, MSG, sig(alg))
    with pytest.raises(SignatureInvalid):
        decode_signature(PARAMS[o], sig(alg))


@pytest.mark.parametrize("alg", BOTH)
def test_mldsa_part_is_not_a_plain_mldsa_signature(alg: CompositeAlg) -> None:
    """Domain separation: the ML-DSA part only verifies over M' with ctx = Label."""
    p, k = PARAMS[alg], key(alg)
    mldsa_sig, _ = decode_signature(p, sig(alg))
    pk = k.mldsa.public_bytes()
    backend = active_backend()
    m_prime = message_representative(p, MSG)
    backend.mldsa87_verify(pk, m_prime, mldsa_sig, p.label)  # the rule holds, so ...
    with pytest.raises(SignatureInvalid):  # ... not a plain signature over M, empty ctx
        backend.mldsa87_verify(pk, MSG, mldsa_sig, b"")
    with pytest.raises(SignatureInvalid):  # nor over M with the Label
        backend.mldsa87_verify(pk, MSG, mldsa_sig, p.label)
    with pytest.raises(SignatureInvalid):  # nor over M' with empty ctx (draft §9.2.3)
        backend.mldsa87_verify(pk, m_prime, mldsa_sig, b"")


def test_classical_part_alone_is_a_standard_signature_over_m_prime() -> None:
    """Documented weak non-separability: the classical part is an ordinary signature, but
    over M', which starts with the composite Prefix, never over M."""
    k = key(CompositeAlg.MLDSA87_ECDSA_P384_SHA512)
    _, trad = decode_signature(P384, sig(CompositeAlg.MLDSA87_ECDSA_P384_SHA512))
    pub = k.classical.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    m_prime = message_representative(P384, MSG)
    assert m_prime.startswith(PREFIX)
    pub.verify(trad, m_prime, ec.ECDSA(hashes.SHA384()))
    with pytest.raises(InvalidSignature):
        pub.verify(trad, MSG, ec.ECDSA(hashes.SHA384()))


def _non_der_ecdsa_variants(trad: bytes) -> dict[str, bytes]:
    (_, r, _), (_, s, _) = [(t, whole, body) for t, whole, body in _children(trad[2:])]
    return {
        "long-form-length": b"\x30\x81" + bytes((trad[1],)) + trad[2:],
        "padded-r": _der(0x30, b"\x02" + bytes((r[1] + 1,)) + b"\x00" + r[2:] + s),
        "trailing-inside": _der(0x30, r + s + b"\x00"),
        "three-integers": _der(0x30, r + s + b"\x02\x01\x01"),
        "zero-r": _der(0x30, b"\x02\x01\x00" + s),
        "negative-s": _der(0x30, r + b"\x02\x01\xff"),
        "not-a-sequence": b"\x31" + trad[1:],
    }


@pytest.mark.parametrize(
    "variant",
    [
        "long-form-length",
        "padded-r",
        "trailing-inside",
        "three-integers",
        "zero-r",
        "negative-s",
        "not-a-sequence",
    ],
)
def test_rejects_non_der_ecdsa_part(variant: str) -> None:
    alg = CompositeAlg.MLDSA87_ECDSA_P384_SHA512
    k, s = key(alg), sig(alg)
    bad = s[:MLDSA87_SIG_LEN] + _non_der_ecdsa_variants(s[MLDSA87_SIG_LEN:])[variant]
    with pytest.raises(SignatureInvalid):
        decode_signature(P384, bad)
    with pytest.raises(SignatureInvalid):
        verify(P384, k.public, MSG, bad)


# == public keys and SPKI =========================================================================


@pytest.mark.parametrize("alg", BOTH)
def test_public_key_round_trip(alg: CompositeAlg) -> None:
    p, k = PARAMS[alg], key(alg)
    pk = k.public
    assert len(pk) == p.public_len
    assert pk == k.mldsa.public_bytes() + k.classical_public
    assert decode_public_key(p, pk) == (k.mldsa.public_bytes(), k.classical_public)
    assert decode_public_key(p, bytearray(pk)) == decode_public_key(p, memoryview(pk))
    assert encode_public_key(p, bytearray(pk[:2592]), memoryview(pk[2592:])) == pk


@pytest.mark.parametrize("alg", BOTH)
def test_public_key_wrong_lengths(alg: CompositeAlg) -> None:
    p, k = PARAMS[alg], key(alg)
    pk = k.public
    for bad in (pk[:-1], pk + b"\x00", pk[:MLDSA87_PUBLIC_LEN], b""):
        with pytest.raises(CallerError):
            decode_public_key(p, bad)
        with pytest.raises(CallerError):
            public_key_spki(p, bad)
        with pytest.raises(CallerError):
            verify(p, bad, MSG, sig(alg))
    with pytest.raises(CallerError):
        encode_public_key(p, pk[: MLDSA87_PUBLIC_LEN - 1], k.classical_public)
    with pytest.raises(CallerError):
        encode_public_key(p, pk[:MLDSA87_PUBLIC_LEN], k.classical_public[:-1])
    with pytest.raises(CallerError):  # the other algorithm's public key
        decode_public_key(p, key(other(alg)).public)


def test_ecdsa_public_key_must_be_an_uncompressed_curve_point() -> None:
    k = key(CompositeAlg.MLDSA87_ECDSA_P384_SHA512)
    pk = k.public
    not_on_curve = pk[:-1] + bytes((pk[-1] ^ 1,))
    wrong_form = pk[:MLDSA87_PUBLIC_LEN] + b"\x06" + pk[MLDSA87_PUBLIC_LEN + 1 :]
    compressed = k.classical.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    for bad in (not_on_curve, wrong_form):
        with pytest.raises(CallerError):
            decode_public_key(P384, bad)
    with pytest.raises(CallerError):
        encode_public_key(P384, pk[:MLDSA87_PUBLIC_LEN], compressed)
    with pytest.raises(CallerError):
        encode_public_key(P384, pk[:MLDSA87_PUBLIC_LEN], compressed + bytes(48))


@pytest.mark.parametrize("alg", BOTH)
def test_spki_round_trip_and_shape(alg: CompositeAlg) -> None:
    p, k = PARAMS[alg], key(alg)
    spki = public_key_spki(p, k.public)
    assert load_public_key_spki(spki) == (p, k.public)
    assert load_public_key_spki(bytearray(spki)) == (p, k.public)
    tag, start, end = _tlv(spki)
    assert tag == 0x30
    assert end == len(spki)
    (alg_tag, alg_id, alg_body), (bits_tag, _, bits) = _children(spki[start:end])
    assert alg_tag == 0x30
    assert alg_id.hex() == ALG_ID_HEX[alg]
    assert [t for t, _, _ in _children(alg_body)] == [0x06]  # OID only: parameters absent
    assert bits_tag == 0x03
    assert bits == b"\x00" + k.public


@pytest.mark.parametrize("alg", BOTH)
def test_pem_round_trip(alg: CompositeAlg) -> None:
    p, k = PARAMS[alg], key(alg)
    pem = public_key_pem(p, k.public)
    lines = pem.decode("ascii").splitlines()
    assert lines[0] == "-----BEGIN PUBLIC KEY-----"
    assert lines[-1] == "-----END PUBLIC KEY-----"
    assert all(len(line) <= 64 for line in lines)
    assert pem.endswith(b"\n")
    assert base64.b64decode("".join(lines[1:-1])) == public_key_spki(p, k.public)
    assert load_public_key_spki(pem) == (p, k.public)
    assert load_public_key_spki(b"\n" + pem.replace(b"\n", b"\r\n")) == (p, k.public)


def _spki_parts(alg: CompositeAlg) -> tuple[bytes, bytes]:
    """(AlgorithmIdentifier, BIT STRING) of a good SPKI, whole TLVs."""
    spki = public_key_spki(PARAMS[alg], key(alg).public)
    _, start, end = _tlv(spki)
    (_, alg_id, _), (_, bits, _) = _children(spki[start:end])
    return alg_id, bits


def _bad_spkis(alg: CompositeAlg) -> dict[str, bytes]:
    alg_id, bits = _spki_parts(alg)
    oid = _children(alg_id[2:])[0][1]
    pk = key(alg).public
    other_alg_id, _ = _spki_parts(other(alg))
    good = _der(0x30, alg_id + bits)
    return {
        "trailing-after": good + b"\x00",
        "trailing-inside": _der(0x30, alg_id + bits + b"\x05\x00"),
        "params-null": _der(0x30, _der(0x30, oid + b"\x05\x00") + bits),
        "params-empty-seq": _der(0x30, _der(0x30, oid + b"\x30\x00") + bits),
        "oid-brainpool": _der(0x30, bytes.fromhex("300a06082b06010505070632") + bits),
        "oid-ml-dsa-87": _der(0x30, bytes.fromhex("300b0609608648016503040313") + bits),
        "oid-of-other-alg": _der(0x30, other_alg_id + bits),
        "unused-bits": _der(0x30, alg_id + _der(0x03, b"\x01" + pk)),
        "key-short": _der(0x30, alg_id + _der(0x03, b"\x00" + pk[:-1])),
        "key-long": _der(0x30, alg_id + _der(0x03, b"\x00" + pk + b"\x00")),
        "octet-string": _der(0x30, alg_id + _der(0x04, pk)),
        "empty-bit-string": _der(0x30, alg_id + b"\x03\x00"),
        "non-minimal-length": b"\x30\x83\x00" + good[2:],
        "indefinite-length": b"\x30\x80" + good[4:] + b"\x00\x00",
        "truncated": good[:-1],
        "empty": b"",
        "not-der": b"\x00" * 16,
    }


BAD_SPKIS: Final = [
    "trailing-after",
    "trailing-inside",
    "params-null",
    "params-empty-seq",
    "oid-brainpool",
    "oid-ml-dsa-87",
    "oid-of-other-alg",
    "unused-bits",
    "key-short",
    "key-long",
    "octet-string",
    "empty-bit-string",
    "non-minimal-length",
    "indefinite-length",
    "truncated",
    "empty",
    "not-der",
]


@pytest.mark.parametrize("alg", BOTH)
@pytest.mark.parametrize("variant", BAD_SPKIS)
def test_spki_rejections(alg: CompositeAlg, variant: str) -> None:
    bad = _bad_spkis(alg)[variant]
    with pytest.raises(CallerError):
        load_public_key_spki(bad)


@pytest.mark.parametrize(
    "pem",
    [
        pytest.param(b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n", id="label"),
        pytest.param(b"-----BEGIN PUBLIC KEY-----\nMA*=\n-----END PUBLIC KEY-----\n", id="base64"),
        pytest.param(b"-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n", id="empty"),
        pytest.param(b"-----BEGIN PUBLIC KEY-----\nMAA=\n", id="no-end"),
        pytest.param("-----BEGIN PUBLIC KEY-----\né\n".encode(), id="not-ascii"),
    ],
)
def test_pem_rejections(pem: bytes) -> None:
    with pytest.raises(CallerError):
        load_public_key_spki(pem)


def test_pem_rejects_two_blocks() -> None:
    pem = public_key_pem(P384, key(CompositeAlg.MLDSA87_ECDSA_P384_SHA512).public)
    with pytest.raises(CallerError):
        load_public_key_spki(pem + pem)


def test_home_made_params_are_refused() -> None:
    forged = dataclasses.replace(P384, label=b"COMPSIG-SOMETHING-ELSE")
    k = key(CompositeAlg.MLDSA87_ECDSA_P384_SHA512)
    with pytest.raises(CallerError):
        public_key_spki(forged, k.public)
    with pytest.raises(CallerError):
        verify(forged, k.public, MSG, sig(CompositeAlg.MLDSA87_ECDSA_P384_SHA512))
    with pytest.raises(CallerError):
        sign(forged, k.mldsa, k.classical_sign, MSG)


# == sign(): what the token closure must return ====================================================


def test_sign_rejects_raw_ecdsa() -> None:
    """CKM_ECDSA returns r‖s; sign() wants the DER Ecdsa-Sig-Value."""
    k = key(CompositeAlg.MLDSA87_ECDSA_P384_SHA512)

    def raw_rs(digest: bytes) -> bytes:
        r, s = decode_dss_signature(k.classical_sign(digest))
        return r.to_bytes(48, "big") + s.to_bytes(48, "big")

    with pytest.raises(DeviceError):
        sign(P384, k.mldsa, raw_rs, MSG)


def test_sign_self_check_catches_the_wrong_ecdsa_hash() -> None:
    """A token fed SHA-512(M') instead of SHA-384(M') (or any wrong input) makes a
    well-formed but invalid signature; composite_public turns that into DeviceError."""
    k = key(CompositeAlg.MLDSA87_ECDSA_P384_SHA512)
    assert isinstance(k.classical, ec.EllipticCurvePrivateKey)
    key_ = k.classical
    m_prime: list[bytes] = []

    def wrong_hash(digest: bytes) -> bytes:
        return key_.sign(hashlib.sha512(m_prime[0]).digest(), ec.ECDSA(Prehashed(hashes.SHA512())))

    m_prime.append(message_representative(P384, MSG))
    unchecked = sign(P384, k.mldsa, wrong_hash, MSG)
    with pytest.raises(SignatureInvalid):
        verify(P384, k.public, MSG, unchecked)
    with pytest.raises(DeviceError):
        sign(P384, k.mldsa, wrong_hash, MSG, composite_public=k.public)


@pytest.mark.parametrize("alg", BOTH)
def test_sign_rejects_malformed_classical_output(alg: CompositeAlg) -> None:
    p, k = PARAMS[alg], key(alg)
    outputs: list[Callable[[bytes], Any]] = [
        lambda d: b"",
        lambda d: k.classical_sign(d) + b"\x00",
        lambda d: k.classical_sign(d)[:-1],
        lambda d: "not bytes",
        lambda d: None,
    ]
    for closure in outputs:
        with pytest.raises(DeviceError):
            sign(p, k.mldsa, closure, MSG)


@pytest.mark.parametrize("alg", BOTH)
def test_sign_refuses_a_foreign_mldsa_key(alg: CompositeAlg) -> None:
    p, k = PARAMS[alg], key(alg)
    with pytest.raises(CallerError):
        sign(p, key(alg, 1).mldsa, k.classical_sign, MSG, composite_public=k.public)


def test_classical_closure_gets_what_classical_digest_says() -> None:
    seen: dict[CompositeAlg, bytes] = {}
    for alg in CompositeAlg:
        k = key(alg)

        def spy(data: bytes, k: Key = k, alg: CompositeAlg = alg) -> bytes:
            seen[alg] = data
            return k.classical_sign(data)

        sign(k.params, k.mldsa, spy, MSG, b"c")
        assert (
            seen[alg]
            == classical_digest(k.params, message_representative(k.params, MSG, b"c")).data
        )
    assert len(seen[CompositeAlg.MLDSA87_ECDSA_P384_SHA512]) == 48
    assert seen[CompositeAlg.MLDSA87_ED448_SHAKE256].startswith(PREFIX + ED448.label)


def test_encode_signature_checks_the_mldsa_length() -> None:
    with pytest.raises(CallerError):
        encode_signature(bytes(MLDSA87_SIG_LEN - 1), b"\x30\x00")
    with pytest.raises(CallerError):
        encode_signature(bytes(MLDSA87_SIG_LEN), b"")


# == bad types ======================================================================================


def _bad_type_calls() -> dict[str, Callable[[], object]]:
    k = key(CompositeAlg.MLDSA87_ED448_SHAKE256)
    pk, s = k.public, sig(CompositeAlg.MLDSA87_ED448_SHAKE256)
    wrong: Any = "a str"
    return {
        "parse-int": lambda: parse_composite_alg(5),  # type: ignore[arg-type]
        "params-str": lambda: message_representative(wrong, MSG),
        "mr-message": lambda: message_representative(ED448, wrong),
        "mr-context": lambda: message_representative(ED448, MSG, wrong),
        "mr-int": lambda: message_representative(ED448, 5),  # type: ignore[arg-type]
        "digest": lambda: classical_digest(ED448, wrong),
        "encode-pk": lambda: encode_public_key(ED448, wrong, pk[2592:]),
        "decode-pk": lambda: decode_public_key(ED448, [1, 2, 3]),  # type: ignore[arg-type]
        "spki": lambda: public_key_spki(ED448, wrong),
        "pem": lambda: public_key_pem(ED448, None),  # type: ignore[arg-type]
        "load-spki": lambda: load_public_key_spki(wrong),
        "encode-sig": lambda: encode_signature(wrong, b""),
        "decode-sig": lambda: decode_signature(ED448, wrong),
        "verify-message": lambda: verify(ED448, pk, wrong, s),
        "verify-sig": lambda: verify(ED448, pk, MSG, wrong),
        "verify-pk": lambda: verify(ED448, wrong, MSG, s),
        "sign-message": lambda: sign(ED448, k.mldsa, k.classical_sign, wrong),
        "sign-closure": lambda: sign(ED448, k.mldsa, wrong, MSG),
    }


BAD_TYPE_CALLS: Final = [
    "parse-int",
    "params-str",
    "mr-message",
    "mr-context",
    "mr-int",
    "digest",
    "encode-pk",
    "decode-pk",
    "spki",
    "pem",
    "load-spki",
    "encode-sig",
    "decode-sig",
    "verify-message",
    "verify-sig",
    "verify-pk",
    "sign-message",
    "sign-closure",
]


@pytest.mark.parametrize("call", BAD_TYPE_CALLS)
def test_bad_types(call: str) -> None:
    with pytest.raises(TypeError):
        _bad_type_calls()[call]()


def test_tables_cover_every_case() -> None:
    assert set(BAD_TYPE_CALLS) == set(_bad_type_calls())
    assert set(MUTATIONS) == set(_mutations(CompositeAlg.MLDSA87_ED448_SHAKE256))
    assert set(BAD_SPKIS) == set(_bad_spkis(CompositeAlg.MLDSA87_ED448_SHAKE256))


def test_module_exports() -> None:
    assert sorted(composite.__all__) == sorted(set(composite.__all__))
    for name in composite.__all__:
        assert hasattr(composite, name)
