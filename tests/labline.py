"""Options for running the hardware tests against real devices in a lab (registered by
the root tests/conftest.py, so ``pytest --serial-port ...`` works from anywhere).

Without options every test here runs on kernel ptys and the relay simulator (the CI tier).
With them, the same tests drive real hardware:

``--serial-port PATH --serial-peer PATH [--serial-baud N]``
    The admin-console session tests serve the console on ``--serial-port`` (the appliance's
    console line, e.g. ``/dev/ttyUSB0``) and type into ``--serial-peer`` (the other end of
    a null-modem cable, e.g. ``/dev/ttyUSB1`` on the same lab host).  Tests that need a
    hang-up (a pty closing its master: "cable pulled") stay on ptys, because an RS-232 line
    without modem-control wiring cannot signal one.

``--relay-port PATH [--relay-channel N]``
    ``test_powercut.py::test_power_cuts_through_the_lab_relay`` switches a real LCUS-type
    relay (9600 8N1) on that port, with the harness killing the local workload at each OFF
    frame; the simulator tests run as well.

See hardware/README.md for the wiring.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pqhsm-hardware", "pqhsm hardware lab (real devices)")
    group.addoption(
        "--serial-port",
        metavar="PATH",
        help="console tests: serve the admin console on this real serial port",
    )
    group.addoption(
        "--serial-peer",
        metavar="PATH",
        help="console tests: the other end of --serial-port's null-modem cable",
    )
    group.addoption(
        "--serial-baud", type=int, default=115200, help="line speed for --serial-port/-peer"
    )
    group.addoption(
        "--relay-port", metavar="PATH", help="power-cut tests: a real LCUS relay on this port"
    )
    group.addoption("--relay-channel", type=int, default=1, help="the relay channel to switch")


def pytest_configure(config: pytest.Config) -> None:
    if bool(config.getoption("--serial-port")) != bool(config.getoption("--serial-peer")):
        raise pytest.UsageError("--serial-port and --serial-peer go together (a null-modem pair)")


@dataclass(frozen=True)
class SerialLine:
    """A real console line: the appliance's port and the operator's end of the cable."""

    port: str
    peer: str
    baud: int


@dataclass(frozen=True)
class RelayPort:
    """A real relay board."""

    port: str
    channel: int


@pytest.fixture(scope="session")
def serial_line(pytestconfig: pytest.Config) -> SerialLine | None:
    """The lab's console line, or ``None``: the tests then use kernel ptys."""
    port = pytestconfig.getoption("--serial-port")
    peer = pytestconfig.getoption("--serial-peer")
    if not port or not peer:
        return None
    return SerialLine(str(port), str(peer), int(pytestconfig.getoption("--serial-baud")))


@pytest.fixture(scope="session")
def relay_port(pytestconfig: pytest.Config) -> RelayPort | None:
    """The lab's relay, or ``None``: the tests then use the pty simulator."""
    port = pytestconfig.getoption("--relay-port")
    if not port:
        return None
    return RelayPort(str(port), int(pytestconfig.getoption("--relay-channel")))
