"""Driver for LCUS-type CH340 "USB relay" boards: cut and restore a device's power.

Protocol (the one this driver and :mod:`hardware.relay_sim` speak)
------------------------------------------------------------------
The widely sold LCUS-1 / LCUS-2 / LCUS-4 boards put a CH340 USB-serial bridge in front of a
small MCU.  The host opens the CH340 port at **9600 baud, 8N1, no flow control** and writes
fixed 4-byte command frames::

    offset  size  field
    0       1     header    always 0xA0
    1       1     channel   1 .. 8 (1 on a single-channel LCUS-1)
    2       1     state     0x00 = relay off (contact open), 0x01 = relay on (contact closed)
    3       1     checksum  (0xA0 + channel + state) & 0xFF

Examples: ``A0 01 01 A2`` turns channel 1 on, ``A0 01 00 A1`` turns it off, ``A0 02 01 A3``
turns channel 2 on.  The board keeps no other state: a frame simply sets one contact.

No acknowledgement.  These boards send nothing back for the frames above.  Some firmware
variants accept extra "state" bytes (a status query, on/off with feedback), but which bytes,
and what they answer, differ between batches, so this driver does not send them and does not
expect any reply.  "The relay does not answer" therefore has a precise, weaker meaning here:

* the driver guarantees that all four bytes of a frame were taken by the serial port (a
  short write, a write timeout, or a port that vanished raises
  :class:`~hardware.transport.SerialError`);
* whether the contact really moved is checked **by its effect**: the power-cut harness
  (:mod:`hardware.lab`) waits for the powered workload to go down after an OFF and come up
  after an ON, and reports a cut that had no effect as a failure.

Wiring for a power cut: the device's supply runs through the normally-open contact, so
channel ON = device powered, OFF = power cut.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from hardware.transport import Transport

__all__ = [
    "FRAME_LEN",
    "HEADER",
    "MAX_CHANNEL",
    "STATE_OFF",
    "STATE_ON",
    "Relay",
    "checksum",
    "frame",
]

log = logging.getLogger(__name__)

HEADER = 0xA0
STATE_OFF = 0x00
STATE_ON = 0x01
FRAME_LEN = 4
MAX_CHANNEL = 8


def checksum(channel: int, state: int) -> int:
    """The frame's last byte: ``(0xA0 + channel + state) & 0xFF``."""
    return (HEADER + channel + state) & 0xFF


def frame(channel: int, on: bool) -> bytes:
    """The 4-byte command that sets ``channel`` on or off.

    :raises ValueError: ``channel`` is not in 1 .. :data:`MAX_CHANNEL`.
    """
    if isinstance(channel, bool) or not isinstance(channel, int):
        raise TypeError("channel must be an int")
    if not 1 <= channel <= MAX_CHANNEL:
        raise ValueError(f"relay channel must be 1 to {MAX_CHANNEL}, not {channel}")
    state = STATE_ON if on else STATE_OFF
    return bytes((HEADER, channel, state, checksum(channel, state)))


@dataclass
class Relay:
    """An LCUS-type relay board on an open :class:`~hardware.transport.Transport`.

    ``sent`` records every frame written, in order, so a test can compare it with what the
    simulator received.
    """

    transport: Transport
    sent: list[bytes] = field(default_factory=list)

    def set(self, channel: int, on: bool) -> None:
        """Write one frame; return once the port has taken all four bytes.

        :raises SerialError: the port failed, timed out or vanished.
        """
        data = frame(channel, on)
        self.transport.write(data)
        self.sent.append(data)
        log.info("relay %s: channel %d %s", self.transport.port, channel, "on" if on else "off")

    def on(self, channel: int) -> None:
        """Close the contact: power the device on ``channel``."""
        self.set(channel, True)

    def off(self, channel: int) -> None:
        """Open the contact: cut the power of the device on ``channel``."""
        self.set(channel, False)

    def power_cycle(self, channel: int, off_seconds: float) -> None:
        """Cut power on ``channel``, wait ``off_seconds``, restore it."""
        if off_seconds < 0:
            raise ValueError("off_seconds must not be negative")
        self.off(channel)
        time.sleep(off_seconds)
        self.on(channel)
