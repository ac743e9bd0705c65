"""The token backend against a real SoftHSM2 token; signatures checked by the openssl CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from pkcs11 import Attribute, ObjectClass

from appliance.algorithms import ALGORITHMS, ClassicalAlg, der_oid, parse_alg
from appliance.errors import (
    BlobInvalid,
    NoSuchObject,
    PinIncorrect,
    TokenError,
    TokenNotPresent,
)
from appliance.secret import SecretBytes
from appliance.token import TokenConfig
from appliance.token.pkcs11 import Pkcs11Token
from conftest import TokenSpec

pytestmark = pytest.mark.softhsm

ALL_TYPES = [a.value for a in ClassicalAlg]


def open_token(spec: TokenSpec) -> Pkcs11Token:
    return Pkcs11Token.open(TokenConfig(spec.module, spec.label), spec.pin_secret())


def openssl_verify(tmp: Path, alg_name: str, spki: bytes, message: bytes, sig: bytes) -> None:
    """Verify with the openssl command line, exactly as a legacy verifier would."""
    pem = serialization.load_der_public_key(spki).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp / "pub.pem").write_bytes(pem)
    (tmp / "msg").write_bytes(message)
    (tmp / "sig").write_bytes(sig)
    alg = parse_alg(alg_name)
    if alg.edwards:
        cmd = [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            "pub.pem",
            "-rawin",
            "-in",
            "msg",
            "-sigfile",
            "sig",
        ]
    else:
        cmd = [
            "openssl",
            "dgst",
            f"-{alg.hash_name}",
            "-verify",
            "pub.pem",
            "-signature",
            "sig",
            "msg",
        ]
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert b"Verified OK" in proc.stdout or b"Signature Verified Successfully" in proc.stdout


@pytest.mark.parametrize("alg_name", ALL_TYPES)
def test_generate_sign_and_openssl_verifies(
    fresh_token: TokenSpec, tmp_path: Path, alg_name: str
) -> None:
    tok = open_token(fresh_token)
    try:
        alg = parse_alg(alg_name)
        spki = tok.generate_keypair(alg, b"\x01\x02" + alg_name.encode(), f"k-{alg_name}")
        message = b"pay 1 BTC to the cold wallet\n"
        sig = tok.sign(alg, b"\x01\x02" + alg_name.encode(), message)
        openssl_verify(tmp_path, alg_name, spki, message, sig)
        # a flipped message must fail under openssl too
        with pytest.raises(AssertionError):
            openssl_verify(tmp_path, alg_name, spki, message + b"!", sig)
    finally:
        tok.close()


def test_private_keys_are_sensitive_and_never_extractable(fresh_token: TokenSpec) -> None:
    tok = open_token(fresh_token)
    try:
        for alg in ALGORITHMS.values():
            tok.generate_keypair(alg, alg.name.encode(), alg.name)
    finally:
        tok.close()
    lib = pkcs11.lib(fresh_token.module)
    token = lib.get_token(token_label=fresh_token.label)
    with token.open(user_pin=fresh_token.pin.decode()) as s:
        privs = list(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        assert len(privs) == len(ALGORITHMS)
        for k in privs:
            assert k[Attribute.TOKEN] is True
            assert k[Attribute.PRIVATE] is True
            assert k[Attribute.SENSITIVE] is True
            assert k[Attribute.EXTRACTABLE] is False
            assert k[Attribute.NEVER_EXTRACTABLE] is True
            with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                _ = k[Attribute.VALUE]


def test_ecdsa_raw_and_der_and_secp256k1_low_s(fresh_token: TokenSpec) -> None:
    tok = open_token(fresh_token)
    try:
        k1 = parse_alg("ecdsa-secp256k1")
        tok.generate_keypair(k1, b"k1", "k1")
        assert k1.order is not None
        for i in range(40):  # about half of raw ECDSA signatures are high-S; all must come out low
            der = tok.sign(k1, b"k1", b"m%d" % i)
            _, s = decode_dss_signature(der)
            assert s <= k1.order // 2
        raw = tok.sign(k1, b"k1", b"m")
        assert len(raw) in (70, 71, 72) or raw[0] == 0x30
        raw_rs = tok.sign(k1, b"k1", b"m", raw=True)
        assert len(raw_rs) == 64
        assert int.from_bytes(raw_rs[32:], "big") <= k1.order // 2
        p384 = parse_alg("ecdsa-p384")
        tok.generate_keypair(p384, b"p384", "p384")
        assert len(tok.sign(p384, b"p384", b"m", raw=True)) == 96
    finally:
        tok.close()


def test_find_keypair_for_adopt(fresh_token: TokenSpec) -> None:
    tok = open_token(fresh_token)
    try:
        spki = tok.generate_keypair(parse_alg("ed25519"), b"\xaa\xbb", "custody-1")
        by_label = tok.find_keypair(label="custody-1")
        by_id = tok.find_keypair(cka_id=b"\xaa\xbb")
        assert by_label == by_id
        assert by_label.spki == spki
        assert by_label.alg.alg is ClassicalAlg.ED25519
        assert by_label.sensitive
        assert not by_label.extractable
        with pytest.raises(NoSuchObject, match="no private key"):
            tok.find_keypair(label="nope")
    finally:
        tok.close()


def test_destroy_confirms_absence_in_a_fresh_session(fresh_token: TokenSpec) -> None:
    tok = open_token(fresh_token)
    try:
        alg = parse_alg("ecdsa-p256")
        tok.generate_keypair(alg, b"gone", "gone")
        tok.generate_keypair(alg, b"stay", "stay")
        assert tok.has_private_key(b"gone")
        assert tok.destroy_private_key(b"gone") == 1
        assert not tok.has_private_key(b"gone")
        assert tok.has_private_key(b"stay")
        with pytest.raises(NoSuchObject):
            tok.sign(alg, b"gone", b"m")
        assert tok.destroy_private_key(b"gone") == 0  # idempotent
        tok.sign(alg, b"stay", b"m")  # the other key is untouched
    finally:
        tok.close()
    # and from a completely separate login
    tok2 = open_token(fresh_token)
    try:
        assert not tok2.has_private_key(b"gone")
    finally:
        tok2.close()


def test_wrap_key_gcm_round_trip_and_tamper(fresh_token: TokenSpec) -> None:
    tok = open_token(fresh_token)
    try:
        tok.ensure_wrap_key("pqhsm:twk")
        tok.ensure_wrap_key("pqhsm:twk")  # idempotent: still one key
        assert tok.has_wrap_key("pqhsm:twk")
        secret = SecretBytes(bytes(range(64)))
        sealed = tok.wrap_encrypt("pqhsm:twk", secret, b"aad")
        assert bytes(range(64)) not in sealed
        with tok.wrap_decrypt("pqhsm:twk", sealed, b"aad") as out:
            assert bytes(out.view()) == bytes(range(64))
        with pytest.raises(BlobInvalid):
            tok.wrap_decrypt("pqhsm:twk", sealed, b"other aad")
        bad = bytearray(sealed)
        bad[20] ^= 1
        with pytest.raises(BlobInvalid):
            tok.wrap_decrypt("pqhsm:twk", bytes(bad), b"aad")
        with pytest.raises(TokenNotPresent, match="no wrap key"):
            tok.wrap_decrypt("missing", sealed, b"aad")
    finally:
        tok.close()


def test_data_object_replace(fresh_token: TokenSpec) -> None:
    tok = open_token(fresh_token)
    try:
        assert tok.read_data("pqhsm:wal-head") == []
        tok.write_data("pqhsm:wal-head", b"one")
        tok.write_data("pqhsm:wal-head", b"two")
        assert tok.read_data("pqhsm:wal-head") == [b"two"]
    finally:
        tok.close()


def test_wrong_pin_missing_token_missing_module(fresh_token: TokenSpec, tmp_path: Path) -> None:
    with pytest.raises(PinIncorrect):
        Pkcs11Token.open(TokenConfig(fresh_token.module, fresh_token.label), SecretBytes(b"wrong"))
    with pytest.raises(TokenNotPresent, match="no token with label 'absent'"):
        Pkcs11Token.open(TokenConfig(fresh_token.module, "absent"), fresh_token.pin_secret())
    with pytest.raises(TokenNotPresent, match="module not found"):
        Pkcs11Token.open(TokenConfig(str(tmp_path / "nope.so"), "x"), fresh_token.pin_secret())
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an ELF file")
    with pytest.raises(TokenNotPresent, match="cannot load"):
        Pkcs11Token.open(TokenConfig(str(junk), "x"), fresh_token.pin_secret())


def test_closed_token_refuses_work(fresh_token: TokenSpec) -> None:
    tok = open_token(fresh_token)
    tok.close()
    with pytest.raises(TokenError, match="closed"):
        tok.sign(parse_alg("ed25519"), b"x", b"m")


def test_der_oid_matches_known_encodings() -> None:
    assert der_oid("1.2.840.10045.3.1.7") == bytes.fromhex("06082a8648ce3d030107")
    assert der_oid("1.3.101.112") == bytes.fromhex("06032b6570")
    assert der_oid("1.3.132.0.10") == bytes.fromhex("06052b8104000a")
