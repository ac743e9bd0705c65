"""Post-quantum primitives behind one small backend interface.

hazardous: use the service API.  This module does no policy; it turns seeds into keys.

The default backend is ``cryptography`` (FIPS 203/204 through its bundled OpenSSL).  The
optional ``liboqs`` backend (:mod:`appliance.pqc_liboqs`, ctypes over liboqs' C API) is
used only where liboqs is already installed: it is *detected* by looking for the shared
library (``$OQS_INSTALL_PATH/lib``, then the system library path), never by importing
``oqs`` (liboqs-python downloads and compiles liboqs at import time when the library is
missing).  :func:`select_backend` makes one of ``cryptography``, ``liboqs`` or ``auto``
the process's active backend; the service calls it from the configuration (``[pqc]
backend``) when it opens the appliance.  Both backends give byte-identical keys from the
same seed and interoperate byte for byte.

Keys are always handled as seeds: the 32-byte ML-DSA seed xi and the 64-byte ML-KEM seed
d||z.  Blobs store seeds, so every blob opens under every backend.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

from appliance.errors import CallerError, ConfigError, SignatureInvalid
from appliance.secret import BytesLike, SecretBytes

if TYPE_CHECKING:
    from appliance.pqc_liboqs import LiboqsBackend

__all__ = [
    "LIBOQS_NOT_INSTALLED",
    "MLDSA87_PUBLIC_LEN",
    "MLDSA87_SEED_LEN",
    "MLDSA87_SIG_LEN",
    "MLKEM1024_CT_LEN",
    "MLKEM1024_EK_LEN",
    "MLKEM1024_SEED_LEN",
    "PQC_BACKEND_CHOICES",
    "BackendInfo",
    "MlDsaSigner",
    "MlKemDecapsulator",
    "PqcBackend",
    "active_backend",
    "backend_info",
    "find_liboqs",
    "liboqs_backend",
    "select_backend",
]

log = logging.getLogger(__name__)

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


def _verify_args(
    public: object, message: object, signature: object, context: object
) -> tuple[bytes, bytes, bytes, bytes]:
    """ML-DSA-87 verification inputs, checked alike for every backend: (public key,
    message, signature, context).

    :raises SignatureInvalid: the signature has the wrong length.
    """
    ctx = _check_context(context)
    pub = _check_len("ML-DSA-87 public key", public, MLDSA87_PUBLIC_LEN)
    sig = _buf("signature", signature)
    msg = _buf("message", message)
    if len(sig) != MLDSA87_SIG_LEN:
        raise SignatureInvalid("signature invalid")
    return pub, msg, sig, ctx


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
        pub, msg, sig, ctx = _verify_args(public, message, signature, context)
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


PQC_BACKEND_CHOICES: Final = ("cryptography", "liboqs", "auto")
LIBOQS_NOT_INSTALLED: Final = (
    "liboqs shared library not installed on this machine (set OQS_INSTALL_PATH)"
)


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What ``pqhsm status`` reports about post-quantum backends.

    ``liboqs_library`` is where a liboqs shared library was found (``liboqs_available``).
    Once :func:`select_backend` has tried it in this process, ``liboqs_version`` is its
    version (it loaded and passed its self-test) or ``liboqs_problem`` says why it cannot
    serve; both stay ``None`` while it has not been tried.
    """

    active: str
    liboqs_library: str | None
    liboqs_version: str | None = None
    liboqs_problem: str | None = None

    @property
    def liboqs_available(self) -> bool:
        return self.liboqs_library is not None

    @property
    def liboqs_usable(self) -> bool:
        """liboqs was loaded in this process and passed its self-test."""
        return self.liboqs_version is not None and self.liboqs_problem is None


def find_liboqs() -> str | None:
    """Locate an installed liboqs shared library without importing liboqs-python.

    ``$OQS_INSTALL_PATH/lib`` (or ``lib64``) first, then the system library search
    (:func:`ctypes.util.find_library`).  Nothing is loaded here.
    """
    root = os.environ.get("OQS_INSTALL_PATH")
    if root:
        for sub in ("lib", "lib64"):
            libdir = Path(root) / sub
            for cand in sorted(libdir.glob("liboqs.so*")) + sorted(libdir.glob("liboqs*.dylib")):
                if cand.is_file():
                    return str(cand)
    return ctypes.util.find_library("oqs")


def liboqs_backend() -> LiboqsBackend:
    """The liboqs backend over the library :func:`find_liboqs` finds, loaded and self-tested.

    Loading runs liboqs' known-answer self-test once per library path and process.

    :raises ConfigError: one line saying what is missing (no library, a library too old
        or built without ML-DSA-87 / ML-KEM-1024, or a failed self-test).
    """
    path = find_liboqs()
    if path is None:
        raise ConfigError(LIBOQS_NOT_INSTALLED)
    from appliance.pqc_liboqs import load_liboqs  # lazy: only when liboqs is wanted

    return load_liboqs(path)  # LiboqsUnusable is a ConfigError


_DEFAULT: Final = CryptographyBackend()
_active: PqcBackend = _DEFAULT


def select_backend(choice: str) -> PqcBackend:
    """Make ``choice`` (``cryptography``, ``liboqs`` or ``auto``) the active backend.

    ``cryptography`` never loads liboqs.  ``auto`` takes liboqs when it is installed and
    passes its self-test, and otherwise ``cryptography`` (logging why at INFO).  Blobs hold
    seeds, so keys made under one backend open under the other.

    :raises ConfigError: an unknown choice, or ``liboqs`` chosen but not usable here.
    """
    global _active
    if choice not in PQC_BACKEND_CHOICES:
        raise ConfigError(
            f"unknown pqc backend {choice!r} (choose {', '.join(PQC_BACKEND_CHOICES)})"
        )
    backend: PqcBackend = _DEFAULT
    if choice != "cryptography":
        try:
            backend = liboqs_backend()
        except ConfigError as exc:
            if choice == "liboqs":
                raise ConfigError(
                    f"pqc backend liboqs is configured but not usable: {exc}"
                ) from None
            log.info("pqc backend auto: using cryptography (%s)", exc)
    _active = backend
    return backend


def active_backend() -> PqcBackend:
    """The backend in use: ``cryptography`` unless :func:`select_backend` chose liboqs."""
    return _active


def backend_info() -> BackendInfo:
    """The active backend, where liboqs was found, and what loading it showed.

    Nothing is loaded here: ``liboqs_version`` / ``liboqs_problem`` are known only once
    :func:`select_backend` (``auto`` or ``liboqs``) has tried that library in this process.
    """
    active = active_backend().name
    path = find_liboqs()
    if path is None or "appliance.pqc_liboqs" not in sys.modules:
        return BackendInfo(active=active, liboqs_library=path)
    from appliance.pqc_liboqs import LiboqsBackend, tried

    outcome = tried(path)
    if isinstance(outcome, LiboqsBackend):
        return BackendInfo(active, path, liboqs_version=outcome.version)
    return BackendInfo(active, path, liboqs_problem=None if outcome is None else str(outcome))
