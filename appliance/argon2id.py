"""Argon2id (RFC 9106) over caller-owned buffers: the one module that imports argon2.

argon2-cffi's Python API takes a secret only as ``bytes`` and copies it again into C
memory that is freed unwiped, and returns derived keys as ``bytes``.  Here the C library
(argon2-cffi's own bindings) reads the secret where the caller keeps it and writes a
derived key straight into the caller's buffer, so neither a passphrase, a PIN nor a
key ever sits in an object that cannot be wiped.  The library wipes its own working
memory (the reference implementation clears its blocks).
"""

from __future__ import annotations

import os
from typing import Final

from _argon2_cffi_bindings import ffi, lib
from argon2 import profiles

from appliance.errors import DeviceError

__all__ = [
    "CHEAPEST",
    "HASH_LEN",
    "RFC_9106_LOW_MEMORY",
    "SALT_LEN",
    "derive_into",
    "hash_encoded",
    "matches",
]

#: argon2-cffi's defaults for encoded hashes (the stored client PINs were made with them).
SALT_LEN: Final = 16
HASH_LEN: Final = 32
_VERSION: Final = 0x13  # Argon2 version 1.3

#: (time cost, memory KiB, parallelism): RFC 9106's second recommendation (t=3, 64 MiB,
#: p=4), for production.
RFC_9106_LOW_MEMORY: Final = (
    profiles.RFC_9106_LOW_MEMORY.time_cost,
    profiles.RFC_9106_LOW_MEMORY.memory_cost,
    profiles.RFC_9106_LOW_MEMORY.parallelism,
)
#: argon2-cffi's cheapest parameters: tests only.
CHEAPEST: Final = (
    profiles.CHEAPEST.time_cost,
    profiles.CHEAPEST.memory_cost,
    profiles.CHEAPEST.parallelism,
)


def _message(rv: int) -> str:
    text: bytes = ffi.string(lib.argon2_error_message(rv))
    return text.decode("ascii", "replace")


def derive_into(
    secret: memoryview,
    salt: bytes,
    time_cost: int,
    memory_kib: int,
    parallelism: int,
    out: memoryview,
) -> None:
    """Derive ``len(out)`` bytes of raw Argon2id output from ``secret`` into ``out``.

    :raises DeviceError: the library refused the parameters (its message says which).
    """
    rv = lib.argon2_hash(
        time_cost, memory_kib, parallelism, ffi.from_buffer(secret), len(secret),
        salt, len(salt), ffi.from_buffer(out, require_writable=True), len(out),
        ffi.NULL, 0, lib.Argon2_id, _VERSION,
    )  # fmt: skip
    if rv != lib.ARGON2_OK:
        raise DeviceError(f"Argon2id failed: {_message(rv)}")


def hash_encoded(secret: memoryview, time_cost: int, memory_kib: int, parallelism: int) -> str:
    """The PHC string (``$argon2id$v=19$m=..,t=..,p=..$salt$hash``) of ``secret``, with
    a fresh random salt.

    :raises DeviceError: the library refused the parameters.
    """
    salt = os.urandom(SALT_LEN)
    size = lib.argon2_encodedlen(
        time_cost, memory_kib, parallelism, SALT_LEN, HASH_LEN, lib.Argon2_id
    )
    out = ffi.new("char[]", size + 1)
    rv = lib.argon2_hash(
        time_cost, memory_kib, parallelism, ffi.from_buffer(secret), len(secret),
        salt, SALT_LEN, ffi.NULL, HASH_LEN, out, size + 1, lib.Argon2_id, _VERSION,
    )  # fmt: skip
    if rv != lib.ARGON2_OK:
        raise DeviceError(f"Argon2id failed: {_message(rv)}")
    encoded: bytes = ffi.string(out)
    return encoded.decode("ascii")


def matches(encoded: str, secret: memoryview) -> bool:
    """Whether ``secret`` matches the Argon2id PHC string ``encoded`` (its parameters and
    salt travel in it).

    :raises ValueError: ``encoded`` is not a readable Argon2id hash.
    """
    if not encoded.startswith("$argon2id$"):
        raise ValueError("not an Argon2id hash")
    rv = lib.argon2_verify(
        encoded.encode("ascii"), ffi.from_buffer(secret), len(secret), lib.Argon2_id
    )
    if rv == lib.ARGON2_OK:
        return True
    if rv == lib.ARGON2_VERIFY_MISMATCH:
        return False
    raise ValueError(f"unreadable Argon2id hash ({_message(rv)})")
