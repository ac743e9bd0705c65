"""A simulated LCUS-type relay board on a real kernel pty, powering a child process.

The simulator opens a pty pair with :func:`os.openpty`, puts it in raw mode, and reads the
master side in a thread, parsing exactly the frames of :mod:`hardware.relay` (``A0 ch st
sum``).  The driver opens the *slave* path (``/dev/pts/N``) with pyserial, as it would open
``/dev/ttyUSB0``.  Channel 1 (or any channel given a load) powers a :class:`PoweredProcess`:
OFF sends SIGKILL to the process — a power cut, nothing is flushed — and ON starts it again.

Like the real board, the simulator never answers.  Anything that is not a valid frame is
ignored and counted, never fatal:

* a byte other than ``0xA0`` where a frame should start: ``garbage`` (one per byte);
* ``0xA0`` followed by a bad checksum, a channel outside 1..8 or a state other than 0/1:
  ``bad_checksum`` / ``bad_channel`` / ``bad_state``; the parser then drops the ``0xA0``
  only and resynchronises on the next ``0xA0``, so a stray byte before a good frame does
  not cost that frame;
* a frame cut short (fewer than four bytes, then silence for ``partial_timeout``):
  ``partial``.

Valid frames are logged in :attr:`RelaySimulator.frames`, in arrival order.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import threading
import time
import tty
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from hardware.relay import (
    FRAME_LEN,
    HEADER,
    MAX_CHANNEL,
    STATE_OFF,
    STATE_ON,
    checksum,
    frame,
)

__all__ = ["FrameParser", "ParserCounters", "PoweredProcess", "RelaySimulator"]

log = logging.getLogger(__name__)


@dataclass
class ParserCounters:
    """What the simulator ignored, by reason."""

    garbage: int = 0
    bad_checksum: int = 0
    bad_channel: int = 0
    bad_state: int = 0
    partial: int = 0

    @property
    def rejected(self) -> int:
        """Every ignored byte or frame, whatever the reason."""
        return self.garbage + self.bad_checksum + self.bad_channel + self.bad_state + self.partial


@dataclass
class FrameParser:
    """Stream parser for relay frames; pure logic, no I/O.

    :param partial_timeout: seconds of silence after which an incomplete frame is dropped.
    """

    partial_timeout: float = 0.05
    counters: ParserCounters = field(default_factory=ParserCounters)
    _buf: bytearray = field(default_factory=bytearray)
    _last: float = 0.0

    def feed(self, data: bytes, now: float) -> list[tuple[int, bool]]:
        """Add received bytes; return the ``(channel, on)`` commands now complete."""
        self.expire(now)
        self._buf += data
        if data:
            self._last = now
        out: list[tuple[int, bool]] = []
        buf = self._buf
        while buf:
            if buf[0] != HEADER:
                del buf[0]
                self.counters.garbage += 1
                continue
            if len(buf) < FRAME_LEN:
                break
            _, channel, state, total = buf[:FRAME_LEN]
            if total != checksum(channel, state):
                self.counters.bad_checksum += 1
            elif not 1 <= channel <= MAX_CHANNEL:
                self.counters.bad_channel += 1
            elif state not in (STATE_OFF, STATE_ON):
                self.counters.bad_state += 1
            else:
                del buf[:FRAME_LEN]
                out.append((channel, state == STATE_ON))
                continue
            del buf[0]  # resynchronise on the next header byte
        return out

    def expire(self, now: float) -> None:
        """Drop an incomplete frame that has waited longer than ``partial_timeout``."""
        if self._buf and now - self._last > self.partial_timeout:
            self.counters.partial += 1
            self._buf.clear()


class PoweredProcess:
    """A child process whose power is a relay channel.

    :meth:`power_on` starts ``argv`` (set or replaced with :meth:`load`); :meth:`power_off`
    SIGKILLs it if it still runs.  Output goes to ``stdout_path`` / ``stderr_path`` when set.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._argv: Sequence[str] | None = None
        self._env: Mapping[str, str] | None = None
        self._out: Path | None = None
        self._err: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.powered = False
        self.power_ons = 0
        self.power_offs = 0
        self.kills = 0  # power cuts that found the process running

    def load(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout_path: Path | None = None,
        stderr_path: Path | None = None,
    ) -> None:
        """Set what the next power-on starts."""
        with self._cond:
            self._argv, self._env = list(argv), env
            self._out, self._err = stdout_path, stderr_path

    def power_on(self) -> None:
        """Start the loaded program (a no-op if already powered)."""
        with self._cond:
            if self.powered:
                return
            if self._argv is None:
                log.warning("power on with nothing loaded")
            else:
                out: IO[bytes] | int = subprocess.DEVNULL
                err: IO[bytes] | int = subprocess.DEVNULL
                if self._out is not None:
                    out = self._out.open("wb")
                if self._err is not None:
                    err = self._err.open("wb")
                try:
                    self.proc = subprocess.Popen(  # noqa: S603 - argv from the lab, no shell
                        self._argv, stdout=out, stderr=err, env=self._env
                    )
                finally:
                    for f in (out, err):
                        if not isinstance(f, int):
                            f.close()
            self.powered = True
            self.power_ons += 1
            self._cond.notify_all()

    def power_off(self) -> None:
        """Cut the power: SIGKILL the process if it still runs, then reap it."""
        with self._cond:
            if not self.powered:
                return
            proc = self.proc
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                self.kills += 1
            if proc is not None:
                proc.wait()
            self.powered = False
            self.power_offs += 1
            self._cond.notify_all()

    def wait_power(self, on: bool, count: int, timeout: float) -> bool:
        """Wait until the power-on (or power-off) counter reaches ``count``."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (self.power_ons if on else self.power_offs) >= count, timeout
            )


class RelaySimulator:
    """A relay board on a pty.  Open :attr:`port` with the driver; use as a context manager.

    :param loads: which channel powers which :class:`PoweredProcess` (default: channel 1
        powers :attr:`power`).
    :param on_change: called as ``on_change(channel, on)`` for every valid frame.
    """

    def __init__(
        self,
        loads: Mapping[int, PoweredProcess] | None = None,
        *,
        on_change: Callable[[int, bool], None] | None = None,
        partial_timeout: float = 0.05,
    ) -> None:
        self.power = PoweredProcess()
        self.loads: dict[int, PoweredProcess] = dict(
            loads if loads is not None else {1: self.power}
        )
        self.on_change = on_change
        self.parser = FrameParser(partial_timeout=partial_timeout)
        self.frames: list[bytes] = []
        self.states: dict[int, bool] = {}
        self._lock = threading.Lock()
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        tty.setraw(self._master)
        self.port = os.ttyname(self._slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-sim", daemon=True)
        self._thread.start()
        log.debug("relay simulator on %s", self.port)

    @property
    def counters(self) -> ParserCounters:
        """What was ignored so far."""
        return self.parser.counters

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._master], [], [], 0.01)
                data = os.read(self._master, 4096) if ready else b""
            except OSError:  # the pty went away under us: stop quietly
                break
            with self._lock:
                commands = self.parser.feed(data, time.monotonic())
                for channel, on in commands:
                    self.frames.append(frame(channel, on))
                    self.states[channel] = on
            for channel, on in commands:
                self._apply(channel, on)

    def _apply(self, channel: int, on: bool) -> None:
        load = self.loads.get(channel)
        try:
            if load is not None:
                if on:
                    load.power_on()
                else:
                    load.power_off()
            if self.on_change is not None:
                self.on_change(channel, on)
        except Exception:  # a failing load must not stop the board
            log.exception("relay simulator: channel %d %s failed", channel, on)

    def close(self) -> None:
        """Stop the board, cut every load's power, close both pty ends."""
        self._stop.set()
        self._thread.join(timeout=2)
        for load in self.loads.values():
            load.power_off()
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> RelaySimulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
