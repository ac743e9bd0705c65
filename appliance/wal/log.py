"""The write-ahead log: one writer, hash-chained records, durable at :meth:`Wal.commit`.

hazardous: the migration engine and the service use this; nothing else writes the log.

Files (DESIGN §3, §5), all under one directory (``$PQHSM_HOME/wal``, mode 0700)::

    wal.log          the frames (see :mod:`appliance.wal.frame`), mode 0600
    lock             the single-writer flock (see :mod:`appliance.wal.lock`), mode 0600
    wal.log.torn     bytes of a torn last frame that opening removed; a later repair
                     uses the first free name of wal.log.torn.1, wal.log.torn.2, ...

Opening for writing
    Takes the lock, then scans the whole file: every frame's length, CRC-32, canonical
    body, ``seq`` (no gaps) and ``prev`` link are checked, and an in-memory index of frame
    offsets is built (record ``seq`` is at ``offsets[seq]``).  Then it fsyncs ``wal.log``
    once, so that everything it indexed is durable even if the previous writer died between
    an append and its commit.

Torn tail versus corruption
    A frame that is short (the file ends inside it), has an impossible length, fails its
    CRC, or whose body is not CBOR at all is a *bad frame*.  A bad frame is a *torn write*
    when it is the last frame: no good frame (valid CRC, valid body, a later ``seq``)
    starts at any byte after it, and the bytes from it to the end of the file fit in one
    frame (``8 + MAX_BODY``).
    Opening for writing copies those bytes to a fresh ``wal.log.torn*`` file (fsync'd, via
    :func:`appliance.fsio.atomic_write`), truncates ``wal.log`` to the end of the last good
    frame, fsyncs the file and the directory, logs a warning and reports the count as
    :attr:`Wal.torn_bytes`.  Any other bad frame, a broken ``prev`` link, a ``seq`` gap, a
    non-canonical body or a body without valid ``seq``/``prev``/``ts``/``type`` (even in the
    last frame: a valid CRC means it was written that way) raises
    :class:`~appliance.errors.WalCorrupted` naming the byte offset, and the file is left
    byte-for-byte untouched.  A frame whose CRC is good (and whose body is CBOR) is never
    called torn.  Damage followed by a good frame is corruption even if the damaged frames
    were never committed (a power cut in the middle of a group commit can leave that on
    some filesystems): the log cannot tell, so it refuses rather than guesses.

Reading only
    ``Wal.open(..., readonly=True)`` takes **no lock**, so ``pqhsm audit verify`` and other
    readers can run next to the live appliance.  It never creates, writes or truncates
    anything; a torn tail is reported in :attr:`Wal.torn_bytes` and left in place.  It sees
    the log as it was when it opened.

Durability (STYLE §6)
    :meth:`Wal.append` writes the frame with one ``os.write`` on an ``O_APPEND`` descriptor
    (no user-space buffering), so it is in the kernel but *not durable*.  :meth:`Wal.commit`
    fsyncs through :func:`appliance.fsio._durable_sync` and returns only after it did: an
    operation may report success only after the commit that covers its record.  Many appends
    may share one commit (group commit).  A crash before the commit may lose any record
    appended since the previous commit, never an earlier one.  A failed fsync or write is
    fatal: the log closes itself and every later call raises
    :class:`~appliance.errors.DeviceError`; nothing is retried (the page cache may already
    have dropped the data).  Reopen to recover.

Crash-injection points (:func:`appliance.fsio.fault_point`): ``wal.append`` after a frame is
written, ``wal.commit.before`` before the fsync, ``wal.fsync`` after it, and
``wal.torn.*`` while a torn tail is set aside.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import zlib
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final

from appliance import fsio
from appliance.errors import CallerError, ConfigError, DeviceError, WalCorrupted
from appliance.wal.frame import (
    FRAME,
    MAX_BODY,
    ZERO_HASH,
    BodyError,
    WalRecord,
    check_body,
    decode_body,
    encode_frame,
    encode_record,
    record_hash,
)
from appliance.wal.lock import WalLock

__all__ = ["LOCK_NAME", "LOG_NAME", "TORN_NAME", "Wal", "verify_chain"]

LOG_NAME: Final = "wal.log"
LOCK_NAME: Final = "lock"
TORN_NAME: Final = "wal.log.torn"

_CHUNK: Final = 4 << 20  # bytes read per system call while scanning
_log = logging.getLogger(__name__)


def _now_ms() -> int:
    """Default clock: wall-clock milliseconds since the Unix epoch (UTC)."""
    return time.time_ns() // 1_000_000


# -- scanning ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Scan:
    """What a scan found: the index, the head, and the torn tail (if any)."""

    offsets: array[int]
    seq: int
    hash: bytes
    end: int  # end of the last good frame
    torn: int  # bytes after ``end`` that form no good frame (0: none)
    why: str  # what was wrong with the torn tail


def _refill(fd: int, buf: bytes, base: int, pos: int, need: int, size: int) -> bytes:
    """Return file bytes from ``pos`` on: what ``buf`` (starting at ``base``) still holds
    plus at least ``need`` bytes in all, at most up to ``size``.  Short if the file shrank.
    """
    rest = buf[pos - base :]
    off = pos + len(rest)
    want = min(max(_CHUNK, need - len(rest)), size - off)
    parts = [rest]
    while want > 0:
        got = os.pread(fd, want, off)
        if not got:
            break
        parts.append(got)
        off += len(got)
        want -= len(got)
    return b"".join(parts)


def _scan(fd: int, path: Path, size: int, after: _Scan | None = None) -> _Scan:
    """Check every frame of ``wal.log`` up to ``size`` and index it; with ``after`` (an
    earlier scan of the same file), only the frames past its end, its index extended.

    :raises WalCorrupted: anything but a torn last frame is wrong.
    """
    offsets: array[int] = array("q") if after is None else after.offsets
    add = offsets.append
    unpack = FRAME.unpack_from
    crc32 = zlib.crc32
    sha3 = hashlib.sha3_256
    check = check_body
    seq = -1 if after is None else after.seq
    head = ZERO_HASH if after is None else after.hash
    pos = 0 if after is None else after.end  # file offset of the next frame
    buf = b""
    base = pos  # file offset of buf[0]
    why = ""
    while pos < size:
        rel = pos - base
        if len(buf) - rel < 8:
            buf, base, rel = _refill(fd, buf, base, pos, 8, size), pos, 0
            if len(buf) < 8:
                why = "short frame header"
                break
        length, crc = unpack(buf, rel)
        if length == 0 or length > MAX_BODY:
            why = "bad frame length"
            break
        end = pos + 8 + length
        if end > size:
            why = "short frame"
            break
        stop = rel + 8 + length
        if stop > len(buf):
            buf, base, rel = _refill(fd, buf, base, pos, 8 + length, size), pos, 0
            stop = 8 + length
            if stop > len(buf):  # the file shrank under a reader
                why = "short frame"
                break
        body = buf[rel + 8 : stop]
        if crc32(body) != crc:
            why = "checksum mismatch"
            break
        try:
            found, prev = check(body)
        except BodyError as exc:
            if not exc.undecodable:
                raise WalCorrupted(path, pos, exc.why) from None
            why = exc.why
            break
        if found != seq + 1:
            raise WalCorrupted(path, pos, f"seq gap: {found} after {seq}")
        if prev != head:
            raise WalCorrupted(path, pos, "broken prev link")
        add(pos)
        seq += 1
        head = sha3(body).digest()
        pos = end
    if pos < size and (size - pos > FRAME.size + MAX_BODY or _frame_follows(fd, pos, size, seq)):
        raise WalCorrupted(path, pos, why)
    return _Scan(offsets, seq, head, pos, size - pos, why)


# A frame that could start at some position: a length below 2**25 (so its first byte is 0 or
# 1) and, 8 bytes on, the head of a CBOR map with at least the 4 reserved keys.
_FRAME_START: Final = re.compile(rb"(?=[\x00\x01].{7}[\xa4-\xbb])", re.DOTALL)


def _frame_follows(fd: int, pos: int, size: int, seq: int) -> bool:
    """Does a good frame (valid CRC, valid body, a later ``seq``) start after ``pos``?

    Run only when the frame at ``pos`` is bad, to tell a torn last frame (nothing good
    after it) from damage in the middle of the log.  Errs towards "yes", i.e. towards
    refusing to start rather than truncating.
    """
    data = _refill(fd, b"", pos + 1, pos + 1, size - pos - 1, size)
    for match in _FRAME_START.finditer(data):
        q = match.start()
        length, crc = FRAME.unpack_from(data, q)
        body = data[q + 8 : q + 8 + length]
        if not 0 < length <= MAX_BODY or len(body) != length or zlib.crc32(body) != crc:
            continue
        try:
            found, _ = check_body(body)
        except BodyError:
            continue
        if found > seq:
            return True
    return False


def _open_fd(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise DeviceError(f"{path}: cannot open: {exc.strerror}") from None


def _scan_file(path: Path) -> _Scan:
    """Scan ``path`` read-only (no lock, nothing written)."""
    fd = _open_fd(path, os.O_RDONLY)
    try:
        return _scan(fd, path, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def verify_chain(directory: Path, *, allow_torn_tail: bool = False) -> tuple[int, bytes]:
    """Re-read ``directory/wal.log`` and check every frame, body and chain link.

    Read-only and lock-free: safe next to a running appliance, and it changes nothing.

    :param allow_torn_tail: accept an incomplete last frame (a crashed or still-running
        writer) instead of failing; the head is then that of the last good record.
    :returns: ``(seq, hash)`` of the last record; ``(-1, 32 zero bytes)`` for an empty log.
    :raises WalCorrupted: naming the offset of the first bad frame.
    :raises ConfigError: there is no ``wal.log``.
    """
    path = Path(directory) / LOG_NAME
    scan = _scan_file(path)
    if scan.torn and not allow_torn_tail:
        raise WalCorrupted(path, scan.end, f"incomplete last frame ({scan.why})")
    return scan.seq, scan.hash


# -- the log ----------------------------------------------------------------------------------


def _ensure_dir(directory: Path) -> None:
    """Create the WAL directory 0700 (and make its entry durable) if it is missing."""
    if directory.is_dir():
        return
    try:
        directory.mkdir(mode=fsio.DIR_MODE, parents=True)
    except FileExistsError:
        return
    except OSError as exc:
        raise DeviceError(f"{directory}: cannot create: {exc.strerror}") from None
    fsio.fsync_dir(directory.parent)


def _open_log(path: Path) -> tuple[int, bool]:
    """Open ``wal.log`` for appending, creating it 0600; say whether it was created."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, fsio.FILE_MODE), True
    except FileExistsError:
        pass
    except OSError as exc:
        raise DeviceError(f"{path}: cannot create: {exc.strerror}") from None
    return _open_fd(path, flags), False


