"""Passphrase key derivation: PBKDF2-HMAC-SHA3-256 (default) or Argon2id.

hazardous: use the service API.  Argon2id runs through :mod:`appliance.argon2id`, which
reads the passphrase and writes the key in place.

``pw_key`` is 32 bytes and lands straight in a :class:`SecretBytes`.  The parameters are
recorded in the keystore header; nothing that could check a passphrase is (DESIGN §4).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from appliance import argon2id
from appliance.errors import CallerError
from appliance.secret import SecretBytes

__all__ = ["ARGON2ID", "KDF_NAMES", "PBKDF2_SHA3", "KdfParams", "calibrate", "derive_pw_key"]

PBKDF2_SHA3: Final = "pbkdf2-hmac-sha3-256"
ARGON2ID: Final = "argon2id"
KDF_NAMES: Final = (PBKDF2_SHA3, ARGON2ID)
PW_KEY_LEN: Final = 32
SALT_LEN: Final = 32
MIN_PBKDF2_ITERATIONS: Final = 1_000  # floor for tests; production calibrates to ~1 s
MAX_PASSPHRASE: Final = 4096


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Recorded in the keystore header.  ``gen`` counts passphrase changes."""

    alg: str
    salt: bytes
    gen: int
    iterations: int = 0  # PBKDF2
    time_cost: int = 0  # Argon2id
    memory_kib: int = 0  # Argon2id
    parallelism: int = 0  # Argon2id

    def to_cbor(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alg": self.alg, "salt": self.salt, "gen": self.gen}
        if self.alg == PBKDF2_SHA3:
            out["iterations"] = self.iterations
        else:
            out.update(t=self.time_cost, m=self.memory_kib, p=self.parallelism)
        return out

    @classmethod
    def from_cbor(cls, m: Any) -> KdfParams:
        if not isinstance(m, dict):
            raise CallerError("keystore header: kdf is not a map")
        alg, salt, gen = m.get("alg"), m.get("salt"), m.get("gen")
        if alg not in KDF_NAMES or not isinstance(salt, bytes) or len(salt) != SALT_LEN:
            raise CallerError("keystore header: bad kdf algorithm or salt")
        if not isinstance(gen, int) or gen < 0:
            raise CallerError("keystore header: bad kdf generation")
        if alg == PBKDF2_SHA3:
            it = m.get("iterations")
            if not isinstance(it, int) or it < MIN_PBKDF2_ITERATIONS:
                raise CallerError("keystore header: bad PBKDF2 iteration count")
            return cls(alg, salt, gen, iterations=it)
        t, mem, p = m.get("t"), m.get("m"), m.get("p")
        if not all(isinstance(x, int) and x > 0 for x in (t, mem, p)):
            raise CallerError("keystore header: bad Argon2id parameters")
        return cls(alg, salt, gen, time_cost=m["t"], memory_kib=m["m"], parallelism=m["p"])

    def fresh(self) -> KdfParams:
        """Same cost, new salt, next generation (for a passphrase change)."""
        return KdfParams(
            self.alg,
            os.urandom(SALT_LEN),
            self.gen + 1,
            self.iterations,
            self.time_cost,
            self.memory_kib,
            self.parallelism,
        )


def calibrate(
    alg: str,
    *,
    target_seconds: float = 1.0,
    pbkdf2_iterations: int | None = None,
    argon2_memory_kib: int = 262_144,
) -> KdfParams:
    """Choose parameters so one derivation takes about ``target_seconds`` on this machine.

    ``pbkdf2_iterations`` fixes the count instead (tests use a low count).
    """
    salt = os.urandom(SALT_LEN)
    if alg == PBKDF2_SHA3:
        if pbkdf2_iterations is None:
            probe = 50_000
            t0 = time.perf_counter()
            PBKDF2HMAC(hashes.SHA3_256(), PW_KEY_LEN, salt, probe).derive(b"calibration")
            per = (time.perf_counter() - t0) / probe
            pbkdf2_iterations = max(int(target_seconds / max(per, 1e-9)), 100_000)
        if pbkdf2_iterations < MIN_PBKDF2_ITERATIONS:
            raise CallerError(f"PBKDF2 iterations must be at least {MIN_PBKDF2_ITERATIONS}")
        return KdfParams(alg, salt, 0, iterations=pbkdf2_iterations)
    if alg == ARGON2ID:
        t = 1
        while True:
            t0 = time.perf_counter()
            scratch = memoryview(bytearray(PW_KEY_LEN))
            argon2id.derive_into(memoryview(b"calibration"), salt, t, argon2_memory_kib, 4, scratch)
            took = time.perf_counter() - t0
            if took >= target_seconds * 0.7 or t >= 16:
                break
            t += max(1, int(t * (target_seconds / max(took, 1e-3) - 1)))
        return KdfParams(alg, salt, 0, time_cost=t, memory_kib=argon2_memory_kib, parallelism=4)
    raise CallerError(f"unknown KDF {alg!r} (choose {' or '.join(KDF_NAMES)})")


def derive_pw_key(params: KdfParams, passphrase: SecretBytes) -> SecretBytes:
    """Derive the 32-byte passphrase key into wipeable memory."""
    if len(passphrase) == 0:
        raise CallerError("passphrase is empty")
    if len(passphrase) > MAX_PASSPHRASE:
        raise CallerError(f"passphrase longer than {MAX_PASSPHRASE} bytes")
    out = SecretBytes(PW_KEY_LEN)
    if params.alg == PBKDF2_SHA3:
        kdf = PBKDF2HMAC(hashes.SHA3_256(), PW_KEY_LEN, params.salt, params.iterations)
        kdf.derive_into(passphrase.view(), out.view())
        return out
    try:  # read and written in place: no copy of the passphrase or the key
        argon2id.derive_into(
            passphrase.view(),
            params.salt,
            params.time_cost,
            params.memory_kib,
            params.parallelism,
            out.view(),
        )
    except BaseException:
        out.wipe()
        raise
    return out
