"""The optional liboqs backend: ML-DSA-87 and ML-KEM-1024 through liboqs' C API (ctypes).

hazardous: use the service API.  :mod:`appliance.pqc` imports this module lazily, only
when a liboqs shared library has been found, and only through :func:`load_liboqs`.

Nothing here imports liboqs-python (``oqs``): its import downloads and compiles liboqs
when the shared library is missing.  This module loads an *installed* ``liboqs.so`` with
:mod:`ctypes` and calls only functions liboqs marks ``OQS_API`` (its public C API), so it
works the same on every liboqs build: x86_64 with AVX2, aarch64, or the portable C code.

Keys come from seeds, exactly as under the default backend, so a blob opens under either:

* ML-KEM-1024: ``OQS_KEM_keypair_derand(kem, ek, dk, d || z)`` is FIPS 203
  ML-KEM.KeyGen_internal(d, z) (liboqs 0.13 and later).
* ML-DSA-87: liboqs (checked up to 0.16) has no public seed-based key generation.
  ``OQS_SIG_keypair`` is FIPS 204 ML-DSA.KeyGen: it draws the 32-byte seed xi from
  ``OQS_randombytes`` and runs KeyGen_internal(xi).  This module therefore installs, once
  per process, its own random source with ``OQS_randombytes_custom_algorithm``.  The
  source serves a caller's seed to exactly one 32-byte request, on the thread that is
  generating that key, and OS randomness (``os.urandom``) to every other request: the
  hedging ``rnd`` of each signature and the ``m`` of each encapsulation.  After key
  generation the module checks that the seed was taken exactly once and nothing else was
  asked for; when the library loads, a known-answer self-test compares the public keys of
  fixed seeds with pinned digests (the same under ``cryptography``, dilithium-py and
  kyber-py).  A liboqs whose key generation does not take xi this way fails that test,
  and the backend refuses to load, saying why.

Security: expanded secret keys (4896 bytes for ML-DSA-87, 3168 for ML-KEM-1024) live in
ctypes buffers that are zeroed with :func:`ctypes.memset` on :meth:`close`, on leaving a
``with`` block, or when the key object is collected; seeds are copied into a ctypes
scratch buffer that is zeroed as soon as the key exists.  liboqs zeroes its own stack
copies.  The process-wide random source means no other code in this process should use
liboqs' RNG; pqhsm never does.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import weakref
from typing import Any, Final, NoReturn

from appliance.errors import CallerError, ConfigError, DeviceError, SignatureInvalid
from appliance.pqc import (
    MLDSA87_PUBLIC_LEN,
    MLDSA87_SEED_LEN,
    MLDSA87_SIG_LEN,
    MLKEM1024_CT_LEN,
    MLKEM1024_EK_LEN,
    MLKEM1024_SEED_LEN,
    MLKEM1024_SS_LEN,
    _buf,
    _check_context,
    _check_len,
    _secret_view,
    _verify_args,
)
from appliance.secret import BytesLike, SecretBytes, ct_equal

__all__ = ["LiboqsBackend", "LiboqsUnusable", "load_liboqs", "tried"]

# Expanded secret-key sizes (FIPS 204 / FIPS 203); the others come from appliance.pqc.
_DSA_SECRET: Final = 4896
_KEM_DK: Final = 3168

_SIG_NAME: Final = b"ML-DSA-87"
_KEM_NAME: Final = b"ML-KEM-1024"
_OQS_SUCCESS: Final = 0

# Known answers for the load-time self-test: SHA3-256 of the public key made from the seed
# bytes(range(32)) (ML-DSA-87) and of the encapsulation key from bytes(range(64))
# (ML-KEM-1024).  Computed with pyca/cryptography and checked against dilithium-py and
# kyber-py, which agree.
_KAT_DSA_PK_SHA3: Final = "e6cf50a9c2fa5234f59949ff61f8161db4d629532127f4aefa8bb10811ecfb1e"
_KAT_KEM_EK_SHA3: Final = "61349e5c131a7e116a0463861d7d18663c5627c38c7147ddaadfd48acd7a4535"

_vp = ctypes.c_void_p
_sz = ctypes.c_size_t
_int = ctypes.c_int
_szp = ctypes.POINTER(ctypes.c_size_t)

# (name, restype, argtypes): every liboqs function this module calls, all OQS_API.
# OQS_KEM_keypair_derand (0.13.0) is the newest of them.
_MIN_VERSION: Final = "0.13"
_FUNCTIONS: Final[tuple[tuple[str, Any, tuple[Any, ...]], ...]] = (
    ("OQS_init", None, ()),
    ("OQS_version", ctypes.c_char_p, ()),
    ("OQS_randombytes_custom_algorithm", None, (_vp,)),
    ("OQS_SIG_new", _vp, (ctypes.c_char_p,)),
    ("OQS_SIG_keypair", _int, (_vp, _vp, _vp)),
    ("OQS_SIG_sign_with_ctx_str", _int, (_vp, _vp, _szp, _vp, _sz, _vp, _sz, _vp)),
    ("OQS_SIG_verify_with_ctx_str", _int, (_vp, _vp, _sz, _vp, _sz, _vp, _sz, _vp)),
    ("OQS_KEM_new", _vp, (ctypes.c_char_p,)),
    ("OQS_KEM_keypair_derand", _int, (_vp, _vp, _vp, _vp)),
    ("OQS_KEM_encaps", _int, (_vp, _vp, _vp, _vp)),
    ("OQS_KEM_decaps", _int, (_vp, _vp, _vp, _vp)),
)


class LiboqsUnusable(ConfigError):
    """The liboqs at hand cannot serve as a backend; ``str()`` says why, in one line."""


# -- the seed-serving random source --------------------------------------------------------


class _SeedSlot(threading.local):
    """Per thread: the seed waiting for the next key generation, and what happened to it."""

    seed: ctypes.Array[ctypes.c_ubyte] | None = None
    served: int = 0
    stray: int = 0
    failed: bool = False


_SLOT: Final = _SeedSlot()
_RNG_TYPE: Final = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t)


def _random_source(ptr: int | None, n: int) -> None:
    """liboqs' ``OQS_randombytes``, while this backend is loaded (see the module docstring)."""
    slot = _SLOT
    if not ptr or not n:
        return
    try:
        seed = slot.seed
        if seed is not None:
            if slot.served == 0 and n == len(seed):
                ctypes.memmove(ptr, seed, n)
                slot.served = 1
                return
            slot.stray += 1
        # os.urandom returns bytes: copied into liboqs' buffer and dropped at once.
        ctypes.memmove(ptr, os.urandom(n), n)
    except BaseException:  # noqa: BLE001 - nothing may escape into C; the caller checks
        slot.failed = True
        ctypes.memset(ptr, 0, n)


