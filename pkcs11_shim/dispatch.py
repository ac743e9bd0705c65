"""Dispatch one p11-kit RPC request body to the :class:`~pkcs11_shim.model.Client`.

The table maps call ids to the request and reply signatures of the p11-kit 0.24 client
(DESIGN §8) and a handler.  A call that is not in the table gets an error reply with
``CKR_FUNCTION_NOT_SUPPORTED``; a request whose signature differs from the table, or that
does not parse, raises :class:`~pkcs11_shim.rpc.ProtocolError` (the server closes that
connection).  Every other failure becomes an error reply (STYLE §4).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from appliance.errors import CKR, ApplianceError, to_ckr
from pkcs11_shim.model import CkrError, Client
from pkcs11_shim.rpc import (
    Mechanism,
    ProtocolError,
    Reader,
    Writer,
    error_body,
    read_sign,
    read_sign_init,
)

__all__ = ["CALLS", "CALL_SIGN_ONCE", "Call", "dispatch", "runs_long"]

log = logging.getLogger(__name__)

Handler = Callable[[Client, Reader, Writer], None]

#: Extension v4 (README): ``C_SignInit`` + ``C_Sign`` in one request, ``uMuayfy`` ->
#: ``ay``; outside p11-kit's call ids.
CALL_SIGN_ONCE: Final = 0x8001


@dataclass(frozen=True, slots=True)
class Call:
    """One supported call: its name, request and reply signatures and handler."""

    name: str
    request: str
    reply: str
    handler: Handler
    #: the reply signature on connections with extension v2, when it differs
    extended_reply: str | None = None


def _initialize(c: Client, r: Reader, w: Writer) -> None:
    handshake = r.ay()
    r.y()
    r.ay()
    r.done()
    c.initialize(handshake)


def _finalize(c: Client, r: Reader, w: Writer) -> None:
    r.done()
    c.finalize()


def _get_info(c: Client, r: Reader, w: Writer) -> None:
    r.done()
    c.check_ready()
    w.v(2, 40).s("pqhsm", 32).u(0).s("pqhsm p11-kit front end", 32).v(0, 1)


def _ulong_list(w: Writer, values: list[int], size: int | None) -> None:
    if size is None or size < len(values):
        w.au(None, len(values))  # size query, or CKR_BUFFER_TOO_SMALL on the client side
    else:
        w.au(values)


def _byte_out(w: Writer, data: bytes, size: int | None) -> None:
    if size is None or size < len(data):
        w.ay(None, len(data))
    else:
        w.ay(data)


def _get_slot_list(c: Client, r: Reader, w: Writer) -> None:
    r.y()
    size = r.fu()
    r.done()
    _ulong_list(w, c.slot_list(), size)


def _get_slot_info(c: Client, r: Reader, w: Writer) -> None:
    slot = r.u()
    r.done()
    c.check_slot(slot)
    w.s("pqhsm appliance slot", 64).s("pqhsm", 32).u(0x1).v(0, 1).v(0, 1)


def _get_token_info(c: Client, r: Reader, w: Writer) -> None:
    slot = r.u()
    r.done()
    c.check_slot(slot)
    m = c.model
    flags = 0x1 | 0x4 | 0x8 | 0x400  # RNG, LOGIN_REQUIRED, USER_PIN_INITIALIZED, INITIALIZED
    flags |= m.pin_flags()  # CKF_USER_PIN_COUNT_LOW / FINAL_TRY / LOCKED
    unavailable = 0xFFFFFFFFFFFFFFFF
    w.s(m.label, 32).s("pqhsm", 32).s("pqhsm appliance", 16).s(m.serial, 16).u(flags)
    w.u(0).u(unavailable).u(0).u(unavailable).u(255).u(4)
    w.u(unavailable).u(unavailable).u(unavailable).u(unavailable)
    w.v(0, 1).v(0, 1).s("", 16)


def _get_mechanism_list(c: Client, r: Reader, w: Writer) -> None:
    slot = r.u()
    size = r.fu()
    r.done()
    c.check_slot(slot)
    _ulong_list(w, sorted(c.mechanisms()), size)


def _get_mechanism_info(c: Client, r: Reader, w: Writer) -> None:
    slot = r.u()
    mech = r.u()
    r.done()
    lo, hi, flags = c.mechanism_info(slot, mech)
    w.u(lo).u(hi).u(flags)


def _open_session(c: Client, r: Reader, w: Writer) -> None:
    slot = r.u()
    flags = r.u()
    r.done()
    w.u(c.open_session(slot, flags))


def _close_session(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    r.done()
    c.close_session(s)


def _close_all_sessions(c: Client, r: Reader, w: Writer) -> None:
    slot = r.u()
    r.done()
    c.close_all_sessions(slot)


def _get_session_info(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    r.done()
    slot, state, flags, err = c.session_info(s)
    w.u(slot).u(state).u(flags).u(err)


def _login(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    user = r.u()
    pin = r.secret_ay()
    try:
        r.done()
        c.login(s, user, pin)
    finally:
        if pin is not None:
            pin.wipe()


def _logout(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    r.done()
    c.logout(s)


def _get_attribute_value(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    obj = r.u()
    template = r.fa()
    r.done()
    attrs, rv = c.get_attributes(s, obj, template)
    w.aa(attrs).u(rv)


def _find_objects_init(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    template = r.aa()
    r.done()
    c.find_init(s, template)


def _find_objects(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    size = r.fu()
    r.done()
    w.au(c.find(s, size or 0))


def _find_objects_final(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    r.done()
    c.find_final(s)


def _sign_init(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    mech = r.m()
    key = r.u()
    r.done()
    _start_signing(c, w, s, mech, key)


def _start_signing(c: Client, w: Writer, s: int, mech: Mechanism, key: int) -> None:
    if c.sized_sign_init:  # the module answers size queries with this (README, extension)
        w.u(c.sign_init_sized(s, mech, key))
    else:
        c.sign_init(s, mech, key)


def _output(w: Writer, size: int | None, need: int, produce: Callable[[], bytes]) -> None:
    """PKCS#11 5.2 output conventions: a size query (no buffer) or a buffer shorter than
    ``need`` gets the length and leaves the operation active; else ``produce()``."""
    if size is None or size < need:
        w.ay(None, need)
    else:
        w.ay(produce())


def _sign(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    data = r.ay()
    size = r.fy()
    r.done()
    _sign_data(c, w, s, data, size)


def _sign_data(c: Client, w: Writer, s: int, data: bytes | None, size: int | None) -> None:
    _output(w, size, c.sign_length(s), lambda: c.sign(s, data))


def _sign_once(c: Client, r: Reader, w: Writer) -> None:
    """Extension v4: ``C_SignInit`` and ``C_Sign`` in one request (README).  A failing
    init part answers its own error; a short buffer keeps the operation, as ``C_Sign``
    does; any other failure ends it."""
    s = r.u()
    mech = r.m()
    key = r.u()
    data = r.ay()
    size = r.fy()
    r.done()
    if not c.sign_once:
        raise CkrError(CKR.FUNCTION_NOT_SUPPORTED)
    c.sign_init(s, mech, key)
    try:
        _output(w, size, c.sign_length(s), lambda: c.sign(s, data))
    except BaseException:
        c.sign_abort(s)
        raise


def _sign_update(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    data = r.ay()
    r.done()
    c.sign_update(s, data)


def _sign_final(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    size = r.fy()
    r.done()
    _output(w, size, c.sign_length(s), lambda: c.sign_final(s))


def _digest_init(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    mech = r.m()
    r.done()
    c.digest_init(s, mech)


def _digest(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    data = r.ay()
    size = r.fy()
    r.done()
    _output(w, size, c.digest_length(s), lambda: c.digest(s, data))


def _digest_update(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    data = r.ay()
    r.done()
    c.digest_update(s, data)


def _digest_final(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    size = r.fy()
    r.done()
    _output(w, size, c.digest_length(s), lambda: c.digest_final(s))


def _verify_init(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    mech = r.m()
    key = r.u()
    r.done()
    c.verify_init(s, mech, key)


def _verify(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    data = r.ay()
    signature = r.ay()
    r.done()
    c.verify(s, data, signature)


def _verify_update(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    data = r.ay()
    r.done()
    c.verify_update(s, data)


def _verify_final(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    signature = r.ay()
    r.done()
    c.verify_final(s, signature)


def _generate_key_pair(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    mech = r.m()
    pub = r.aa()
    priv = r.aa()
    r.done()
    pub_handle, priv_handle = c.generate_key_pair(s, mech, pub, priv)
    w.u(pub_handle).u(priv_handle)


def _destroy_object(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    obj = r.u()
    r.done()
    c.destroy_object(s, obj)


def _generate_random(c: Client, r: Reader, w: Writer) -> None:
    s = r.u()
    size = r.fy()
    r.done()
    # No size query here: the length is the request (0 gives an empty, valid array).
    w.ay(c.random(s, size or 0))


CALLS: Final[dict[int, Call]] = {
    1: Call("C_Initialize", "ayyay", "", _initialize),
    2: Call("C_Finalize", "", "", _finalize),
    3: Call("C_GetInfo", "", "vsusv", _get_info),
    4: Call("C_GetSlotList", "yfu", "au", _get_slot_list),
    5: Call("C_GetSlotInfo", "u", "ssuvv", _get_slot_info),
    6: Call("C_GetTokenInfo", "u", "ssssuuuuuuuuuuuvvs", _get_token_info),
    7: Call("C_GetMechanismList", "ufu", "au", _get_mechanism_list),
    8: Call("C_GetMechanismInfo", "uu", "uuu", _get_mechanism_info),
    10: Call("C_OpenSession", "uu", "u", _open_session),
    11: Call("C_CloseSession", "u", "", _close_session),
    12: Call("C_CloseAllSessions", "u", "", _close_all_sessions),
    13: Call("C_GetSessionInfo", "u", "uuuu", _get_session_info),
    18: Call("C_Login", "uuay", "", _login),
    19: Call("C_Logout", "u", "", _logout),
    22: Call("C_DestroyObject", "uu", "", _destroy_object),
    24: Call("C_GetAttributeValue", "uufA", "aAu", _get_attribute_value),
    26: Call("C_FindObjectsInit", "uaA", "", _find_objects_init),
    27: Call("C_FindObjects", "ufu", "au", _find_objects),
    28: Call("C_FindObjectsFinal", "u", "", _find_objects_final),
    37: Call("C_DigestInit", "uM", "", _digest_init),
    38: Call("C_Digest", "uayfy", "ay", _digest),
    39: Call("C_DigestUpdate", "uay", "", _digest_update),
    41: Call("C_DigestFinal", "ufy", "ay", _digest_final),
    42: Call("C_SignInit", "uMu", "", _sign_init, extended_reply="u"),
    43: Call("C_Sign", "uayfy", "ay", _sign),
    44: Call("C_SignUpdate", "uay", "", _sign_update),
    45: Call("C_SignFinal", "ufy", "ay", _sign_final),
    48: Call("C_VerifyInit", "uMu", "", _verify_init),
    49: Call("C_Verify", "uayay", "", _verify),
    50: Call("C_VerifyUpdate", "uay", "", _verify_update),
    51: Call("C_VerifyFinal", "uay", "", _verify_final),
    59: Call("C_GenerateKeyPair", "uMaAaA", "uu", _generate_key_pair),
    64: Call("C_GenerateRandom", "ufy", "ay", _generate_random),
    CALL_SIGN_ONCE: Call("pqhsm_SignOnce", "uMuayfy", "ay", _sign_once),
}

_SIGN_INIT: Final = CALLS[42]
_SIGN: Final = CALLS[43]

#: Request signatures of the supported calls (for generic decoding).
REQUEST_SIGNATURES: Final = {k: v.request for k, v in CALLS.items()}


#: C_Login (Argon2id) and C_GenerateKeyPair (token key generation, a WAL fsync).
_LONG_CALLS: Final = frozenset({18, 59})

#: Calls whose requests carry a PIN (C_InitToken, C_InitPIN, C_SetPIN, C_Login): the
#: server hands them to :func:`dispatch` as a ``bytearray`` and wipes what it received.
PIN_CALLS: Final = frozenset({9, 14, 15, 18})
#: C_Sign, C_SignFinal and the v4 combined signature: long unless one token call makes
#: the signature (~0.15 ms).
_SIGNING_CALLS: Final = frozenset({43, 45, CALL_SIGN_ONCE})
#: C_Verify and C_VerifyFinal: long for ML-DSA, dual and composite (~0.5-1 ms).
_VERIFY_CALLS: Final = frozenset({49, 51})
#: CKM_ECDSA, CKM_ECDSA_SHA256/384/512, CKM_EDDSA: one token call (or one classical
#: verification), well under 1 ms.
_CLASSICAL_MECHANISMS: Final = frozenset({0x1041, 0x1044, 0x1045, 0x1046, 0x1057})
#: Calls up to C_OpenSession name no session (nor does C_CloseAllSessions, 12).
_LAST_SESSIONLESS: Final = 10
#: Calls that change the connection's login state, session table or objects.
_ALONE_CALLS: Final = frozenset({1, 2, 12, 18, 19, 22, 59})
#: A body this large is hashed or signed for long enough to leave the event loop.
_LONG_BODY: Final = 64 * 1024


def _session_of(body: bytes | bytearray) -> int | None:
    """The session handle a request names first (every call from C_CloseSession on,
    except C_CloseAllSessions), or None; never raises."""
    call_id = int.from_bytes(body[:4], "big")
    if call_id <= _LAST_SESSIONLESS or call_id == 12:
        return None
    at = 8 + int.from_bytes(body[4:8], "big")  # call id, signature string, then the session
    if len(body) < at + 8:
        return None
    return int.from_bytes(body[at : at + 8], "big")


def runs_long(client: Client, body: bytes | bytearray) -> bool:
    """Whether the server should run this request on a worker thread, off its event loop.

    True for calls that take long: logins (Argon2id), key generation, messages over
    64 KiB, and signatures or verifications that are not classical (ML-DSA, dual and
    composite: ``cryptography`` does ML-DSA without the GIL, so two clients use two
    cores).  A signing size query (output buffer size 0) signs nothing and stays on the
    loop.  Never raises: a body it cannot read is left to :func:`dispatch` to refuse.
    """
    if len(body) > _LONG_BODY:
        return True
    call_id = int.from_bytes(body[:4], "big")
    if call_id in _LONG_CALLS:
        return True
    signing = call_id in _SIGNING_CALLS
    if not signing and call_id not in _VERIFY_CALLS:
        return False
    if signing and body[-4:] == b"\0\0\0\0":
        return False
    if call_id == CALL_SIGN_ONCE:  # no operation yet: read the mechanism type, which
        at = 16 + int.from_bytes(body[4:8], "big")  # follows the signature and session
        return int.from_bytes(body[at : at + 4], "big") not in _CLASSICAL_MECHANISMS
    handle = _session_of(body)
    session = None if handle is None else client.sessions.get(handle)
    if session is None:
        return False
    if signing:
        return session.sign.key is not None and session.sign.mech not in _CLASSICAL_MECHANISMS
    return session.verify.key is not None and session.verify.mech not in _CLASSICAL_MECHANISMS


class Plan(IntEnum):
    """How a multiplexed connection (extension v3) runs one request."""

    #: On the event loop, now, beside the connection's calls in flight.
    INLINE = 0
    #: On a worker, while the connection's later requests go on being served.
    PARALLEL = 1
    #: On the event loop once nothing of the connection's is in flight.
    INLINE_ALONE = 2
    #: On a worker once nothing is in flight; later requests wait for it.
    ALONE = 3


def plan(client: Client, body: bytes | bytearray) -> tuple[Plan, int | None]:
    """How to run ``body`` on a multiplexed connection, and the session it names.

    Only single signatures and verifications that run long go beside other calls: they
    touch their own session's operation and the appliance (which serves every connection
    at once already), never the connection's session table or login state.  Calls that
    change those (C_Initialize, C_Finalize, C_CloseAllSessions, C_Login, C_Logout,
    C_GenerateKeyPair, C_DestroyObject) and every other long call run alone.  The caller
    also holds back a request whose session has a call in flight (PKCS#11 sessions are
    serial).  Never raises.
    """
    session = _session_of(body)
    call_id = int.from_bytes(body[:4], "big")
    if runs_long(client, body):
        parallel = call_id in _SIGNING_CALLS or call_id in _VERIFY_CALLS
        return (Plan.PARALLEL if parallel else Plan.ALONE), session
    return (Plan.INLINE_ALONE if call_id in _ALONE_CALLS else Plan.INLINE), session


def dispatch(client: Client, body: bytes | bytearray) -> bytes:
    """Run one request body and return the reply body.

    A ``bytearray`` body (the server passes requests that carry a PIN so, see
    :data:`PIN_CALLS`) is read in place and wiped before this returns.

    :raises ProtocolError: the body does not parse or its signature does not match the
        call; the caller closes the connection.
    """
    try:
        return _dispatch(client, body)
    finally:
        if isinstance(body, bytearray):
            body[:] = bytes(len(body))


def _dispatch(client: Client, body: bytes | bytearray) -> bytes:
    plain = _plain_signing(client, body)
    if plain is not None:
        return plain
    reader = Reader(body)
    call = CALLS.get(reader.call_id)
    if call is None:
        log.info("unsupported call id %d", reader.call_id)
        return error_body(CKR.FUNCTION_NOT_SUPPORTED)
    if reader.signature != call.request:
        raise ProtocolError(f"{call.name}: signature mismatch")
    return _answer(client, reader.call_id, call, lambda w: call.handler(client, reader, w))


def _plain_signing(client: Client, body: bytes | bytearray) -> bytes | None:
    """The reply to a ``C_SignInit`` or ``C_Sign`` in the shape every classical signature
    sends (:func:`~pkcs11_shim.rpc.read_sign_init`, :func:`~pkcs11_shim.rpc.read_sign`:
    one unpack instead of a :class:`Reader` call per field); None for any other body.
    The handlers and answers are the general path's."""
    if not isinstance(body, bytes):
        return None
    init = read_sign_init(body)
    if init is not None:
        s, mech, key = init
        return _answer(client, 42, _SIGN_INIT, lambda w: _start_signing(client, w, s, mech, key))
    sign = read_sign(body)
    if sign is not None:
        s, data, size = sign
        return _answer(client, 43, _SIGN, lambda w: _sign_data(client, w, s, data, size))
    return None


def _answer(client: Client, call_id: int, call: Call, handle: Callable[[Writer], None]) -> bytes:
    """Run ``handle`` on a writer for ``call``'s reply; failures become error replies."""
    reply = call.extended_reply if client.sized_sign_init and call.extended_reply else call.reply
    writer = Writer(call_id, reply)
    try:
        handle(writer)
    except ProtocolError:
        raise
    except CkrError as exc:
        log.debug("%s -> 0x%x", call.name, exc.rv)
        return error_body(exc.rv)
    except ApplianceError as exc:
        log.info("%s failed: %s [%s]", call.name, type(exc).__name__, exc.ckr.name)
        return error_body(to_ckr(exc))
    except Exception as exc:
        log.exception("%s: internal error %s", call.name, type(exc).__name__)
        return error_body(to_ckr(exc))
    return writer.body()
