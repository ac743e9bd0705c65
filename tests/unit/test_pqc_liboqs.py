"""The optional liboqs backend (appliance.pqc_liboqs) against the default one.

Where liboqs is installed (system library path or ``$OQS_INSTALL_PATH/lib``) these tests
show it interoperates byte for byte with ``cryptography``: the same seed gives the same
ML-DSA-87 public key and ML-KEM-1024 encapsulation key, signatures and encapsulations
made by one verify and decapsulate under the other, NIST ACVP vectors pass (byte-exact
signatures and encapsulations included), blobs sealed under one backend open under the
other (real SoftHSM2 token), and the generic backend tests of test_pqc_backend.py pass
under liboqs too.  Without liboqs they skip, naming what is missing.

Detection and configuration tests run everywhere: they never import ``oqs`` and report a
missing, fake or too-old library cleanly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
import json
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import pytest
from cryptography.hazmat.bindings import _rust

# The generic backend tests, collected again here with this module's fixtures (liboqs).
from test_pqc_backend import (  # the generic tests, and their key fixtures over `backend`
    decapsulator,
    signature,
    signer,
    test_buffer_encapsulate_and_decapsulate,
    test_buffer_mldsa_seed,
    test_buffer_mlkem_seed,
    test_buffer_sign_message,
    test_buffer_verify_inputs,
    test_ciphertext_wrong_length,
    test_context_255_bytes_is_the_limit,
    test_encapsulation_key_coefficient_not_reduced,
    test_encapsulation_key_wrong_length,
    test_mldsa_seed_wrong_length,
    test_mlkem_seed_wrong_length,
    test_public_key_wrong_length,
    test_round_trips,
    test_sign_context_256_bytes,
    test_signature_wrong_length,
    test_sizes,
    test_tampered_ciphertext_is_implicitly_rejected,
    test_tampered_message,
    test_tampered_signature,
    test_type_ciphertext,
    test_type_context,
    test_type_encapsulation_key,
    test_type_message_int_verify,
    test_type_message_not_a_buffer_sign,
    test_type_message_str,
    test_type_mldsa_seed,
    test_type_mlkem_seed,
    test_type_verify_public_key,
    test_type_verify_signature,
    test_verify_context_256_bytes,
    test_wrong_context,
    test_wrong_public_key,
)

import appliance.pqc
from appliance import pqc_liboqs
from appliance.config import Config, load_config, write_config
from appliance.errors import CallerError, ConfigError, DeviceError, SignatureInvalid
from appliance.pqc import (
    LIBOQS_NOT_INSTALLED,
    MLDSA87_SEED_LEN,
    MLDSA87_SIG_LEN,
    MLKEM1024_SEED_LEN,
    CryptographyBackend,
    PqcBackend,
    active_backend,
    backend_info,
    find_liboqs,
    liboqs_backend,
    select_backend,
)
from appliance.pqc_liboqs import LiboqsBackend
from appliance.secret import SecretBytes
from conftest import CHEAP_PBKDF2, PASSPHRASE, TokenSpec, make_config, run_cli
from pkcs11_shim.launch import throwaway_init_args

__all__ = [  # re-collected generic tests and their fixtures (see the import above)
    "decapsulator",
    "signature",
    "signer",
    "test_buffer_encapsulate_and_decapsulate",
    "test_buffer_mldsa_seed",
    "test_buffer_mlkem_seed",
    "test_buffer_sign_message",
    "test_buffer_verify_inputs",
    "test_ciphertext_wrong_length",
    "test_context_255_bytes_is_the_limit",
    "test_encapsulation_key_coefficient_not_reduced",
    "test_encapsulation_key_wrong_length",
    "test_mldsa_seed_wrong_length",
    "test_mlkem_seed_wrong_length",
    "test_public_key_wrong_length",
    "test_round_trips",
    "test_sign_context_256_bytes",
    "test_signature_wrong_length",
    "test_sizes",
    "test_tampered_ciphertext_is_implicitly_rejected",
    "test_tampered_message",
    "test_tampered_signature",
    "test_type_ciphertext",
    "test_type_context",
    "test_type_encapsulation_key",
    "test_type_message_int_verify",
    "test_type_message_not_a_buffer_sign",
    "test_type_message_str",
    "test_type_mldsa_seed",
    "test_type_mlkem_seed",
    "test_type_verify_public_key",
    "test_type_verify_signature",
    "test_verify_context_256_bytes",
    "test_wrong_context",
    "test_wrong_public_key",
]

VECTORS: Final = Path(__file__).resolve().parents[1] / "vectors"
DSA_SEED: Final = hashlib.sha256(b"pqhsm unit ML-DSA seed").digest()
KEM_SEED: Final = hashlib.sha512(b"pqhsm unit ML-KEM seed").digest()
MESSAGE: Final = b"pqhsm unit message"
CONTEXT: Final = b"pqhsm/unit"
CONTEXTS: Final = [
    pytest.param(b"", id="no-context"),
    pytest.param(CONTEXT, id="context"),
    pytest.param(bytes(range(255)), id="context-255"),
]


def _probe() -> LiboqsBackend | str:
    """This machine's liboqs backend, or why there is none (detection as the service does it)."""
    try:
        return liboqs_backend()
    except ConfigError as exc:
        return str(exc)