_RNG_CALLBACK: Final = _RNG_TYPE(_random_source)  # kept alive for the life of the process


def _check_rng(what: str) -> None:
    """Raise if the random source failed during the liboqs call that just returned."""
    if _SLOT.failed:
        _SLOT.failed = False
        raise DeviceError(f"liboqs {what}: the random source failed; result discarded")


# -- input helpers: the same rules as appliance.pqc, from there --------------------------


def _secret_copy(what: str, value: object, n: int) -> ctypes.Array[ctypes.c_ubyte]:
    """Copy a secret input into a ctypes scratch buffer (the caller memsets it)."""
    view = _secret_view(what, value, n)
    scratch = (ctypes.c_ubyte * n)()
    memoryview(scratch).cast("B")[:] = view
    return scratch


def _wipe(buf: ctypes.Array[ctypes.c_ubyte]) -> None:
    ctypes.memset(buf, 0, ctypes.sizeof(buf))


# -- the library -----------------------------------------------------------------------------


class _Lib:
    """One loaded liboqs: typed entry points and the ML-DSA-87 / ML-KEM-1024 handles."""

    def __init__(self, path: str) -> None:
        try:
            self._dll = ctypes.CDLL(path)
        except OSError as exc:
            detail = str(exc).removeprefix(f"{path}: ")  # dlopen repeats the path
            raise LiboqsUnusable(f"{path} cannot be loaded: {detail}") from None
        self.path = path
        fns: dict[str, Any] = {}
        for name, restype, argtypes in _FUNCTIONS:
            try:
                fn = getattr(self._dll, name)
            except AttributeError:
                raise LiboqsUnusable(
                    f"{path} has no {name} (pqhsm needs liboqs {_MIN_VERSION} or later)"
                ) from None
            fn.restype = restype
            fn.argtypes = argtypes
            fns[name] = fn
        self._fn = fns
        fns["OQS_init"]()
        raw_version = fns["OQS_version"]()
        self.version = raw_version.decode("ascii", "replace") if raw_version else "unknown"
        self.sig = self._new("OQS_SIG_new", _SIG_NAME)
        self.kem = self._new("OQS_KEM_new", _KEM_NAME)

    def _new(self, fn: str, alg: bytes) -> int:
        handle = self._fn[fn](alg)
        if not handle:
            raise LiboqsUnusable(
                f"liboqs {self.version} at {self.path} was built without {alg.decode()}"
            )
        return int(handle)

    def call(self, name: str, *args: object) -> int:
        return int(self._fn[name](*args))

    def install_random_source(self) -> None:
        self._fn["OQS_randombytes_custom_algorithm"](ctypes.cast(_RNG_CALLBACK, _vp))


