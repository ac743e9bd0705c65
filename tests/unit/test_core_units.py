"""Pure logic without a token: errors, secrets, codec, selectors, algorithms, KDF, config."""

from __future__ import annotations

import inspect
import os
import pickle
from pathlib import Path

import pkcs11.exceptions as p11x
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from appliance import codec, errors
from appliance.algorithms import (
    ALGORITHMS,
    ClassicalAlg,
    alg_from_ec_params,
    der_oid,
    ec_point_to_spki,
    parse_alg,
)
from appliance.cli import get_secret
from appliance.config import Config, load_config, write_config
from appliance.fsio import atomic_write, check_private_file
from appliance.keys import KeyInfo, KeyKind, KeyState, parse_selector, replay
from appliance.keystore import ARGON2ID, PBKDF2_SHA3, KdfParams, calibrate, derive_pw_key
from appliance.secret import SecretBytes, ct_equal, read_secret_fd

# -- errors ---------------------------------------------------------------------------------------


def _classes() -> list[type[errors.ApplianceError]]:
    return [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, errors.ApplianceError)
    ]


def test_every_error_class_declares_its_ckr() -> None:
    for cls in _classes():
        assert "ckr" in cls.__dict__, f"{cls.__name__} inherits its CKR instead of naming it"
        assert isinstance(cls.ckr, errors.CKR)


def test_error_names_agree_with_python_pkcs11() -> None:
    shared = {c.__name__ for c in _classes()} & {
        n for n, _ in inspect.getmembers(p11x, inspect.isclass)
    }
    assert {
        "PinIncorrect",
        "PinLocked",
        "SignatureInvalid",
        "MultipleObjectsReturned",
        "DeviceError",
        "TokenNotPresent",
    } <= shared


def test_to_ckr() -> None:
    assert errors.to_ckr(errors.PinLocked("x")) is errors.CKR.PIN_LOCKED
    assert errors.to_ckr(RuntimeError("x")) is errors.CKR.FUNCTION_FAILED
    exc = errors.WalCorrupted(Path("/x/wal.log"), 1234, "bad crc")
    assert str(exc) == "wal.log: bad crc at offset 1234"
    assert exc.offset == 1234


# -- secrets ---------------------------------------------------------------------------------------


def test_secret_bytes_hygiene() -> None:
    s = SecretBytes(b"hunter2")
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s)
    view = s.view()
    s.wipe()
    assert bytes(view) == b"\x00" * 7
    with pytest.raises(TypeError):
        _ = s == SecretBytes(b"x")
    with pytest.raises(TypeError):
        pickle.dumps(s)
    with pytest.raises(TypeError):
        hash(s)
    with SecretBytes(b"abc") as t:
        inner = t.view()
    assert bytes(inner) == b"\x00\x00\x00"


def test_ct_equal_accepts_buffers() -> None:
    assert ct_equal(SecretBytes(b"abc"), b"abc")
    assert ct_equal(bytearray(b"abc"), memoryview(b"abc"))
    assert not ct_equal(b"abc", b"abd")
    assert not ct_equal(b"abc", b"ab")


def test_read_secret_fd(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.write(w, b"pass phrase\r\n")
    os.close(w)
    s = read_secret_fd(r)
    os.close(r)
    assert bytes(s.view()) == b"pass phrase"
    r, w = os.pipe()
    os.write(w, b"x" * 100)
    os.close(w)
    with pytest.raises(ValueError, match="longer than 10"):
        read_secret_fd(r, max_len=10)
    os.close(r)


def test_environment_secret_is_removed_after_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PQHSM_TEST_SECRET", "s3cret")
    s = get_secret("token PIN", fd=None, file=None, cfg_file=None, env="PQHSM_TEST_SECRET")
    assert bytes(s.view()) == b"s3cret"
    assert "PQHSM_TEST_SECRET" not in os.environ


def test_secret_file_must_be_private(tmp_path: Path) -> None:
    p = tmp_path / "pin"
    p.write_text("1234")
    p.chmod(0o640)
    with pytest.raises(errors.ConfigError, match="chmod 600"):
        check_private_file(p)
    p.chmod(0o600)
    check_private_file(p)
    with pytest.raises(errors.ConfigError, match="no such file"):
        check_private_file(tmp_path / "absent")


# -- codec and files -----------------------------------------------------------------------------------


def test_codec_is_canonical_and_strict() -> None:
    a = codec.dumps({"b": 1, "a": [b"x", "y"]})
    assert a == codec.dumps({"a": [b"x", "y"], "b": 1})
    assert codec.loads(a) == {"a": [b"x", "y"], "b": 1}
    with pytest.raises(codec.CodecError, match="trailing"):
        codec.loads(a + b"\x00")
    with pytest.raises(codec.CodecError):
        codec.loads(b"\xff\xff")
    with pytest.raises(codec.CodecError, match="not a CBOR map"):
        codec.loads_map(codec.dumps([1]), "thing")


def test_atomic_write_mode_and_replace(tmp_path: Path) -> None:
    p = tmp_path / "f"
    atomic_write(p, b"one")
    atomic_write(p, bytearray(b"two"))
    assert p.read_bytes() == b"two"
    assert p.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".*.tmp"))


