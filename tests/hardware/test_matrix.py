"""The token lab matrix (issue 9 item 3) against SoftHSM2 and the pqhsm PKCS#11 server.

One real run of ``pqhsm lab run lab.toml`` (a child process, as an operator runs it) with a
short signing window, over three targets: SoftHSM2, pqhsm's own module
(``libpqhsm-pkcs11.so``, built with ``make`` first, as bootstrap.sh does) in front of a
temporary appliance, and Debian's ``p11-kit-client.so`` in front of another; the tests then
read its ``report.json`` and ``report.html``.  Config errors and the exit-code rule are
checked in-process; the older ``python -m hardware.matrix`` entry point once more.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from hardware.matrix import (
    FAIL,
    OWN_MODULE,
    PASS,
    Check,
    LabConfig,
    MatrixConfigError,
    MatrixReport,
    TokenResult,
    machine_info,
    main,
    render_html,
)

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
MISSING = "/nonexistent/yubihsm_pkcs11.so"
EVIL_NAME = 'YubiHSM 2 <b>via</b> OpenSC & "co"'

LAB_TOML = f"""
ops_seconds = 0.2

[[token]]
name = "SoftHSM2"
module = "{SOFTHSM}"
init = "softhsm-temp"

[[token]]
name = "pqhsm module"
init = "pqhsm-module"

[[token]]
name = "pqhsm via p11-kit-client"
module = "{CLIENT}"
init = "pqhsm-server"