# -- keys ------------------------------------------------------------------------------------


class _LiboqsMlDsa:
    """An ML-DSA-87 private key (expanded, in a ctypes buffer) made from a 32-byte seed."""

    __slots__ = ("__weakref__", "_lib", "_pub", "_sk", "_wiper")

    def __init__(self, lib: _Lib, seed: BytesLike) -> None:
        scratch = _secret_copy("ML-DSA-87 seed", seed, MLDSA87_SEED_LEN)
        sk = (ctypes.c_ubyte * _DSA_SECRET)()
        pk = (ctypes.c_ubyte * MLDSA87_PUBLIC_LEN)()
        slot = _SLOT
        slot.seed, slot.served, slot.stray, slot.failed = scratch, 0, 0, False
        try:
            rc = lib.call("OQS_SIG_keypair", lib.sig, pk, sk)
            served, stray, failed = slot.served, slot.stray, slot.failed
        finally:
            slot.seed = None
            slot.failed = False
            _wipe(scratch)
        if rc != _OQS_SUCCESS or served != 1 or stray or failed:
            _wipe(sk)
            raise DeviceError(
                "liboqs did not derive the ML-DSA-87 key from its seed "
                f"(status {rc}, seed taken {served} time(s), {stray} other request(s))"
            )
        self._lib = lib
        self._sk = sk
        self._pub = bytes(pk)
        self._wiper = weakref.finalize(self, _wipe, sk)

    def public_bytes(self) -> bytes:
        return self._pub

    def sign(self, message: BytesLike, context: bytes = b"") -> bytes:
        """FIPS 204 pure ML-DSA, hedged, context of at most 255 bytes."""
        ctx = _check_context(context)
        msg = _buf("message", message)
        if not self._wiper.alive:
            raise CallerError("this ML-DSA-87 key has been closed")
        out = (ctypes.c_ubyte * MLDSA87_SIG_LEN)()
        out_len = ctypes.c_size_t(MLDSA87_SIG_LEN)
        rc = self._lib.call(
            "OQS_SIG_sign_with_ctx_str",
            self._lib.sig,
            out,
            ctypes.byref(out_len),
            msg,
            len(msg),
            ctx or None,
            len(ctx),
            self._sk,
        )
        _check_rng("ML-DSA-87 sign")
        if rc != _OQS_SUCCESS or out_len.value != MLDSA87_SIG_LEN:
            raise DeviceError(f"liboqs ML-DSA-87 sign failed (status {rc})")
        return bytes(out)

    def close(self) -> None:
        """Zero the expanded secret key now; the object cannot sign afterwards."""
        self._wiper()

    def __enter__(self) -> _LiboqsMlDsa:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<liboqs ML-DSA-87 private key, redacted>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("private keys are not picklable")