LIBOQS: Final = _probe()
NO_LIBOQS: Final = "" if isinstance(LIBOQS, LiboqsBackend) else str(LIBOQS)
needs_liboqs = pytest.mark.skipif(bool(NO_LIBOQS), reason=NO_LIBOQS)


def _secret(sb: SecretBytes) -> bytes:
    # test-only copy of a shared secret, compared once and dropped
    return bytes(sb.view())


@pytest.fixture(autouse=True)
def _restore_default_backend() -> Iterator[None]:
    yield
    select_backend("cryptography")


@pytest.fixture(scope="module")
def oqs() -> LiboqsBackend:
    if not isinstance(LIBOQS, LiboqsBackend):
        pytest.skip(NO_LIBOQS)
    return LIBOQS


@pytest.fixture(scope="module")
def crypto() -> CryptographyBackend:
    return CryptographyBackend()


# fixtures the re-collected generic tests ask for: the liboqs backend and its keys


@pytest.fixture(scope="module")
def backend(oqs: LiboqsBackend) -> PqcBackend:
    return oqs


@contextmanager
def given_randomness(value: bytes) -> Iterator[None]:
    """Test-only: liboqs' next random request on this thread, of ``len(value)`` bytes,
    gets ``value`` (the same slot key generation uses for its seed).  Lets the ACVP tests
    give ML-DSA its ``rnd`` and ML-KEM its ``m``."""
    slot = pqc_liboqs._SLOT
    buf = (ctypes.c_ubyte * len(value)).from_buffer_copy(value)
    slot.seed, slot.served, slot.stray, slot.failed = buf, 0, 0, False
    try:
        yield
        assert (slot.served, slot.stray) == (1, 0), "liboqs did not take the given randomness"
    finally:
        slot.seed = None


# -- same seed, same keys -------------------------------------------------------------------

SEEDS: Final = [
    pytest.param(bytes(32), id="zero"),
    pytest.param(DSA_SEED, id="fixed"),
    *(pytest.param(os.urandom(32), id=f"random{i}") for i in range(4)),
]


@needs_liboqs
@pytest.mark.parametrize("seed", SEEDS)
def test_same_seed_same_mldsa_public_key(
    oqs: LiboqsBackend, crypto: CryptographyBackend, seed: bytes
) -> None:
    assert (
        oqs.mldsa87_from_seed(seed).public_bytes() == crypto.mldsa87_from_seed(seed).public_bytes()
    )


@needs_liboqs
@pytest.mark.parametrize(
    "seed",
    [
        pytest.param(bytes(64), id="zero"),
        pytest.param(KEM_SEED, id="fixed"),
        *(pytest.param(os.urandom(64), id=f"random{i}") for i in range(3)),
    ],
)
def test_same_seed_same_mlkem_encapsulation_key(
    oqs: LiboqsBackend, crypto: CryptographyBackend, seed: bytes
) -> None:
    assert (
        oqs.mlkem1024_from_seed(seed).encapsulation_key()
        == crypto.mlkem1024_from_seed(seed).encapsulation_key()
    )


# -- signatures across backends -----------------------------------------------------------


def _other_context(context: bytes) -> bytes:
    """A different context of at most 255 bytes."""
    return context[:-1] + bytes([context[-1] ^ 1]) if context else b"x"


@needs_liboqs
@pytest.mark.parametrize("context", CONTEXTS)
def test_liboqs_signature_verifies_under_cryptography(
    oqs: LiboqsBackend, crypto: CryptographyBackend, context: bytes
) -> None:
    public = oqs.mldsa87_from_seed(DSA_SEED).public_bytes()
    sig = oqs.mldsa87_from_seed(DSA_SEED).sign(MESSAGE, context)
    crypto.mldsa87_verify(public, MESSAGE, sig, context)
    with pytest.raises(SignatureInvalid):
        crypto.mldsa87_verify(public, MESSAGE, sig, _other_context(context))
    with pytest.raises(SignatureInvalid):
        crypto.mldsa87_verify(public, MESSAGE + b"x", sig, context)


@needs_liboqs
@pytest.mark.parametrize("context", CONTEXTS)
def test_cryptography_signature_verifies_under_liboqs(
    oqs: LiboqsBackend, crypto: CryptographyBackend, context: bytes
) -> None:
    public = crypto.mldsa87_from_seed(DSA_SEED).public_bytes()
    sig = crypto.mldsa87_from_seed(DSA_SEED).sign(MESSAGE, context)
    oqs.mldsa87_verify(public, MESSAGE, sig, context)
    with pytest.raises(SignatureInvalid):
        oqs.mldsa87_verify(public, MESSAGE, sig, _other_context(context))
    bad = bytearray(sig)
    bad[100] ^= 0x04
    with pytest.raises(SignatureInvalid):
        oqs.mldsa87_verify(public, MESSAGE, bad, context)


