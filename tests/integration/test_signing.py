"""Per-state signing, dual (OR-mode) envelopes and verification policies (DESIGN §7)."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from appliance.errors import CallerError, SignatureInvalid, StateError
from appliance.keys import KeyInfo, KeyState
from appliance.service import Appliance
from appliance.signing.dual import DualSignature, encode_dual, parse_dual
from appliance.signing.policy import Policy, PublicKeys, load_public_keys, verify

pytestmark = pytest.mark.softhsm

S = KeyState
P = Policy
M = b"transfer 3 BTC to bc1q...\n"
TYPES = ["ed25519", "ed448", "ecdsa-p256", "ecdsa-p384", "ecdsa-secp256k1"]


def keys_of(key: KeyInfo) -> PublicKeys:
    return load_public_keys(Appliance.public_key_pem_of(key))


def hybrid(app: Appliance, key_type: str, label: str) -> KeyInfo:
    return app.migrate(app.create_key(key_type, label), S.HYBRID)


def openssl_verifies(tmp: Path, key: KeyInfo, message: bytes, classical_sig: bytes) -> bool:
    pem = Appliance.public_key_pem_of(key, part="classical")
    (tmp / "pub.pem").write_bytes(pem)
    (tmp / "msg").write_bytes(message)
    (tmp / "sig").write_bytes(classical_sig)
    alg = key.classical_alg or ""
    if alg.startswith("ecdsa"):
        dgst = "-sha384" if alg == "ecdsa-p384" else "-sha256"
        cmd = ["openssl", "dgst", dgst, "-verify", "pub.pem", "-signature", "sig", "msg"]
    else:
        cmd = [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            "pub.pem",
            "-rawin",
            "-in",
            "msg",
            "-sigfile",
            "sig",
        ]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, check=False).returncode == 0


@pytest.mark.parametrize("key_type", TYPES)
def test_dual_is_the_default_in_hybrid_and_legacy_tools_verify_it(
    appliance: Appliance, tmp_path: Path, key_type: str
) -> None:
    k = hybrid(appliance, key_type, "h")
    sig = appliance.sign(k, M)
    dual = parse_dual(sig)
    assert dual.classical_alg == key_type
    # the classical part is a standard signature: openssl checks it unchanged
    assert openssl_verifies(tmp_path, k, M, dual.classical_sig)
    for policy in P:
        verify(keys_of(k), M, sig, policy=policy)
    with pytest.raises(SignatureInvalid):
        verify(keys_of(k), M + b"x", sig, policy=P.LEGACY)
    with pytest.raises(SignatureInvalid):
        verify(keys_of(k), M + b"x", sig, policy=P.PQC)


def test_each_state_signs_what_it_may(appliance: Appliance) -> None:
    app = appliance
    k = app.create_key("ecdsa-p256", "s")
    assert app.sign(k, M)[0] == 0x30  # CLASSICAL: DER ECDSA
    with pytest.raises(StateError, match="no ML-DSA-87 key yet"):
        app.sign(k, M, kind="ml-dsa")
    with pytest.raises(StateError, match="need both parts"):
        app.sign(k, M, kind="dual")
    k = app.migrate(k, S.PQC_PREFERRED)
    assert app.sign(k, M)[:4] == b"PQDS"  # PQC_PREFERRED: dual by default
    verify(keys_of(k), M, app.sign(k, M, kind="classical"), policy=P.LEGACY)
    verify(
        load_public_keys(app.public_key_pem_of(k, part="ml-dsa")),
        M,
        app.sign(k, M, kind="ml-dsa"),
        policy=P.PQC,
    )
    k = app.migrate(k, S.FINALIZING)
    assert len(app.sign(k, M)) == 4627  # FINALIZING: ML-DSA only
    for kind in ("classical", "dual"):
        with pytest.raises(StateError):
            app.sign(k, M, kind=kind)
    k = app.migrate(k, S.PQC_ONLY)
    verify(keys_of(k), M, app.sign(k, M, context=b"ctx"), policy=P.STRICT, context=b"ctx")
    with pytest.raises(StateError, match="classical private key is gone"):
        app.sign(k, M, kind="classical")
    with pytest.raises(CallerError, match="deterministic ML-DSA signing is not available"):
        app.sign(k, M, deterministic=True)
    with pytest.raises(CallerError, match="unknown signature kind"):
        app.sign(k, M, kind="composite-ish")


def test_stripping_and_substitution_are_rejected(appliance: Appliance) -> None:
    app = appliance
    a = hybrid(app, "ed25519", "a")
    b = hybrid(app, "ed25519", "b")
    sig_a = parse_dual(app.sign(a, M))
    sig_b = parse_dual(app.sign(b, M))
    other_msg = parse_dual(app.sign(a, b"another message"))
    forgeries = {
        # the ML-DSA part of another key's envelope moved into a's
        "mldsa-from-another-key": DualSignature("ed25519", sig_a.classical_sig, sig_b.mldsa_sig),
        # a's ML-DSA part from an envelope over another message
        "mldsa-from-another-envelope": DualSignature(
            "ed25519", sig_a.classical_sig, other_msg.mldsa_sig
        ),
        # the classical part swapped for another (valid, for key b) one
        "classical-swapped": DualSignature("ed25519", sig_b.classical_sig, sig_a.mldsa_sig),
    }
    for name, forged in forgeries.items():
        for policy in (P.PQC, P.STRICT):
            with pytest.raises(SignatureInvalid):
                verify(keys_of(a), M, encode_dual(forged), policy=policy)
            assert name
    # the ML-DSA part presented as a plain ML-DSA signature fails: its context binds it
    pq_only = load_public_keys(app.public_key_pem_of(a, part="ml-dsa"))
    for policy in (P.PQC, P.STRICT):
        with pytest.raises(SignatureInvalid):
            verify(pq_only, M, sig_a.mldsa_sig, policy=policy)
    # and a plain classical signature is not enough where the ML-DSA part is required
    plain = app.sign(a, M, kind="classical")
    verify(keys_of(a), M, plain, policy=P.LEGACY)
    for policy in (P.PQC, P.STRICT):
        with pytest.raises(SignatureInvalid, match=r"part is missing|needs an ML-DSA-87 part"):
            verify(keys_of(a), M, plain, policy=policy)


def test_ecdsa_classical_part_swapped_for_another_valid_one(appliance: Appliance) -> None:
    # ECDSA is randomized: a second signature of the same key over M is valid but different
    app = appliance
    k = hybrid(app, "ecdsa-p384", "e")
    one, two = parse_dual(app.sign(k, M)), parse_dual(app.sign(k, M))
    assert one.classical_sig != two.classical_sig
    mixed = encode_dual(DualSignature("ecdsa-p384", two.classical_sig, one.mldsa_sig))
    verify(keys_of(k), M, mixed, policy=P.LEGACY)  # a legacy verifier cannot tell
    with pytest.raises(SignatureInvalid):
        verify(keys_of(k), M, mixed, policy=P.PQC)


def test_dual_context(appliance: Appliance) -> None:
    k = hybrid(appliance, "ed448", "c")
    sig = appliance.sign(k, M, context=b"payments-v2")
    verify(keys_of(k), M, sig, policy=P.STRICT, context=b"payments-v2")
    with pytest.raises(SignatureInvalid):
        verify(keys_of(k), M, sig, policy=P.PQC, context=b"payments-v3")
    verify(keys_of(k), M, sig, policy=P.LEGACY, context=b"ignored by the classical part")
    with pytest.raises(CallerError, match="at most 178"):
        appliance.sign(k, M, context=b"x" * 179)


def _malformed(good: bytes) -> dict[str, bytes]:
    head, clen = good[:7], struct.unpack(">H", good[7:9])[0]
    return {
        "empty": b"",
        "truncated-header": good[:5],
        "truncated-classical": good[: 9 + clen - 1],
        "truncated-mldsa": good[:-1],
        "extended": good + b"\x00",
        "wrong-version": good[:4] + b"\x02" + good[5:],
        "unknown-classical-id": good[:5] + b"\x09" + good[6:],
        "unknown-pqc-id": good[:6] + b"\x02" + good[7:],
        "classical-length-too-long": head + struct.pack(">H", clen + 50) + good[9:],
        "mldsa-length-wrong": good[: 9 + clen] + struct.pack(">H", 4626) + good[11 + clen :],
        "wrong-algorithm-for-key": good[:5] + b"\x02" + good[6:],
    }


def test_malformed_dual_signatures_are_rejected_with_a_reason(appliance: Appliance) -> None:
    k = hybrid(appliance, "ed25519", "m")
    good = appliance.sign(k, M)
    for name, bad in _malformed(good).items():
        for policy in P:
            with pytest.raises(SignatureInvalid) as info:
                verify(keys_of(k), M, bad, policy=policy)
            assert str(info.value), name


def test_signer_cache_is_bounded(appliance: Appliance) -> None:
    app = appliance
    app.signer_cache_size = 2
    keys = [app.create_key("ml-dsa-87", f"pq{i}") for i in range(4)]
    for k in keys:
        app.sign(k, M)
    assert len(app._signers) == 2
    app.close()
    assert len(app._signers) == 0


def test_policy_parse() -> None:
    assert Policy.parse("pqc") is P.PQC
    with pytest.raises(CallerError, match="choose legacy, pqc or strict"):
        Policy.parse("lenient")


@pytest.mark.parametrize("alg", ["mldsa87-ecdsa-p384-sha512", "mldsa87-ed448-shake256"])
def test_composite_keys_sign_in_the_token_and_verify_from_spki(
    appliance: Appliance, fresh_token: object, alg: str
) -> None:
    from appliance.signing import composite

    app = appliance
    k = app.create_key(alg, f"comp-{alg}")
    assert k.kind.value == "composite"
    assert k.state is S.HYBRID
    pem = Appliance.public_key_pem_of(k)
    params, public = composite.load_public_key_spki(pem)
    assert params.alg.value == alg
    sig = app.sign(k, M)
    assert len(sig) > 4627
    composite.verify(params, public, M, sig)
    for policy in P:  # a composite always needs all of its parts, whatever the policy
        verify(load_public_keys(pem), M, sig, policy=policy)
    with pytest.raises(SignatureInvalid):
        verify(load_public_keys(pem), M + b"!", sig, policy=P.LEGACY)
    ctx_sig = app.sign(k, M, context=b"ledger")
    verify(load_public_keys(pem), M, ctx_sig, policy=P.STRICT, context=b"ledger")
    with pytest.raises(SignatureInvalid):
        verify(load_public_keys(pem), M, ctx_sig, policy=P.STRICT, context=b"other")
    # the parts never sign alone, and the key does not migrate
    for kind in ("classical", "ml-dsa", "dual"):
        with pytest.raises(StateError, match="never sign alone"):
            app.sign(k, M, kind=kind)
    with pytest.raises(StateError, match="does not migrate"):
        app.migrate(k, S.PQC_ONLY)
    # the ML-DSA part of a composite signature is not a plain ML-DSA signature over M
    from appliance.pqc import active_backend

    mldsa_part, _ = composite.decode_signature(params, sig)
    with pytest.raises(SignatureInvalid):
        active_backend().mldsa87_verify(public[:2592], M, mldsa_part)


def test_composite_keys_survive_reopen_and_recovery(
    appliance: Appliance, fresh_token: object
) -> None:
    from conftest import PASSPHRASE, TokenSpec

    assert isinstance(fresh_token, TokenSpec)
    app = appliance
    k = app.create_key("mldsa87-ed448-shake256", "comp-r")
    cfg = app.cfg
    app.close()
    from appliance.secret import SecretBytes

    app2 = Appliance.open(cfg, pin=fresh_token.pin_secret(), passphrase=SecretBytes(PASSPHRASE))
    try:
        assert app2.last_recovery is not None
        assert app2.last_recovery.clean
        verify(
            load_public_keys(Appliance.public_key_pem_of(k)),
            M,
            app2.sign(app2.key(k.key_id), M),
            policy=P.STRICT,
        )
    finally:
        app2.close()
