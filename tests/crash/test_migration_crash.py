"""Every migration operation killed at its fault points; recovery must restore I1-I6.

Quick tier (default): for each scenario, the first occurrence of every distinct fault point
name.  Full tier (``PQHSM_FULL=1``): every fault point k = 1..N of every scenario.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from crashkit import Scenario, first_of_each_name, make_base, prepare, run_points

pytestmark = [pytest.mark.crash, pytest.mark.softhsm]

FULL = os.environ.get("PQHSM_FULL") == "1"

C = ("key", "create", "--type")
SCENARIOS = [
    Scenario("create-classical", "app.create_key('ecdsa-p256', 'new-c')"),
    Scenario("create-mldsa", "app.create_key('ml-dsa-87', 'new-pq')"),
    Scenario(
        "to-hybrid", "app.migrate(key('c1'), S.HYBRID)", setup=((*C, "ed25519", "--label", "c1"),)
    ),
    Scenario(
        "to-pqc-only",
        "app.migrate(key('c1'), S.PQC_ONLY)",
        setup=((*C, "ecdsa-secp256k1", "--label", "c1"),),
    ),
    Scenario(
        "finalize",
        "app.migrate(key('c1'), S.PQC_ONLY)",
        setup=((*C, "ed448", "--label", "c1"), ("migrate", "c1", "--to", "PQC_PREFERRED")),
    ),
    Scenario(
        "backward",
        "app.migrate(key('c1'), S.CLASSICAL, allow_backward=True, reason='drill')",
        setup=((*C, "ecdsa-p384", "--label", "c1"), ("migrate", "c1", "--to", "PQC_PREFERRED")),
    ),
    Scenario(
        "bulk-hybrid",
        "app.migrate_all(S.HYBRID, batch=2)",
        setup=tuple((*C, "ed25519", "--label", f"b{i}") for i in range(3)),
    ),
    Scenario(
        "bulk-finalize",
        "app.migrate_all(S.PQC_ONLY, batch=2)",
        setup=(
            *((*C, "ecdsa-p256", "--label", f"b{i}") for i in range(3)),
            ("migrate", "--all", "--to", "HYBRID"),
        ),
    ),
    Scenario(
        "passphrase",
        "app.change_passphrase(read('passphrase'), read('passphrase'))",
        setup=(
            (*C, "ml-dsa-87", "--label", "pq"),
            (*C, "ed25519", "--label", "c1"),
            ("migrate", "c1", "--to", "HYBRID"),
        ),
    ),
    Scenario(
        "adopt",
        "from appliance.algorithms import parse_alg\n"
        "app.token.generate_keypair(parse_alg('ed25519'), b'\\xad\\x01', 'ext')\n"
        "app.adopt_key(label='ext')",
    ),
    Scenario("checkpoint", "app.checkpoint()", setup=((*C, "ed25519", "--label", "c1"),)),
    Scenario(
        "audit-rotate",
        "app.rotate_audit_key(); app.checkpoint()",
        setup=((*C, "ed25519", "--label", "c1"), ("audit", "checkpoint")),
    ),
    Scenario(
        "backup-restore",
        "from appliance.service import restore_backup\n"
        "info = app.backup(home.parent)\n"
        "cfg = app.cfg\n"
        "app.close()\n"
        "restore_backup(cfg, info.path, pin=read('token-pin'), passphrase=read('passphrase'))",
        setup=((*C, "ed25519", "--label", "c1"), (*C, "ml-dsa-87", "--label", "pq")),
    ),
    # recovery itself: two keys left in FINALIZING by hand, then crash while opening
    Scenario(
        "recovery",
        "pass",
        during_open=True,
        setup=((*C, "ed25519", "--label", "f1"), (*C, "ecdsa-p256", "--label", "f2")),
        late=(("migrate", "f1", "--to", "FINALIZING"), ("migrate", "f2", "--to", "FINALIZING")),
    ),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("crash-base"))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_crash_at_fault_points(scenario: Scenario, base: Path, tmp_path: Path) -> None:
    template, points, could_sign = prepare(scenario, base / "", tmp_path)
    assert points, f"{scenario.name} reached no fault point"
    ks = range(1, len(points) + 1) if FULL else first_of_each_name(points)
    results = run_points(scenario, template, ks, could_sign, tmp_path)
    failures = {
        f"k={k} ({points[k - 1]})": r["problems"] for k, r in results.items() if r["problems"]
    }
    assert not failures, failures
    names = sorted(set(points))
    print(  # noqa: T201 - the counts the README quotes
        f"\n{scenario.name}: {len(points)} fault points ({len(names)} distinct), "
        f"crashed at {len(results)}, 0 invariant violations"
    )
