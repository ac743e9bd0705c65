"""The appliance's own client PINs (DESIGN §8): Argon2id hashes with a persisted lockout.

The store is one canonical-CBOR file, ``$PQHSM_HOME/clients.cbor`` (0600, replaced with
:func:`appliance.fsio.atomic_write`), mapping a client name to its Argon2id hash (PHC
string: the parameters travel with the hash) and its count of consecutive failures.

Lockout survives restarts: :func:`verify` counts the attempt *before* it checks the PIN
(one durable write), so a crash or a kill during the check still counts; a success
resets the counter (a second write).  After ``max_failures`` consecutive failures every
attempt, right PIN or not, raises :class:`~appliance.errors.PinLocked` without checking
anything; only :func:`set_pin` (the operator, ``python -m pkcs11_shim set-pin``) unlocks.

Argon2id runs through :mod:`appliance.argon2id`, which reads the PIN where the caller
keeps it (a wipeable buffer): no ``bytes`` copy of a PIN is made here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from appliance import argon2id, codec
from appliance.errors import CallerError, DeviceError, PinIncorrect, PinLocked
from appliance.fsio import atomic_write, read_file
from appliance.secret import SecretBytes

__all__ = [
    "DEFAULT_CLIENT",
    "MAX_FAILURES",
    "STORE_FILE",
    "Argon2Profile",
    "exists",
    "failures",
    "set_pin",
    "verify",
]

STORE_FILE: Final = "clients.cbor"
DEFAULT_CLIENT: Final = "user"
MAX_FAILURES: Final = 5
MIN_PIN: Final = 4
MAX_PIN: Final = 255  # as C_GetTokenInfo reports (ulMaxPinLen)
_VERSION: Final = 1

# One lock for every store in this process: logins are rare and short.  Across
# processes (``serve --processes``, ``set-pin`` beside a running server) each
# read-modify-write of a store also holds an flock on its lock file, so no process can
# lose another's failed-login count.
_lock = threading.Lock()
LOCK_FILE: Final = "clients.lock"


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    with _lock:
        try:
            fd = os.open(Path(home) / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DeviceError(f"{LOCK_FILE}: cannot open: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # drops the flock


@dataclass(frozen=True, slots=True)
class Argon2Profile:
    """Argon2id cost parameters for new hashes (old hashes keep theirs)."""

    time_cost: int
    memory_kib: int
    parallelism: int

    def hash(self, pin: memoryview) -> str:
        """The encoded Argon2id hash (PHC string) of ``pin``, with a fresh salt."""
        return argon2id.hash_encoded(pin, self.time_cost, self.memory_kib, self.parallelism)


#: RFC 9106 second recommendation (t=3, 64 MiB, p=4): production default.
DEFAULT_PROFILE: Final = Argon2Profile(*argon2id.RFC_9106_LOW_MEMORY)
#: argon2-cffi's cheapest parameters: tests only.
TEST_PROFILE: Final = Argon2Profile(*argon2id.CHEAPEST)


def _path(home: Path) -> Path:
    return Path(home) / STORE_FILE


def exists(home: Path) -> bool:
    """Whether ``home`` holds a client PIN store."""
    return _path(home).is_file()


def _load(home: Path) -> dict[str, dict[str, Any]]:
    path = _path(home)
    if not path.is_file():
        return {}
    try:
        m = codec.loads_map(read_file(path, limit=1 << 20), STORE_FILE)
    except codec.CodecError:
        raise DeviceError(f"{STORE_FILE}: not a PIN store") from None
    clients = m.get("clients")
    if m.get("version") != _VERSION or not isinstance(clients, dict):
        raise DeviceError(f"{STORE_FILE}: unknown format")
    for name, rec in clients.items():
        if (
            not isinstance(name, str)
            or not isinstance(rec, dict)
            or not isinstance(rec.get("hash"), str)
            or not isinstance(rec.get("failures"), int)
        ):
            raise DeviceError(f"{STORE_FILE}: malformed client record")
    return clients


def _save(home: Path, clients: dict[str, dict[str, Any]]) -> None:
    atomic_write(
        _path(home), codec.dumps({"version": _VERSION, "clients": clients}), point="clientpins"
    )


def set_pin(
    home: Path,
    pin: SecretBytes,
    *,
    client: str = DEFAULT_CLIENT,
    profile: Argon2Profile = DEFAULT_PROFILE,
) -> None:
    """Set (or replace) the PIN of ``client`` and clear its failure counter.

    :raises CallerError: the PIN is shorter than 4 or longer than 255 bytes.
    """
    if not isinstance(pin, SecretBytes):
        raise TypeError("pin must be SecretBytes")
    if not MIN_PIN <= len(pin) <= MAX_PIN:
        raise CallerError(f"a client PIN has {MIN_PIN} to {MAX_PIN} bytes")
    encoded = profile.hash(pin.view())
    with _locked(home):
        clients = _load(home)
        clients[client] = {"hash": encoded, "failures": 0}
        _save(home, clients)


def failures(home: Path, client: str = DEFAULT_CLIENT) -> int:
    """Consecutive failed logins of ``client`` (0 when it has no PIN)."""
    with _locked(home):
        rec = _load(home).get(client)
    return 0 if rec is None else int(rec["failures"])


def verify(
    home: Path,
    pin: bytes | bytearray | memoryview,
    *,
    client: str = DEFAULT_CLIENT,
    max_failures: int = MAX_FAILURES,
) -> None:
    """Check ``client``'s PIN; the attempt is counted durably before the check.

    :raises PinLocked: ``max_failures`` consecutive failures (even with the right PIN).
    :raises PinIncorrect: wrong PIN, or ``client`` has none.
    """
    if not isinstance(pin, bytes | bytearray | memoryview):
        raise TypeError("pin must be bytes-like")
    with _locked(home):
        clients = _load(home)
        rec = clients.get(client)
        if rec is None:
            raise PinIncorrect("no such client")
        if rec["failures"] >= max_failures:
            raise PinLocked("client PIN locked")
        rec["failures"] += 1
        _save(home, clients)  # persisted before the answer (and before the check)
        try:
            with memoryview(pin) as view:
                right = argon2id.matches(rec["hash"], view)
        except ValueError:
            raise DeviceError(f"{STORE_FILE}: unreadable hash for {client!r}") from None
        if not right:
            raise PinIncorrect("client PIN incorrect")
        rec["failures"] = 0
        _save(home, clients)
