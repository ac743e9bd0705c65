"""appliance.pqc: input checking, buffer-protocol inputs, backend detection.

Known-answer behaviour is in tests/vectors/test_mldsa87_acvp.py and
test_mlkem1024_acvp.py; this file covers what the vectors do not: wrong lengths, wrong
types, tampering, bytearray/memoryview inputs (pyca's ``test_buffer_protocol``) and
liboqs detection without importing ``oqs``.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pytest

import appliance.pqc
from appliance.errors import CallerError, SignatureInvalid
from appliance.pqc import (
    MLDSA87_PUBLIC_LEN,
    MLDSA87_SEED_LEN,
    MLDSA87_SIG_LEN,
    MLKEM1024_CT_LEN,
    MLKEM1024_EK_LEN,
    MLKEM1024_SEED_LEN,
    BackendInfo,
    MlDsaSigner,
    MlKemDecapsulator,
    PqcBackend,
    active_backend,
    backend_info,
    find_liboqs,
)
from appliance.secret import BytesLike, SecretBytes

DSA_SEED: Final = hashlib.sha256(b"pqhsm unit ML-DSA seed").digest()
KEM_SEED: Final = hashlib.sha512(b"pqhsm unit ML-KEM seed").digest()
MESSAGE: Final = b"pqhsm unit message"
CONTEXT: Final = b"pqhsm/unit"


def _secret(sb: SecretBytes) -> bytes:
    # test-only copy of a shared secret, compared once and dropped
    return bytes(sb.view())


@pytest.fixture(scope="module")
def backend() -> PqcBackend:
    return active_backend()


@pytest.fixture(scope="module")
def signer(backend: PqcBackend) -> MlDsaSigner:
    return backend.mldsa87_from_seed(DSA_SEED)


@pytest.fixture(scope="module")
def signature(signer: MlDsaSigner) -> bytes:
    return signer.sign(MESSAGE, CONTEXT)


@pytest.fixture(scope="module")
def decapsulator(backend: PqcBackend) -> MlKemDecapsulator:
    return backend.mlkem1024_from_seed(KEM_SEED)


def test_sizes(signer: MlDsaSigner, signature: bytes, decapsulator: MlKemDecapsulator) -> None:
    assert len(signer.public_bytes()) == MLDSA87_PUBLIC_LEN
    assert len(signature) == MLDSA87_SIG_LEN
    assert len(decapsulator.encapsulation_key()) == MLKEM1024_EK_LEN


def test_round_trips(
    backend: PqcBackend, signer: MlDsaSigner, signature: bytes, decapsulator: MlKemDecapsulator
) -> None:
    backend.mldsa87_verify(signer.public_bytes(), MESSAGE, signature, CONTEXT)
    secret, ct = backend.mlkem1024_encapsulate(decapsulator.encapsulation_key())
    assert isinstance(secret, SecretBytes)
    assert len(ct) == MLKEM1024_CT_LEN
    assert _secret(decapsulator.decapsulate(ct)) == _secret(secret)


# -- wrong lengths -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, MLDSA87_SEED_LEN - 1, MLDSA87_SEED_LEN + 1, 64])
def test_mldsa_seed_wrong_length(backend: PqcBackend, n: int) -> None:
    with pytest.raises(CallerError, match="seed"):
        backend.mldsa87_from_seed(bytes(n))


@pytest.mark.parametrize("n", [0, 32, MLKEM1024_SEED_LEN - 1, MLKEM1024_SEED_LEN + 1, 96])
def test_mlkem_seed_wrong_length(backend: PqcBackend, n: int) -> None:
    with pytest.raises(CallerError, match="seed"):
        backend.mlkem1024_from_seed(bytes(n))


def test_sign_context_256_bytes(signer: MlDsaSigner) -> None:
    with pytest.raises(CallerError, match="context"):
        signer.sign(MESSAGE, bytes(256))


def test_verify_context_256_bytes(
    backend: PqcBackend, signer: MlDsaSigner, signature: bytes
) -> None:
    with pytest.raises(CallerError, match="context"):
        backend.mldsa87_verify(signer.public_bytes(), MESSAGE, signature, bytes(256))


def test_context_255_bytes_is_the_limit(backend: PqcBackend, signer: MlDsaSigner) -> None:
    context = bytes(range(255))
    sig = signer.sign(MESSAGE, context)
    backend.mldsa87_verify(signer.public_bytes(), MESSAGE, sig, context)


@pytest.mark.parametrize(
    "n", [0, 1, MLDSA87_SIG_LEN - 1, MLDSA87_SIG_LEN + 1, 2 * MLDSA87_SIG_LEN, 3309]
)
def test_signature_wrong_length(
    backend: PqcBackend, signer: MlDsaSigner, signature: bytes, n: int
) -> None:
    # a prefix or a zero-padded copy of a valid signature, so only the length is wrong
    bad = (signature + bytes(MLDSA87_SIG_LEN))[:n]
    with pytest.raises(SignatureInvalid):
        backend.mldsa87_verify(signer.public_bytes(), MESSAGE, bad, CONTEXT)


@pytest.mark.parametrize("n", [0, MLDSA87_PUBLIC_LEN - 1, MLDSA87_PUBLIC_LEN + 1, 1952])
def test_public_key_wrong_length(backend: PqcBackend, signature: bytes, n: int) -> None:
    with pytest.raises(CallerError, match="public key"):
        backend.mldsa87_verify(bytes(n), MESSAGE, signature, CONTEXT)


@pytest.mark.parametrize("n", [0, MLKEM1024_EK_LEN - 1, MLKEM1024_EK_LEN + 1, 1184, 800])
def test_encapsulation_key_wrong_length(
    backend: PqcBackend, decapsulator: MlKemDecapsulator, n: int
) -> None:
    ek = (decapsulator.encapsulation_key() + bytes(MLKEM1024_EK_LEN))[:n]
    with pytest.raises(CallerError, match="encapsulation key"):
        backend.mlkem1024_encapsulate(ek)


def test_encapsulation_key_coefficient_not_reduced(
    backend: PqcBackend, decapsulator: MlKemDecapsulator
) -> None:
    # FIPS 203 §7.2: first 12-bit coefficient set to 4095 >= q = 3329
    ek = bytearray(decapsulator.encapsulation_key())
    ek[0] = 0xFF
    ek[1] |= 0x0F
    with pytest.raises(CallerError, match="malformed"):
        backend.mlkem1024_encapsulate(ek)


@pytest.mark.parametrize("n", [0, MLKEM1024_CT_LEN - 1, MLKEM1024_CT_LEN + 1, 1088, 768])
def test_ciphertext_wrong_length(decapsulator: MlKemDecapsulator, n: int) -> None:
    with pytest.raises(CallerError, match="ciphertext"):
        decapsulator.decapsulate(bytes(n))


# -- tampering ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offset",
    [0, 63, 64, 2000, MLDSA87_SIG_LEN - 83, MLDSA87_SIG_LEN - 1],
    ids=["c-first", "c-last", "z-first", "z-middle", "hint-first", "hint-last"],
)
def test_tampered_signature(
    backend: PqcBackend, signer: MlDsaSigner, signature: bytes, offset: int
) -> None:
    bad = bytearray(signature)
    bad[offset] ^= 0x01
    with pytest.raises(SignatureInvalid):
        backend.mldsa87_verify(signer.public_bytes(), MESSAGE, bad, CONTEXT)


@pytest.mark.parametrize(
    "message",
    [b"", MESSAGE[:-1], MESSAGE + b"\x00", bytes([MESSAGE[0] ^ 0x01]) + MESSAGE[1:]],
    ids=["empty", "truncated", "extended", "bit-flip"],
)
def test_tampered_message(
    backend: PqcBackend, signer: MlDsaSigner, signature: bytes, message: bytes
) -> None:
    with pytest.raises(SignatureInvalid):
        backend.mldsa87_verify(signer.public_bytes(), message, signature, CONTEXT)


@pytest.mark.parametrize("context", [b"", CONTEXT[:-1], CONTEXT + b"\x00"])
def test_wrong_context(
    backend: PqcBackend, signer: MlDsaSigner, signature: bytes, context: bytes
) -> None:
    with pytest.raises(SignatureInvalid):
        backend.mldsa87_verify(signer.public_bytes(), MESSAGE, signature, context)


def test_wrong_public_key(backend: PqcBackend, signature: bytes) -> None:
    other = backend.mldsa87_from_seed(bytes(MLDSA87_SEED_LEN)).public_bytes()
    with pytest.raises(SignatureInvalid):
        backend.mldsa87_verify(other, MESSAGE, signature, CONTEXT)


def test_tampered_ciphertext_is_implicitly_rejected(
    backend: PqcBackend, decapsulator: MlKemDecapsulator
) -> None:
    secret, ct = backend.mlkem1024_encapsulate(decapsulator.encapsulation_key())
    bad = bytearray(ct)
    bad[-1] ^= 0x80
    rejected = _secret(decapsulator.decapsulate(bad))
    assert len(rejected) == 32
    assert rejected != _secret(secret)
    # implicit rejection is deterministic: same key, same ciphertext, same output
    assert _secret(decapsulator.decapsulate(bad)) == rejected


# -- buffer protocol (pyca test_buffer_protocol) ----------------------------------------------

BUFFERS: Final[list[Any]] = [
    pytest.param(bytes, id="bytes"),
    pytest.param(bytearray, id="bytearray"),
    pytest.param(memoryview, id="memoryview"),
    # a view into the middle of a larger buffer: offset and length must both be honoured
    pytest.param(lambda b: memoryview(b"\xaa" + bytes(b) + b"\xbb")[1:-1], id="memoryview-slice"),
]
Conv = Callable[[bytes], BytesLike]


@pytest.mark.parametrize("conv", BUFFERS)
def test_buffer_mldsa_seed(backend: PqcBackend, signer: MlDsaSigner, conv: Conv) -> None:
    assert backend.mldsa87_from_seed(conv(DSA_SEED)).public_bytes() == signer.public_bytes()


@pytest.mark.parametrize("conv", BUFFERS)
def test_buffer_sign_message(backend: PqcBackend, signer: MlDsaSigner, conv: Conv) -> None:
    sig = signer.sign(conv(MESSAGE), CONTEXT)
    backend.mldsa87_verify(signer.public_bytes(), MESSAGE, sig, CONTEXT)


@pytest.mark.parametrize("conv", BUFFERS)
def test_buffer_verify_inputs(
    backend: PqcBackend, signer: MlDsaSigner, signature: bytes, conv: Conv
) -> None:
    public = signer.public_bytes()
    backend.mldsa87_verify(conv(public), conv(MESSAGE), conv(signature), CONTEXT)
    with pytest.raises(SignatureInvalid):
        backend.mldsa87_verify(conv(public), conv(MESSAGE + b"!"), conv(signature), CONTEXT)


@pytest.mark.parametrize("conv", BUFFERS)
def test_buffer_mlkem_seed(
    backend: PqcBackend, decapsulator: MlKemDecapsulator, conv: Conv
) -> None:
    key = backend.mlkem1024_from_seed(conv(KEM_SEED))
    assert key.encapsulation_key() == decapsulator.encapsulation_key()


@pytest.mark.parametrize("conv", BUFFERS)
def test_buffer_encapsulate_and_decapsulate(
    backend: PqcBackend, decapsulator: MlKemDecapsulator, conv: Conv
) -> None:
    secret, ct = backend.mlkem1024_encapsulate(conv(decapsulator.encapsulation_key()))
    assert _secret(decapsulator.decapsulate(conv(ct))) == _secret(secret)


# -- wrong types (pyca: a wrong type raises TypeError) --------------------------------------

NOT_BYTES: Final[list[Any]] = [
    pytest.param(None, id="None"),
    pytest.param(32, id="int"),
    pytest.param("00" * 16, id="str"),
    pytest.param([0] * 32, id="list"),
]
# ints and lists of ints once slipped through bytes(x) (bytes(5) is five zero bytes):
# every buffer is now converted through memoryview, which refuses them.
NOT_BYTES_CONVERTED: Final[list[Any]] = NOT_BYTES


def _sized(bad: Any, n: int) -> Any:
    """``bad`` at the length ``n`` where it has a length, so only the type is wrong."""
    if isinstance(bad, str):
        return "x" * n
    if isinstance(bad, list):
        return [0] * n
    return bad


@pytest.mark.parametrize("bad", NOT_BYTES)
def test_type_mldsa_seed(backend: PqcBackend, bad: Any) -> None:
    with pytest.raises(TypeError):
        backend.mldsa87_from_seed(_sized(bad, MLDSA87_SEED_LEN))


@pytest.mark.parametrize("bad", NOT_BYTES)
def test_type_mlkem_seed(backend: PqcBackend, bad: Any) -> None:
    with pytest.raises(TypeError):
        backend.mlkem1024_from_seed(_sized(bad, MLKEM1024_SEED_LEN))


@pytest.mark.parametrize("bad", NOT_BYTES_CONVERTED)
def test_type_verify_public_key(backend: PqcBackend, signature: bytes, bad: Any) -> None:
    with pytest.raises(TypeError):
        backend.mldsa87_verify(_sized(bad, MLDSA87_PUBLIC_LEN), MESSAGE, signature, CONTEXT)


@pytest.mark.parametrize("bad", NOT_BYTES_CONVERTED)
def test_type_verify_signature(backend: PqcBackend, signer: MlDsaSigner, bad: Any) -> None:
    with pytest.raises(TypeError):
        backend.mldsa87_verify(signer.public_bytes(), MESSAGE, _sized(bad, MLDSA87_SIG_LEN))


@pytest.mark.parametrize("bad", [pytest.param(None, id="None"), pytest.param("ctx", id="str")])
def test_type_context(backend: PqcBackend, signer: MlDsaSigner, signature: bytes, bad: Any) -> None:
    with pytest.raises(TypeError):
        signer.sign(MESSAGE, bad)
    with pytest.raises(TypeError):
        backend.mldsa87_verify(signer.public_bytes(), MESSAGE, signature, bad)


@pytest.mark.parametrize("bad", NOT_BYTES_CONVERTED)
def test_type_encapsulation_key(backend: PqcBackend, bad: Any) -> None:
    with pytest.raises(TypeError):
        backend.mlkem1024_encapsulate(_sized(bad, MLKEM1024_EK_LEN))


@pytest.mark.parametrize("bad", NOT_BYTES_CONVERTED)
def test_type_ciphertext(decapsulator: MlKemDecapsulator, bad: Any) -> None:
    with pytest.raises(TypeError):
        decapsulator.decapsulate(_sized(bad, MLKEM1024_CT_LEN))


def test_type_message_str(backend: PqcBackend, signer: MlDsaSigner, signature: bytes) -> None:
    bad: Any = MESSAGE.decode()
    with pytest.raises(TypeError):
        signer.sign(bad, CONTEXT)
    with pytest.raises(TypeError):
        backend.mldsa87_verify(signer.public_bytes(), bad, signature, CONTEXT)


@pytest.mark.parametrize("bad", [pytest.param(5, id="int"), pytest.param([1, 2], id="list")])
def test_type_message_not_a_buffer_sign(signer: MlDsaSigner, bad: Any) -> None:
    with pytest.raises(TypeError):
        signer.sign(bad, CONTEXT)


def test_type_message_int_verify(backend: PqcBackend, signer: MlDsaSigner) -> None:
    # the signature is over five zero bytes, so an int 5 currently *verifies*
    sig = signer.sign(bytes(5), CONTEXT)
    bad: Any = 5
    with pytest.raises(TypeError):
        backend.mldsa87_verify(signer.public_bytes(), bad, sig, CONTEXT)


# -- backend_info and liboqs detection ----------------------------------------------------------


def test_backend_info_default() -> None:
    info = backend_info()
    assert isinstance(info, BackendInfo)
    assert info.active == "cryptography" == active_backend().name
    assert info.liboqs_library == find_liboqs()
    assert info.liboqs_available is (info.liboqs_library is not None)


@pytest.mark.parametrize("sub", ["lib", "lib64"])
@pytest.mark.parametrize("name", ["liboqs.so", "liboqs.dylib"])
def test_liboqs_found_under_oqs_install_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sub: str, name: str
) -> None:
    fake = tmp_path / sub / name
    fake.parent.mkdir()
    fake.write_bytes(b"\x7fELF not really")
    monkeypatch.setenv("OQS_INSTALL_PATH", str(tmp_path))
    # the system search must not be consulted when OQS_INSTALL_PATH has the library
    monkeypatch.setattr(ctypes.util, "find_library", _refuse_find_library)
    assert find_liboqs() == str(fake)
    info = backend_info()
    assert info == BackendInfo(active="cryptography", liboqs_library=str(fake))
    assert info.liboqs_available is True


def _refuse_find_library(name: str) -> str | None:
    raise AssertionError(f"ctypes.util.find_library({name!r}) called")


@pytest.mark.parametrize("install_path", ["empty-dir", "unset"])
def test_liboqs_falls_back_to_system_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, install_path: str
) -> None:
    if install_path == "unset":
        monkeypatch.delenv("OQS_INSTALL_PATH", raising=False)
    else:
        (tmp_path / "lib").mkdir()
        monkeypatch.setenv("OQS_INSTALL_PATH", str(tmp_path))
    asked: list[str] = []

    def none_found(name: str) -> str | None:
        asked.append(name)
        return None

    monkeypatch.setattr(ctypes.util, "find_library", none_found)
    info = backend_info()
    assert info == BackendInfo(active="cryptography", liboqs_library=None)
    assert info.liboqs_available is False
    assert asked == ["oqs"]

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "liboqs.so.9")
    info = backend_info()
    assert info.liboqs_library == "liboqs.so.9"
    assert info.liboqs_available is True


_PROBE: Final = """
import importlib.util, json, sys
import appliance.pqc as pqc
info = pqc.backend_info()
spec = importlib.util.find_spec("oqs")
print(json.dumps({
    "oqs_imported": "oqs" in sys.modules,
    "oqs_importable_from": spec.origin if spec else None,
    "active": info.active,
    "liboqs_library": info.liboqs_library,
    "liboqs_available": info.liboqs_available,
}))
"""


def test_import_never_imports_oqs(tmp_path: Path) -> None:
    # A fresh interpreter, with an importable fake "oqs" module on the path and a fake
    # liboqs install: detection must find the library without importing the module.  The
    # fake imports cleanly (so a guarded import would succeed) and leaves a marker file.
    trap = tmp_path / "oqs-was-imported"
    fake_mod = tmp_path / "site" / "oqs.py"
    fake_mod.parent.mkdir()
    fake_mod.write_text(f"open({str(trap)!r}, 'w').close()\n", encoding="utf-8")
    fake_lib = tmp_path / "install" / "lib" / "liboqs.so"
    fake_lib.parent.mkdir(parents=True)
    fake_lib.write_bytes(b"")
    repo = Path(appliance.pqc.__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(fake_mod.parent), str(repo)])
    env["OQS_INSTALL_PATH"] = str(tmp_path / "install")
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(out.stdout)
    assert report["oqs_importable_from"] == str(fake_mod)  # the trap was reachable
    assert report["oqs_imported"] is False
    assert not trap.exists()
    assert report["active"] == "cryptography"
    assert report["liboqs_library"] == str(fake_lib)
    assert report["liboqs_available"] is True
