"""PKCS#11 slot, token, session and object model over a running :class:`Appliance`.

One slot (:data:`SLOT_ID`) holds one token.  For every key whose classical ECDSA part is
live (kind classical, state CLASSICAL, HYBRID or PQC_PREFERRED) the token shows a
``CKO_PRIVATE_KEY`` and a ``CKO_PUBLIC_KEY`` (``CKK_EC``) sharing the key's ``CKA_ID``.
Which objects exist follows the key's state at every call: once a key leaves the
classical states its handles are invalid.

Each client connection (one PKCS#11 application) gets a :class:`Client`: its own
sessions, login state, and object handles, stable for the life of the connection.

Security: client login, interim (this slice): the client PIN is the token PIN the
operator gave when the server started.  The next slice replaces it with the appliance's
own Argon2id client PINs with lockout (DESIGN §8).  The PIN is compared in constant time
and never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.algorithms import der_oid, load_spki, parse_alg
from appliance.errors import CKR
from appliance.keys import KeyInfo, KeyKind, KeyState
from appliance.secret import SecretBytes
from appliance.service import Appliance
from pkcs11_shim.rpc import HANDSHAKE, Attribute, AttrValue, Mechanism

__all__ = ["SLOT_ID", "CkrError", "Client", "Pkcs11Model"]

log = logging.getLogger(__name__)

SLOT_ID: Final = 1
MAX_SESSIONS: Final = 64
MAX_RANDOM: Final = 64 * 1024
UNAVAILABLE: Final = 0xFFFFFFFFFFFFFFFF  # CK_UNAVAILABLE_INFORMATION

# Object classes, key types, attributes, mechanisms, flags (pkcs11t.h values).
CKO_PUBLIC_KEY: Final = 2
CKO_PRIVATE_KEY: Final = 3
CKK_EC: Final = 3
CKA_CLASS: Final = 0x000
CKA_TOKEN: Final = 0x001
CKA_PRIVATE: Final = 0x002
CKA_LABEL: Final = 0x003
CKA_VALUE: Final = 0x011
CKA_KEY_TYPE: Final = 0x100
CKA_SUBJECT: Final = 0x101
CKA_ID: Final = 0x102
CKA_SENSITIVE: Final = 0x103
CKA_ENCRYPT: Final = 0x104
CKA_DECRYPT: Final = 0x105
CKA_WRAP: Final = 0x106
CKA_UNWRAP: Final = 0x107
CKA_SIGN: Final = 0x108
CKA_SIGN_RECOVER: Final = 0x109
CKA_VERIFY: Final = 0x10A
CKA_VERIFY_RECOVER: Final = 0x10B
CKA_DERIVE: Final = 0x10C
CKA_EXTRACTABLE: Final = 0x162
CKA_LOCAL: Final = 0x163
CKA_NEVER_EXTRACTABLE: Final = 0x164
CKA_ALWAYS_SENSITIVE: Final = 0x165
CKA_KEY_GEN_MECHANISM: Final = 0x166
CKA_MODIFIABLE: Final = 0x170
CKA_COPYABLE: Final = 0x171
CKA_DESTROYABLE: Final = 0x172
CKA_EC_PARAMS: Final = 0x180
CKA_EC_POINT: Final = 0x181
CKA_ALWAYS_AUTHENTICATE: Final = 0x202
CKA_ALLOWED_MECHANISMS: Final = 0x40000600
# Attributes that would reveal private key material: always CKR_ATTRIBUTE_SENSITIVE.
SENSITIVE_ATTRS: Final = frozenset({CKA_VALUE, 0x122, 0x123, 0x124, 0x125, 0x126, 0x127, 0x128})

CKM_EC_KEY_PAIR_GEN: Final = 0x1040
CKM_ECDSA: Final = 0x1041
CKF_HW: Final = 0x1
CKF_SIGN: Final = 0x800
CKF_EC_F_P: Final = 0x100000
CKF_EC_NAMEDCURVE: Final = 0x800000
CKF_EC_UNCOMPRESS: Final = 0x1000000

CKF_TOKEN_PRESENT: Final = 0x1
CKF_RNG: Final = 0x1
CKF_LOGIN_REQUIRED: Final = 0x4
CKF_USER_PIN_INITIALIZED: Final = 0x8
CKF_TOKEN_INITIALIZED: Final = 0x400
CKF_RW_SESSION: Final = 0x2
CKF_SERIAL_SESSION: Final = 0x4
CKU_SO: Final = 0
CKU_USER: Final = 1
CKS_RO_PUBLIC_SESSION: Final = 0
CKS_RO_USER_FUNCTIONS: Final = 1
CKS_RW_PUBLIC_SESSION: Final = 2
CKS_RW_USER_FUNCTIONS: Final = 3
CKR_SESSION_PARALLEL_NOT_SUPPORTED: Final = 0x0B4

#: Mechanisms advertised: only ones the p11-kit 0.24 client passes (DESIGN §8).
MECHANISMS: Final[dict[int, tuple[int, int, int]]] = {
    CKM_ECDSA: (256, 384, CKF_HW | CKF_SIGN | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS),
}
_LIVE_CLASSICAL: Final = (KeyState.CLASSICAL, KeyState.HYBRID, KeyState.PQC_PREFERRED)


class CkrError(Exception):
    """A PKCS#11 call failed with ``rv``; the dispatcher sends it as an error reply."""

    def __init__(self, rv: int) -> None:
        super().__init__(f"CKR 0x{rv:x}")
        self.rv = rv


