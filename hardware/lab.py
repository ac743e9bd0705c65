"""Power-cut lab: cut the appliance's power through a relay mid-operation, then check DESIGN §6.

One :class:`Scenario` format runs in two places:

* **CI** (``--simulate``): a :class:`~hardware.relay_sim.RelaySimulator` on a kernel pty
  powers the workload process; the driver's OFF frame makes the simulator SIGKILL it.
* **Lab** (``--port /dev/ttyUSB0``): a real LCUS-type relay is switched with the same frames,
  and the harness kills the local workload at the moment it writes the OFF frame (the relay
  cuts whatever is wired to it, e.g. a USB token's supply).

Per cut: copy the prepared appliance home; load the workload (open the appliance, print
``opened``, run the operation, print progress); relay ON; wait for ``opened``; wait the
chosen delay; relay OFF (the power cut); wait ``off_seconds``; load the checker; relay ON
(power up = boot = recovery); the checker (:mod:`appliance.migration.invariants`, shared
with the crash suite) opens the appliance — which recovers — and checks I1 to I5, that a
second recovery appends nothing and that no key is DAMAGED; relay OFF.  I6 holds by
construction: replay refuses any transition off the edges.

A cut that does not take effect (the process still running after OFF, or never started after
ON) is reported as a relay failure: that is how a relay that "does not answer" is detected.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from appliance.errors import DeviceError
from appliance.keys import KeyState
from hardware.relay import Relay
from hardware.relay_sim import PoweredProcess, RelaySimulator
from hardware.transport import Transport
from pkcs11_shim.launch import child_env, throwaway_init_args

__all__ = [
    "CHECK",
    "WORKLOAD",
    "CutResult",
    "LabError",
    "LabReport",
    "PowerTarget",
    "Scenario",
    "check_home",
    "child_env",
    "copy_home",
    "main",
    "make_home",
    "run_powercut",
    "run_pqhsm",
]

log = logging.getLogger(__name__)

# The workload: open, announce, run one bulk migration with progress lines.
WORKLOAD = r"""
import sys
from pathlib import Path
from appliance.config import load_config
from appliance.keys import KeyState
from appliance.secret import SecretBytes
from appliance.service import Appliance
home, secrets, target, batch = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
read = lambda n: SecretBytes((secrets / n).read_bytes().strip())
app = Appliance.open(load_config(home), pin=read("token-pin"), passphrase=read("passphrase"))
print("opened", flush=True)
app.migrate_all(KeyState[target], batch=batch,
                progress=lambda done, total: print("progress", done, total, flush=True))
app.close()
print("done", flush=True)
"""

# Create the lab's keys in one process (the appliance API, as `pqhsm key create` does).
MAKE_KEYS = r"""
import json, sys
from pathlib import Path
from appliance.config import load_config
from appliance.secret import SecretBytes
from appliance.service import Appliance
home, secrets, keys = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
read = lambda n: SecretBytes((secrets / n).read_bytes().strip())
with Appliance.open(load_config(home), pin=read("token-pin"), passphrase=read("passphrase")) as app:
    for key_type, label in keys:
        app.create_key(key_type, label)
"""

# The checker (power-up / after a crash): appliance.migration.invariants, I1-I5 + idempotence.
CHECK = "from appliance.migration.invariants import main; raise SystemExit(main())"


class LabError(DeviceError):
    """The lab setup failed: the relay had no effect, or the workload never came up."""


@dataclass(frozen=True)
class Scenario:
    """One power-cut campaign.  Loadable from a TOML table with the same field names.

    :param keys: ``(type, label)`` of each key created in CLASSICAL before the campaign.
    :param target: the state ``migrate_all`` moves every key to.
    :param cut_ms: the cut lands a uniformly random delay in ``[a, b]`` ms after the
        workload has opened the appliance (``a == b`` for a fixed delay).
    """

    name: str = "bulk-pqc-only"
    keys: tuple[tuple[str, str], ...] = tuple(("ed25519", f"k{i}") for i in range(6))
    target: str = KeyState.PQC_ONLY.name
    batch: int = 2
    cut_ms: tuple[float, float] = (0.0, 60.0)
    cuts: int = 6
    seed: int | None = None
    channel: int = 1
    off_seconds: float = 0.05

    def __post_init__(self) -> None:
        if self.target not in KeyState.__members__:
            raise ValueError(f"unknown target state {self.target!r}")
        a, b = self.cut_ms
        if not 0 <= a <= b:
            raise ValueError("cut_ms must be [a, b] with 0 <= a <= b")
        if self.cuts < 1 or self.batch < 1:
            raise ValueError("cuts and batch must be at least 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scenario:
        """Build from a TOML-style table (lists become tuples)."""
        args = dict(data)
        if "keys" in args:
            args["keys"] = tuple((str(t), str(label)) for t, label in args["keys"])
        if "cut_ms" in args:
            a, b = args["cut_ms"]
            args["cut_ms"] = (float(a), float(b))
        return cls(**args)

    @classmethod
    def from_toml(cls, path: Path) -> Scenario:
        """Load ``path`` (a TOML file whose top-level table is the scenario)."""
        with path.open("rb") as f:
            return cls.from_dict(tomllib.load(f))


@dataclass
class CutResult:
    """What one power cut did and what the checker found after power-up."""

    index: int
    delay_ms: float
    landed: bool  # the workload was still running when the power went
    progress: int  # keys reported migrated before the cut
    finished: bool  # the workload had completed before the cut
    problems: list[str] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)
    recovery: dict[str, Any] | None = None


@dataclass
class LabReport:
    """All cuts of a campaign."""

    scenario: str
    port: str
    cuts: list[CutResult] = field(default_factory=list)

    @property
    def violations(self) -> int:
        """Number of cuts after which the checker reported a problem."""
        return sum(1 for c in self.cuts if c.problems)

    @property
    def landed(self) -> int:
        """Number of cuts that found the workload running."""
        return sum(1 for c in self.cuts if c.landed)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary and the per-cut details."""
        return {
            "scenario": self.scenario,
            "port": self.port,
            "cuts": len(self.cuts),
            "landed": self.landed,
            "violations": self.violations,
            "results": [asdict(c) for c in self.cuts],
        }