@needs_liboqs
def test_liboqs_signs_hedged(oqs: LiboqsBackend, crypto: CryptographyBackend) -> None:
    key = oqs.mldsa87_from_seed(DSA_SEED)
    sigs = {key.sign(MESSAGE) for _ in range(3)}
    assert len(sigs) == 3  # fresh rnd each time: hedged, not deterministic
    for sig in sigs:
        crypto.mldsa87_verify(key.public_bytes(), MESSAGE, sig)


@needs_liboqs
@pytest.mark.parametrize("n", [0, 1, 4096, 1 << 20])
def test_message_sizes_across_backends(
    oqs: LiboqsBackend, crypto: CryptographyBackend, n: int
) -> None:
    msg = os.urandom(n)
    key = oqs.mldsa87_from_seed(DSA_SEED)
    crypto.mldsa87_verify(key.public_bytes(), msg, key.sign(msg, CONTEXT), CONTEXT)
    oqs.mldsa87_verify(
        key.public_bytes(),
        msg,
        crypto.mldsa87_from_seed(DSA_SEED).sign(msg, CONTEXT),
        CONTEXT,
    )


# -- ML-KEM across backends -----------------------------------------------------------------


@needs_liboqs
@pytest.mark.parametrize(
    "liboqs_encapsulates", [True, False], ids=["liboqs->crypto", "crypto->liboqs"]
)
def test_encapsulation_decapsulates_under_the_other_backend(
    oqs: LiboqsBackend, crypto: CryptographyBackend, liboqs_encapsulates: bool
) -> None:
    sender, receiver = (oqs, crypto) if liboqs_encapsulates else (crypto, oqs)
    theirs = receiver.mlkem1024_from_seed(KEM_SEED)
    for _ in range(4):
        secret, ct = sender.mlkem1024_encapsulate(theirs.encapsulation_key())
        assert _secret(theirs.decapsulate(ct)) == _secret(secret)


@needs_liboqs
@pytest.mark.parametrize("offset", [0, 777, -1])
def test_implicit_rejection_is_the_same_under_both(
    oqs: LiboqsBackend, crypto: CryptographyBackend, offset: int
) -> None:
    # a tampered ciphertext yields the FIPS 203 rejection key J(z || c): same bytes in both
    secret, ct = crypto.mlkem1024_encapsulate(
        crypto.mlkem1024_from_seed(KEM_SEED).encapsulation_key()
    )
    bad = bytearray(ct)
    bad[offset] ^= 0x10
    rejected = _secret(oqs.mlkem1024_from_seed(KEM_SEED).decapsulate(bad))
    assert rejected == _secret(crypto.mlkem1024_from_seed(KEM_SEED).decapsulate(bad))
    assert rejected != _secret(secret)


# -- NIST ACVP vectors under liboqs ---------------------------------------------------------


def _acvp(name: str) -> Any:
    """A vector file from tests/vectors, after the same pinned-SHA-256 check the loader does."""
    sys.path.insert(0, str(VECTORS))
    try:
        import _acvp

        return json.loads(_acvp.read_pinned(name))
    finally:
        sys.path.remove(str(VECTORS))


def _cases(name: str, keep: Callable[[dict[str, Any]], bool] = lambda g: True) -> list[Any]:
    doc = _acvp(name)
    return [
        pytest.param(group, case, id=f"tg{group['tgId']}-tc{case['tcId']}")
        for group in doc["testGroups"]
        if keep(group)
        for case in group["tests"]
    ]


def h(value: str) -> bytes:
    return bytes.fromhex(value)


DSA_KEYGEN: Final = _cases("ml-dsa-87-keygen.json")
DSA_SIGGEN: Final = _cases(
    "ml-dsa-87-siggen.json",
    lambda g: (
        g["keyFormat"] == "seed"
        and g["signatureInterface"] == "external"
        and g.get("preHash") == "pure"
    ),
)
DSA_SIGVER: Final = _cases(
    "ml-dsa-87-sigver.json",
    lambda g: g["signatureInterface"] == "external" and g["preHash"] == "pure",
)
KEM_KEYGEN: Final = _cases("ml-kem-1024-keygen.json")
KEM_ENCAP: Final = _cases("ml-kem-1024-encapdecap.json", lambda g: g["function"] == "encapsulation")
KEM_DECAP: Final = _cases("ml-kem-1024-encapdecap.json", lambda g: g["function"] == "decapsulation")
KEM_EKCHECK: Final = _cases(
    "ml-kem-1024-encapdecap.json", lambda g: g["function"] == "encapsulationKeyCheck"
)


def test_acvp_case_counts() -> None:
    # runs everywhere: the selections below are not silently empty
    assert len(DSA_KEYGEN) == 25
    assert len(KEM_KEYGEN) == 25
    assert len(DSA_SIGGEN) >= 10
    assert len(DSA_SIGVER) == 15
    assert min(len(KEM_ENCAP), len(KEM_DECAP), len(KEM_EKCHECK)) >= 5