def _ecdsa_key(key: KeyInfo) -> bool:
    return (
        key.kind is KeyKind.CLASSICAL
        and key.state in _LIVE_CLASSICAL
        and (key.classical_alg or "").startswith("ecdsa-")
        and key.cka_id is not None
        and key.classical_spki is not None
    )


def _der_octet_string(data: bytes) -> bytes:
    n = len(data)
    if n < 0x80:
        return b"\x04" + bytes((n,)) + data
    if n < 0x100:
        return b"\x04\x81" + bytes((n,)) + data
    return b"\x04\x82" + n.to_bytes(2, "big") + data


def object_attributes(key: KeyInfo, cls: int) -> dict[int, AttrValue]:
    """The attributes of the public (``CKO_PUBLIC_KEY``) or private object of ``key``."""
    if key.classical_alg is None or key.classical_spki is None:
        raise CkrError(CKR.DEVICE_ERROR)
    alg = parse_alg(key.classical_alg)
    pub = load_spki(key.classical_spki)
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise CkrError(CKR.DEVICE_ERROR)
    point = pub.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    attrs: dict[int, AttrValue] = {
        CKA_CLASS: cls,
        CKA_TOKEN: True,
        CKA_PRIVATE: cls == CKO_PRIVATE_KEY,
        CKA_LABEL: key.label.encode("utf-8"),
        CKA_ID: key.cka_id or b"",
        CKA_KEY_TYPE: CKK_EC,
        CKA_SUBJECT: b"",
        CKA_LOCAL: key.origin == "generated",
        CKA_KEY_GEN_MECHANISM: CKM_EC_KEY_PAIR_GEN if key.origin == "generated" else UNAVAILABLE,
        CKA_MODIFIABLE: False,
        CKA_COPYABLE: False,
        CKA_DESTROYABLE: False,
        CKA_DERIVE: False,
        CKA_EC_PARAMS: der_oid(alg.curve_oid),
        CKA_ALLOWED_MECHANISMS: (CKM_ECDSA,),
    }
    if cls == CKO_PRIVATE_KEY:
        attrs.update(
            {
                CKA_SENSITIVE: True,
                CKA_ALWAYS_SENSITIVE: True,
                CKA_EXTRACTABLE: False,
                CKA_NEVER_EXTRACTABLE: True,
                CKA_SIGN: True,
                CKA_SIGN_RECOVER: False,
                CKA_DECRYPT: False,
                CKA_UNWRAP: False,
                CKA_ALWAYS_AUTHENTICATE: False,
            }
        )
    else:
        attrs.update(
            {
                CKA_EC_POINT: _der_octet_string(point),
                CKA_VERIFY: True,
                CKA_VERIFY_RECOVER: False,
                CKA_ENCRYPT: False,
                CKA_WRAP: False,
            }
        )
    return attrs


