"""Post-quantum primitives behind one small backend interface.

hazardous: use the service API.  This module does no policy; it turns seeds into keys.

The default backend is ``cryptography`` (FIPS 203/204 through its bundled OpenSSL).  An
optional liboqs backend may register itself later; it is only ever *detected* by looking
for the installed shared library, never by importing ``oqs`` (liboqs-python downloads and
compiles liboqs at import time when the library is missing).

Keys are always handled as seeds: the 32-byte ML-DSA seed xi and the 64-byte ML-KEM seed
d||z.  Blobs store seeds, so every blob opens under every backend.
"""

from __future__ import annotations

import ctypes.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

from appliance.errors import CallerError, SignatureInvalid
from appliance.secret import BytesLike, SecretBytes

__all__ = [
    "MLDSA87_PUBLIC_LEN",
    "MLDSA87_SEED_LEN",
    "MLDSA87_SIG_LEN",
    "MLKEM1024_CT_LEN",
    "MLKEM1024_EK_LEN",
    "MLKEM1024_SEED_LEN",
    "BackendInfo",
    "MlDsaSigner",
    "MlKemDecapsulator",
    "PqcBackend",
    "active_backend",
    "backend_info",
]

MLDSA87_SEED_LEN: Final = 32
MLDSA87_PUBLIC_LEN: Final = 2592
MLDSA87_SIG_LEN: Final = 4627
MLKEM1024_SEED_LEN: Final = 64
MLKEM1024_EK_LEN: Final = 1568
MLKEM1024_CT_LEN: Final = 1568
MLKEM1024_SS_LEN: Final = 32
MAX_CONTEXT: Final = 255


class MlDsaSigner(Protocol):
    """An ML-DSA-87 private key made from a seed."""

    def public_bytes(self) -> bytes: ...

    def sign(self, message: BytesLike, context: bytes = b"") -> bytes:
        """FIPS 204 pure ML-DSA, hedged (randomized), context of at most 255 bytes."""
        ...


class MlKemDecapsulator(Protocol):
    """An ML-KEM-1024 decapsulation key made from a seed."""

    def encapsulation_key(self) -> bytes: ...

    def decapsulate(self, ciphertext: BytesLike) -> SecretBytes: ...


class PqcBackend(Protocol):
    """What the appliance needs from a post-quantum library."""

    name: str

    def mldsa87_from_seed(self, seed: BytesLike) -> MlDsaSigner: ...

    def mldsa87_verify(
        self, public: BytesLike, message: BytesLike, signature: BytesLike, context: bytes = b""
    ) -> None:
        """Raise :class:`SignatureInvalid` unless ``signature`` verifies."""
        ...

    def mlkem1024_from_seed(self, seed: BytesLike) -> MlKemDecapsulator: ...

    def mlkem1024_encapsulate(self, ek: BytesLike) -> tuple[SecretBytes, bytes]:
        """Return (shared secret, ciphertext)."""
        ...


def _buf(what: str, value: object) -> bytes:
    """Bytes of a buffer; refuses ints and lists, which ``bytes()`` would silently accept."""
    try:
        return memoryview(value).tobytes()  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be bytes-like, not {type(value).__name__}") from None


def _check_context(context: object) -> bytes:
    ctx = _buf("context", context)
    if len(ctx) > MAX_CONTEXT:
        raise CallerError(f"ML-DSA context is {len(ctx)} bytes; at most {MAX_CONTEXT}")
    return ctx


def _secret_view(what: str, value: object, n: int) -> memoryview:
    """A byte view of a secret input, length-checked without copying it."""
    try:
        view = memoryview(value).cast("B")  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be bytes-like, not {type(value).__name__}") from None
    if view.nbytes != n:
        raise CallerError(f"{what} must be {n} bytes, got {view.nbytes}")
    return view


def _check_len(what: str, value: object, n: int) -> bytes:
    data = _buf(what, value)
    if len(data) != n:
        raise CallerError(f"{what} must be {n} bytes, got {len(data)}")
    return data