@needs_liboqs
@pytest.mark.parametrize(("group", "case"), DSA_KEYGEN)
def test_acvp_mldsa_keygen(oqs: LiboqsBackend, group: Any, case: Any) -> None:
    key = oqs.mldsa87_from_seed(h(case["seed"]))
    assert key.public_bytes() == h(case["pk"])
    # test-only look at the expanded key liboqs holds: FIPS 204 skEncode, byte for byte
    assert bytes(key._sk) == h(case["sk"])


@needs_liboqs
@pytest.mark.parametrize(("group", "case"), DSA_SIGGEN)
def test_acvp_mldsa_siggen_byte_exact(oqs: LiboqsBackend, group: Any, case: Any) -> None:
    rnd = bytes(32) if group["deterministic"] else h(case["rnd"])
    key = oqs.mldsa87_from_seed(h(case["seed"]))
    with given_randomness(rnd):
        sig = key.sign(h(case["message"]), h(case["context"]))
    assert sig == h(case["signature"])


@needs_liboqs
@pytest.mark.parametrize(("group", "case"), DSA_SIGVER)
def test_acvp_mldsa_sigver(oqs: LiboqsBackend, group: Any, case: Any) -> None:
    args = (h(case["pk"]), h(case["message"]), h(case["signature"]), h(case["context"]))
    if case["testPassed"]:
        oqs.mldsa87_verify(*args)
    else:
        with pytest.raises(SignatureInvalid):
            oqs.mldsa87_verify(*args)


@needs_liboqs
@pytest.mark.parametrize(("group", "case"), KEM_KEYGEN)
def test_acvp_mlkem_keygen(oqs: LiboqsBackend, group: Any, case: Any) -> None:
    key = oqs.mlkem1024_from_seed(h(case["d"]) + h(case["z"]))
    assert key.encapsulation_key() == h(case["ek"])
    assert bytes(key._dk) == h(case["dk"])  # test-only look at the expanded key


@needs_liboqs
@pytest.mark.parametrize(("group", "case"), KEM_ENCAP)
def test_acvp_mlkem_encapsulation_byte_exact(oqs: LiboqsBackend, group: Any, case: Any) -> None:
    with given_randomness(h(case["m"])):
        secret, ct = oqs.mlkem1024_encapsulate(h(case["ek"]))
    assert ct == h(case["c"])
    assert _secret(secret) == h(case["k"])


@needs_liboqs
@pytest.mark.parametrize(("group", "case"), KEM_DECAP)
def test_acvp_mlkem_decapsulation(oqs: LiboqsBackend, group: Any, case: Any) -> None:
    key = oqs.mlkem1024_from_seed(h(case["d"]) + h(case["z"]))
    assert _secret(key.decapsulate(h(case["c"]))) == h(case["k"])


@needs_liboqs
@pytest.mark.parametrize(("group", "case"), KEM_EKCHECK)
def test_acvp_mlkem_encapsulation_key_check(oqs: LiboqsBackend, group: Any, case: Any) -> None:
    if case["testPassed"]:
        secret, _ = oqs.mlkem1024_encapsulate(h(case["ek"]))
        secret.wipe()
    else:
        with pytest.raises(CallerError, match="malformed"):
            oqs.mlkem1024_encapsulate(h(case["ek"]))


# -- the seed-serving random source ----------------------------------------------------------


