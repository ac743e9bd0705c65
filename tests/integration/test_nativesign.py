"""Token signatures through ctypes (appliance.token.nativesign).

The appliance signs with two module calls through the module's own function list instead
of python-pkcs11's three.  These tests pin that this path is the one in use on SoftHSM2,
that what it returns verifies for every key type (Ed448 and P-384 included, whose
signatures are the largest), that it keeps python-pkcs11's behaviour when the token needs
a larger buffer, that a module without a function list falls back cleanly, and that token
errors come back translated.
"""

from __future__ import annotations

import ctypes.util

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.algorithms import parse_alg
from appliance.errors import TokenError
from appliance.service import Appliance
from appliance.signing.policy import Policy, load_public_keys, verify
from appliance.token.nativesign import NativeSigner

pytestmark = pytest.mark.softhsm


def test_softhsm_signs_through_ctypes(appliance: Appliance) -> None:
    key = appliance.create_key("ecdsa-p256", "native")
    token = appliance.token
    assert getattr(token, "_native", None) is not None  # the two-call path is active
    assert key.cka_id is not None
    assert key.classical_spki is not None
    pub = serialization.load_der_public_key(key.classical_spki)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    for msg in (b"", b"one", bytes(range(256)) * 40):
        sig = token.sign(parse_alg("ecdsa-p256"), key.cka_id, msg)
        pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("alg", ["ed25519", "ed448", "ecdsa-p384", "ecdsa-secp256k1"])
def test_every_key_type_matches_python_pkcs11(appliance: Appliance, alg: str) -> None:
    """Both paths give signatures that verify; the native one is the one in use."""
    key = appliance.create_key(alg, f"native-{alg}")
    assert key.cka_id is not None
    token = appliance.token
    native = getattr(token, "_native", None)
    assert native is not None
    msg = b"both paths" * 100
    by_ctypes = token.sign(parse_alg(alg), key.cka_id, msg)
    token._native = None  # type: ignore[attr-defined]  # python-pkcs11 signs now
    try:
        by_python_pkcs11 = token.sign(parse_alg(alg), key.cka_id, msg)
    finally:
        token._native = native  # type: ignore[attr-defined]
    pem = Appliance.public_key_pem_of(key)
    keys = load_public_keys(pem)
    for sig in (by_ctypes, by_python_pkcs11):
        verify(keys, msg, sig, policy=Policy.LEGACY)
    if alg.startswith("ed"):
        assert by_ctypes == by_python_pkcs11  # EdDSA is deterministic


def test_a_short_buffer_is_retried(appliance: Appliance) -> None:
    """CKR_BUFFER_TOO_SMALL keeps the operation: the signer retries at the asked length."""
    key = appliance.create_key("ed448", "native-short")
    assert key.cka_id is not None
    token = appliance.token
    native = getattr(token, "_native", None)
    assert native is not None
    session = token._s.handle  # type: ignore[attr-defined]
    handle = token._private(key.cka_id).handle  # type: ignore[attr-defined]
    small = NativeSigner(appliance.cfg.module)
    small_sig = small.sign(session, handle, 0x1057, b"m", "sign", buffer=16)
    assert len(small_sig) == 114


def test_a_library_without_a_function_list_falls_back() -> None:
    assert NativeSigner.load("/nonexistent/libnothing.so") is None
    libc = ctypes.util.find_library("c")
    assert libc is not None
    assert NativeSigner.load(libc) is None  # loads, but has no C_GetFunctionList


def test_token_errors_are_translated(appliance: Appliance) -> None:
    signer = NativeSigner(appliance.cfg.module)
    with pytest.raises(TokenError, match=r"sign with key x: CKR_"):
        signer.sign(0xDEAD, 1, 0x1041, b"\0" * 32, "sign with key x")