class _CryptoMlDsa:
    __slots__ = ("_key", "_pub")

    def __init__(self, seed: BytesLike) -> None:
        seed_view = _secret_view("ML-DSA-87 seed", seed, MLDSA87_SEED_LEN)
        # Security: the expanded key lives inside OpenSSL, where Python cannot wipe it;
        # it is freed when this object is dropped (see docs/threat-model.md).
        self._key = mldsa.MLDSA87PrivateKey.from_seed_bytes(seed_view)
        self._pub = self._key.public_key().public_bytes_raw()

    def public_bytes(self) -> bytes:
        return self._pub

    def sign(self, message: BytesLike, context: bytes = b"") -> bytes:
        ctx = _check_context(context)
        return self._key.sign(_buf("message", message), ctx or None)


class _CryptoMlKem:
    __slots__ = ("_ek", "_key")

    def __init__(self, seed: BytesLike) -> None:
        seed_view = _secret_view("ML-KEM-1024 seed", seed, MLKEM1024_SEED_LEN)
        self._key = mlkem.MLKEM1024PrivateKey.from_seed_bytes(seed_view)
        self._ek = self._key.public_key().public_bytes_raw()

    def encapsulation_key(self) -> bytes:
        return self._ek

    def decapsulate(self, ciphertext: BytesLike) -> SecretBytes:
        ct = _check_len("ML-KEM-1024 ciphertext", ciphertext, MLKEM1024_CT_LEN)
        # decapsulate() returns bytes; copied into wipeable memory at once.
        return SecretBytes(self._key.decapsulate(ct))


class CryptographyBackend:
    """FIPS 203/204 from pyca/cryptography (OpenSSL); the default."""

    name = "cryptography"

    def mldsa87_from_seed(self, seed: BytesLike) -> MlDsaSigner:
        return _CryptoMlDsa(seed)

    def mldsa87_verify(
        self, public: BytesLike, message: BytesLike, signature: BytesLike, context: bytes = b""
    ) -> None:
        ctx = _check_context(context)
        pub = _check_len("ML-DSA-87 public key", public, MLDSA87_PUBLIC_LEN)
        sig = _buf("signature", signature)
        msg = _buf("message", message)
        if len(sig) != MLDSA87_SIG_LEN:
            raise SignatureInvalid("signature invalid")
        key = mldsa.MLDSA87PublicKey.from_public_bytes(pub)
        try:
            key.verify(sig, msg, ctx or None)
        except InvalidSignature:
            raise SignatureInvalid("signature invalid") from None

    def mlkem1024_from_seed(self, seed: BytesLike) -> MlKemDecapsulator:
        return _CryptoMlKem(seed)

    def mlkem1024_encapsulate(self, ek: BytesLike) -> tuple[SecretBytes, bytes]:
        ek_bytes = _check_len("ML-KEM-1024 encapsulation key", ek, MLKEM1024_EK_LEN)
        try:
            key = mlkem.MLKEM1024PublicKey.from_public_bytes(ek_bytes)
        except ValueError:
            raise CallerError("ML-KEM-1024 encapsulation key is malformed") from None
        ss, ct = key.encapsulate()
        # the shared secret arrives as bytes; copied into wipeable memory at once.
        return SecretBytes(ss), ct


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What ``pqhsm status`` reports about post-quantum backends."""

    active: str
    liboqs_library: str | None

    @property
    def liboqs_available(self) -> bool:
        return self.liboqs_library is not None


def find_liboqs() -> str | None:
    """Locate an installed liboqs shared library without importing liboqs-python."""
    root = os.environ.get("OQS_INSTALL_PATH")
    if root:
        for sub in ("lib", "lib64"):
            libdir = Path(root) / sub
            for cand in sorted(libdir.glob("liboqs.so*")) + sorted(libdir.glob("liboqs*.dylib")):
                if cand.is_file():
                    return str(cand)
    return ctypes.util.find_library("oqs")


_DEFAULT: Final = CryptographyBackend()


def active_backend() -> PqcBackend:
    """The backend in use.  Only ``cryptography`` ships as the default."""
    return _DEFAULT


def backend_info() -> BackendInfo:
    return BackendInfo(active=active_backend().name, liboqs_library=find_liboqs())