@needs_liboqs
def test_concurrent_keygen_and_signing_keep_seeds_apart(
    oqs: LiboqsBackend, crypto: CryptographyBackend
) -> None:
    # key generation on some threads while others sign: each key must come from its own
    # seed (the slot is per thread), and no signature may take a seed as its rnd
    seeds = [os.urandom(32) for _ in range(24)]
    want = {s: crypto.mldsa87_from_seed(s).public_bytes() for s in seeds}
    signer = oqs.mldsa87_from_seed(DSA_SEED)
    got: dict[bytes, bytes] = {}
    sigs: list[bytes] = []
    errors: list[BaseException] = []

    def keygen(part: list[bytes]) -> None:
        try:
            for s in part:
                got[s] = oqs.mldsa87_from_seed(s).public_bytes()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def sign() -> None:
        try:
            for _ in range(12):
                sigs.append(signer.sign(MESSAGE))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=keygen, args=(seeds[i::3],)) for i in range(3)]
    threads += [threading.Thread(target=sign) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert got == want
    assert len(set(sigs)) == len(sigs) == 24
    for sig in sigs[:4]:
        crypto.mldsa87_verify(signer.public_bytes(), MESSAGE, sig)


@needs_liboqs
def test_a_stray_random_request_during_keygen_is_refused(
    oqs: LiboqsBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # if liboqs asked for anything but one 32-byte seed, the key is not the seed's: refuse
    real_call = pqc_liboqs._Lib.call

    def keypair_then_extra(self: pqc_liboqs._Lib, name: str, *args: object) -> int:
        rc = real_call(self, name, *args)
        if name == "OQS_SIG_keypair":
            buf = (ctypes.c_ubyte * 32)()
            pqc_liboqs._random_source(ctypes.addressof(buf), 32)
        return rc

    monkeypatch.setattr(pqc_liboqs._Lib, "call", keypair_then_extra)
    with pytest.raises(DeviceError, match="did not derive the ML-DSA-87 key"):
        oqs.mldsa87_from_seed(DSA_SEED)


@needs_liboqs
def test_keygen_refused_when_the_seed_is_not_taken(
    oqs: LiboqsBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # e.g. someone switched liboqs' RNG away from ours: the seed is never asked for
    real_call = pqc_liboqs._Lib.call

    def no_seed(self: pqc_liboqs._Lib, name: str, *args: object) -> int:
        if name == "OQS_SIG_keypair":
            slot = pqc_liboqs._SLOT
            saved, slot.seed = slot.seed, None
            try:
                return real_call(self, name, *args)
            finally:
                slot.seed = saved
        return real_call(self, name, *args)

    monkeypatch.setattr(pqc_liboqs._Lib, "call", no_seed)
    with pytest.raises(DeviceError, match="seed taken 0 time"):
        oqs.mldsa87_from_seed(DSA_SEED)


@needs_liboqs
def test_random_source_failure_discards_the_encapsulation(
    oqs: LiboqsBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(n: int) -> bytes:
        raise OSError("no entropy")

    ek = oqs.mlkem1024_from_seed(KEM_SEED).encapsulation_key()
    monkeypatch.setattr(os, "urandom", broken)
    with pytest.raises(DeviceError, match="random source failed"):
        oqs.mlkem1024_encapsulate(ek)
    with pytest.raises(DeviceError, match="random source failed"):
        oqs.mldsa87_from_seed(DSA_SEED).sign(MESSAGE)
    monkeypatch.undo()
    oqs.mlkem1024_encapsulate(ek)[0].wipe()  # and it recovers


# -- secret hygiene --------------------------------------------------------------------------


@needs_liboqs
def test_close_zeroes_the_expanded_keys(oqs: LiboqsBackend) -> None:
    dsa = oqs.mldsa87_from_seed(DSA_SEED)
    kem = oqs.mlkem1024_from_seed(KEM_SEED)
    sk, dk = dsa._sk, kem._dk
    assert any(bytes(sk))
    assert any(bytes(dk))
    dsa.close()
    kem.close()
    assert not any(bytes(sk))
    assert not any(bytes(dk))
    with pytest.raises(CallerError, match="closed"):
        dsa.sign(MESSAGE)
    with pytest.raises(CallerError, match="closed"):
        kem.decapsulate(bytes(1568))
    dsa.close()  # idempotent


@needs_liboqs
def test_with_block_and_collection_zero_the_keys(oqs: LiboqsBackend) -> None:
    with oqs.mldsa87_from_seed(DSA_SEED) as dsa:
        sk = dsa._sk
        assert any(bytes(sk))
    assert not any(bytes(sk))
    kem = oqs.mlkem1024_from_seed(KEM_SEED)
    dk = kem._dk
    del kem
    gc.collect()
    assert not any(bytes(dk))


@needs_liboqs
def test_keys_are_redacted_and_not_picklable(oqs: LiboqsBackend) -> None:
    dsa = oqs.mldsa87_from_seed(DSA_SEED)
    kem = oqs.mlkem1024_from_seed(KEM_SEED)
    for key in (dsa, kem):
        assert "redacted" in repr(key)
        assert DSA_SEED.hex()[:16] not in repr(key)
        with pytest.raises(TypeError, match="not picklable"):
            pickle.dumps(key)


@needs_liboqs
def test_seed_scratch_is_zeroed(oqs: LiboqsBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    scratches: list[ctypes.Array[ctypes.c_ubyte]] = []
    real = pqc_liboqs._secret_copy

    def spy(what: str, value: object, n: int) -> ctypes.Array[ctypes.c_ubyte]:
        scratches.append(real(what, value, n))
        return scratches[-1]

    monkeypatch.setattr(pqc_liboqs, "_secret_copy", spy)
    oqs.mldsa87_from_seed(DSA_SEED)
    oqs.mlkem1024_from_seed(KEM_SEED)
    assert len(scratches) == 2
    assert all(not any(bytes(s)) for s in scratches)


# -- selection -------------------------------------------------------------------------------


@needs_liboqs
@pytest.mark.parametrize("choice", ["liboqs", "auto"])
def test_select_liboqs(oqs: LiboqsBackend, choice: str) -> None:
    assert select_backend(choice) is oqs
    assert active_backend() is oqs
    info = backend_info()
    assert info.active == "liboqs"
    assert info.liboqs_usable
    assert info.liboqs_version == oqs.version
    assert info.liboqs_problem is None


def test_select_cryptography_and_unknown() -> None:
    assert select_backend("cryptography").name == "cryptography"
    assert active_backend().name == "cryptography"
    with pytest.raises(ConfigError, match="unknown pqc backend 'openssl'"):
        select_backend("openssl")
    assert active_backend().name == "cryptography"


# A shared library that is certainly on every machine these tests run on, and is not liboqs:
# the compiled core of pyca/cryptography (loadable with ctypes, no OQS_* symbols).
NOT_LIBOQS: Final = Path(_rust.__file__ or "")


def _hide_system_liboqs(monkeypatch: pytest.MonkeyPatch, install_path: Path) -> None:
    monkeypatch.setenv("OQS_INSTALL_PATH", str(install_path))
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)


def test_empty_oqs_install_path_is_cleanly_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lib").mkdir()
    _hide_system_liboqs(monkeypatch, tmp_path)
    assert find_liboqs() is None
    info = backend_info()
    assert (info.liboqs_library, info.liboqs_usable, info.liboqs_problem) == (None, False, None)
    assert select_backend("auto").name == "cryptography"
    with pytest.raises(ConfigError) as err:
        select_backend("liboqs")
    message = str(err.value)
    assert message == f"pqc backend liboqs is configured but not usable: {LIBOQS_NOT_INSTALLED}"
    assert "\n" not in message
    assert active_backend().name == "cryptography"
    assert "oqs" not in sys.modules


def test_a_library_that_is_not_liboqs_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a real shared library without liboqs' symbols stands in for a too-old liboqs
    (tmp_path / "lib").mkdir()
    fake = tmp_path / "lib" / "liboqs.so"
    fake.symlink_to(NOT_LIBOQS)
    _hide_system_liboqs(monkeypatch, tmp_path)
    assert find_liboqs() == str(fake)
    with pytest.raises(ConfigError, match=r"has no OQS_init \(pqhsm needs liboqs 0\.13 or later\)"):
        select_backend("liboqs")
    assert select_backend("auto").name == "cryptography"
    info = backend_info()
    assert info.liboqs_available
    assert not info.liboqs_usable
    assert info.liboqs_problem is not None
    assert "has no OQS_init" in info.liboqs_problem


def test_a_broken_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "liboqs.so.9").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(64))
    _hide_system_liboqs(monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match="cannot be loaded"):
        select_backend("liboqs")
    assert select_backend("auto").name == "cryptography"


_PROBE: Final = """
import importlib.util, json, sys
import appliance.pqc as pqc
chosen = pqc.select_backend(sys.argv[1])
info = pqc.backend_info()
if chosen.name == "liboqs":  # exercise it: keys, a signature, an encapsulation
    k = chosen.mldsa87_from_seed(bytes(32))
    chosen.mldsa87_verify(k.public_bytes(), b"m", k.sign(b"m"))
    chosen.mlkem1024_encapsulate(chosen.mlkem1024_from_seed(bytes(64)).encapsulation_key())
spec = importlib.util.find_spec("oqs")
with open("/proc/self/maps") as maps:
    mapped = any("liboqs" in line for line in maps)
print(json.dumps({
    "oqs_imported": "oqs" in sys.modules,
    "oqs_importable_from": spec.origin if spec else None,
    "active": info.active,
    "usable": info.liboqs_usable,
    "found": info.liboqs_available,
    "liboqs_mapped": mapped,
    "ctypes_module_imported": "appliance.pqc_liboqs" in sys.modules,
}))
"""


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc/self/maps")
@pytest.mark.parametrize("choice", ["auto", "cryptography"])
def test_detection_and_use_never_import_oqs(tmp_path: Path, choice: str) -> None:
    # a fresh interpreter with an importable fake "oqs" (it leaves a marker when imported)
    # and this machine's real liboqs, if any: detecting, loading and using liboqs never
    # imports the module (liboqs-python would download and build liboqs on import)
    trap = tmp_path / "oqs-was-imported"
    fake_mod = tmp_path / "site" / "oqs.py"
    fake_mod.parent.mkdir()
    fake_mod.write_text(f"open({str(trap)!r}, 'w').close()\n", encoding="utf-8")
    repo = Path(appliance.pqc.__file__).resolve().parents[1]
    env = dict(os.environ)
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(fake_mod.parent), str(repo), *inherited])
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, choice],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(out.stdout)
    assert report["oqs_importable_from"] == str(fake_mod)  # the trap was reachable
    assert report["oqs_imported"] is False
    assert not trap.exists()
    assert report["found"] is (find_liboqs() is not None)
    if choice == "cryptography":
        # cryptography never loads liboqs, not even to report on it
        assert report["usable"] is False
        assert report["liboqs_mapped"] is False
        assert report["ctypes_module_imported"] is False
        assert report["active"] == "cryptography"
    else:
        assert report["usable"] is (not NO_LIBOQS)
        assert report["liboqs_mapped"] is (not NO_LIBOQS)
        assert report["active"] == ("cryptography" if NO_LIBOQS else "liboqs")


