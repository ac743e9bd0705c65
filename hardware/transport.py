"""Serial transport: the only module in pqhsm that imports :mod:`serial` (pyserial).

A :class:`Transport` opens a port by device path (``/dev/ttyUSB0``, a pty slave such as
``/dev/pts/7``) or by any pyserial URL (``loop://``, ``rfc2217://host:port``) and offers
exactly what the relay driver and the admin console need: write all bytes or fail, read
an exact number of bytes or fail, close.  Every pyserial failure is translated into
:class:`SerialError`, a :class:`~appliance.errors.DeviceError`, with a one-line message
that names the port — never a pyserial traceback.
"""

from __future__ import annotations

import logging
import queue
import termios
from types import TracebackType

import serial

from appliance.errors import DeviceError

__all__ = ["DEFAULT_BAUD", "SerialError", "SerialTimeout", "Transport"]

log = logging.getLogger(__name__)

DEFAULT_BAUD = 9600  # LCUS-1 / CH340 relay boards and most admin consoles: 9600 8N1


class SerialError(DeviceError):
    """The serial port cannot be opened, vanished, or failed a read or write."""

    def __init__(self, port: str, why: str) -> None:
        super().__init__(f"serial port {port}: {why}")
        self.port = port
        self.why = why


class SerialTimeout(SerialError):
    """A read or write did not complete within the port's timeout."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class Transport:
    """An open serial port.

    :param port: a device path or a pyserial URL (``loop://`` for byte-level tests).
    :param baud: line speed; 8 data bits, no parity, one stop bit.
    :param timeout: seconds a :meth:`read_exact` may wait for its bytes.
    :param write_timeout: seconds a :meth:`write` may wait for the driver to take its bytes.
    :raises SerialError: the port does not exist or cannot be opened.
    """

    def __init__(
        self,
        port: str,
        *,
        baud: int = DEFAULT_BAUD,
        timeout: float = 1.0,
        write_timeout: float = 1.0,
    ) -> None:
        self.port = port
        try:
            self._serial = serial.serial_for_url(
                port,
                baudrate=baud,
                bytesize=serial.EIGHTBITS,
                parity=serial.PARITY_NONE,
                stopbits=serial.STOPBITS_ONE,
                timeout=timeout,
                write_timeout=write_timeout,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise SerialError(port, f"cannot open: {_one_line(exc)}") from exc
        log.debug("opened serial port %s at %d baud", port, baud)

    @property
    def is_open(self) -> bool:
        """Whether the port is still open on this side."""
        return bool(self._serial.is_open)

    def write(self, data: bytes) -> None:
        """Write every byte of ``data`` and wait until the OS has taken them.

        :raises SerialTimeout: the port did not take the bytes within ``write_timeout``.
        :raises SerialError: the port is closed, vanished, or wrote fewer bytes.
        """
        if not self.is_open:
            raise SerialError(self.port, "port is closed")
        try:
            n = self._serial.write(data)
            self._serial.flush()
        except (serial.SerialTimeoutException, queue.Full) as exc:
            # queue.Full: pyserial's loop:// when nobody reads what it wrote
            raise SerialTimeout(self.port, "write timed out") from exc
        except (serial.SerialException, OSError, termios.error) as exc:
            # termios.error: pyserial's flush (tcdrain) after the far end of a pty hung up
            raise SerialError(self.port, f"write failed: {_one_line(exc)}") from exc
        if n != len(data):
            raise SerialError(self.port, f"short write: {n} of {len(data)} bytes")

    def read_exact(self, n: int) -> bytes:
        """Read exactly ``n`` bytes.

        :raises SerialTimeout: fewer than ``n`` bytes arrived within ``timeout``.
        :raises SerialError: the port is closed or vanished.
        """
        if not self.is_open:
            raise SerialError(self.port, "port is closed")
        try:
            data = bytes(self._serial.read(n))
        except (serial.SerialException, OSError) as exc:
            raise SerialError(self.port, f"read failed: {_one_line(exc)}") from exc
        if len(data) != n:
            raise SerialTimeout(self.port, f"read timed out after {len(data)} of {n} bytes")
        return data

    def read_available(self) -> bytes:
        """Return whatever bytes are waiting, without blocking.

        :raises SerialError: the port is closed or vanished.
        """
        if not self.is_open:
            raise SerialError(self.port, "port is closed")
        try:
            waiting = self._serial.in_waiting
            return bytes(self._serial.read(waiting)) if waiting else b""
        except (serial.SerialException, OSError) as exc:
            raise SerialError(self.port, f"read failed: {_one_line(exc)}") from exc

    def close(self) -> None:
        """Close the port; closing twice is harmless."""
        try:
            self._serial.close()
        except (serial.SerialException, OSError) as exc:
            log.warning("closing serial port %s: %s", self.port, _one_line(exc))

    def __enter__(self) -> Transport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
