"""The key migration state machine (DESIGN §6).

hazardous: use :class:`appliance.service.Appliance` (``app.migrate``).

Each edge is one method named after it, its steps numbered in the order DESIGN §6 fixes.
The one that matters most, FINALIZING -> PQC_ONLY, erases the classical private key in the
token and confirms its absence from a fresh session *before* the record that says so is
appended and fsync'd: no crash, replay or restore can bring the key back (invariant I1).

Every transition names the state it expects to leave (optimistic check) and runs under a
per-key lock; the WAL append itself is serialized by the appliance.  Backward edges need
``allow_backward=True`` and a reason.  Bulk migration groups many records under one fsync
and never reorders an erasure after its record.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from appliance.errors import CallerError, KeyExists, PolicyDenied, StateError
from appliance.fsio import fault_point
from appliance.keys import KeyInfo, KeyKind, KeyState, edge_allowed, is_backward
from appliance.keystore import MLDSA_ALG

if TYPE_CHECKING:
    from appliance.service import Appliance

__all__ = ["BulkResult", "MigrationEngine", "plan_path"]

log = logging.getLogger(__name__)

ORDER: Final = (
    KeyState.CLASSICAL,
    KeyState.HYBRID,
    KeyState.PQC_PREFERRED,
    KeyState.FINALIZING,
    KeyState.PQC_ONLY,
)
MAX_REASON: Final = 1024
Progress = Callable[[int, int], None]


def plan_path(frm: KeyState, to: KeyState) -> list[tuple[KeyState, KeyState]]:
    """The edges from ``frm`` to ``to``.  PQC_PREFERRED is visited only when it is the target."""
    if frm is to:
        return []
    i, j = ORDER.index(frm), ORDER.index(to)
    steps: list[tuple[KeyState, KeyState]] = []
    if j > i:  # forward
        cur = frm
        while cur is not to:
            if cur is KeyState.CLASSICAL:
                nxt = KeyState.HYBRID
            elif cur is KeyState.HYBRID:
                nxt = (
                    KeyState.PQC_PREFERRED if to is KeyState.PQC_PREFERRED else KeyState.FINALIZING
                )
            elif cur is KeyState.PQC_PREFERRED:
                nxt = KeyState.FINALIZING
            else:
                nxt = KeyState.PQC_ONLY
            steps.append((cur, nxt))
            cur = nxt
        return steps
    # backward: only PQC_PREFERRED -> HYBRID -> CLASSICAL exist
    cur = frm
    while cur is not to:
        if cur is KeyState.PQC_PREFERRED:
            nxt = KeyState.HYBRID
        elif cur is KeyState.HYBRID:
            nxt = KeyState.CLASSICAL
        else:
            raise PolicyDenied(f"nothing leads back from {cur.value} to {to.value}")
        steps.append((cur, nxt))
        cur = nxt
    return steps


@dataclass
class BulkResult:
    """What ``migrate --all`` did."""

    target: KeyState
    migrated: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    fsyncs: int = 0


class MigrationEngine:
    """Moves keys along the edges of DESIGN §6 for one appliance."""

    def __init__(self, app: Appliance) -> None:
        self._app = app
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _key_lock(self, key_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key_id, threading.Lock())

    # -- single key ------------------------------------------------------------------------

    def migrate(
        self,
        key: KeyInfo,
        to: KeyState,
        *,
        allow_backward: bool = False,
        reason: str | None = None,
        actor: str = "operator",
    ) -> KeyInfo:
        """Move ``key`` to state ``to`` along the allowed edges, one durable record per edge."""
        if key.kind is not KeyKind.CLASSICAL:
            raise StateError(f"key {key.label!r} was born {key.kind.value}; it does not migrate")
        reason = _check_reason(reason)
        with self._key_lock(key.key_id):
            current = self._app.key(key.key_id)
            steps = plan_path(current.state, to)
            if not steps:
                raise StateError(f"key {key.label!r} is already {to.value}")
            for frm, nxt in steps:
                if is_backward(frm, nxt) and (not allow_backward or not reason):
                    raise PolicyDenied(
                        f"{frm.value} -> {nxt.value} goes backward: it needs "
                        "--allow-backward and a --reason"
                    )
            for frm, nxt in steps:
                self._edge(self._app.key(key.key_id), frm, nxt, reason=reason, actor=actor)
                self._app.wal.commit()
            return self._app.key(key.key_id)

    def _edge(
        self,
        key: KeyInfo,
        frm: KeyState,
        to: KeyState,
        *,
        reason: str | None,
        actor: str,
        blob: object = None,
    ) -> None:
        """Run one edge's side effects and append its record (the caller commits)."""
        live = self._app.key(key.key_id)
        if live.state is not frm:  # optimistic check: the key moved since the caller looked
            raise StateError(f"key {key.label!r} is {live.state.value}, expected {frm.value}")
        key = live
        if not edge_allowed(frm, to):
            raise PolicyDenied(f"{frm.value} -> {to.value} is not an allowed transition")
        name = f"_{frm.value.lower()}_to_{to.value.lower()}"
        step: Callable[..., None] = getattr(self, name)
        step(key, reason=reason, actor=actor, blob=blob)

    def _append(
        self,
        key: KeyInfo,
        frm: KeyState,
        to: KeyState,
        *,
        reason: str | None,
        actor: str,
        **extra: Any,
    ) -> None:
        fields: dict[str, Any] = {
            "key_id": key.key_id,
            "from": frm.value,
            "to": to.value,
            "alg": key.classical_alg,
            "actor": actor,
            **extra,
        }
        if reason:
            fields["reason"] = reason
        self._app.append_record("key.transition", fields)

    def _classical_to_hybrid(
        self, key: KeyInfo, *, reason: str | None, actor: str, blob: object = None
    ) -> None:
        ks = self._app.keystore
        # (1) generate ML-DSA-87 and seal its blob; (2) write the blob atomically
        #     (bulk callers pass a blob they already wrote)
        if isinstance(blob, tuple):
            public, digest = blob
        else:
            if ks.blob_path(key.key_id).exists():  # an orphan the WAL never named
                ks.remove_blob(key.key_id)
            public, digest = ks.new_mldsa(key.key_id)
        # (3) append the record naming the PQC public key and the blob digest; (4) the
        #     caller's commit fsyncs it
        self._append(
            key,
            KeyState.CLASSICAL,
            KeyState.HYBRID,
            reason=reason,
            actor=actor,
            pqc_alg=MLDSA_ALG,
            pqc_public=public,
            blob_sha3=digest,
        )

    def _hybrid_to_pqc_preferred(
        self, key: KeyInfo, *, reason: str | None, actor: str, blob: object = None
    ) -> None:
        # (1) append; (2) the caller's commit fsyncs
        self._append(key, KeyState.HYBRID, KeyState.PQC_PREFERRED, reason=reason, actor=actor)

    def _to_finalizing(
        self, key: KeyInfo, frm: KeyState, *, reason: str | None, actor: str
    ) -> None:
        # (1) append carrying the classical PUBLIC key as a backup; (2) commit fsyncs
        self._append(
            key,
            frm,
            KeyState.FINALIZING,
            reason=reason,
            actor=actor,
            classical_spki=key.classical_spki,
        )

    def _hybrid_to_finalizing(
        self, key: KeyInfo, *, reason: str | None, actor: str, blob: object = None
    ) -> None:
        self._to_finalizing(key, KeyState.HYBRID, reason=reason, actor=actor)

    def _pqc_preferred_to_finalizing(
        self, key: KeyInfo, *, reason: str | None, actor: str, blob: object = None
    ) -> None:
        self._to_finalizing(key, KeyState.PQC_PREFERRED, reason=reason, actor=actor)

    def _finalizing_to_pqc_only(
        self, key: KeyInfo, *, reason: str | None, actor: str, blob: object = None
    ) -> None:
        if key.cka_id is None:
            raise StateError(f"key {key.label!r} has no token key id recorded")
        if isinstance(blob, int):
            # bulk: steps (1)-(3) already ran for the whole batch, confirmed by one listing
            erased = blob
        else:
            # (1) C_DestroyObject every private key with this CKA_ID;
            # (2) confirm absence with a search in a fresh session (inside
            #     destroy_private_key, which raises if anything is still there);
            # (3) handles are dropped by the token backend; no host copy ever existed (I2)
            erased = self._app.token.destroy_private_key(key.cka_id)
        fault_point("migration.erased")
        # (4) only now append the PQC_ONLY record; (5) the caller's commit fsyncs it
        self._append(
            key,
            KeyState.FINALIZING,
            KeyState.PQC_ONLY,
            reason=reason,
            actor=actor,
            erased_objects=erased,
        )

    def _hybrid_to_classical(
        self, key: KeyInfo, *, reason: str | None, actor: str, blob: object = None
    ) -> None:
        # (1) append and fsync the record first, (2) then delete the blob
        self._append(key, KeyState.HYBRID, KeyState.CLASSICAL, reason=reason, actor=actor)
        self._app.wal.commit()
        self._app.keystore.remove_blob(key.key_id)

    def _pqc_preferred_to_hybrid(
        self, key: KeyInfo, *, reason: str | None, actor: str, blob: object = None
    ) -> None:
        self._append(key, KeyState.PQC_PREFERRED, KeyState.HYBRID, reason=reason, actor=actor)

    # -- bulk --------------------------------------------------------------------------------

    def migrate_all(
        self,
        to: KeyState,
        *,
        reason: str | None = None,
        actor: str = "operator",
        batch: int = 256,
        progress: Progress | None = None,
    ) -> BulkResult:
        """Move every migrating key forward to ``to`` with group commit.

        Keys already at or past ``to``, born post-quantum, or damaged are skipped.  Each
        batch does every key's side effects (blob writes, erasures) first, then appends the
        batch's records and fsyncs once; an erasure always precedes its own record.
        """
        if to is KeyState.CLASSICAL:
            raise PolicyDenied("bulk migration only moves keys forward")
        reason = _check_reason(reason)
        result = BulkResult(target=to)
        target_rank = ORDER.index(to)
        todo: list[KeyInfo] = []
        for k in self._app.keys():
            if k.kind is not KeyKind.CLASSICAL:
                result.skipped[k.key_id] = f"born {k.kind.value}"
            elif k.key_id in self._app.damaged:
                result.skipped[k.key_id] = "DAMAGED"
            elif ORDER.index(k.state) >= target_rank:
                result.skipped[k.key_id] = f"already {k.state.value}"
            else:
                todo.append(k)
        fsyncs_before = self._app.wal.fsync_count
        done = 0
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            locks = [self._key_lock(k.key_id) for k in chunk]
            for lk in locks:
                lk.acquire()
            try:
                self._bulk_chunk(chunk, to, reason=reason, actor=actor, result=result)
            finally:
                for lk in locks:
                    lk.release()
            done += len(chunk)
            if progress is not None:
                progress(done, len(todo))
        result.fsyncs = self._app.wal.fsync_count - fsyncs_before
        return result

    def _bulk_chunk(
        self,
        chunk: Sequence[KeyInfo],
        to: KeyState,
        *,
        reason: str | None,
        actor: str,
        result: BulkResult,
    ) -> None:
        alive = list(chunk)
        while alive:
            # one edge for every key still moving, then one commit for the whole group
            moving: list[KeyInfo] = []
            blobs: dict[str, tuple[bytes, bytes]] = {}
            stepping: list[tuple[KeyInfo, KeyState, KeyState]] = []
            for k in alive:
                cur = self._app.key(k.key_id)
                path = plan_path(cur.state, to)
                if not path:
                    continue
                frm, nxt = path[0]
                stepping.append((cur, frm, nxt))
            if not stepping:
                break
            hybrid = [cur for cur, frm, _ in stepping if frm is KeyState.CLASSICAL]
            if hybrid:
                blobs = self._app.keystore.new_mldsa_many([k.key_id for k in hybrid])
            # erase every finalizing key of the batch first; one fresh listing confirms all
            finals = [c.cka_id for c, f, _ in stepping if f is KeyState.FINALIZING and c.cka_id]
            erased = self._app.token.destroy_private_keys(finals) if finals else {}
            for cur, frm, nxt in stepping:
                prepared: object = blobs.get(cur.key_id)
                if frm is KeyState.FINALIZING and cur.cka_id in erased:
                    prepared = erased[cur.cka_id]
                try:
                    self._edge(cur, frm, nxt, reason=reason, actor=actor, blob=prepared)
                    moving.append(cur)
                except (StateError, PolicyDenied, KeyExists, CallerError) as exc:
                    result.failed[cur.key_id] = str(exc)
            self._app.wal.commit()
            alive = [k for k in moving if self._app.key(k.key_id).state is not to]
            for k in moving:
                if self._app.key(k.key_id).state is to:
                    result.migrated.append(k.key_id)


def _check_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    if (
        not reason.strip()
        or len(reason.encode()) > MAX_REASON
        or any(ord(c) < 0x20 for c in reason)
    ):
        raise CallerError(f"reason must be 1 to {MAX_REASON} printable bytes")
    return reason
