"""Recovery at every start and on ``pqhsm recover`` (DESIGN §6).

hazardous: called by :class:`appliance.service.Appliance`.

In this order:

(1) finish every FINALIZING key: erase its classical private key if the token still has
    one, confirm absence from a fresh session, append PQC_ONLY;
(2) a PQC_ONLY key whose classical private key is visible again (restored token, manual
    import) violates I1: erase it again, the WAL already says it is gone;
(3) check every key against what the WAL says it has: the classical private key in the
    token while its state still uses it, the blob whose SHA3-256 the WAL recorded while its
    state uses one.  A key that fails is marked DAMAGED (in memory; derived again at every
    start) and reported; nothing is erased for it;
(4) remove blob files the WAL does not name (written before a crash took their record).

Idempotent: a second run finds nothing to finish and appends nothing (tested).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.fsio import fault_point
from appliance.keys import KeyKind, KeyState
from appliance.secret import ct_equal

if TYPE_CHECKING:
    from appliance.service import Appliance

__all__ = ["RecoveryReport", "recover"]

log = logging.getLogger(__name__)

_USES_TOKEN = (KeyState.CLASSICAL, KeyState.HYBRID, KeyState.PQC_PREFERRED)
_USES_BLOB = (KeyState.HYBRID, KeyState.PQC_PREFERRED, KeyState.FINALIZING, KeyState.PQC_ONLY)


@dataclass
class RecoveryReport:
    finished: list[str] = field(default_factory=list)
    erased_again: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)
    removed_orphans: list[str] = field(default_factory=list)
    appended: int = 0

    @property
    def clean(self) -> bool:
        return not (self.finished or self.erased_again or self.damaged or self.removed_orphans)

    def to_json(self) -> dict[str, Any]:
        return {
            "finished": self.finished,
            "erased_again": self.erased_again,
            "damaged": self.damaged,
            "removed_orphans": self.removed_orphans,
            "appended": self.appended,
        }


def recover(app: Appliance) -> RecoveryReport:
    report = RecoveryReport()
    before = len(app.wal)
    token = app.token
    # (1) finish FINALIZING keys: erase them all (confirmed by one fresh listing), then
    #     append their records
    finishing = [k for k in app.keys() if k.state is KeyState.FINALIZING and k.cka_id is not None]
    if finishing:
        erased = token.destroy_private_keys([k.cka_id for k in finishing if k.cka_id is not None])
        fault_point("recovery.erased")
        for key in finishing:
            app.append_record(
                "key.transition",
                {
                    "key_id": key.key_id,
                    "from": KeyState.FINALIZING.value,
                    "to": KeyState.PQC_ONLY.value,
                    "alg": key.classical_alg,
                    "actor": "recovery",
                    "erased_objects": erased.get(key.cka_id or b"", 0),
                    "reason": "finished by recovery after an interrupted finalization",
                },
            )
            report.finished.append(key.key_id)
        app.wal.commit()
        log.warning("recovery finished %d interrupted finalization(s)", len(report.finished))
    present = token.private_key_ids()  # one listing serves every check below
    # (2) I1 must hold for every PQC_ONLY key
    back = [k for k in app.keys() if k.state is KeyState.PQC_ONLY and k.cka_id in present]
    if back:
        token.destroy_private_keys([k.cka_id for k in back if k.cka_id is not None])
        for key in back:
            report.erased_again.append(key.key_id)
            log.warning(
                "key %s is PQC_ONLY but its classical private key was back; erased it", key.key_id
            )
    # (3) what the WAL promises must be there
    named: set[str] = set()
    for key in app.keys():
        why = None
        in_token = key.kind is KeyKind.COMPOSITE or (
            key.kind is KeyKind.CLASSICAL and key.state in _USES_TOKEN
        )
        if in_token and key.cka_id not in present:
            why = "the token no longer holds its classical private key"
        if key.blob_sha3 is not None and (key.state in _USES_BLOB or key.kind is KeyKind.MLDSA):
            named.add(key.key_id)
            why = _blob_problem(app, key.key_id, key.blob_sha3) or why
        if why is not None:
            report.damaged[key.key_id] = why
            log.error("key %s (%s) is DAMAGED: %s", key.key_id, key.label, why)
    # the audit key's halves are promised by the log as well
    from appliance.audit import audit_keys

    keys_of_audit = audit_keys(app.wal.records())
    for ak in keys_of_audit:
        blob_id = f"audit-{ak.n}"
        named.add(blob_id)
        problem = _blob_problem(app, blob_id, ak.blob_sha3)
        # only the current audit key must still have its Ed25519 half in the token
        if problem is None and ak is keys_of_audit[-1] and ak.cka_id not in present:
            problem = "the token no longer holds the audit key's Ed25519 half"
        if problem is not None:
            report.damaged[blob_id] = problem
    # (4) blobs nobody names
    for blob_id in app.keystore.blob_ids():
        if blob_id not in named:
            app.keystore.remove_blob(blob_id)
            report.removed_orphans.append(blob_id)
            log.warning("removed blob %s, which no log record names", blob_id)
    report.appended = len(app.wal) - before
    return report


def _blob_problem(app: Appliance, blob_id: str, digest: bytes) -> str | None:
    path = app.keystore.blob_path(blob_id)
    if not path.exists():
        return "its blob is missing"
    if not ct_equal(hashlib.sha3_256(path.read_bytes()).digest(), digest):
        return "its blob does not match the digest in the log"
    return None