# -- appliance homes ---------------------------------------------------------------------------


def run_pqhsm(home: Path, *args: str) -> None:
    """Run ``pqhsm --home HOME ARGS`` in a child; a failure is a :class:`LabError`."""
    proc = subprocess.run(  # noqa: S603 - our own interpreter and CLI, no shell
        [sys.executable, "-m", "appliance", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=child_env(),
    )
    if proc.returncode != 0:
        raise LabError(f"pqhsm {args[0]} failed: {proc.stderr.strip()[-300:]}")


def make_home(root: Path, keys: Sequence[tuple[str, str]]) -> tuple[Path, Path]:
    """Create an appliance with an embedded SoftHSM2 token and ``keys``, cheap KDF.

    Lab use only: the KDF is weakened (1000 PBKDF2 iterations) to keep campaigns fast.
    Returns ``(home, secrets)``.
    """
    home, secrets = root / "pqhsm", root / "secrets"
    run_pqhsm(home, *throwaway_init_args(secrets))
    if keys:
        # One child for all keys (not one `pqhsm key create` each): a campaign template or a
        # matrix target makes up to a dozen, and every process start costs a token login.
        proc = subprocess.run(  # noqa: S603 - our own interpreter, no shell
            [sys.executable, "-c", MAKE_KEYS, str(home), str(secrets), json.dumps(list(keys))],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=child_env(),
        )
        if proc.returncode != 0:
            raise LabError(f"creating the lab keys failed: {proc.stderr.strip()[-300:]}")
    return home, secrets


def copy_home(template: Path, dst: Path) -> tuple[Path, Path]:
    """Copy a home made by :func:`make_home` (its root) to ``dst``; fix the token path."""
    shutil.copytree(template, dst)
    home = dst / "pqhsm"
    conf = home / "softhsm" / "softhsm2.conf"
    conf.write_text(conf.read_text().replace(str(template / "pqhsm"), str(home)))
    return home, dst / "secrets"


def check_home(home: Path, secrets: Path, could_sign: Sequence[str]) -> dict[str, Any]:
    """Open ``home`` in a fresh process (recovery), check I1, I3, I4, I5; return the verdict."""
    proc = subprocess.run(  # noqa: S603 - our own interpreter, no shell
        [sys.executable, "-c", CHECK, str(home), str(secrets), json.dumps(list(could_sign))],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=child_env(),
    )
    return _verdict(proc.returncode, proc.stdout, proc.stderr)


def _verdict(rc: int | None, out: str, err: str) -> dict[str, Any]:
    if rc != 0 or not out.strip():
        return {"problems": [f"checker failed (rc={rc}): {err.strip()[-800:]}"]}
    verdict: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return verdict


# -- power -------------------------------------------------------------------------------------


class PowerTarget:
    """The workload's power supply as the lab sees it.

    ``simulated=True``: the relay frames drive ``supply`` (the simulator does it); the lab
    only waits for the effect.  ``simulated=False``: a real relay switches an external
    supply, and the lab starts and SIGKILLs the local workload itself right after each frame.
    """

    def __init__(self, supply: PoweredProcess, *, simulated: bool, timeout: float = 5.0) -> None:
        self.supply = supply
        self.simulated = simulated
        self.timeout = timeout

    def switch(self, relay: Relay, channel: int, on: bool) -> None:
        """Write the frame, then make sure the supply followed.

        :raises LabError: the supply did not follow within ``timeout``.
        """
        count = (self.supply.power_ons if on else self.supply.power_offs) + 1
        relay.set(channel, on)
        if not self.simulated:
            if on:
                self.supply.power_on()
            else:
                self.supply.power_off()
        if not self.supply.wait_power(on, count, self.timeout):
            raise LabError(
                f"relay on {relay.transport.port} channel {channel}: "
                f"no power {'on' if on else 'off'} within {self.timeout:g} s"
            )


def _wait_for_line(path: Path, word: str, supply: PoweredProcess, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and word in path.read_text().split():
            return True
        proc = supply.proc
        if proc is not None and proc.poll() is not None:
            return path.exists() and word in path.read_text().split()
        time.sleep(0.002)
    return False


def _progress(out: str) -> tuple[int, bool]:
    done = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "progress":
            done = int(parts[1])
    return done, "done" in out.split()


def run_powercut(
    scenario: Scenario,
    relay: Relay,
    power: PowerTarget,
    work: Path,
    *,
    template: Path | None = None,
    keep: bool = False,
) -> LabReport:
    """Run every cut of ``scenario``; return the report.  ``work`` receives one dir per cut.

    :param template: a root made by :func:`make_home` with the scenario's keys; made under
        ``work`` when not given.
    :param keep: keep every cut's directory (by default only those with problems stay).
    :raises LabError: the relay or the workload did not behave (not an invariant violation:
        those are in the report).
    """
    rng = random.Random(scenario.seed)  # noqa: S311 - test timing, not cryptography
    if template is None:
        template = work / "template"
        make_home(template, scenario.keys)
    could_sign = [label for _, label in scenario.keys]
    report = LabReport(scenario=scenario.name, port=relay.transport.port)
    env = child_env()
    ch = scenario.channel
    for i in range(scenario.cuts):
        cut_dir = work / f"cut-{i}"
        home, secrets = copy_home(template, cut_dir)
        out, err = cut_dir / "workload.out", cut_dir / "workload.err"
        power.supply.load(
            [
                sys.executable,
                "-c",
                WORKLOAD,
                str(home),
                str(secrets),
                scenario.target,
                str(scenario.batch),
            ],
            env=env,
            stdout_path=out,
            stderr_path=err,
        )
        power.switch(relay, ch, True)
        if not _wait_for_line(out, "opened", power.supply, 60.0):
            power.switch(relay, ch, False)
            raise LabError(f"cut {i}: workload never opened: {err.read_text()[-500:]}")
        delay_ms = rng.uniform(*scenario.cut_ms)
        time.sleep(delay_ms / 1000)
        kills = power.supply.kills
        power.switch(relay, ch, False)  # the power cut
        landed = power.supply.kills > kills
        progress, finished = _progress(out.read_text())
        time.sleep(scenario.off_seconds)
        check_out, check_err = cut_dir / "check.out", cut_dir / "check.err"
        power.supply.load(
            [sys.executable, "-c", CHECK, str(home), str(secrets), json.dumps(could_sign)],
            env=env,
            stdout_path=check_out,
            stderr_path=check_err,
        )
        power.switch(relay, ch, True)  # power up: boot, recovery, checks
        proc = power.supply.proc
        try:
            rc = proc.wait(timeout=180) if proc is not None else None
        except subprocess.TimeoutExpired:
            rc = None  # the OFF below kills it; the verdict reports the hang
        power.switch(relay, ch, False)
        verdict = _verdict(rc, check_out.read_text(), check_err.read_text())
        result = CutResult(
            index=i,
            delay_ms=round(delay_ms, 3),
            landed=landed,
            progress=progress,
            finished=finished,
            problems=list(verdict.get("problems", [])),
            states=dict(verdict.get("states", {})),
            recovery=verdict.get("recovery"),
        )
        log.info(
            "cut %d at %.1f ms: landed=%s progress=%d problems=%d",
            i,
            delay_ms,
            landed,
            progress,
            len(result.problems),
        )
        report.cuts.append(result)
        if not result.problems and not keep:
            shutil.rmtree(cut_dir, ignore_errors=True)
    return report


# -- entry point -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hardware.lab (--simulate | --port PATH) [--scenario FILE.toml]``."""
    parser = argparse.ArgumentParser(prog="python -m hardware.lab", description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--simulate", action="store_true", help="relay simulator on a pty")
    where.add_argument("--port", help="serial port or pyserial URL of a real LCUS relay")
    parser.add_argument("--scenario", type=Path, help="TOML file (fields of Scenario)")
    parser.add_argument("--cuts", type=int, help="override the scenario's number of cuts")
    parser.add_argument("--seed", type=int, help="override the scenario's random seed")
    parser.add_argument("--work", type=Path, help="keep cut directories here")
    parser.add_argument("--baud", type=int, default=9600)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    scenario = Scenario.from_toml(args.scenario) if args.scenario else Scenario()
    overrides = {k: v for k, v in (("cuts", args.cuts), ("seed", args.seed)) if v is not None}
    if overrides:
        scenario = replace(scenario, **overrides)
    work = args.work or Path(tempfile.mkdtemp(prefix="pqhsm-lab-"))
    work.mkdir(parents=True, exist_ok=True)
    sim = RelaySimulator() if args.simulate else None
    try:
        port = sim.port if sim is not None else args.port
        with Transport(port, baud=args.baud) as transport:
            supply = sim.power if sim is not None else PoweredProcess()
            power = PowerTarget(supply, simulated=sim is not None)
            report = run_powercut(scenario, Relay(transport), power, work)
    except DeviceError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    finally:
        if sim is not None:
            sim.close()
    sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.violations == 0 else 2


if __name__ == "__main__":
    raise SystemExit(main())