# -- configuration -------------------------------------------------------------------------


def test_config_backend_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PQHSM_PQC_BACKEND", raising=False)
    home = tmp_path / "h"
    home.mkdir()
    assert load_config(home).pqc_backend == "cryptography"  # the default
    cfg = Config(home=home, pqc_backend="auto")
    write_config(cfg)
    assert 'backend = "auto"' in (home / "config.toml").read_text()
    assert load_config(home) == cfg
    monkeypatch.setenv("PQHSM_PQC_BACKEND", "cryptography")
    assert load_config(home).pqc_backend == "cryptography"
    monkeypatch.setenv("PQHSM_PQC_BACKEND", "oqs")
    with pytest.raises(ConfigError, match=r"pqc\.backend is 'oqs'; choose cryptography, liboqs"):
        load_config(home)
    monkeypatch.delenv("PQHSM_PQC_BACKEND")
    (home / "config.toml").write_text('[pqc]\nbackend = ""\n')
    with pytest.raises(ConfigError, match=r"pqc\.backend must be a non-empty string"):
        load_config(home)
    (home / "config.toml").write_text('pqc = "liboqs"\n')
    with pytest.raises(ConfigError, match=r"\[pqc\] must be tables"):
        load_config(home)


def test_apply_environment_selects_the_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lib").mkdir()
    _hide_system_liboqs(monkeypatch, tmp_path)
    Config(home=tmp_path, pqc_backend="auto").apply_environment()
    assert active_backend().name == "cryptography"
    with pytest.raises(ConfigError, match="liboqs is configured but not usable"):
        Config(home=tmp_path, pqc_backend="liboqs").apply_environment()
    monkeypatch.undo()
    if not NO_LIBOQS:
        Config(home=tmp_path, pqc_backend="liboqs").apply_environment()
        assert active_backend().name == "liboqs"
    Config(home=tmp_path).apply_environment()
    assert active_backend().name == "cryptography"


