"""The shipped pytest plugin, used the way a developer's own suite would use it."""

from __future__ import annotations

import shutil

import pytest

pytestmark = [pytest.mark.softhsm, pytest.mark.conformance]

USER_SUITE = """
import os, subprocess, hashlib

def test_my_app_signs_through_pkcs11(pqhsm_server, tmp_path):
    env = {**os.environ, **pqhsm_server.env()}
    base = ["pkcs11-tool", "--module", pqhsm_server.module]
    listing = subprocess.run(base + ["-L"], env=env, capture_output=True, text=True, check=True).stdout
    assert pqhsm_server.token_label in listing
    digest = tmp_path / "d"
    digest.write_bytes(hashlib.sha256(b"my app's message").digest())
    out = tmp_path / "s"
    # the PIN from the environment (OpenSC 0.23+), not from argv, which ps shows everyone
    subprocess.run(base + ["--login", "--pin", "env:APP_PIN", "--sign", "-m", "ECDSA",
                           "--label", pqhsm_server.key_label, "-i", str(digest), "-o", str(out)],
                   env={**env, "APP_PIN": pqhsm_server.pin}, capture_output=True, check=True)
    assert len(out.read_bytes()) == 64

def test_the_fixture_is_shared(pqhsm_server):
    assert pqhsm_server.socket.exists()
    assert pqhsm_server.address.startswith("unix:path=")
"""


def test_plugin_gives_a_users_suite_a_running_appliance(pytester: pytest.Pytester) -> None:
    if shutil.which("pkcs11-tool") is None:
        pytest.skip("pkcs11-tool not installed (Debian package opensc)")
    pytester.makepyfile(test_user=USER_SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2)