def _free_torn_path(directory: Path) -> Path:
    candidate = directory / TORN_NAME
    n = 0
    while candidate.exists():
        n += 1
        candidate = directory / f"{TORN_NAME}.{n}"
    return candidate


def _pread_exact(fd: int, n: int, offset: int, path: Path) -> bytes:
    data = _refill(fd, b"", offset, offset, n, offset + n)
    if len(data) != n:
        raise WalCorrupted(path, offset, "frame cut short since open")
    return data


class Wal:
    """The appliance's write-ahead log.  Open with :meth:`open`; use as a context manager.

    One writer at a time (``flock`` on ``wal/lock``).  Methods are thread-safe: appends and
    commits are serialised by an internal mutex.

    Security: record fields end up on disk in clear and in every replica; never put
    secrets in them.  The log itself never logs or reports record contents.
    """

    __slots__ = (
        "_clock",
        "_closed",
        "_committed",
        "_directory",
        "_end",
        "_failed",
        "_fd",
        "_fsyncs",
        "_hash",
        "_lock",
        "_mutex",
        "_offsets",
        "_on_commit",
        "_path",
        "_pending",
        "_readonly",
        "_seq",
        "_torn_bytes",
        "_torn_path",
        "_verified",
    )

    def __init__(
        self,
        *,
        directory: Path,
        fd: int,
        lock: WalLock | None,
        scan: _Scan,
        clock: Callable[[], int],
        fsyncs: int,
        torn_path: Path | None,
    ) -> None:
        """Internal: use :meth:`open`."""
        self._directory = directory
        self._path = directory / LOG_NAME
        self._fd = fd
        self._lock = lock
        self._readonly = lock is None
        self._clock = clock
        self._offsets = scan.offsets
        self._seq = scan.seq
        self._hash = scan.hash
        self._end = scan.end
        self._committed = scan.end  # a writer's open makes what it found durable
        self._on_commit: Callable[[int], None] | None = None
        self._torn_bytes = scan.torn
        self._torn_path = torn_path
        self._fsyncs = fsyncs
        self._pending = 0
        self._verified = False
        self._closed = False
        self._failed = False
        self._mutex = threading.Lock()

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        clock: Callable[[], int] | None = None,
        readonly: bool = False,
        limit: int | None = None,
    ) -> Wal:
        """Open (for writing: create if missing) the log in ``directory`` and replay it.

        :param clock: returns milliseconds since the Unix epoch (UTC) for ``ts``; defaults
            to the system clock.
        :param readonly: take no lock and change nothing (see the module docs).
        :param limit: with ``readonly``, read only the first ``limit`` bytes: a follower
            of a live writer passes the writer's :attr:`committed_end`, so that it never
            acts on a record that is appended but not yet durable.
        :raises WalLocked: another writer holds ``directory/lock``.
        :raises WalCorrupted: the log is damaged before its last frame; the file is untouched.
        :raises ConfigError: ``readonly`` and there is no ``wal.log``.
        :raises DeviceError: the storage failed.
        """
        directory = Path(directory)
        path = directory / LOG_NAME
        tick = clock if clock is not None else _now_ms
        if limit is not None and (not readonly or limit < 0):
            raise CallerError("a WAL limit needs readonly=True and a length >= 0")
        if readonly:
            fd = _open_fd(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                scan = _scan(fd, path, size if limit is None else min(size, limit))
            except BaseException:
                os.close(fd)
                raise
            if scan.torn:  # a crashed writer, or one writing right now: not ours to repair
                _log.info(
                    "%s: incomplete last frame at offset %d (%d bytes: %s), left in place "
                    "(read-only)",
                    path,
                    scan.end,
                    scan.torn,
                    scan.why,
                )
            return cls(
                directory=directory,
                fd=fd,
                lock=None,
                scan=scan,
                clock=tick,
                fsyncs=0,
                torn_path=None,
            )

        _ensure_dir(directory)
        lock = WalLock.acquire(directory / LOCK_NAME)
        try:
            fd, created = _open_log(path)
            try:
                if created:
                    fsio.fsync_dir(directory)
                scan = _scan(fd, path, os.fstat(fd).st_size)
                if scan.torn:
                    torn_path: Path | None = _set_aside_torn(fd, path, scan)  # fsyncs the log
                else:
                    # What we just indexed may be the un-committed appends of a writer that
                    # died: make it durable before anyone acts on it.
                    torn_path = None
                    fsio._durable_sync(fd)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            lock.release()
            raise
        return cls(
            directory=directory,
            fd=fd,
            lock=lock,
            scan=scan,
            clock=tick,
            fsyncs=1,
            torn_path=torn_path,
        )

    # -- state ---------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The ``wal.log`` file."""
        return self._path

    @property
    def directory(self) -> Path:
        """The WAL directory (``wal.log``, ``lock``, ``wal.log.torn*``)."""
        return self._directory

    @property
    def head(self) -> tuple[int, bytes]:
        """``(seq, hash)`` of the last record (committed or not); ``(-1, 32 zero bytes)``
        for an empty log."""
        return self._seq, self._hash

    def __len__(self) -> int:
        """Number of records (committed or not); the next ``seq``."""
        return len(self._offsets)

    @property
    def readonly(self) -> bool:
        """Opened with ``readonly=True``."""
        return self._readonly

    @property
    def closed(self) -> bool:
        """Closed, by :meth:`close` or by a storage failure."""
        return self._closed

    @property
    def committed_end(self) -> int:
        """The file length the last commit made durable (a reader: what it read)."""
        return self._committed

    def follow(self, limit: int) -> int:
        """A reader of a live writer's log: index the frames up to ``limit`` (the writer's
        :attr:`committed_end` now) that were appended since this object last read; return
        the ``seq`` of the first new record (:meth:`records` from there gives them).

        Only the new frames are read and checked, chained to the last one read before: a
        follower keeps up with a writer in time proportional to what the writer added,
        not to the whole log.  (A writer only appends past what it committed; it cuts off
        a partial frame of a failed write, never committed bytes.)

        :raises CallerError: not opened read-only, ``limit`` is below what was read, or the
            log is closed.
        :raises WalCorrupted: a new frame is damaged before its last one.
        """
        with self._mutex:
            self._check_open()
            if not self._readonly:
                raise CallerError(f"{self._path}: only a read-only log follows a writer")
            if limit < self._end:
                raise CallerError(
                    f"{self._path}: follow limit {limit} is below what was read ({self._end})"
                )
            first = len(self._offsets)
            if limit == self._end:
                return first
            size = min(os.fstat(self._fd).st_size, limit)
            before = _Scan(self._offsets, self._seq, self._hash, self._end, 0, "")
            try:
                scan = _scan(self._fd, self._path, size, before)
            except BaseException:
                del self._offsets[first:]  # the index as it was: nothing new was read
                raise
            if scan.torn:
                _log.info(
                    "%s: incomplete frame at offset %d under the follow limit (%s); read up to it",
                    self._path,
                    scan.end,
                    scan.why,
                )
            self._seq, self._hash, self._end = scan.seq, scan.hash, scan.end
            self._committed = scan.end
            return first

    def on_commit(self, hook: Callable[[int], None] | None) -> None:
        """Call ``hook(committed_end)`` now and after every commit that made something
        durable, inside the log's mutex (so no commit is missed and calls come in
        order); it must not raise or block."""
        with self._mutex:
            self._on_commit = hook
            if hook is not None:
                hook(self._committed)

    @property
    def torn_bytes(self) -> int:
        """Bytes of a torn last frame found at open (0: none).  A writer moved them to
        :attr:`torn_path`; a reader left them in place."""
        return self._torn_bytes

    @property
    def torn_path(self) -> Path | None:
        """Where opening set a torn tail aside, or None."""
        return self._torn_path

    @property
    def fsync_count(self) -> int:
        """fsyncs of ``wal.log`` this object made: one at open, then one per commit that
        had something to commit.  Directory syncs and the torn-tail copy are not counted.
        """
        return self._fsyncs

    def __repr__(self) -> str:
        state = "closed" if self._closed else "read-only" if self._readonly else "open"
        return f"<Wal {self._path} {state} records={len(self._offsets)}>"

    # -- reading -------------------------------------------------------------------------

    def get(self, seq: int) -> WalRecord:
        """The record at ``seq``, read from disk (one ``pread``) and checked again.

        :raises CallerError: no record has that ``seq``, or the log is closed.
        :raises WalCorrupted: the frame changed on disk since the log was opened.
        """
        with self._mutex:
            self._check_open()
            if type(seq) is not int or not 0 <= seq < len(self._offsets):
                raise CallerError(f"{self._path.name}: no record with seq {seq!r}")
            offset, end = self._extent(seq)
        return self._read(seq, offset, end)

    def records(self, start: int = 0) -> Iterator[WalRecord]:
        """Records from ``start`` up to the head as it was at this call, in order; the
        ``prev`` links between them are checked again.

        :raises CallerError: ``start`` is negative or past the end, or the log is closed.
        :raises WalCorrupted: (while iterating) a frame changed on disk since open.
        """
        with self._mutex:
            self._check_open()
            count = len(self._offsets)
            if type(start) is not int or not 0 <= start <= count:
                raise CallerError(f"{self._path.name}: no record with seq {start!r}")
        return self._iter(start, count)

    def _iter(self, start: int, stop: int) -> Iterator[WalRecord]:
        prev: bytes | None = None
        for seq in range(start, stop):
            with self._mutex:
                self._check_open()
                offset, end = self._extent(seq)
            rec = self._read(seq, offset, end)
            if prev is not None and rec.prev != prev:
                raise WalCorrupted(self._path, offset, "broken prev link")
            prev = rec.hash
            yield rec

    def _extent(self, seq: int) -> tuple[int, int]:
        offsets = self._offsets
        end = offsets[seq + 1] if seq + 1 < len(offsets) else self._end
        return offsets[seq], end

    def _read(self, seq: int, offset: int, end: int) -> WalRecord:
        data = _pread_exact(self._fd, end - offset, offset, self._path)
        length, crc = FRAME.unpack_from(data)
        body = data[FRAME.size :]
        if length != len(body) or zlib.crc32(body) != crc:
            raise WalCorrupted(self._path, offset, "frame changed since open")
        try:
            fields = decode_body(body)
        except BodyError as exc:
            raise WalCorrupted(self._path, offset, exc.why) from None
        if fields["seq"] != seq:
            raise WalCorrupted(self._path, offset, "frame changed since open")
        return _record(fields, body, record_hash(body), offset)

    # -- writing -------------------------------------------------------------------------

    def append(self, type: str, fields: Mapping[str, Any]) -> WalRecord:
        """Append a record (``seq`` = head + 1, ``prev`` = head hash, ``ts`` = clock()).

        The frame is written but **not durable** until :meth:`commit` returns.

        :param type: the record type (non-empty).
        :param fields: the rest of the body; may not set ``seq``, ``prev``, ``ts`` or
            ``type``; values as allowed by :mod:`appliance.wal.frame`.
        :raises CallerError: bad fields (nothing written), read-only or closed log.
        :raises DeviceError: the write failed; the log is closed.
        """
        with self._mutex:
            self._check_writable()
            seq = self._seq + 1
            prev = self._hash
            # The first body also goes through the reader's validator (see encode_body).
            body, body_map = encode_record(
                seq, prev, self._clock(), type, fields, verify=not self._verified
            )
            self._verified = True
            frame = encode_frame(body)
            offset = self._end
            self._write(frame, offset)
            digest = record_hash(body)
            self._offsets.append(offset)
            self._end = offset + len(frame)
            self._seq = seq
            self._hash = digest
            self._pending += 1
        fsio.fault_point("wal.append")
        return _record(body_map, body, digest, offset)

    def commit(self) -> None:
        """Make every appended record durable; returns only after the fsync did.

        A no-op when nothing was appended since the last commit.

        :raises DeviceError: the fsync failed.  That is fatal: the log closes itself, and
            records appended since the last commit may or may not be on disk.
        :raises CallerError: read-only or closed log.
        """
        with self._mutex:
            self._check_writable()
            if not self._pending:
                return
            fsio.fault_point("wal.commit.before")
            try:
                fsio._durable_sync(self._fd)
            except (DeviceError, OSError) as exc:
                self._shut(failed=True)
                raise DeviceError(
                    f"{self._path}: fsync failed, log closed; reopen to recover"
                ) from exc
            self._fsyncs += 1
            self._pending = 0
            self._committed = self._end
            if self._on_commit is not None:
                self._on_commit(self._end)
        fsio.fault_point("wal.fsync")

    def append_commit(self, type: str, fields: Mapping[str, Any]) -> WalRecord:
        """:meth:`append` then :meth:`commit`: the record is durable when this returns."""
        record = self.append(type, fields)
        self.commit()
        return record

    def _write(self, frame: bytes, offset: int) -> None:
        """Write one whole frame at the end of the file (one ``write`` call unless the
        kernel writes short).  On failure cut the partial frame off and close the log."""
        view = memoryview(frame)
        try:
            while view:
                n = os.write(self._fd, view)
                if n <= 0:
                    raise OSError(0, "write made no progress")
                view = view[n:]
        except OSError as exc:
            try:
                os.ftruncate(self._fd, offset)
            except OSError:
                _log.critical("%s: cannot cut a partial frame at offset %d", self._path, offset)
            self._shut(failed=True)
            raise DeviceError(
                f"{self._path}: write failed at offset {offset} ({exc.strerror}), log closed"
            ) from None

    # -- lifetime ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._failed:
            raise DeviceError(f"{self._path}: log closed after a storage failure; reopen it")
        if self._closed:
            raise CallerError(f"{self._path}: log is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._readonly:
            raise CallerError(f"{self._path}: log is open read-only")

    def _shut(self, *, failed: bool) -> None:
        if failed:
            self._failed = True
        if self._closed:
            return
        self._closed = True
        try:
            os.close(self._fd)
        finally:
            if self._lock is not None:
                self._lock.release()

    def close(self) -> None:
        """Close the file and release the lock.  Does **not** commit: records appended
        since the last commit stay in the file but are not promised to survive a crash.
        Safe to call twice."""
        with self._mutex:
            self._shut(failed=False)

    def __enter__(self) -> Wal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _record(fields: dict[str, Any], body: bytes, digest: bytes, offset: int) -> WalRecord:
    return WalRecord(
        seq=fields["seq"],
        prev=fields["prev"],
        ts=fields["ts"],
        type=fields["type"],
        fields=MappingProxyType(fields),
        body=body,
        hash=digest,
        offset=offset,
    )


def _set_aside_torn(fd: int, path: Path, scan: _Scan) -> Path:
    """Copy a torn tail to a fresh ``wal.log.torn*``, then cut it off ``wal.log``.

    Order: (1) the copy is durable (atomic_write: write, fsync, rename, fsync dir);
    (2) truncate; (3) fsync the log; (4) fsync the directory.  A crash anywhere leaves
    either the torn tail still in place (the next open repeats this) or the log repaired.
    """
    directory = path.parent
    data = _pread_exact(fd, scan.torn, scan.end, path)
    torn_path = _free_torn_path(directory)
    fsio.atomic_write(torn_path, data, point="wal.torn")  # (1)
    try:
        os.ftruncate(fd, scan.end)  # (2)
    except OSError as exc:
        raise DeviceError(f"{path}: cannot truncate a torn tail: {exc.strerror}") from None
    fsio.fault_point("wal.torn.truncate")
    fsio._durable_sync(fd)  # (3)
    fsio.fsync_dir(directory)  # (4)
    _log.warning(
        "%s: torn write at offset %d (%d bytes: %s) moved to %s and cut off",
        path,
        scan.end,
        scan.torn,
        scan.why,
        torn_path.name,
    )
    return torn_path
