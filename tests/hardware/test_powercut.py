"""Power cuts through the relay driver and the pty simulator during a bulk migration.

CI quick tier of issue 9 item 2: the same :func:`hardware.lab.run_powercut` a lab runs with
a real LCUS relay, here against :class:`hardware.relay_sim.RelaySimulator` on a kernel pty,
whose OFF frame SIGKILLs the appliance process.  After every cut the lab's checker (I1, I3,
I4, I5) must find nothing, and so must the crash suite's own checker (which adds I2).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from crashkit import CHECK, py
from labline import RelayPort

from hardware.lab import LabError, PowerTarget, Scenario, check_home, make_home, run_powercut
from hardware.relay import Relay
from hardware.relay_sim import PoweredProcess, RelaySimulator
from hardware.transport import Transport

pytestmark = [pytest.mark.softhsm, pytest.mark.crash]

SCENARIO = Scenario(
    name="ci-bulk-pqc-only",
    keys=tuple((t, f"k{i}") for i, t in enumerate(["ed25519", "ecdsa-p256"] * 3)),
    target="PQC_ONLY",
    batch=2,
    cut_ms=(0.0, 45.0),
    cuts=6,
    seed=20261124,
    off_seconds=0.02,
)


def _needs_softhsm() -> None:
    if shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 not installed (Debian package softhsm2)")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _needs_softhsm()
    root = tmp_path_factory.mktemp("powercut-template")
    make_home(root, SCENARIO.keys)
    return root


@pytest.fixture
def bench() -> Iterator[tuple[RelaySimulator, Relay]]:
    with RelaySimulator() as sim, Transport(sim.port, timeout=0.5) as transport:
        yield sim, Relay(transport)


def test_template_is_clean(template: Path) -> None:
    labels = [label for _, label in SCENARIO.keys]
    verdict = check_home(template / "pqhsm", template / "secrets", labels)
    assert verdict["problems"] == []
    assert set(verdict["states"].values()) == {"CLASSICAL"}


def test_random_power_cuts_during_bulk_migration(
    template: Path, bench: tuple[RelaySimulator, Relay], tmp_path: Path
) -> None:
    sim, relay = bench
    # line noise before the campaign: never a power change, always counted
    relay.transport.write(bytes.fromhex("a00100ff") + b"\x00\x55" + bytes.fromhex("a00102a3"))
    power = PowerTarget(sim.power, simulated=True)
    report = run_powercut(SCENARIO, relay, power, tmp_path, template=template, keep=True)

    summary = report.to_json()
    failures = {c.index: c.problems for c in report.cuts if c.problems}
    assert not failures, failures
    assert summary["cuts"] == SCENARIO.cuts
    assert summary["violations"] == 0
    # every cut found the workload running: the SIGKILL was a real power cut
    assert report.landed == SCENARIO.cuts
    assert sim.power.kills == SCENARIO.cuts
    # the cuts spread over the migration: not all before it, not all after it
    progress = [c.progress for c in report.cuts]
    moved = [sum(s != "CLASSICAL" for s in c.states.values()) for c in report.cuts]
    assert len(set(moved)) > 1, (progress, moved)
    # four frames per cut (on, off, on for the checker, off), byte for byte as sent
    assert len(relay.sent) == 4 * SCENARIO.cuts
    assert sim.frames == relay.sent
    assert sim.power.power_ons == sim.power.power_offs == 2 * SCENARIO.cuts
    assert sim.counters.bad_checksum == 1
    assert sim.counters.bad_state == 1
    assert sim.counters.garbage == 3 + 2 + 3

    # the crash suite's checker (I1-I6 incl. I2 and idempotence) agrees on every cut home
    could_sign = json.dumps([label for _, label in SCENARIO.keys])

    def crash_check(i: int) -> dict[str, Any]:
        cut = tmp_path / f"cut-{i}"
        proc = py(CHECK, str(cut / "pqhsm"), str(cut / "secrets"), could_sign)
        assert proc.returncode == 0, proc.stderr[-800:]
        verdict: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
        return verdict

    with ThreadPoolExecutor(max_workers=3) as pool:
        verdicts = list(pool.map(crash_check, range(SCENARIO.cuts)))
    assert [v["problems"] for v in verdicts] == [[]] * SCENARIO.cuts
    # recovery after power-up already did the work: the second look appended nothing
    assert all(v["recovery"]["appended"] == 0 for v in verdicts)
    assert [v["states"] for v in verdicts] == [c.states for c in report.cuts]


def test_relay_that_does_not_switch_is_detected(template: Path, tmp_path: Path) -> None:
    """A board that takes the bytes but never moves its contact fails the run, loudly."""
    with RelaySimulator(loads={}) as sim, Transport(sim.port) as transport:  # nothing wired
        power = PowerTarget(sim.power, simulated=True, timeout=0.5)
        with pytest.raises(LabError, match=r"channel 1: no power on within 0.5 s"):
            run_powercut(SCENARIO, Relay(transport), power, tmp_path, template=template)
        assert sim.frames == [bytes.fromhex("a00101a2")]


FULL = os.environ.get("PQHSM_FULL") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="full tier: set PQHSM_FULL=1")
@pytest.mark.parametrize("target", ["HYBRID", "PQC_ONLY"])
def test_full_tier_many_cuts(
    target: str, template: Path, bench: tuple[RelaySimulator, Relay], tmp_path: Path
) -> None:
    sim, relay = bench
    scenario = replace(SCENARIO, name=f"full-{target}", target=target, cuts=30, seed=None)
    report = run_powercut(
        scenario, relay, PowerTarget(sim.power, simulated=True), tmp_path, template=template
    )
    assert {c.index: c.problems for c in report.cuts if c.problems} == {}
    assert sim.frames == relay.sent


def test_power_cuts_through_the_lab_relay(
    relay_port: RelayPort | None, template: Path, tmp_path: Path
) -> None:
    """``--relay-port PATH``: the same campaign through a real LCUS relay board.

    The relay switches whatever the lab wired to it (a USB token's supply, the appliance
    host's own supply through a UPS-less socket); the harness SIGKILLs the local workload at
    the moment the OFF frame is on the wire, so every cut also lands on the appliance.
    """
    if relay_port is None:
        pytest.skip("lab only: pass --relay-port PATH (the simulator tests above run in CI)")
    scenario = replace(SCENARIO, name="lab-relay", channel=relay_port.channel, cuts=3)
    with Transport(relay_port.port, timeout=0.5) as transport:
        relay = Relay(transport)
        power = PowerTarget(PoweredProcess(), simulated=False)
        report = run_powercut(scenario, relay, power, tmp_path, template=template)
    assert {c.index: c.problems for c in report.cuts if c.problems} == {}
    assert report.landed == scenario.cuts
    assert len(relay.sent) == 4 * scenario.cuts
