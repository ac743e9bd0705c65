"""The invariants of DESIGN §6, checked on an appliance home after a crash or a power cut.

hazardous: a test and lab tool.  Run it in a fresh process (SoftHSM2 reads its
configuration once per process)::

    python -m appliance.migration.invariants HOME SECRETS COULD_SIGN_JSON

``SECRETS`` holds ``token-pin`` and ``passphrase``; ``COULD_SIGN_JSON`` lists the labels of
the keys that could sign before the crash.  It opens the appliance (which recovers) and
checks I1 (PQC_ONLY => no classical private key in the token), I2 (every private key in
the token is sensitive and not extractable), I3 (every HYBRID..PQC_ONLY blob opens and
matches the log), I4 (the log verifies; a second recovery appends nothing), I5 (every key
that could sign still signs) and that no key is DAMAGED.  I6 holds by construction:
replay refuses any transition off the edges.  Prints one JSON line
``{"problems": [...], "states": {label: state}, "recovery": {...}}``.

The crash suite (tests/crashkit.py) and the power-cut lab (hardware/lab.py) both use it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.config import load_config
from appliance.errors import ApplianceError
from appliance.keys import KeyState
from appliance.secret import SecretBytes
from appliance.service import Appliance
from appliance.wal import verify_chain

__all__ = ["check_invariants", "main"]

_BLOB_STATES = (KeyState.HYBRID, KeyState.PQC_PREFERRED, KeyState.FINALIZING, KeyState.PQC_ONLY)


def _read(secrets: Path, name: str) -> SecretBytes:
    # read_bytes gives bytes; copied into wipeable memory at once (test and lab secrets).
    return SecretBytes((secrets / name).read_bytes().strip())


def check_invariants(home: Path, secrets: Path, could_sign: Sequence[str]) -> dict[str, Any]:
    """Recover ``home`` and check I1-I5; returns the verdict (see the module docstring)."""
    cfg = load_config(home)
    problems: list[str] = []
    states: dict[str, str] = {}
    app = Appliance.open(
        cfg, pin=_read(secrets, "token-pin"), passphrase=_read(secrets, "passphrase")
    )
    try:
        first = app.last_recovery.to_json() if app.last_recovery is not None else None
        n1 = len(app.wal)
        labels = {}
        for k in app.keys():
            states[k.label] = k.state.value
            labels[k.label] = k
            if (
                k.state is KeyState.PQC_ONLY
                and k.cka_id is not None
                and app.token.has_private_key(k.cka_id)
            ):
                problems.append(f"I1: {k.label} is PQC_ONLY but its classical key exists")
            if k.state in _BLOB_STATES:
                try:
                    app.keystore.open_mldsa(
                        k.key_id, expect_public=k.pqc_public, expect_digest=k.blob_sha3
                    )
                except ApplianceError as exc:
                    problems.append(f"I3: {k.label}: {exc}")
        problems += [
            f"I2: private key {label!r} is extractable or not sensitive"
            for label in app.token.exposed_private_keys()
        ]
        for label in could_sign:
            if label not in labels:
                problems.append(f"I5: {label} vanished")
                continue
            try:
                app.sign(labels[label], b"after the crash")
            except ApplianceError as exc:
                problems.append(f"I5: {label} cannot sign: {exc}")
        if app.damaged:
            problems.append(f"damaged: {app.damaged}")
    finally:
        app.close()
    try:
        verify_chain(home / "wal")
    except ApplianceError as exc:
        problems.append(f"I4: the WAL does not verify: {exc}")
    app = Appliance.open(
        cfg, pin=_read(secrets, "token-pin"), passphrase=_read(secrets, "passphrase")
    )
    try:
        second, n2 = app.last_recovery, len(app.wal)
    finally:
        app.close()
    if n2 != n1 or (second is not None and not second.clean):
        problems.append(f"I4: a second recovery was not a no-op ({n1} -> {n2} records)")
    return {"problems": problems, "states": states, "recovery": first}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        sys.stderr.write(
            "usage: python -m appliance.migration.invariants HOME SECRETS COULD_SIGN_JSON\n"
        )
        return 2
    verdict = check_invariants(Path(args[0]), Path(args[1]), json.loads(args[2]))
    sys.stdout.write(json.dumps(verdict) + "\n")  # the tool's answer
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