class _LiboqsMlKem:
    """An ML-KEM-1024 decapsulation key (expanded, in a ctypes buffer) made from d || z."""

    __slots__ = ("__weakref__", "_dk", "_ek", "_lib", "_wiper")

    def __init__(self, lib: _Lib, seed: BytesLike) -> None:
        scratch = _secret_copy("ML-KEM-1024 seed", seed, MLKEM1024_SEED_LEN)
        dk = (ctypes.c_ubyte * _KEM_DK)()
        ek = (ctypes.c_ubyte * MLKEM1024_EK_LEN)()
        try:
            rc = lib.call("OQS_KEM_keypair_derand", lib.kem, ek, dk, scratch)
        finally:
            _wipe(scratch)
        if rc != _OQS_SUCCESS:
            _wipe(dk)
            raise DeviceError(f"liboqs ML-KEM-1024 key generation failed (status {rc})")
        self._lib = lib
        self._dk = dk
        self._ek = bytes(ek)
        self._wiper = weakref.finalize(self, _wipe, dk)

    def encapsulation_key(self) -> bytes:
        return self._ek

    def decapsulate(self, ciphertext: BytesLike) -> SecretBytes:
        ct = _check_len("ML-KEM-1024 ciphertext", ciphertext, MLKEM1024_CT_LEN)
        if not self._wiper.alive:
            raise CallerError("this ML-KEM-1024 key has been closed")
        out = SecretBytes(MLKEM1024_SS_LEN)
        # liboqs writes the shared secret straight into the wipeable buffer
        target = (ctypes.c_ubyte * MLKEM1024_SS_LEN).from_buffer(out.view())
        rc = self._lib.call("OQS_KEM_decaps", self._lib.kem, target, ct, self._dk)
        del target
        if rc != _OQS_SUCCESS:
            out.wipe()
            raise DeviceError(f"liboqs ML-KEM-1024 decapsulation failed (status {rc})")
        return out

    def close(self) -> None:
        """Zero the expanded decapsulation key now."""
        self._wiper()

    def __enter__(self) -> _LiboqsMlKem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<liboqs ML-KEM-1024 decapsulation key, redacted>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("private keys are not picklable")


# -- the backend -----------------------------------------------------------------------------


class LiboqsBackend:
    """FIPS 203/204 from an installed liboqs, through its C API.  Make with :func:`load_liboqs`."""

    name = "liboqs"

    def __init__(self, lib: _Lib) -> None:
        self._lib = lib

    @property
    def library(self) -> str:
        return self._lib.path

    @property
    def version(self) -> str:
        return self._lib.version

    def mldsa87_from_seed(self, seed: BytesLike) -> _LiboqsMlDsa:
        return _LiboqsMlDsa(self._lib, seed)

    def mldsa87_verify(
        self, public: BytesLike, message: BytesLike, signature: BytesLike, context: bytes = b""
    ) -> None:
        """Raise :class:`SignatureInvalid` unless ``signature`` verifies."""
        pub, msg, sig, ctx = _verify_args(public, message, signature, context)
        rc = self._lib.call(
            "OQS_SIG_verify_with_ctx_str",
            self._lib.sig,
            msg,
            len(msg),
            sig,
            len(sig),
            ctx or None,
            len(ctx),
            pub,
        )
        if rc != _OQS_SUCCESS:
            raise SignatureInvalid("signature invalid")

    def mlkem1024_from_seed(self, seed: BytesLike) -> _LiboqsMlKem:
        return _LiboqsMlKem(self._lib, seed)

    def mlkem1024_encapsulate(self, ek: BytesLike) -> tuple[SecretBytes, bytes]:
        """Return (shared secret, ciphertext); a malformed key raises :class:`CallerError`."""
        ek_bytes = _check_len("ML-KEM-1024 encapsulation key", ek, MLKEM1024_EK_LEN)
        secret = SecretBytes(MLKEM1024_SS_LEN)
        ct = (ctypes.c_ubyte * MLKEM1024_CT_LEN)()
        target = (ctypes.c_ubyte * MLKEM1024_SS_LEN).from_buffer(secret.view())
        rc = self._lib.call("OQS_KEM_encaps", self._lib.kem, ct, target, ek_bytes)
        del target
        try:
            _check_rng("ML-KEM-1024 encapsulate")
        except DeviceError:
            secret.wipe()
            raise
        if rc != _OQS_SUCCESS:
            # FIPS 203 §7.2 input check (coefficients reduced mod q) is the only failure
            secret.wipe()
            raise CallerError("ML-KEM-1024 encapsulation key is malformed")
        return secret, bytes(ct)


