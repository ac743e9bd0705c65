"""The single-writer lock on ``wal/lock`` (DESIGN §5).

hazardous: use :class:`appliance.wal.Wal`, which takes and releases this lock.

The lock is a non-blocking exclusive ``fcntl.flock`` on a file of its own, never on
``wal.log`` (whose descriptor is opened and closed independently).  ``flock`` locks belong
to the open file description, so a second :class:`WalLock` in the *same* process is refused
just like one in another process, and the kernel drops the lock when the holder dies,
however it dies: there is no stale lock to clean up.  The holder writes its pid into the
file, only so that the refusal can say who holds the log.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from appliance.errors import DeviceError, WalLocked
from appliance.fsio import FILE_MODE

__all__ = ["WalLock"]


class WalLock:
    """An exclusive hold on one WAL directory's ``lock`` file.

    Use :meth:`acquire`; :meth:`release` (idempotent) closes the descriptor, which drops
    the lock.
    """

    __slots__ = ("_fd", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, path: Path) -> WalLock:
        """Create ``path`` if needed (0600) and lock it exclusively without waiting.

        :raises WalLocked: another writer (in this or another process) holds the lock.
        :raises DeviceError: the lock file cannot be opened or locked.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise DeviceError(f"{path}: cannot open lock file: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WalLocked(
                    f"{path}: the write-ahead log is held by another writer{holder}"
                ) from None
            raise DeviceError(f"{path}: cannot lock: {exc.strerror}") from None
        with contextlib.suppress(OSError):  # diagnostics only: not fsync'd, never trusted
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    @property
    def held(self) -> bool:
        """True until :meth:`release`."""
        return self._fd >= 0

    def release(self) -> None:
        """Drop the lock (closing the descriptor).  Safe to call twice."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _read_holder(fd: int) -> str:
    """`` (pid N)`` from the lock file, or an empty string when it says nothing useful."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {text})" if text.isdigit() else ""