# -- algorithms ------------------------------------------------------------------------------------------


def test_parse_alg_lists_choices() -> None:
    assert parse_alg("ed448").alg is ClassicalAlg.ED448
    with pytest.raises(errors.CallerError, match="choose one of: ed25519"):
        parse_alg("rsa-2048")


@pytest.mark.parametrize("alg", list(ALGORITHMS.values()), ids=lambda a: a.name)
def test_curve_params_round_trip(alg: object) -> None:
    from appliance.algorithms import Algorithm

    assert isinstance(alg, Algorithm)
    assert alg_from_ec_params(der_oid(alg.curve_oid)) is alg


def test_edwards_printable_names_and_unknown_curves() -> None:
    assert alg_from_ec_params(b"\x13\x0cedwards25519").alg is ClassicalAlg.ED25519
    with pytest.raises(errors.CallerError, match="unsupported curve OID"):
        alg_from_ec_params(der_oid("1.2.3.4"))
    with pytest.raises(errors.CallerError):
        alg_from_ec_params(b"\x05\x00")


def test_ec_point_to_spki_accepts_der_and_raw() -> None:
    k = ec.generate_private_key(ec.SECP256R1()).public_key()
    from cryptography.hazmat.primitives import serialization as ser

    point = k.public_bytes(ser.Encoding.X962, ser.PublicFormat.UncompressedPoint)
    want = k.public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)
    p256 = parse_alg("ecdsa-p256")
    assert ec_point_to_spki(p256, bytes([0x04, len(point)]) + point) == want
    assert ec_point_to_spki(p256, point) == want
    e = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    assert len(ec_point_to_spki(parse_alg("ed25519"), b"\x04\x20" + e)) == 44
    with pytest.raises(errors.CallerError, match="malformed"):
        ec_point_to_spki(p256, b"\x04\x03abc")


# -- keys and selectors ------------------------------------------------------------------------------------


class _Rec:
    def __init__(self, seq: int, type_: str, fields: dict[str, object]) -> None:
        self.seq, self.type, self.fields = seq, type_, fields


def _create(seq: int, key_id: str, label: str, cka: bytes) -> _Rec:
    return _Rec(
        seq,
        "key.create",
        {
            "key_id": key_id,
            "label": label,
            "kind": "classical",
            "state": "CLASSICAL",
            "classical_alg": "ed25519",
            "cka_id": cka,
            "origin": "generated",
            "ts": seq,
        },
    )


def test_replay_is_a_pure_function_of_records() -> None:
    recs = [
        _Rec(0, "appliance.init", {}),
        _create(1, "aa01", "one", b"\xaa\x01"),
        _create(2, "bb02", "two", b"\xbb\x02"),
    ]
    keys = replay(recs)
    assert replay(recs) == keys
    assert [k.label for k in keys.values()] == ["one", "two"]
    assert keys["aa01"].state is KeyState.CLASSICAL
    assert keys["aa01"].kind is KeyKind.CLASSICAL
    with pytest.raises(errors.DeviceError, match="created twice"):
        replay([*recs, _create(3, "aa01", "again", b"\xaa\x01")])