def _self_test(backend: LiboqsBackend) -> None:
    """Known answers and pairwise checks; raise :class:`LiboqsUnusable` on any mismatch."""
    where = f"liboqs {backend.version} at {backend.library}"
    try:
        with backend.mldsa87_from_seed(bytes(range(MLDSA87_SEED_LEN))) as dsa:
            if hashlib.sha3_256(dsa.public_bytes()).hexdigest() != _KAT_DSA_PK_SHA3:
                raise LiboqsUnusable(
                    f"{where}: ML-DSA-87 key generation does not follow FIPS 204 "
                    "KeyGen_internal from a 32-byte seed (known-answer self-test failed)"
                )
            sig = dsa.sign(b"pqhsm liboqs self-test", b"pqhsm")
            backend.mldsa87_verify(dsa.public_bytes(), b"pqhsm liboqs self-test", sig, b"pqhsm")
            try:
                backend.mldsa87_verify(dsa.public_bytes(), b"pqhsm liboqs self-test", sig)
            except SignatureInvalid:
                pass
            else:
                raise LiboqsUnusable(f"{where}: ML-DSA-87 verify ignores the context")
        with backend.mlkem1024_from_seed(bytes(range(MLKEM1024_SEED_LEN))) as kem:
            ek = kem.encapsulation_key()
            if hashlib.sha3_256(ek).hexdigest() != _KAT_KEM_EK_SHA3:
                raise LiboqsUnusable(
                    f"{where}: ML-KEM-1024 key generation does not follow FIPS 203 "
                    "KeyGen_internal from d || z (known-answer self-test failed)"
                )
            ss1, ct1 = backend.mlkem1024_encapsulate(ek)
            ss2, ct2 = backend.mlkem1024_encapsulate(ek)
            with ss1, ss2, kem.decapsulate(ct1) as back:
                # the secret comes back, and two encapsulations differ (the RNG is live)
                if not ct_equal(back, ss1) or ct_equal(ss1, ss2) or ct1 == ct2:
                    raise LiboqsUnusable(f"{where}: ML-KEM-1024 pairwise self-test failed")
    except (DeviceError, SignatureInvalid, CallerError) as exc:
        raise LiboqsUnusable(f"{where}: self-test failed ({exc})") from None


_LOCK: Final = threading.Lock()
_LOADED: dict[str, LiboqsBackend | LiboqsUnusable] = {}


def load_liboqs(path: str) -> LiboqsBackend:
    """Load liboqs from ``path``, install the seed-serving random source, self-test.

    The result (backend or reason) is cached per path for the life of the process.

    :raises LiboqsUnusable: with a one-line reason naming the library and what is missing.
    """
    with _LOCK:
        cached = _LOADED.get(path)
        if cached is None:
            try:
                lib = _Lib(path)
                lib.install_random_source()
                backend = LiboqsBackend(lib)
                _self_test(backend)
                cached = backend
            except LiboqsUnusable as exc:
                cached = exc
            _LOADED[path] = cached
    if isinstance(cached, LiboqsUnusable):
        raise LiboqsUnusable(str(cached))
    return cached


def tried(path: str) -> LiboqsBackend | LiboqsUnusable | None:
    """What :func:`load_liboqs` gave for ``path`` in this process, without loading anything."""
    with _LOCK:
        return _LOADED.get(path)
