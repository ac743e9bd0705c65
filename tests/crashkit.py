"""Crash-injection harness: kill a child at the k-th fault point, recover, check I1-I6.

A *scenario* is an operation run by a child process against a copy of a prepared
appliance home (embedded SoftHSM2 token included).  The child installs a hook on
:func:`appliance.fsio.fault_point` that ``os._exit(137)``s at the k-th point reached
(every write, fsync, rename, directory fsync, ``C_DestroyObject``, WAL append and fsync).
A fresh process then opens the appliance — which recovers — and checks the invariants of
DESIGN §6; it opens it a second time to show recovery appended nothing more.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import run_cli
from pkcs11_shim.launch import throwaway_init_args

# The child: open the appliance, arm the hook, run one operation (Python source in OP).
CHILD = r"""
import json, os, sys
from pathlib import Path
from appliance import fsio
from appliance.config import load_config
from appliance.keys import KeyState as S
from appliance.secret import SecretBytes
from appliance.service import Appliance
home, secrets, k = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
op = sys.argv[4]
read = lambda n: SecretBytes((secrets / n).read_bytes().strip())
points = []
def hook(name):
    points.append(name)
    if len(points) == k:
        os._exit(137)
arm_before_open = os.environ.get("CRASH_DURING_OPEN") == "1"
if arm_before_open:
    fsio._fault_hook = hook
app = Appliance.open(load_config(home), pin=read("token-pin"), passphrase=read("passphrase"))
fsio._fault_hook = hook
def key(label):
    return app.find(label)
exec(op)
fsio._fault_hook = None
app.close()
print(json.dumps(points))
"""

# The checker (power-up / after a crash): appliance.migration.invariants, I1-I5 + idempotence.
CHECK = "from appliance.migration.invariants import main; raise SystemExit(main())"


@dataclass(frozen=True)
class Scenario:
    """One operation to crash.  ``setup`` is CLI argv lists run once on the template."""

    name: str
    op: str
    setup: tuple[tuple[str, ...], ...] = ()
    late: tuple[tuple[str, ...], ...] = ()  # after the "who can sign" snapshot
    during_open: bool = False


def py(
    script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    full.pop("SOFTHSM2_CONF", None)
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=full,
    )


def make_base(root: Path) -> Path:
    """An appliance with an embedded token and generated secrets, cheap KDF."""
    proc = run_cli(
        *throwaway_init_args(root / "secrets"),
        home=root / "pqhsm",
    )
    assert proc.returncode == 0, proc.stderr
    return root


def copy_home(template: Path, dst: Path) -> tuple[Path, Path]:
    shutil.copytree(template, dst)
    home = dst / "pqhsm"
    conf = home / "softhsm" / "softhsm2.conf"
    conf.write_text(conf.read_text().replace(str(template / "pqhsm"), str(home)))
    return home, dst / "secrets"


def signable_labels(home: Path, secrets: Path) -> list[str]:
    script = CHILD.replace(
        "exec(op)",
        "print(json.dumps([k.label for k in app.keys() if not app.damaged])); raise SystemExit(0)",
    )
    proc = py(script, str(home), str(secrets), "0", "")
    assert proc.returncode == 0, proc.stderr
    labels: list[str] = json.loads(proc.stdout.splitlines()[0])
    return labels


def prepare(scenario: Scenario, base: Path, work: Path) -> tuple[Path, list[str], list[str]]:
    """Build the scenario's template; return it, its fault points, and who can sign."""
    template = work / f"{scenario.name}-template"
    home, secrets = copy_home(base, template)
    for argv in scenario.setup:
        proc = run_cli(*argv, home=home)
        assert proc.returncode == 0, f"{scenario.name} setup {argv}: {proc.stderr.decode()}"
    could_sign = signable_labels(home, secrets)
    for argv in scenario.late:
        proc = run_cli(*argv, home=home)
        assert proc.returncode == 0, f"{scenario.name} late setup {argv}: {proc.stderr.decode()}"
    probe, probe_secrets = copy_home(template, work / f"{scenario.name}-count")
    env = {"CRASH_DURING_OPEN": "1"} if scenario.during_open else None
    count = py(CHILD, str(probe), str(probe_secrets), "0", scenario.op, env=env)
    assert count.returncode == 0, f"{scenario.name}: {count.stderr}"
    points: list[str] = json.loads(count.stdout.splitlines()[-1])
    return template, points, could_sign


def crash_and_check(
    scenario: Scenario, template: Path, k: int, could_sign: list[str], work: Path
) -> dict[str, Any]:
    home, secrets = copy_home(template, work / f"{scenario.name}-k{k}")
    env = {"CRASH_DURING_OPEN": "1"} if scenario.during_open else None
    crashed = py(CHILD, str(home), str(secrets), str(k), scenario.op, env=env)
    if crashed.returncode != 137:
        return {
            "problems": [
                f"child did not crash at point {k}: rc={crashed.returncode} {crashed.stderr[-500:]}"
            ]
        }
    check = py(CHECK, str(home), str(secrets), json.dumps(could_sign))
    if check.returncode != 0:
        return {"problems": [f"checker failed: {check.stderr[-800:]}"]}
    verdict: dict[str, Any] = json.loads(check.stdout.splitlines()[-1])
    shutil.rmtree(work / f"{scenario.name}-k{k}", ignore_errors=True)
    return verdict


def run_points(
    scenario: Scenario,
    template: Path,
    ks: Iterable[int],
    could_sign: list[str],
    work: Path,
    workers: int = 2,
) -> dict[int, dict[str, Any]]:
    ks = list(ks)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            pool.map(lambda k: crash_and_check(scenario, template, k, could_sign, work), ks)
        )
    return dict(zip(ks, results, strict=True))


def first_of_each_name(points: list[str]) -> list[int]:
    """The quick tier: the first k at which each distinct fault point name is reached."""
    seen: dict[str, int] = {}
    for i, name in enumerate(points, start=1):
        seen.setdefault(name, i)
    return sorted(seen.values())