def test_selectors() -> None:
    keys: dict[str, KeyInfo] = replay(
        [_create(1, "aa01", "one", b"\xaa\x01"), _create(2, "bb02", "two", b"\xbb\x02")]
    )
    assert parse_selector("one").match(keys).key_id == "aa01"
    assert parse_selector("bb02").match(keys).label == "two"  # a bare id
    assert parse_selector("id:AA01").match(keys).label == "one"
    assert parse_selector("pkcs11:object=two;type=private").match(keys).key_id == "bb02"
    assert parse_selector("pkcs11:id=%aa%01").match(keys).key_id == "aa01"
    assert parse_selector("pkcs11:token=t;object=one?pin-value=x").match(keys, "t").key_id == "aa01"
    for bad, why in (
        ("", "empty"),
        ("id:xyz", "hex"),
        ("pkcs11:object", "malformed"),
        ("pkcs11:type=private", "must name"),
        ("pkcs11:foo=1", "unknown"),
    ):
        with pytest.raises(errors.CallerError, match=why):
            parse_selector(bad)
    with pytest.raises(errors.NoSuchKey):
        parse_selector("three").match(keys)
    with pytest.raises(errors.NoSuchKey, match="not this appliance"):
        parse_selector("pkcs11:token=x;object=one").match(keys, "t")


# -- KDF -----------------------------------------------------------------------------------------------------


def test_kdf_params_round_trip_and_validation() -> None:
    p = calibrate(PBKDF2_SHA3, pbkdf2_iterations=1000)
    assert KdfParams.from_cbor(p.to_cbor()) == p
    a = calibrate(ARGON2ID, target_seconds=0.001, argon2_memory_kib=1024)
    assert KdfParams.from_cbor(a.to_cbor()) == a
    assert p.fresh().gen == p.gen + 1
    assert p.fresh().salt != p.salt
    for bad in (
        {"alg": "md5"},
        {**p.to_cbor(), "iterations": 10},
        {**p.to_cbor(), "salt": b"x"},
        [1],
    ):
        with pytest.raises(errors.CallerError):
            KdfParams.from_cbor(bad)
    with pytest.raises(errors.CallerError, match="unknown KDF"):
        calibrate("scrypt")


def test_derive_pw_key_is_deterministic_and_salted() -> None:
    p = calibrate(PBKDF2_SHA3, pbkdf2_iterations=1000)
    k1 = derive_pw_key(p, SecretBytes(b"pw"))
    k2 = derive_pw_key(p, SecretBytes(bytearray(b"pw")))
    assert ct_equal(k1, k2)
    assert not ct_equal(k1, derive_pw_key(p.fresh(), SecretBytes(b"pw")))
    with pytest.raises(errors.CallerError, match="empty"):
        derive_pw_key(p, SecretBytes(b""))
    a = calibrate(ARGON2ID, target_seconds=0.001, argon2_memory_kib=1024)
    assert len(derive_pw_key(a, SecretBytes(b"pw"))) == 32


# -- config ----------------------------------------------------------------------------------------------------


def test_config_round_trip_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "h"
    home.mkdir()
    cfg = Config(
        home=home,
        module="/m.so",
        token_label="lab",
        softhsm_conf=home / "softhsm" / "c.conf",
        pin_file=tmp_path / "pin",
        kdf=ARGON2ID,
    )
    write_config(cfg)
    assert 'softhsm_conf = "softhsm/c.conf"' in (home / "config.toml").read_text()
    assert load_config(home) == cfg
    monkeypatch.setenv("PQHSM_PKCS11_MODULE", "/other.so")
    monkeypatch.setenv("PQHSM_TOKEN_SERIAL", "0042")
    env_cfg = load_config(home)
    assert env_cfg.module == "/other.so"
    assert env_cfg.softhsm_conf is None
    assert env_cfg.token_serial == "0042"
    (home / "config.toml").write_text("[token\n")
    with pytest.raises(errors.ConfigError, match="not valid TOML"):
        load_config(home)
    (home / "config.toml").write_text("[token]\nmodule = 3\n")
    with pytest.raises(errors.ConfigError, match=r"token\.module"):
        load_config(home)
