"""The dual-compromise keystore on a real SoftHSM2 token (DESIGN §4)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import BlobInvalid, CallerError, KeyExists, StateError, TokenNotPresent
from appliance.keystore import (
    ARGON2ID,
    MLDSA_ALG,
    PBKDF2_SHA3,
    KdfParams,
    Keystore,
    calibrate,
    parse_blob,
)
from appliance.keystore.blob import PREFIX
from appliance.pqc import active_backend
from appliance.secret import SecretBytes
from appliance.token import TokenConfig
from appliance.token.pkcs11 import Pkcs11Token
from conftest import CHEAP_PBKDF2, PASSPHRASE, TokenSpec, new_token

pytestmark = pytest.mark.softhsm


def cheap_kdf() -> KdfParams:
    return calibrate(PBKDF2_SHA3, pbkdf2_iterations=CHEAP_PBKDF2)


@pytest.fixture
def token(fresh_token: TokenSpec) -> Iterator[Pkcs11Token]:
    tok = Pkcs11Token.open(
        TokenConfig(fresh_token.module, fresh_token.label), fresh_token.pin_secret()
    )
    yield tok
    tok.close()


@pytest.fixture
def keystore(token: Pkcs11Token, tmp_path: Path) -> Keystore:
    ks = Keystore(tmp_path / "home", token, active_backend())
    ks.create(SecretBytes(PASSPHRASE), cheap_kdf())
    return ks


def test_create_unlock_lock(keystore: Keystore, token: Pkcs11Token) -> None:
    public, digest = keystore.new_mldsa("k1")
    signer = keystore.open_mldsa("k1", expect_public=public, expect_digest=digest)
    assert signer.public_bytes() == public
    keystore.lock()
    assert not keystore.unlocked
    with pytest.raises(StateError, match="locked"):
        keystore.open_mldsa("k1")
    again = Keystore(keystore.home, token, active_backend())
    again.unlock(SecretBytes(PASSPHRASE))
    assert again.open_mldsa("k1").public_bytes() == public


def test_files_are_private(keystore: Keystore) -> None:
    keystore.new_mldsa("k1")
    assert keystore.path.stat().st_mode & 0o777 == 0o600
    assert keystore.blob_path("k1").stat().st_mode & 0o777 == 0o600
    assert keystore.home.stat().st_mode & 0o777 == 0o700
    assert keystore.blob_dir.stat().st_mode & 0o777 == 0o700


def test_no_passphrase_verifier_and_no_seed_on_disk(keystore: Keystore) -> None:
    header = keystore.path.read_bytes()
    # the header carries KDF parameters, the token-sealed seed and ek; never pw_key material
    assert PASSPHRASE not in header
    assert len(keystore.header().seed_sealed) == 12 + 64 + 16


def test_wrong_passphrase_is_refused_at_unlock(keystore: Keystore, token: Pkcs11Token) -> None:
    ks = Keystore(keystore.home, token, active_backend())
    with pytest.raises(BlobInvalid, match="wrong passphrase"):
        ks.unlock(SecretBytes(b"not the passphrase"))
    assert not ks.unlocked


def test_refuses_second_create(keystore: Keystore) -> None:
    with pytest.raises(KeyExists):
        keystore.create(SecretBytes(PASSPHRASE), cheap_kdf())


def _flip_each(blob: bytes, positions: range) -> Iterator[bytes]:
    for i in positions:
        bad = bytearray(blob)
        bad[i] ^= 0x01
        yield bytes(bad)


def test_every_flipped_byte_of_a_blob_is_rejected(keystore: Keystore) -> None:
    keystore.new_mldsa("k1")
    blob = keystore.read_blob("k1")
    _, start = parse_blob(blob)
    assert start > PREFIX.size
    rejected = 0
    for bad in _flip_each(blob, range(len(blob))):
        with pytest.raises(BlobInvalid):
            keystore.open("k1", MLDSA_ALG, bad)
        rejected += 1
    assert rejected == len(blob) > 4000
    # truncations and extensions too
    for cut in (0, 4, PREFIX.size, start, start + 15, len(blob) - 1):
        with pytest.raises(BlobInvalid):
            keystore.open("k1", MLDSA_ALG, blob[:cut])
    with pytest.raises(BlobInvalid):
        keystore.open("k1", MLDSA_ALG, blob + b"\x00")
    # the original still opens
    with keystore.open("k1", MLDSA_ALG) as plain:
        assert len(plain) == 32 + 2592


def test_blob_of_another_key_is_refused(keystore: Keystore) -> None:
    keystore.new_mldsa("k1")
    keystore.new_mldsa("k2")
    shutil.copy(keystore.blob_path("k2"), keystore.blob_path("k1"))
    with pytest.raises(BlobInvalid, match="does not belong to key k1"):
        keystore.open_mldsa("k1")


def test_corrupted_blob_breaks_only_its_own_key(keystore: Keystore) -> None:
    pub1, _ = keystore.new_mldsa("k1")
    pub2, dig2 = keystore.new_mldsa("k2")
    path = keystore.blob_path("k1")
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BlobInvalid, match="k1"):
        keystore.open_mldsa("k1", expect_public=pub1)
    assert keystore.open_mldsa("k2", expect_public=pub2, expect_digest=dig2).public_bytes() == pub2
    with pytest.raises(BlobInvalid, match="digest"):
        keystore.open_mldsa("k2", expect_digest=b"\x00" * 32)


def test_disk_only_attacker_with_passphrase_opens_nothing(
    keystore: Keystore, tmp_path: Path
) -> None:
    """A copy of the state directory plus the passphrase, but another token: nothing opens."""
    keystore.new_mldsa("k1")
    stolen = tmp_path / "stolen"
    shutil.copytree(keystore.home, stolen)
    other_spec = new_token()
    other = Pkcs11Token.open(
        TokenConfig(other_spec.module, other_spec.label), other_spec.pin_secret()
    )
    try:
        ks = Keystore(stolen, other, active_backend())
        with pytest.raises(TokenNotPresent, match="no wrap key"):
            ks.unlock(SecretBytes(PASSPHRASE))
        # even with a wrap key of the same label, the seal was made by another key
        other.ensure_wrap_key("pqhsm:twk")
        with pytest.raises(BlobInvalid):
            ks.unlock(SecretBytes(PASSPHRASE))
    finally:
        other.close()


def test_token_and_disk_without_passphrase_open_nothing(
    keystore: Keystore, token: Pkcs11Token
) -> None:
    keystore.new_mldsa("k1")
    ks = Keystore(keystore.home, token, active_backend())
    for guess in (b"", b"x", PASSPHRASE[:-1], PASSPHRASE + b" "):
        with pytest.raises((BlobInvalid, CallerError)):
            ks.unlock(SecretBytes(guess))
        assert not ks.unlocked


def test_swapped_encapsulation_key_in_header_is_detected(
    keystore: Keystore, token: Pkcs11Token
) -> None:
    raw = bytearray(keystore.path.read_bytes())
    ek = keystore.header().ek
    at = bytes(raw).index(ek)
    raw[at + 100] ^= 1
    keystore.path.write_bytes(bytes(raw))
    ks = Keystore(keystore.home, token, active_backend())
    with pytest.raises(BlobInvalid, match="does not match the token"):
        ks.unlock(SecretBytes(PASSPHRASE))


def test_argon2id_keystore(token: Pkcs11Token, tmp_path: Path) -> None:
    kdf = calibrate(ARGON2ID, target_seconds=0.01, argon2_memory_kib=8192)
    ks = Keystore(tmp_path / "a2", token, active_backend())
    ks.create(SecretBytes(PASSPHRASE), kdf)
    pub, _ = ks.new_mldsa("k1")
    ks2 = Keystore(ks.home, token, active_backend())
    with pytest.raises(BlobInvalid):
        ks2.unlock(SecretBytes(b"wrong"))
    ks2.unlock(SecretBytes(PASSPHRASE))
    assert ks2.header().kdf.alg == ARGON2ID
    assert ks2.open_mldsa("k1").public_bytes() == pub