[[token]]
name = {json.dumps(EVIL_NAME)}
module = "{MISSING}"
label = "yubi"
pin_file = "yubi.pin"
"""

pytestmark = [
    pytest.mark.softhsm,
    pytest.mark.skipif(not Path(SOFTHSM).is_file(), reason="SoftHSM2 not installed"),
    pytest.mark.skipif(not Path(CLIENT).is_file(), reason="p11-kit-client.so missing"),
]


@dataclass
class Run:
    rc: int
    stdout: str
    report: dict[str, Any]
    html: str

    def token(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = next(t for t in self.report["tokens"] if t["name"] == name)
        return found

    def checks(self, name: str) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in self.token(name)["checks"]}


def _build_own_module() -> None:
    """``make -C pkcs11_shim/c`` as bootstrap.sh runs it: rebuilds only what changed."""
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.skip("gcc and make are needed to build libpqhsm-pkcs11.so")
    proc = subprocess.run(
        ["make", "-s", "-C", str(OWN_MODULE.parent)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert OWN_MODULE.is_file()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    _build_own_module()
    root = tmp_path_factory.mktemp("matrix")
    (root / "lab.toml").write_text(LAB_TOML)
    out = root / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "lab",
            "run",
            str(root / "lab.toml"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode in (0, 2), f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return Run(
        rc=proc.returncode,
        stdout=proc.stdout,
        report=json.loads((out / "report.json").read_text()),
        html=(out / "report.html").read_text(encoding="utf-8"),
    )


def test_exit_code_and_summary_lines(run: Run) -> None:
    assert run.rc == 0, run.stdout
    assert run.report["passed"] is True
    lines = run.stdout.splitlines()
    assert lines[0].startswith("SoftHSM2: ok:")
    assert lines[1].startswith("pqhsm module: ok:")
    assert lines[2].startswith("pqhsm via p11-kit-client: ok:")
    assert lines[3] == f"{EVIL_NAME}: skipped: module not found at {MISSING}"


def test_softhsm_every_check_passes(run: Run) -> None:
    token = run.token("SoftHSM2")
    assert token["status"] == "ran"
    assert token["token"]["label"] == "matrix"
    assert {"EC_KEY_PAIR_GEN", "ECDSA", "EC_EDWARDS_KEY_PAIR_GEN", "EDDSA"} <= set(
        token["mechanisms"]
    )
    assert "SIGN" in token["mechanisms"]["ECDSA"]
    checks = run.checks("SoftHSM2")
    for alg in ("ec-p256", "ec-p384", "ed25519", "ed448"):
        for step in ("keygen", "sign-verify", "ops", "destroy"):
            assert checks[f"{step}:{alg}"]["status"] == PASS, checks[f"{step}:{alg}"]
        assert "verified" in checks[f"sign-verify:{alg}"]["detail"]
        assert checks[f"sign-verify:{alg}"]["seconds"] > 0
    assert token["ops"]["ec-p256"] > 50
    # SoftHSM2 has no ML-DSA: recorded as unsupported, never as a failure
    assert checks["sign-verify:ml-dsa-87"]["status"] == "unsupported"


def test_own_module_signs_every_algorithm_and_migrates(run: Run) -> None:
    token = run.token("pqhsm module")
    assert token["status"] == "ran"
    assert token["module"] == str(OWN_MODULE)
    # the extension's mechanisms: EdDSA, ECDSA with hashing, CKM_ML_DSA (0x1d)
    assert {"ECDSA", "ECDSA_SHA256", "EDDSA", "ML_DSA"} <= set(token["mechanisms"])
    assert "SIGN" in token["mechanisms"]["ML_DSA"]
    checks = run.checks("pqhsm module")
    assert not [c for c in checks.values() if c["status"] == FAIL], checks
    for name in (
        "sign-verify:ec-p256",
        "sign-verify:ec-p256:ECDSA_SHA256",
        "sign-verify:ec-p384",
        "sign-verify:ec-p384:ECDSA_SHA384",
        "sign-verify:ed25519",
        "sign-verify:ed448",
        "sign-verify:ml-dsa-87",
        "ops:ml-dsa-87",
    ):
        assert checks[name]["status"] == PASS, checks[name]
        assert "verified" in checks[name]["detail"]
    assert "4627-byte signature" in checks["sign-verify:ml-dsa-87"]["detail"]  # ML-DSA-87
    assert "64-byte" in checks["sign-verify:ed25519"]["detail"]
    assert "114-byte" in checks["sign-verify:ed448"]["detail"]
    # keys are the operator's: the module has no C_GenerateKeyPair, existing keys are used
    assert "using an existing key" in checks["keygen:ec-p256"]["detail"]
    assert set(token["ops"]) == {"ec-p256", "ec-p384", "ed25519", "ed448", "ml-dsa-87"}
    migration = checks["migration:pqc-only"]
    assert migration["status"] == PASS, migration
    assert "-> 0" in migration["detail"]
    assert "ML-DSA objects for all 3" in migration["detail"]


def test_pqhsm_server_signs_and_migration_drops_private_objects(run: Run) -> None:
    token = run.token("pqhsm via p11-kit-client")
    assert token["status"] == "ran"
    assert token["mechanisms"]
    assert "ECDSA" in token["mechanisms"]
    checks = run.checks("pqhsm via p11-kit-client")
    assert not [c for c in checks.values() if c["status"] == FAIL]
    for alg in ("ec-p256", "ec-p384"):
        # keygen through the shim may not be supported yet: recorded, never a failure
        assert checks[f"keygen:{alg}"]["status"] in (PASS, "unsupported")
        assert checks[f"sign-verify:{alg}"]["status"] == PASS
        assert "verified" in checks[f"sign-verify:{alg}"]["detail"]
    assert checks["sign-verify:ed25519"]["status"] == "unsupported"
    assert token["ops"]["ec-p256"] > 0
    migration = checks["migration:pqc-only"]
    assert migration["status"] == PASS, migration
    assert "-> 0" in migration["detail"]


def test_missing_module_is_skipped(run: Run) -> None:
    token = run.token(EVIL_NAME)
    assert token["status"] == "skipped"
    assert token["reason"] == f"module not found at {MISSING}"
    assert token["checks"] == []


class _Collector(HTMLParser):
    """Start tags and text, as a browser would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_is_self_contained_and_escaped(run: Run) -> None:
    parser = _Collector()
    parser.feed(run.html)
    parser.close()
    assert "svg" in parser.tags
    assert parser.tags.count("rect") >= 11  # 4 SoftHSM2 + 5 own module + 2 p11-kit-client
    assert "b" not in parser.tags  # the token name's <b> stayed text
    text = "".join(parser.text)
    assert EVIL_NAME in text
    assert "&lt;b&gt;via&lt;/b&gt; OpenSC &amp; &quot;co&quot;" in run.html
    for needle in (
        "pqhsm token lab matrix",
        SOFTHSM,
        CLIENT,
        str(OWN_MODULE),
        "CKM_ML_DSA",
        "Mechanism coverage",
        "✓",
        "✗",
    ):
        assert needle in text
    assert run.report["machine"]["python"] in text
    for external in ("<script", "<link", "src=", "@import", "url("):
        assert external not in run.html


