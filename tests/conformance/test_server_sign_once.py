"""Extension v4 (version byte 0x53): ``C_SignInit`` and ``C_Sign`` in one request.

libpqhsm-pkcs11.so sends the call (0x8001, ``uMuayfy`` -> ``ay``) when an application
repeats the session's last accepted ``C_SignInit`` (tests/module/test_module_issue7.py
shows that side).  Here the server's side, on raw connections: the answer is ``C_Sign``'s,
or the init part's error with no operation left behind; a short buffer keeps the
operation, as ``C_Sign`` does; connections of other versions do not have the call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from p11raw import ay as _ay
from p11raw import u32 as _u32
from p11raw import u64 as _u64
from test_server_live import Live, Peer, _check_signature, live

from appliance.errors import CKR
from pkcs11_shim.dispatch import CALL_SIGN_ONCE
from pkcs11_shim.rpc import Reader, request_body
from pkcs11_shim.server import EXTENSION_VERSION_3, EXTENSION_VERSION_4

pytestmark = [pytest.mark.conformance, pytest.mark.softhsm]

__all__ = ["live"]  # the fixture, imported for these tests

CKM_ECDSA = 0x1041
NO_PARAM = 0xFFFFFFFF
DIGEST = hashlib.sha256(b"sign once").digest()


def _once(peer: Peer, session: int, key: int, data: bytes, size: int) -> Reader:
    fields = _u64(session) + _u32(CKM_ECDSA) + _u32(NO_PARAM) + _u64(key)
    _, body = peer.frame(request_body(CALL_SIGN_ONCE, "uMuayfy", fields + _ay(data) + _u32(size)))
    return Reader(body)


def _error(r: Reader) -> int:
    """The CKR of an error reply (call id 0), or 0 for a reply of the call."""
    return r.u() if r.call_id == 0 else 0


def _plain_sign(peer: Peer, session: int, data: bytes, size: int) -> Reader:
    _, body = peer.frame(request_body(43, "uayfy", _u64(session) + _ay(data) + _u32(size)))
    return Reader(body)


@pytest.fixture
def v4(live: Live) -> Iterator[tuple[Peer, int, int]]:
    """A v4 connection, a logged-in session and the ECDSA key's private handle."""
    peer = Peer(live.server.path, version=EXTENSION_VERSION_4)
    session = peer.login_session()
    yield peer, session, peer.find_private(session, live.key)
    peer.close()


def test_one_request_signs_and_ends_the_operation(live: Live, v4: tuple[Peer, int, int]) -> None:
    peer, session, key = v4
    for _ in range(2):  # the operation ended: the same request works again
        r = _once(peer, session, key, DIGEST, 1024)
        assert r.call_id == CALL_SIGN_ONCE
        signature = r.ay()
        assert signature is not None
        _check_signature(live.key, DIGEST, signature)
    assert _error(_plain_sign(peer, session, DIGEST, 1024)) == CKR.OPERATION_NOT_INITIALIZED


def test_a_failing_init_part_leaves_no_operation(live: Live, v4: tuple[Peer, int, int]) -> None:
    peer, session, key = v4
    assert _error(_once(peer, session, 0xDEAD, DIGEST, 1024)) == CKR.KEY_HANDLE_INVALID
    assert _error(_once(peer, 0xBAD, key, DIGEST, 1024)) == CKR.SESSION_HANDLE_INVALID
    # a failing signature part (CKM_ECDSA signs no empty digest) ends the operation too
    assert _error(_once(peer, session, key, b"", 1024)) == CKR.ARGUMENTS_BAD
    assert _error(_plain_sign(peer, session, DIGEST, 1024)) == CKR.OPERATION_NOT_INITIALIZED
    assert _once(peer, session, key, DIGEST, 1024).call_id == CALL_SIGN_ONCE


def test_an_operation_already_active_is_refused(v4: tuple[Peer, int, int]) -> None:
    peer, session, key = v4
    peer.ok(42, "uMu", _u64(session) + _u32(CKM_ECDSA) + _u32(NO_PARAM) + _u64(key))
    assert _error(_once(peer, session, key, DIGEST, 1024)) == CKR.OPERATION_ACTIVE
    signature = _plain_sign(peer, session, DIGEST, 1024).ay()  # the first one goes on
    assert signature is not None
    assert len(signature) == 64


def test_a_short_buffer_keeps_the_operation(live: Live, v4: tuple[Peer, int, int]) -> None:
    peer, session, key = v4
    r = _once(peer, session, key, DIGEST, 10)
    assert r.call_id == CALL_SIGN_ONCE
    assert r.ay() is None  # no bytes: the length only, which the client turns into
    r = _plain_sign(peer, session, DIGEST, 1024)  # CKR_BUFFER_TOO_SMALL; C_Sign finishes
    signature = r.ay()
    assert signature is not None
    _check_signature(live.key, DIGEST, signature)


@pytest.mark.parametrize("version", [0, EXTENSION_VERSION_3], ids=["p11-kit", "v3"])
def test_other_versions_do_not_have_the_call(live: Live, version: int) -> None:
    peer = Peer(live.server.path, version=version)
    session = peer.login_session()
    key = peer.find_private(session, live.key)
    assert _error(_once(peer, session, key, DIGEST, 1024)) == CKR.FUNCTION_NOT_SUPPORTED
    signature = peer.sign(session, key, DIGEST)  # no operation was started
    _check_signature(live.key, DIGEST, signature)
    peer.close()
