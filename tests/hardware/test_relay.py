"""Relay driver, serial transport and relay simulator: bytes on ``loop://`` and on real ptys.

No SoftHSM2 and no real device needed: the simulator's load here is a sleeping child.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hardware.lab import Scenario, main
from hardware.relay import Relay, checksum, frame
from hardware.relay_sim import FrameParser, RelaySimulator
from hardware.transport import SerialError, SerialTimeout, Transport

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


# -- frames ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "on", "expected"),
    [
        (1, True, "a00101a2"),
        (1, False, "a00100a1"),
        (2, True, "a00201a3"),
        (4, False, "a00400a4"),
        (8, True, "a00801a9"),
    ],
)
def test_frame_bytes(channel: int, on: bool, expected: str) -> None:
    assert frame(channel, on) == bytes.fromhex(expected)


def test_checksum_is_sum_mod_256() -> None:
    for channel in range(256):
        for state in (0, 1, 0xFF):
            assert checksum(channel, state) == (0xA0 + channel + state) % 256
    assert checksum(0xFF, 0xFF) == 0x9E


@pytest.mark.parametrize("channel", [0, 9, -1, 256])
def test_frame_rejects_bad_channel(channel: int) -> None:
    with pytest.raises(ValueError, match="relay channel"):
        frame(channel, True)


def test_frame_rejects_bool_channel() -> None:
    with pytest.raises(TypeError):
        frame(True, True)


# -- driver over loop:// -----------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[Transport]:
    with Transport("loop://", timeout=0.2) as t:
        yield t


def test_driver_writes_exact_frames(loop: Transport) -> None:
    relay = Relay(loop)
    relay.on(1)
    relay.off(1)
    relay.on(3)
    assert loop.read_exact(12) == bytes.fromhex("a00101a2 a00100a1 a00301a4")
    assert relay.sent == [bytes.fromhex(h) for h in ("a00101a2", "a00100a1", "a00301a4")]
    assert loop.read_available() == b""


def test_power_cycle_is_off_then_on(loop: Transport) -> None:
    relay = Relay(loop)
    t0 = time.monotonic()
    relay.power_cycle(2, 0.05)
    assert time.monotonic() - t0 >= 0.05
    assert loop.read_exact(8) == bytes.fromhex("a00200a2 a00201a3")
    with pytest.raises(ValueError, match="off_seconds"):
        relay.power_cycle(2, -1)


def test_read_timeout_is_serial_timeout(loop: Transport) -> None:
    loop.write(b"\xa0\x01")
    with pytest.raises(SerialTimeout, match=r"loop://: read timed out after 2 of 4 bytes"):
        loop.read_exact(4)


def test_write_after_close_is_serial_error(loop: Transport) -> None:
    loop.close()
    loop.close()  # harmless
    with pytest.raises(SerialError, match="port is closed"):
        Relay(loop).on(1)
    with pytest.raises(SerialError, match="port is closed"):
        loop.read_exact(1)
    with pytest.raises(SerialError, match="port is closed"):
        loop.read_available()


# -- bad ports ---------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["/dev/ttyNOSUCH99", "nosuchscheme://x"])
def test_unknown_port_is_one_line_serial_error(port: str) -> None:
    with pytest.raises(SerialError) as info:
        Transport(port)
    message = str(info.value)
    assert message.startswith(f"serial port {port}: cannot open")
    assert "\n" not in message
    assert info.value.port == port
    from appliance.errors import CKR, DeviceError

    assert isinstance(info.value, DeviceError)
    assert info.value.ckr is CKR.DEVICE_ERROR


def test_driver_on_vanished_pty_is_serial_error() -> None:
    sim = RelaySimulator()
    transport = Transport(sim.port)
    relay = Relay(transport)
    relay.on(2)  # no load on channel 2: the frame is just accepted
    sim.close()  # the board is unplugged
    with pytest.raises(SerialError) as info:
        relay.off(2)
    assert sim.port in str(info.value)
    assert "\n" not in str(info.value)
    transport.close()


def _flood(transport: Transport) -> None:
    for _ in range(100_000):
        transport.write(frame(1, True) * 64)


def test_pty_master_without_reader_times_out() -> None:
    """A pty nobody drains fills up; the driver's write then times out, never hangs."""
    master, slave = os.openpty()
    try:
        with Transport(os.ttyname(slave), write_timeout=0.2) as transport:
            with pytest.raises(SerialTimeout, match="write timed out"):
                _flood(transport)
    finally:
        os.close(master)
        os.close(slave)


# -- the frame parser --------------------------------------------------------------------------