# -- blobs across backends (real SoftHSM2 token) ----------------------------------------------


def _other(name: str, oqs: LiboqsBackend, crypto: CryptographyBackend) -> PqcBackend:
    return crypto if name == "liboqs" else oqs


@needs_liboqs
@pytest.mark.softhsm
@pytest.mark.parametrize("maker", ["cryptography", "liboqs"])
def test_keystore_blobs_open_under_the_other_backend(
    oqs: LiboqsBackend,
    crypto: CryptographyBackend,
    fresh_token: TokenSpec,
    tmp_path: Path,
    maker: str,
) -> None:
    from appliance.keystore import PBKDF2_SHA3, Keystore, calibrate
    from appliance.token import TokenConfig
    from appliance.token.pkcs11 import Pkcs11Token

    made_by: PqcBackend = oqs if maker == "liboqs" else crypto
    opened_by = _other(maker, oqs, crypto)
    token = Pkcs11Token.open(
        TokenConfig(fresh_token.module, fresh_token.label), fresh_token.pin_secret()
    )
    try:
        ks = Keystore(tmp_path / "home", token, made_by)
        ks.create(SecretBytes(PASSPHRASE), calibrate(PBKDF2_SHA3, pbkdf2_iterations=CHEAP_PBKDF2))
        public, digest = ks.new_mldsa("k1")
        sig_before = ks.open_mldsa("k1").sign(MESSAGE, CONTEXT)

        again = Keystore(ks.home, token, opened_by)
        again.unlock(SecretBytes(PASSPHRASE))  # KEM seed -> same ek under the other backend
        signer = again.open_mldsa("k1", expect_public=public, expect_digest=digest)
        assert signer.public_bytes() == public
        sig_after = signer.sign(MESSAGE, CONTEXT)
        for backend in (oqs, crypto):
            backend.mldsa87_verify(public, MESSAGE, sig_before, CONTEXT)
            backend.mldsa87_verify(public, MESSAGE, sig_after, CONTEXT)
        # and a blob sealed by the second backend opens under the first
        public2, digest2 = again.new_mldsa("k2")
        first = Keystore(ks.home, token, made_by)
        first.unlock(SecretBytes(PASSPHRASE))
        assert first.open_mldsa("k2", expect_digest=digest2).public_bytes() == public2
    finally:
        token.close()


@needs_liboqs
@pytest.mark.softhsm
def test_appliance_made_under_cryptography_runs_under_liboqs(
    oqs: LiboqsBackend, crypto: CryptographyBackend, fresh_token: TokenSpec, app_home: Path
) -> None:
    from dataclasses import replace

    from appliance.keys import KeyState
    from appliance.keystore import PBKDF2_SHA3, calibrate
    from appliance.service import Appliance

    cfg = make_config(app_home, fresh_token)
    kdf = calibrate(PBKDF2_SHA3, pbkdf2_iterations=CHEAP_PBKDF2)
    app = Appliance.initialize(
        cfg, pin=fresh_token.pin_secret(), passphrase=SecretBytes(PASSPHRASE), kdf=kdf
    )
    try:
        assert app.pqc.name == "cryptography"
        key = app.create_key("ml-dsa-87", "pq")
        hybrid = app.migrate(app.create_key("ed25519", "dual"), KeyState.HYBRID)
        app.checkpoint()  # signed by the audit key, whose ML-DSA half is a blob too
    finally:
        app.close()
    assert key.pqc_public is not None

    app = Appliance.open(
        replace(cfg, pqc_backend="liboqs"),
        pin=fresh_token.pin_secret(),
        passphrase=SecretBytes(PASSPHRASE),
    )
    try:
        assert app.pqc is oqs
        assert active_backend() is oqs
        assert app.status().pqc_backend["active"] == "liboqs"
        sig = app.sign(app.key(key.key_id), MESSAGE, context=CONTEXT)
        dual = app.sign(app.key(hybrid.key_id), MESSAGE)
        app.checkpoint()
    finally:
        app.close()
    assert len(sig) == MLDSA87_SIG_LEN
    crypto.mldsa87_verify(key.pqc_public, MESSAGE, sig, CONTEXT)
    assert dual[:4] == b"PQDS"

    # and back: reopened under cryptography, the WAL (checkpoints signed under both) verifies
    app = Appliance.open(cfg, pin=fresh_token.pin_secret(), passphrase=SecretBytes(PASSPHRASE))
    try:
        assert app.pqc.name == "cryptography"
        oqs.mldsa87_verify(
            key.pqc_public,
            MESSAGE,
            app.sign(app.key(key.key_id), MESSAGE, context=CONTEXT),
            CONTEXT,
        )
    finally:
        app.close()


