"""Keys as the WAL describes them: states, records, and a pure replay.

Key state is a pure function of the WAL (DESIGN §5): :func:`replay` folds records into a
dict of :class:`KeyInfo`; nothing else is authoritative.  Records are self-contained so
they mean the same thing on every appliance.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from appliance.errors import CallerError, DeviceError, MultipleObjectsReturned, NoSuchKey

__all__ = [
    "BACKWARD",
    "EDGES",
    "FORWARD",
    "KeyInfo",
    "KeyKind",
    "KeyState",
    "Selector",
    "apply_record",
    "edge_allowed",
    "is_backward",
    "parse_selector",
    "replay",
]


class KeyState(Enum):
    """Migration states (DESIGN §6)."""

    CLASSICAL = "CLASSICAL"
    HYBRID = "HYBRID"
    PQC_PREFERRED = "PQC_PREFERRED"
    FINALIZING = "FINALIZING"
    PQC_ONLY = "PQC_ONLY"


FORWARD: Final = frozenset(
    {
        ("CLASSICAL", "HYBRID"),
        ("HYBRID", "PQC_PREFERRED"),
        ("HYBRID", "FINALIZING"),
        ("PQC_PREFERRED", "FINALIZING"),
        ("FINALIZING", "PQC_ONLY"),
    }
)
BACKWARD: Final = frozenset({("HYBRID", "CLASSICAL"), ("PQC_PREFERRED", "HYBRID")})
EDGES: Final = FORWARD | BACKWARD


def edge_allowed(frm: KeyState, to: KeyState) -> bool:
    """I6: states move only along the edges of DESIGN §6."""
    return (frm.value, to.value) in EDGES


def is_backward(frm: KeyState, to: KeyState) -> bool:
    return (frm.value, to.value) in BACKWARD


class KeyKind(Enum):
    CLASSICAL = "classical"  # born classical; migrates CLASSICAL -> ... -> PQC_ONLY
    MLDSA = "ml-dsa-87"  # born post-quantum, PQC_ONLY from the start
    COMPOSITE = "composite"  # IETF composite key, HYBRID for life: fresh parts, never migrates


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    label: str
    kind: KeyKind
    state: KeyState
    classical_alg: str | None
    cka_id: bytes | None
    classical_spki: bytes | None
    pqc_public: bytes | None
    blob_sha3: bytes | None
    origin: str
    created: int
    history: tuple[int, ...] = field(default=())
    composite_alg: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "label": self.label,
            "kind": self.kind.value,
            "state": self.state.value,
            "classical_alg": self.classical_alg,
            "pqc_alg": "ml-dsa-87" if self.pqc_public is not None else None,
            "cka_id": self.cka_id.hex() if self.cka_id is not None else None,
            "origin": self.origin,
            "composite_alg": self.composite_alg,
            "created_ms": self.created,
            "wal_records": list(self.history),
        }


def _need(fields: Any, name: str, typ: type) -> Any:
    value = fields.get(name)
    if not isinstance(value, typ):
        raise DeviceError(f"WAL record is missing {name!r}")
    return value


def apply_record(keys: MutableMapping[str, KeyInfo], rtype: str, fields: Any, seq: int) -> None:
    """Fold one WAL record into ``keys`` (in place).  Unknown types are ignored."""
    if rtype == "key.create":
        key_id = _need(fields, "key_id", str)
        if key_id in keys:
            raise DeviceError(f"WAL seq {seq}: key {key_id} created twice")
        keys[key_id] = KeyInfo(
            key_id=key_id,
            label=_need(fields, "label", str),
            kind=KeyKind(_need(fields, "kind", str)),
            state=KeyState(_need(fields, "state", str)),
            classical_alg=fields.get("classical_alg"),
            cka_id=fields.get("cka_id"),
            classical_spki=fields.get("classical_spki"),
            pqc_public=fields.get("pqc_public"),
            blob_sha3=fields.get("blob_sha3"),
            origin=_need(fields, "origin", str),
            created=_need(fields, "ts", int),
            history=(seq,),
            composite_alg=fields.get("composite_alg"),
        )
    elif rtype == "key.transition":
        key_id = _need(fields, "key_id", str)
        k = keys.get(key_id)
        if k is None:
            raise DeviceError(f"WAL seq {seq}: transition of unknown key {key_id}")
        frm, to = KeyState(_need(fields, "from", str)), KeyState(_need(fields, "to", str))
        if frm is not k.state:
            raise DeviceError(
                f"WAL seq {seq}: key {key_id} leaves {frm.value} but is {k.state.value}"
            )
        if not edge_allowed(frm, to):
            raise DeviceError(f"WAL seq {seq}: {frm.value} -> {to.value} is not an allowed edge")
        if to is KeyState.HYBRID and frm is KeyState.CLASSICAL:
            k = replace(
                k,
                pqc_public=_need(fields, "pqc_public", bytes),
                blob_sha3=_need(fields, "blob_sha3", bytes),
            )
        elif to is KeyState.CLASSICAL:
            k = replace(k, pqc_public=None, blob_sha3=None)
        keys[key_id] = replace(k, state=to, history=(*k.history, seq))
    elif rtype == "keystore.passphrase":
        blobs = _need(fields, "blobs", dict)
        for key_id, digest in blobs.items():
            if key_id in keys:
                k = keys[key_id]
                keys[key_id] = replace(k, blob_sha3=digest, history=(*k.history, seq))


def replay(records: Any) -> dict[str, KeyInfo]:
    """Key state from an iterable of WAL records (objects with .type, .fields, .seq)."""
    keys: dict[str, KeyInfo] = {}
    for rec in records:
        apply_record(keys, rec.type, rec.fields, rec.seq)
    return keys


# -- selectors: label, key id, or RFC 7512 pkcs11: URI --------------------------------------

_HEX: Final = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True, slots=True)
class Selector:
    label: str | None = None
    key_id: str | None = None
    cka_id: bytes | None = None
    token: str | None = None
    text: str = ""

    def match(self, keys: dict[str, KeyInfo], token_label: str | None = None) -> KeyInfo:
        """Exactly one key or a clear error naming the selector."""
        if self.token is not None and token_label is not None and self.token != token_label:
            raise NoSuchKey(f"{self.text}: token {self.token!r} is not this appliance's token")
        hits = [
            k
            for k in keys.values()
            if (self.label is None or k.label == self.label)
            and (self.key_id is None or k.key_id == self.key_id)
            and (self.cka_id is None or k.cka_id == self.cka_id)
        ]
        if not hits and self.key_id is None and self.label is not None and self.cka_id is None:
            hits = [k for k in keys.values() if k.key_id == self.label]  # a bare id
        if not hits:
            raise NoSuchKey(f"no key matches {self.text!r}")
        if len(hits) > 1:
            raise MultipleObjectsReturned(f"{len(hits)} keys match {self.text!r}; use the key id")
        return hits[0]


def parse_selector(text: str) -> Selector:
    """``LABEL``, ``id:HEX`` or an RFC 7512 ``pkcs11:object=...;id=%01...`` URI."""
    if not text:
        raise CallerError("empty key selector")
    if text.startswith("id:"):
        key_id = text[3:].lower()
        if not _HEX.fullmatch(key_id):
            raise CallerError(f"{text!r}: key id must be hex")
        return Selector(key_id=key_id, text=text)
    if not text.startswith("pkcs11:"):
        return Selector(label=text, text=text)
    path = text[len("pkcs11:") :].split("?", 1)[0]
    label = token = None
    cka_id = None
    for part in filter(None, path.split(";")):
        name, sep, value = part.partition("=")
        if not sep:
            raise CallerError(f"{text!r}: malformed pkcs11 URI attribute {part!r}")
        raw = unquote_to_bytes(value)
        if name == "object":
            label = raw.decode("utf-8", "strict")
        elif name == "id":
            cka_id = raw
        elif name == "token":
            token = raw.decode("utf-8", "strict")
        elif name in (
            "type",
            "manufacturer",
            "model",
            "serial",
            "library-description",
            "library-manufacturer",
            "library-version",
            "slot-id",
            "slot-description",
            "slot-manufacturer",
        ):
            continue  # not needed to pick one of this appliance's keys
        else:
            raise CallerError(f"{text!r}: unknown pkcs11 URI attribute {name!r}")
    if label is None and cka_id is None:
        raise CallerError(f"{text!r}: a pkcs11 URI must name object= or id=")
    return Selector(label=label, cka_id=cka_id, token=token, text=text)