# -- in-process: config errors and the exit-code rule --------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[token]]\nname = "x"\nmodule = "/m.so"\ninit = "softhsm-temp"\ncolour = 1\n', "colour"),
        ('[[token]]\nname = "x"\ninit = "softhsm-temp"\n', "'module'"),
        ('[[token]]\nname = "x"\nmodule = "/m.so"\ninit = "magic"\n', "init must be"),
        ('[[token]]\nname = "x"\nmodule = "/m.so"\n', "needs init or pin_file"),
        ("tokens = []\n", "unknown key"),
        (
            '[[token]]\nname = "x"\nmodule = "/m.so"\ninit = "softhsm-temp"\nops_seconds = "a"\n',
            "ops_seconds",
        ),
        ("not toml [", "lab.toml"),
    ],
)
def test_config_error_is_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, message: str
) -> None:
    (tmp_path / "lab.toml").write_text(toml)
    rc = main(["run", str(tmp_path / "lab.toml"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_config_loads_and_resolves_pin_file(tmp_path: Path) -> None:
    (tmp_path / "lab.toml").write_text(LAB_TOML)
    config = LabConfig.from_toml(tmp_path / "lab.toml")
    assert config.ops_seconds == 0.2
    assert [t.init for t in config.tokens] == [
        "softhsm-temp",
        "pqhsm-module",
        "pqhsm-server",
        None,
    ]
    assert config.tokens[1].module == str(OWN_MODULE)  # the default for pqhsm-module
    assert config.tokens[3].pin_file == tmp_path / "yubi.pin"
    with pytest.raises(MatrixConfigError):
        LabConfig.from_toml(tmp_path / "missing.toml")


def test_a_failed_check_means_exit_2() -> None:
    report = MatrixReport(created="now", machine=machine_info(), ops_seconds=0.1)
    report.tokens.append(TokenResult(name="a", module="/a.so", init=None, status="skipped"))
    assert report.exit_code == 0
    bad = TokenResult(name="b<", module="/b.so", init=None)
    bad.checks.append(Check("sign-verify:ec-p256", FAIL, 0.01, "SignatureInvalid"))
    report.tokens.append(bad)
    assert report.exit_code == 2
    assert "FAILED sign-verify:ec-p256" in bad.summary()
    page = render_html(report)
    assert "b&lt;" in page
    assert "No signing throughput" in page


def test_old_entry_point_and_cli_agree_on_config_errors(tmp_path: Path) -> None:
    (tmp_path / "lab.toml").write_text('[[token]]\nname = "x"\nmodule = "/m.so"\ninit = "magic"\n')
    outs = []
    for argv in (["-m", "hardware.matrix", "run"], ["-m", "appliance", "lab", "run"]):
        proc = subprocess.run(
            [sys.executable, *argv, str(tmp_path / "lab.toml"), "--out", str(tmp_path / "out")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        outs.append(proc.stderr)
    assert outs[0] == outs[1]
    assert "init must be one of softhsm-temp, pqhsm-server, pqhsm-module" in outs[0]
