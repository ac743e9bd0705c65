"""The real ``pqhsm`` command in child processes, on an embedded SoftHSM2 token.

Signatures are checked by the ``openssl`` command; an adopted key is made by ``pkcs11-tool``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import PKCS11_TOOL_LOGIN, pin_env, run_cli
from pkcs11_shim.launch import throwaway_init_args

pytestmark = pytest.mark.softhsm

TYPES = ["ed25519", "ed448", "ecdsa-p256", "ecdsa-p384", "ecdsa-secp256k1"]
DGST = {"ecdsa-p256": "sha256", "ecdsa-p384": "sha384", "ecdsa-secp256k1": "sha256"}


def _init(root: Path) -> Path:
    home = root / "pqhsm"
    proc = run_cli(
        *throwaway_init_args(root / "secrets"),
        "--json",
        home=home,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    status = json.loads(proc.stdout)
    assert status["token"]["label"] == "pqhsm"
    assert status["keystore"]["kdf"] == "pbkdf2-hmac-sha3-256"
    assert status["pqc_backend"]["active"] == "cryptography"
    return home


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _init(tmp_path_factory.mktemp("cli"))


def ok(*args: str, home: Path, stdin: bytes | None = None) -> bytes:
    proc = run_cli(*args, home=home, stdin=stdin)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def fails(*args: str, home: Path | None, env: dict[str, str] | None = None, match: str = "") -> str:
    """The command fails with exactly one ``error:`` line and no traceback."""
    proc = run_cli(*args, home=home, env=env)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert match in lines[0], err
    return lines[0]


def openssl_verify(key_type: str, pem: Path, msg: Path, sig: Path) -> int:
    if key_type in DGST:
        cmd = [
            "openssl",
            "dgst",
            f"-{DGST[key_type]}",
            "-verify",
            str(pem),
            "-signature",
            str(sig),
            str(msg),
        ]
    else:
        cmd = [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            str(pem),
            "-rawin",
            "-in",
            str(msg),
            "-sigfile",
            str(sig),
        ]
    return subprocess.run(cmd, capture_output=True, check=False).returncode


def test_secrets_and_state_are_private(home: Path) -> None:
    secrets = home.parent / "secrets"
    for name in ("token-pin", "so-pin", "passphrase"):
        assert (secrets / name).stat().st_mode & 0o777 == 0o600
    assert secrets.stat().st_mode & 0o777 == 0o700
    assert home.stat().st_mode & 0o777 == 0o700
    for p in home.rglob("*"):
        if p.is_file() and "tokens" not in p.parts:
            assert p.stat().st_mode & 0o077 == 0, p
    cfg = (home / "config.toml").read_text()
    assert (secrets / "passphrase").read_text().strip() not in cfg


@pytest.mark.parametrize("key_type", TYPES)
def test_every_type_signs_and_openssl_verifies(home: Path, tmp_path: Path, key_type: str) -> None:
    label = f"cli-{key_type}"
    created = json.loads(
        ok("key", "create", "--type", key_type, "--label", label, "--json", home=home)
    )
    assert created["state"] == "CLASSICAL"
    assert created["classical_alg"] == key_type
    msg = tmp_path / "msg"
    msg.write_bytes(b"custody transfer #42\n")
    pem, sig = tmp_path / "pub.pem", tmp_path / "sig"
    ok("key", "export-public", label, "--out", str(pem), home=home)
    ok("sign", label, "--in", str(msg), "--out", str(sig), home=home)
    assert openssl_verify(key_type, pem, msg, sig) == 0
    # the appliance's own verifier agrees, by public key file and by key name
    ok("verify", "--pub", str(pem), "--in", str(msg), "--sig", str(sig), home=home)
    ok("verify", "--key", f"id:{created['key_id']}", "--in", str(msg), "--sig", str(sig), home=home)
    msg.write_bytes(b"custody transfer #43\n")
    assert openssl_verify(key_type, pem, msg, sig) != 0
    fails(
        "verify",
        "--pub",
        str(pem),
        "--in",
        str(msg),
        "--sig",
        str(sig),
        home=home,
        match="signature invalid [CKR_SIGNATURE_INVALID]",
    )


def test_ecdsa_raw_signature(home: Path, tmp_path: Path) -> None:
    ok("key", "create", "--type", "ecdsa-p384", "--label", "raw-p384", home=home)
    msg = tmp_path / "m"
    msg.write_bytes(b"x")
    ok("sign", "raw-p384", "--raw", "--in", str(msg), "--out", str(tmp_path / "sig"), home=home)
    assert len((tmp_path / "sig").read_bytes()) == 96
    ok("verify", "--key", "raw-p384", "--in", str(msg), "--sig", str(tmp_path / "sig"), home=home)


def test_mldsa_key_with_context(home: Path, tmp_path: Path) -> None:
    ok("key", "create", "--type", "ml-dsa-87", "--label", "pq1", home=home)
    msg, sig, pem = tmp_path / "m", tmp_path / "s", tmp_path / "p.pem"
    msg.write_bytes(b"post-quantum hello")
    ok("sign", "pq1", "--context", "tx-v1", "--in", str(msg), "--out", str(sig), home=home)
    assert len(sig.read_bytes()) == 4627
    ok("key", "export-public", "pq1", "--out", str(pem), home=home)
    assert pem.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    ok(
        "verify",
        "--pub",
        str(pem),
        "--context",
        "tx-v1",
        "--in",
        str(msg),
        "--sig",
        str(sig),
        home=home,
    )
    fails(
        "verify",
        "--pub",
        str(pem),
        "--context",
        "tx-v2",
        "--in",
        str(msg),
        "--sig",
        str(sig),
        home=home,
        match="signature invalid",
    )
    fails(
        "verify", "--pub", str(pem), "--in", str(msg), "--sig", str(sig), home=home, match="invalid"
    )
    fails(
        "sign",
        "pq1",
        "--context",
        "x" * 256,
        "--in",
        str(msg),
        "--out",
        str(sig),
        home=home,
        match="at most 255",
    )


def test_list_show_and_selectors(home: Path) -> None:
    ok("key", "create", "--type", "ed25519", "--label", "sel", home=home)
    listing = json.loads(ok("key", "list", "--json", home=home))
    me = next(k for k in listing if k["label"] == "sel")
    for sel in (
        "sel",
        f"id:{me['key_id']}",
        "pkcs11:object=sel;token=pqhsm",
        f"pkcs11:id=%{'%'.join(me['cka_id'][i : i + 2] for i in range(0, 32, 2))}",
    ):
        assert json.loads(ok("key", "show", sel, "--json", home=home))["key_id"] == me["key_id"]
    table = ok("key", "list", home=home).decode()
    assert "LABEL" in table
    assert "sel" in table
    fails(
        "key",
        "show",
        "pkcs11:object=sel;token=other",
        home=home,
        match="not this appliance's token",
    )
    fails("key", "show", "nope", home=home, match="no key matches 'nope'")
    fails("key", "show", "pkcs11:bogus=1", home=home, match="unknown pkcs11 URI attribute")


def test_status_table(home: Path) -> None:
    out = ok("status", home=home).decode()
    assert "pqc backend cryptography" in out
    assert "CLASSICAL" in out


def test_adopt_a_key_made_by_pkcs11_tool(home: Path, tmp_path: Path) -> None:
    pin = (home.parent / "secrets" / "token-pin").read_text().strip()
    env = {**os.environ, "SOFTHSM2_CONF": str(home / "softhsm" / "softhsm2.conf"), **pin_env(pin)}
    module = json.loads(ok("status", "--json", home=home))["token"]["module"]
    base = ["pkcs11-tool", "--module", module, "--token-label", "pqhsm", *PKCS11_TOOL_LOGIN]
    for label, key_id, extra in (
        ("legacy-1", "c0ffee01", ["--sensitive"]),
        ("leaky-1", "c0ffee02", ["--extractable"]),
    ):
        proc = subprocess.run(
            [
                *base,
                "--keypairgen",
                "--key-type",
                "EC:prime256v1",
                "--label",
                label,
                "--id",
                key_id,
                "--usage-sign",
                *extra,
            ],
            env=env,
            capture_output=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
    adopted = json.loads(ok("key", "adopt", "--token-object", "legacy-1", "--json", home=home))
    assert adopted["origin"] == "adopted"
    assert adopted["cka_id"] == "c0ffee01"
    assert adopted["classical_alg"] == "ecdsa-p256"
    msg, sig, pem = tmp_path / "m", tmp_path / "s", tmp_path / "p.pem"
    msg.write_bytes(b"legacy")
    ok("sign", "legacy-1", "--in", str(msg), "--out", str(sig), home=home)
    ok("key", "export-public", "legacy-1", "--out", str(pem), home=home)
    assert openssl_verify("ecdsa-p256", pem, msg, sig) == 0
    fails("key", "adopt", "--token-object", "legacy-1", home=home, match="already managed")
    fails("key", "adopt", "--token-id", "c0ffee02", home=home, match="extractable")
    fails("key", "adopt", "--token-object", "absent", home=home, match="no private key")
    fails("key", "adopt", home=home, match="needs --token-object")


def test_bad_input_is_one_line(home: Path, tmp_path: Path) -> None:
    ok("key", "create", "--type", "ed25519", "--label", "bad-sel", home=home)
    msg = tmp_path / "m"
    msg.write_bytes(b"m")
    pin_bad = tmp_path / "pin"
    pin_bad.write_text("0000\n")
    pin_bad.chmod(0o600)
    fails(
        "sign",
        "nope",
        "--in",
        str(msg),
        "--out",
        str(tmp_path / "s"),
        home=home,
        match="no key matches",
    )
    fails(
        "sign",
        "bad-sel",
        "--in",
        str(tmp_path / "absent"),
        "--out",
        str(tmp_path / "s"),
        home=home,
        match="no such file",
    )
    fails(
        "status", "--pin-file", str(pin_bad), home=home, match="wrong token PIN [CKR_PIN_INCORRECT]"
    )
    pin_bad.chmod(0o644)
    fails("status", "--pin-file", str(pin_bad), home=home, match="chmod 600")
    fails(
        "status",
        home=home,
        env={"PQHSM_PKCS11_MODULE": str(tmp_path / "missing.so")},
        match="module not found",
    )
    fails(
        "status", home=home, env={"PQHSM_TOKEN_LABEL": "other"}, match="no token with label 'other'"
    )
    fails("status", home=tmp_path / "empty", match="no appliance here")
    fails(
        "key",
        "create",
        "--type",
        "ed25519",
        "--label",
        "bad-sel",
        home=home,
        match="already exists",
    )
    fails("key", "create", "--type", "ed25519", "--label", "", home=home, match="label must be")
    fails(
        "verify",
        "--pub",
        str(msg),
        "--in",
        str(msg),
        "--sig",
        str(msg),
        home=home,
        match="not a PEM or DER public key",
    )
    fails("init", "--embedded-softhsm", home=home, match="already holds an appliance")
    fails(
        "init",
        "--module",
        "/x.so",
        "--generate-secrets",
        str(tmp_path / "s"),
        home=tmp_path / "n",
        match="only works with the embedded",
    )
    # nothing was lost: the keys still sign
    ok("sign", "bad-sel", "--in", str(msg), "--out", str(tmp_path / "s"), home=home)


def test_secret_sources(home: Path, tmp_path: Path) -> None:
    secrets = home.parent / "secrets"
    pin = (secrets / "token-pin").read_bytes()
    # a file descriptor (stdin), and the environment (CI path)
    ok("status", "--pin-fd", "0", home=home, stdin=pin)
    proc = run_cli("status", home=home, env={"PQHSM_TOKEN_PIN": pin.decode().strip()})
    assert proc.returncode == 0, proc.stderr
    fails("status", "--pin-fd", "0", home=home, match="")  # empty stdin: an empty PIN


def test_passphrase_change_via_cli(tmp_path: Path) -> None:
    home = _init(tmp_path)
    secrets = tmp_path / "secrets"
    ok("key", "create", "--type", "ml-dsa-87", "--label", "pq", home=home)
    ok("key", "create", "--type", "ml-dsa-87", "--label", "pq2", home=home)
    new = tmp_path / "new-pass"
    fd = os.open(new, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"a brand new passphrase\n")
    os.close(fd)
    out = ok("passphrase", "change", "--new-passphrase-file", str(new), home=home).decode()
    assert "3 blob(s) re-encrypted" in out  # two keys and the audit key's ML-DSA half
    msg = tmp_path / "m"
    msg.write_bytes(b"m")
    fails(
        "sign",
        "pq",
        "--in",
        str(msg),
        "--out",
        str(tmp_path / "s"),
        home=home,
        match="wrong passphrase",
    )
    ok(
        "sign",
        "pq",
        "--passphrase-file",
        str(new),
        "--in",
        str(msg),
        "--out",
        str(tmp_path / "s"),
        home=home,
    )
    ok(
        "sign",
        "pq2",
        "--passphrase-file",
        str(new),
        "--in",
        str(msg),
        "--out",
        str(tmp_path / "s"),
        home=home,
    )
    status = json.loads(ok("status", "--json", home=home))
    assert status["keystore"]["passphrase_generation"] == 1
    assert (secrets / "passphrase").exists()


def test_migrate_history_recover_and_wal_show(tmp_path: Path) -> None:
    home = _init(tmp_path)
    ok("key", "create", "--type", "ed25519", "--label", "mig", home=home)
    ok("key", "create", "--type", "ecdsa-p256", "--label", "mig2", home=home)
    out = ok("migrate", "mig", "--to", "hybrid", home=home).decode()
    assert "is now HYBRID" in out
    fails("migrate", "mig", "--to", "CLASSICAL", home=home, match="needs --allow-backward")
    fails("migrate", "mig", "--to", "SIDEWAYS", home=home, match="unknown state 'SIDEWAYS'")
    fails("migrate", "--to", "HYBRID", home=home, match="exactly one of KEY or --all")
    ok("migrate", "mig", "--to", "CLASSICAL", "--allow-backward", "--reason", "drill", home=home)
    bulk = json.loads(ok("migrate", "--all", "--to", "PQC_ONLY", "--json", home=home))
    assert bulk["migrated"] == 2
    assert bulk["failed"] == {}
    assert bulk["wal_fsyncs"] == 3  # one group commit per edge
    hist = json.loads(ok("key", "history", "mig", "--json", home=home))
    assert [h["event"] for h in hist] == [
        "key.create",
        "CLASSICAL -> HYBRID",
        "HYBRID -> CLASSICAL",
        "CLASSICAL -> HYBRID",
        "HYBRID -> FINALIZING",
        "FINALIZING -> PQC_ONLY",
    ]
    assert hist[2]["reason"] == "drill"
    rec = json.loads(ok("recover", "--json", home=home))
    assert rec["recovered"]["damaged"] == {}
    assert rec["second_pass_appended"] == 0
    records = json.loads(ok("wal", "show", "--json", home=home))
    assert records[0]["type"] == "appliance.init"
    assert all(records[i]["prev"] == records[i - 1]["hash"] for i in range(1, len(records)))
    table = ok("wal", "show", "--last", "2", home=home).decode()
    assert table.count("key.transition") == 1
    assert "checkpoint" in table  # migrate signs the new head
    status = json.loads(ok("status", "--json", home=home))
    assert status["keys_by_state"]["PQC_ONLY"] == 2
    assert status["needs_migration"] == []
    msg, sig = tmp_path / "m", tmp_path / "s"
    msg.write_bytes(b"after migration")
    ok("sign", "mig", "--in", str(msg), "--out", str(sig), home=home)
    ok("verify", "--key", "mig", "--in", str(msg), "--sig", str(sig), home=home)
    assert len(sig.read_bytes()) == 4627


def test_audit_verify_and_a_damaged_wal(tmp_path: Path) -> None:
    home = _init(tmp_path)
    ok("key", "create", "--type", "ed25519", "--label", "w1", home=home)
    ok("audit", "checkpoint", home=home)
    report = json.loads(ok("audit", "verify", "--json", home=home))
    assert report["checkpoints"] == 1
    assert report["unsigned_tail"] == 0
    ok("audit", "verify", "--anchor", report["audit_keys"][0], home=home)
    fails("audit", "verify", "--anchor", "ab" * 32, home=home, match="pinned anchor")
    out = ok("audit", "rotate", home=home).decode()
    assert "audit key 2 is now current" in out
    assert len(json.loads(ok("audit", "verify", "--json", home=home))["audit_keys"]) == 2
    # flip a byte inside the first frame's body: refused at start, offset named, file untouched
    wal = home / "wal" / "wal.log"
    pristine = wal.read_bytes()
    damaged = bytearray(pristine)
    damaged[20] ^= 0xFF
    wal.write_bytes(bytes(damaged))
    fails("status", home=home, match="at offset 0")
    fails("audit", "verify", home=home, match="at offset 0")
    fails("key", "list", home=home, match="at offset 0")
    assert wal.read_bytes() == bytes(damaged)
    wal.write_bytes(pristine)
    ok("status", home=home)


def test_dual_signing_and_policies_via_cli(tmp_path: Path) -> None:
    home = _init(tmp_path)
    ok("key", "create", "--type", "ecdsa-p256", "--label", "dual", home=home)
    ok("migrate", "dual", "--to", "HYBRID", home=home)
    msg, sig, pem = tmp_path / "m", tmp_path / "s", tmp_path / "both.pem"
    msg.write_bytes(b"a dual-signed transfer")
    ok("sign", "dual", "--in", str(msg), "--out", str(sig), home=home)
    assert sig.read_bytes()[:4] == b"PQDS"
    ok("key", "export-public", "dual", "--out", str(pem), home=home)
    assert pem.read_text().count("BEGIN PUBLIC KEY") == 2
    for policy in ("legacy", "pqc", "strict"):
        out = ok(
            "verify",
            "--policy",
            policy,
            "--pub",
            str(pem),
            "--in",
            str(msg),
            "--sig",
            str(sig),
            home=home,
        )
        assert f"policy {policy}" in out.decode()
    # the classical part alone, as a legacy verifier sees it: openssl reads the first PEM block
    plain = tmp_path / "plain"
    ok("sign", "dual", "--kind", "classical", "--in", str(msg), "--out", str(plain), home=home)
    assert openssl_verify("ecdsa-p256", pem, msg, plain) == 0
    fails(
        "verify",
        "--policy",
        "pqc",
        "--pub",
        str(pem),
        "--in",
        str(msg),
        "--sig",
        str(plain),
        home=home,
        match="needs an ML-DSA-87 part",
    )
    fails(
        "verify",
        "--policy",
        "lenient",
        "--pub",
        str(pem),
        "--in",
        str(msg),
        "--sig",
        str(sig),
        home=home,
        match="unknown policy",
    )
    truncated = tmp_path / "t"
    truncated.write_bytes(sig.read_bytes()[:-10])
    fails(
        "verify",
        "--pub",
        str(pem),
        "--in",
        str(msg),
        "--sig",
        str(truncated),
        home=home,
        match="truncated",
    )
    fails(
        "sign",
        "dual",
        "--deterministic",
        "--in",
        str(msg),
        "--out",
        str(sig),
        home=home,
        match="deterministic ML-DSA signing is not available",
    )


def test_module_path_points_at_the_built_module(tmp_path: Path) -> None:
    proc = run_cli("module-path", home=tmp_path)
    if proc.returncode != 0:  # only when the C module was not built on this machine
        assert b"is not built: run `make -C pkcs11_shim/c`" in proc.stderr
        pytest.skip("pkcs11_shim/c is not built (./bootstrap.sh builds it)")
    path = Path(proc.stdout.decode().strip())
    assert path.name == "libpqhsm-pkcs11.so"
    assert path.is_file()
