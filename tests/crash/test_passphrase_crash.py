"""Passphrase change killed at every fault point (DESIGN §4, issue 3 item 4).

A child process changes the passphrase and ``os._exit(137)``s at the k-th fault point
(every write, fsync, rename, directory fsync and WAL step).  A fresh process then opens
the appliance (which recovers) with the old and with the new passphrase: exactly one must
unlock, every key must sign under it, and recovery must append nothing the second time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from crashkit import copy_home, make_base

from conftest import run_cli

pytestmark = [pytest.mark.crash, pytest.mark.softhsm]

CHILD = r"""
import json, os, sys
from pathlib import Path
from appliance import fsio
from appliance.config import load_config
from appliance.secret import SecretBytes
from appliance.service import Appliance
home, secrets, k = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
read = lambda n: SecretBytes((secrets / n).read_bytes().strip())
app = Appliance.open(load_config(home), pin=read("token-pin"), passphrase=None)
points = []
def hook(name):
    points.append(name)
    if len(points) == k:
        os._exit(137)
fsio._fault_hook = hook
app.change_passphrase(read("passphrase"), read("new-passphrase"))
print(json.dumps(points))
"""

CHECK = r"""
import json, sys
from pathlib import Path
from appliance.config import load_config
from appliance.errors import ApplianceError
from appliance.secret import SecretBytes
from appliance.service import Appliance
home, secrets = Path(sys.argv[1]), Path(sys.argv[2])
read = lambda n: SecretBytes((secrets / n).read_bytes().strip())
out = {}
for name in ("passphrase", "new-passphrase"):
    try:
        app = Appliance.open(load_config(home), pin=read("token-pin"), passphrase=read(name))
    except ApplianceError as exc:
        out[name] = {"error": str(exc)}
        continue
    with app:
        signed = [k.label for k in app.keys() if app.sign(k, b"after the crash")]
        out[name] = {"signed": signed, "records": len(app.wal),
                     "gen": app.keystore.header().kdf.gen}
leftovers = sorted(p.name for p in home.rglob("*") if p.name.endswith((".new", ".next.cbor", ".tmp")))
out["leftovers"] = leftovers
print(json.dumps(out))
"""


def _py(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_base(tmp_path_factory.mktemp("pp-template"))
    home = root / "pqhsm"
    for label, kind in (("pq-a", "ml-dsa-87"), ("pq-b", "ml-dsa-87"), ("ed", "ed25519")):
        proc = run_cli("key", "create", "--type", kind, "--label", label, home=home)
        assert proc.returncode == 0, proc.stderr
    new = root / "secrets" / "new-passphrase"
    new.write_text("the new passphrase\n")
    new.chmod(0o600)
    return root


def test_passphrase_change_survives_a_crash_at_every_fault_point(
    template: Path, tmp_path: Path
) -> None:
    home, secrets = copy_home(template, tmp_path / "count")
    full = _py(CHILD, str(home), str(secrets), "0")
    assert full.returncode == 0, full.stderr
    points: list[str] = json.loads(full.stdout)
    assert any(p.startswith("wal.") for p in points)
    assert any(p.startswith("passphrase.blob") for p in points)
    assert any(p.startswith("passphrase.commit") for p in points)
    outcomes = {"passphrase": 0, "new-passphrase": 0}
    for k in range(1, len(points) + 1):
        home, secrets = copy_home(template, tmp_path / f"k{k}")
        crashed = _py(CHILD, str(home), str(secrets), str(k))
        assert crashed.returncode == 137, f"k={k} ({points[k - 1]}): {crashed.stderr}"
        check = _py(CHECK, str(home), str(secrets))
        assert check.returncode == 0, f"k={k} ({points[k - 1]}): {check.stderr}"
        res = json.loads(check.stdout)
        opened = [n for n in ("passphrase", "new-passphrase") if "signed" in res[n]]
        assert len(opened) == 1, f"k={k} ({points[k - 1]}): {res}"
        winner = res[opened[0]]
        assert sorted(winner["signed"]) == ["ed", "pq-a", "pq-b"], f"k={k}: {res}"
        assert res["leftovers"] == [], f"k={k}: {res}"
        # recovery ran in the first open; the second open appended nothing
        loser = "passphrase" if opened[0] == "new-passphrase" else "new-passphrase"
        assert "wrong passphrase" in res[loser]["error"], f"k={k}: {res}"
        assert winner["gen"] == (1 if opened[0] == "new-passphrase" else 0)
        outcomes[opened[0]] += 1
    # both sides of the commit point were exercised
    assert outcomes["passphrase"] > 0
    assert outcomes["new-passphrase"] > 0
    print(f"\npassphrase change: {len(points)} fault points, outcomes {outcomes}")  # noqa: T201