class Pkcs11Model:
    """What every client connection shares: the appliance, the token label, the PIN.

    Security: ``client_pin`` is an interim credential (the token PIN, see the module
    docstring); this object owns it and :meth:`close` wipes it.
    """

    def __init__(self, app: Appliance, *, client_pin: SecretBytes) -> None:
        self.app = app
        self._pin = client_pin
        info = app.token.info()
        self.label = info.label or "pqhsm"
        self.serial = info.serial or app.appliance_id[:16]

    def check_pin(self, pin: bytes) -> None:
        """Compare a client PIN in constant time.

        :raises CkrError: ``CKR_PIN_INCORRECT``.
        """
        if not hmac.compare_digest(bytes(self._pin.view()), pin):
            raise CkrError(CKR.PIN_INCORRECT)

    def ecdsa_keys(self) -> list[KeyInfo]:
        """Keys that currently expose PKCS#11 objects."""
        return [k for k in self.app.keys() if _ecdsa_key(k)]

    def close(self) -> None:
        """Wipe the client PIN."""
        self._pin.wipe()


@dataclass
class Session:
    """One PKCS#11 session of a client."""

    flags: int
    found: list[int] | None = None
    sign_key: str | None = None  # key_id while C_Sign is active


@dataclass
class Client:
    """State of one client connection (one PKCS#11 application).

    Every method implements one PKCS#11 call and raises :class:`CkrError` on failure.
    """

    model: Pkcs11Model
    initialized: bool = False
    logged_in: bool = False
    sessions: dict[int, Session] = field(default_factory=dict)
    _next_session: int = 1
    _handles: dict[tuple[str, int], int] = field(default_factory=dict)
    _objects: dict[int, tuple[str, int]] = field(default_factory=dict)

    # -- general -------------------------------------------------------------------------

    def initialize(self, handshake: bytes | None) -> None:
        if handshake != HANDSHAKE:
            raise CkrError(CKR.ARGUMENTS_BAD)
        if self.initialized:
            raise CkrError(CKR.CRYPTOKI_ALREADY_INITIALIZED)
        self.initialized = True

    def finalize(self) -> None:
        self._ready()
        self.sessions.clear()
        self.logged_in = False
        self.initialized = False

    def check_ready(self) -> None:
        """:raises CkrError: ``CKR_CRYPTOKI_NOT_INITIALIZED`` before C_Initialize."""
        self._ready()

    def _ready(self) -> None:
        if not self.initialized:
            raise CkrError(CKR.CRYPTOKI_NOT_INITIALIZED)

    def _slot(self, slot_id: int) -> None:
        self._ready()
        if slot_id != SLOT_ID:
            raise CkrError(CKR.SLOT_ID_INVALID)

    def _session(self, handle: int) -> Session:
        self._ready()
        try:
            return self.sessions[handle]
        except KeyError:
            raise CkrError(CKR.SESSION_HANDLE_INVALID) from None

    # -- slots, tokens, mechanisms -------------------------------------------------------

    def slot_list(self) -> list[int]:
        self._ready()
        return [SLOT_ID]

    def check_slot(self, slot_id: int) -> None:
        self._slot(slot_id)

    def mechanism_info(self, slot_id: int, mech: int) -> tuple[int, int, int]:
        self._slot(slot_id)
        try:
            return MECHANISMS[mech]
        except KeyError:
            raise CkrError(CKR.MECHANISM_INVALID) from None

    # -- sessions --------------------------------------------------------------------------

    def open_session(self, slot_id: int, flags: int) -> int:
        self._slot(slot_id)
        if not flags & CKF_SERIAL_SESSION:
            raise CkrError(CKR_SESSION_PARALLEL_NOT_SUPPORTED)
        if len(self.sessions) >= MAX_SESSIONS:
            raise CkrError(CKR.HOST_MEMORY)
        handle = self._next_session
        self._next_session += 1
        self.sessions[handle] = Session(flags=flags & (CKF_RW_SESSION | CKF_SERIAL_SESSION))
        return handle

    def close_session(self, handle: int) -> None:
        self._session(handle)
        del self.sessions[handle]
        if not self.sessions:
            self.logged_in = False

    def close_all_sessions(self, slot_id: int) -> None:
        self._slot(slot_id)
        self.sessions.clear()
        self.logged_in = False

    def session_info(self, handle: int) -> tuple[int, int, int, int]:
        s = self._session(handle)
        rw = bool(s.flags & CKF_RW_SESSION)
        if self.logged_in:
            state = CKS_RW_USER_FUNCTIONS if rw else CKS_RO_USER_FUNCTIONS
        else:
            state = CKS_RW_PUBLIC_SESSION if rw else CKS_RO_PUBLIC_SESSION
        return SLOT_ID, state, s.flags, 0

    def login(self, handle: int, user_type: int, pin: bytes | None) -> None:
        self._session(handle)
        if user_type != CKU_USER:
            raise CkrError(CKR.USER_TYPE_INVALID)
        if self.logged_in:
            raise CkrError(CKR.USER_ALREADY_LOGGED_IN)
        if pin is None:
            raise CkrError(CKR.ARGUMENTS_BAD)
        self.model.check_pin(pin)
        self.logged_in = True
        log.info("client logged in")

    def logout(self, handle: int) -> None:
        self._session(handle)
        if not self.logged_in:
            raise CkrError(CKR.USER_NOT_LOGGED_IN)
        self.logged_in = False
        for s in self.sessions.values():
            s.sign_key = None

    # -- objects -------------------------------------------------------------------------

    def _visible(self) -> dict[int, tuple[KeyInfo, int]]:
        """Handle -> (key, class) for every object the client may see now."""
        out: dict[int, tuple[KeyInfo, int]] = {}
        for key in self.model.ecdsa_keys():
            classes = [CKO_PUBLIC_KEY, CKO_PRIVATE_KEY] if self.logged_in else [CKO_PUBLIC_KEY]
            for cls in classes:
                ref = (key.key_id, cls)
                handle = self._handles.get(ref)
                if handle is None:
                    handle = len(self._handles) + 1
                    self._handles[ref] = handle
                    self._objects[handle] = ref
                out[handle] = (key, cls)
        return out

    def _object(
        self, handle: int, *, invalid: int = CKR.OBJECT_HANDLE_INVALID
    ) -> tuple[KeyInfo, int]:
        try:
            return self._visible()[handle]
        except KeyError:
            raise CkrError(invalid) from None

    def find_init(self, handle: int, template: list[Attribute]) -> None:
        s = self._session(handle)
        if s.found is not None:
            raise CkrError(CKR.OPERATION_ACTIVE)
        found: list[int] = []
        for h, (key, cls) in sorted(self._visible().items()):
            attrs = object_attributes(key, cls)
            if all(a.type in attrs and attrs[a.type] == a.value for a in template):
                found.append(h)
        s.found = found

    def find(self, handle: int, max_count: int) -> list[int]:
        s = self._session(handle)
        if s.found is None:
            raise CkrError(CKR.OPERATION_NOT_INITIALIZED)
        out, s.found = s.found[:max_count], s.found[max_count:]
        return out

    def find_final(self, handle: int) -> None:
        s = self._session(handle)
        if s.found is None:
            raise CkrError(CKR.OPERATION_NOT_INITIALIZED)
        s.found = None

    def get_attributes(
        self, handle: int, obj: int, template: list[tuple[int, int]]
    ) -> tuple[list[Attribute], int]:
        """Values for ``template`` and the call's real return code (``aAu``)."""
        self._session(handle)
        key, cls = self._object(obj)
        attrs = object_attributes(key, cls)
        rv: int = CKR.OK
        out: list[Attribute] = []
        for atype, length in template:
            if cls == CKO_PRIVATE_KEY and atype in SENSITIVE_ATTRS:
                out.append(Attribute(atype, None))
                rv = CKR.ATTRIBUTE_SENSITIVE
                continue
            if atype not in attrs:
                out.append(Attribute(atype, None))
                if rv == CKR.OK or rv == CKR.BUFFER_TOO_SMALL:
                    rv = CKR.ATTRIBUTE_TYPE_INVALID
                continue
            value = attrs[atype]
            if length and length < _c_size(value):
                out.append(Attribute(atype, None))
                if rv == CKR.OK:
                    rv = CKR.BUFFER_TOO_SMALL
                continue
            out.append(Attribute(atype, value))
        return out, rv

    # -- signing -------------------------------------------------------------------------

    def sign_init(self, handle: int, mech: Mechanism, key_handle: int) -> None:
        s = self._session(handle)
        if s.sign_key is not None:
            raise CkrError(CKR.OPERATION_ACTIVE)
        if not self.logged_in:
            raise CkrError(CKR.USER_NOT_LOGGED_IN)
        if mech.type != CKM_ECDSA:
            raise CkrError(CKR.MECHANISM_INVALID)
        if mech.param:
            raise CkrError(CKR.MECHANISM_PARAM_INVALID)
        key, cls = self._object(key_handle, invalid=CKR.KEY_HANDLE_INVALID)
        if cls != CKO_PRIVATE_KEY:
            raise CkrError(CKR.KEY_FUNCTION_NOT_PERMITTED)
        s.sign_key = key.key_id

    def sign_length(self, handle: int) -> int:
        """The signature length of the active operation (for size queries)."""
        s = self._session(handle)
        if s.sign_key is None:
            raise CkrError(CKR.OPERATION_NOT_INITIALIZED)
        key = self.model.app.key(s.sign_key)
        return 2 * parse_alg(key.classical_alg or "").coord_len

    def sign(self, handle: int, data: bytes | None) -> bytes:
        """Sign a client-computed digest (``CKM_ECDSA``); ends the operation."""
        s = self._session(handle)
        key_id, s.sign_key = s.sign_key, None
        if key_id is None:
            raise CkrError(CKR.OPERATION_NOT_INITIALIZED)
        if data is None or not data:
            raise CkrError(CKR.ARGUMENTS_BAD)
        if not self.logged_in:
            raise CkrError(CKR.USER_NOT_LOGGED_IN)
        key = self.model.app.key(key_id)
        if not _ecdsa_key(key):
            raise CkrError(CKR.KEY_HANDLE_INVALID)
        if len(data) > 64:
            raise CkrError(CKR.DATA_LEN_RANGE)
        sig = self.model.app.sign(key, data, kind="classical", raw=True, prehashed=True)
        log.info("signed %d-byte digest with key %s", len(data), key.label)
        return sig

    def random(self, handle: int, n: int) -> bytes:
        self._session(handle)
        if n > MAX_RANDOM:
            raise CkrError(CKR.DATA_LEN_RANGE)
        return os.urandom(n)


def _c_size(value: AttrValue) -> int:
    """The C length of an attribute value (what ``ulValueLen`` reports)."""
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return 8
    if isinstance(value, bytes):
        return len(value)
    if value is None:
        return 0
    return (8 if all(isinstance(v, int) for v in value) else 24) * len(value)
