"""Durable file writes: atomic replace, fsync'd files and directories, private modes.

Every persisted file is written through :func:`atomic_write` (DESIGN §3): a temporary
file in the same directory, flushed and fsync'd, renamed over the target, then the
directory fsync'd.  Files are created 0600 (never chmod'ed afterwards), folders 0700.
:func:`_durable_sync` is the single seam crash tests replace to stop the process at a
chosen sync point.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from appliance.errors import CallerError, ConfigError, DeviceError

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "atomic_write",
    "check_private_file",
    "ensure_private_dir",
    "fault_point",
    "fsync_dir",
    "read_file",
    "remove_stale_temps",
    "sync_filesystem",
    "write_synced",
]

FILE_MODE = 0o600
DIR_MODE = 0o700

# Crash-injection seam: tests install a callable that may os._exit() at a named point.
_fault_hook: Callable[[str], None] | None = None


def fault_point(name: str) -> None:
    """Mark a durable step; a crash test may stop the process here."""
    if _fault_hook is not None:
        _fault_hook(name)


def _durable_sync(fd: int) -> None:
    """fsync ``fd``; an fsync failure is fatal for the store (never retried)."""
    try:
        os.fsync(fd)
    except OSError as exc:
        raise DeviceError(f"fsync failed: {exc.strerror}") from None


def sync_filesystem(path: Path) -> None:
    """Flush every dirty page of the filesystem holding ``path`` (Linux ``syncfs(2)``).

    One call instead of one fsync per file, for bulk writes (a restore stages thousands
    of blobs) that only need to be durable together before a later commit point.  Falls
    back to ``os.sync()`` where ``syncfs`` is unavailable.
    """
    import ctypes
    import ctypes.util

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        syncfs = getattr(libc, "syncfs", None)
        if syncfs is None:
            os.sync()
        elif syncfs(fd) != 0:
            raise DeviceError(f"syncfs failed: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _durable_sync(fd)
    finally:
        os.close(fd)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) as 0700 folders if missing."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


def write_synced(path: Path, data: bytes | bytearray | memoryview, *, point: str) -> None:
    """Create or truncate ``path`` (0600), write ``data`` and fsync it (no rename)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        fault_point(f"{point}.write")
        _durable_sync(fd)
        fault_point(f"{point}.fsync")
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | bytearray | memoryview, *, point: str = "") -> None:
    """Replace ``path`` with ``data`` atomically and durably; the file is 0600.

    ``point`` names the operation for crash injection (``<point>.write``, ``.fsync``,
    ``.rename``, ``.dirsync``).
    """
    tag = point or path.name
    tmp = path.with_name(f".{path.name}.tmp")
    write_synced(tmp, data, point=tag)
    os.replace(tmp, path)
    fault_point(f"{tag}.rename")
    fsync_dir(path.parent)
    fault_point(f"{tag}.dirsync")


def remove_stale_temps(directory: Path) -> list[str]:
    """Delete temp files an interrupted :func:`atomic_write` left behind; return their names.

    A temp file is never meaningful after a crash: its rename had not happened, so the
    target still holds the old, complete content.
    """
    if not directory.is_dir():
        return []
    removed = [p.name for p in directory.glob(".*.tmp") if p.is_file()]
    for name in removed:
        (directory / name).unlink()
    if removed:
        fsync_dir(directory)
    return removed


def read_file(path: Path, *, limit: int = 64 << 20) -> bytes:
    """Read a whole file, refusing anything larger than ``limit`` bytes.

    A missing, unreadable or directory path is the caller's to fix (:class:`ConfigError`);
    other I/O failures are the device's (:class:`DeviceError`).
    """
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except OSError as exc:
        raise DeviceError(f"{path}: {exc.strerror}") from None
    if len(data) > limit:
        raise CallerError(f"{path}: larger than {limit} bytes")
    return data


def check_private_file(path: Path) -> None:
    """Refuse a secrets file that others can read or write (mode must be 0600 or 0400)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(f"{path}: mode {st.st_mode & 0o777:04o} lets others read it; chmod 600")