def test_parser_resyncs_after_stray_header() -> None:
    p = FrameParser()
    assert p.feed(bytes.fromhex("a0 a00101a2"), 0.0) == [(1, True)]
    assert p.counters.bad_checksum == 1
    assert p.counters.garbage == 0


def test_parser_frames_split_across_reads() -> None:
    p = FrameParser()
    assert p.feed(b"\xa0", 0.0) == []
    assert p.feed(b"\x01\x00", 0.01) == []
    assert p.feed(b"\xa1\xa0\x02\x01\xa3", 0.02) == [(1, False), (2, True)]
    assert p.counters.rejected == 0


def test_parser_counts_every_kind_of_bad_input() -> None:
    p = FrameParser(partial_timeout=0.05)
    bad = bytes.fromhex("a00100ff") + b"xyz" + bytes.fromhex("a00900a9 a00102a3")
    assert p.feed(bad, 0.0) == []
    assert p.counters.bad_checksum == 1
    assert p.counters.bad_channel == 1
    assert p.counters.bad_state == 1
    assert p.feed(b"\xa0\x01", 0.0) == []
    assert p.feed(b"", 0.2) == []  # silence: the partial frame is dropped
    assert p.counters.partial == 1
    assert p.feed(frame(1, True), 0.3) == [(1, True)]


# -- the simulator on a real pty ---------------------------------------------------------------


def test_simulator_cuts_power_only_on_valid_off_frame(tmp_path: Path) -> None:
    with RelaySimulator() as sim, Transport(sim.port) as transport:
        assert sim.port.startswith("/dev/pts/")
        sim.power.load(SLEEPER)
        relay = Relay(transport)
        relay.on(1)
        assert sim.power.wait_power(True, 1, 5)
        proc = sim.power.proc
        assert proc is not None
        # malformed OFF commands: bad checksum, wrong header, bad channel, bad state, partial
        for junk in ("a00100ff", "a10100a1", "a00900a9", "a00102a3", "ff00"):
            transport.write(bytes.fromhex(junk))
        transport.write(bytes.fromhex("a00100"))
        time.sleep(0.3)
        assert proc.poll() is None, "a malformed frame cut the power"
        assert sim.power.power_offs == 0
        relay.off(1)
        assert sim.power.wait_power(False, 1, 5)
        assert proc.returncode == -9  # SIGKILL: a power cut, nothing flushed
        assert sim.power.kills == 1
        relay.on(1)
        assert sim.power.wait_power(True, 2, 5)
        assert sim.power.proc is not None
        assert sim.power.proc.pid != proc.pid
        relay.off(1)
        assert sim.power.wait_power(False, 2, 5)
        assert sim.frames == relay.sent
        c = sim.counters
        assert (c.bad_checksum, c.bad_channel, c.bad_state, c.partial) == (1, 1, 1, 1)
        assert c.garbage == 3 * 3 + 4 + 2  # tails of the three rejected frames, a1.., ff00


def test_simulator_survives_a_failing_load() -> None:
    calls: list[tuple[int, bool]] = []

    def on_change(channel: int, on: bool) -> None:
        calls.append((channel, on))
        if channel == 3:
            raise RuntimeError("boom")

    with RelaySimulator(on_change=on_change) as sim, Transport(sim.port) as transport:
        relay = Relay(transport)
        relay.on(3)
        relay.on(4)
        deadline = time.monotonic() + 5
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls == [(3, True), (4, True)]
        assert sim.states == {3: True, 4: True}


# -- scenario format ---------------------------------------------------------------------------


def test_scenario_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "drill"\nkeys = [["ed25519", "a"], ["ecdsa-p256", "b"]]\n'
        'target = "HYBRID"\ncut_ms = [5, 10]\ncuts = 3\nseed = 7\n'
    )
    s = Scenario.from_toml(path)
    assert s == Scenario(
        name="drill",
        keys=(("ed25519", "a"), ("ecdsa-p256", "b")),
        target="HYBRID",
        cut_ms=(5.0, 10.0),
        cuts=3,
        seed=7,
    )


@pytest.mark.parametrize(
    "bad", [{"target": "NOPE"}, {"cut_ms": (5, 1)}, {"cuts": 0}, {"cut_ms": (-1, 1)}]
)
def test_scenario_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"target|cut_ms|cuts"):
        Scenario.from_dict(bad)


def test_lab_entry_point_bad_port(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "/dev/ttyNOSUCH99", "--cuts", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: serial port /dev/ttyNOSUCH99: cannot open")
    assert err.count("\n") == 1