@pytest.mark.softhsm
def test_cli_liboqs_configured_but_unusable_is_one_error_line(tmp_path: Path) -> None:
    # runs everywhere (SoftHSM2 only): OQS_INSTALL_PATH names a library that is not liboqs
    (tmp_path / "oqs" / "lib").mkdir(parents=True)
    (tmp_path / "oqs" / "lib" / "liboqs.so").symlink_to(NOT_LIBOQS)
    home = tmp_path / "pqhsm"
    init = run_cli(
        *throwaway_init_args(tmp_path / "secrets"),
        home=home,
    )
    assert init.returncode == 0, init.stderr.decode()
    env = {"PQHSM_PQC_BACKEND": "liboqs", "OQS_INSTALL_PATH": str(tmp_path / "oqs")}
    proc = run_cli("status", home=home, env=env)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: pqc backend liboqs is configured but not usable: "), err
    assert "has no OQS_init" in lines[0]
    env["PQHSM_PQC_BACKEND"] = "auto"
    status = json.loads(run_cli("status", "--json", home=home, env=env).stdout)["pqc_backend"]
    assert status["active"] == "cryptography"
    assert status["liboqs_library"] == str(tmp_path / "oqs" / "lib" / "liboqs.so")
    assert "has no OQS_init" in status["liboqs_problem"]
    table = run_cli("status", home=home, env=env).stdout.decode()
    assert "pqc backend cryptography (liboqs not usable: " in table


@needs_liboqs
@pytest.mark.softhsm
def test_cli_signs_under_liboqs_and_verifies_under_cryptography(tmp_path: Path) -> None:
    home = tmp_path / "pqhsm"
    init = run_cli(
        *throwaway_init_args(tmp_path / "secrets"),
        home=home,
    )
    assert init.returncode == 0, init.stderr.decode()
    made = run_cli("key", "create", "--type", "ml-dsa-87", "--label", "pq", home=home)
    assert made.returncode == 0, made.stderr.decode()
    (tmp_path / "msg").write_bytes(MESSAGE)
    env = {"PQHSM_PQC_BACKEND": "liboqs"}
    status = json.loads(run_cli("status", "--json", home=home, env=env).stdout)
    assert status["pqc_backend"]["active"] == "liboqs"
    assert status["pqc_backend"]["liboqs_problem"] is None
    version = status["pqc_backend"]["liboqs_version"]
    table = run_cli("status", home=home, env=env).stdout.decode()
    assert f"pqc backend liboqs (liboqs {version} at " in table
    # without the setting the same appliance runs on cryptography again, and never loads
    # liboqs (so its version is unknown), though status says where it is
    plain = json.loads(run_cli("status", "--json", home=home).stdout)["pqc_backend"]
    assert (plain["active"], plain["liboqs_version"]) == ("cryptography", None)
    assert plain["liboqs_available"] is True
    sign = run_cli(
        "sign", "pq", "--in", str(tmp_path / "msg"), "--out", str(tmp_path / "sig"),
        "--context", "cli", home=home, env=env,
    )  # fmt: skip
    assert sign.returncode == 0, sign.stderr.decode()
    # `pqhsm verify` checks with public keys alone, through cryptography
    verify = run_cli(
        "verify", "--key", "pq", "--in", str(tmp_path / "msg"), "--sig", str(tmp_path / "sig"),
        "--context", "cli", home=home,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr.decode()
    assert len((tmp_path / "sig").read_bytes()) == MLDSA87_SIG_LEN


def test_seed_lengths_are_the_fips_ones() -> None:
    # both backends size their buffers with appliance.pqc's constants (FIPS 204 / 203)
    assert MLDSA87_SEED_LEN == 32
    assert MLKEM1024_SEED_LEN == 64
    assert MLDSA87_SIG_LEN == 4627
    assert appliance.pqc.MLDSA87_PUBLIC_LEN == 2592
    assert appliance.pqc.MLKEM1024_EK_LEN == 1568
    assert appliance.pqc.MLKEM1024_CT_LEN == 1568
