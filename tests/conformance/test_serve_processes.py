"""``serve --processes 2`` with real clients: Debian's p11-kit-client.so under
python-pkcs11, connections handed to a follower process, a key generated through the
follower, and every process gone after SIGTERM."""

from __future__ import annotations

import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from conftest import pin_env
from hardware.lab import make_home
from pkcs11_shim.launch import child_env, serve_argv

CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"

pytestmark = [
    pytest.mark.conformance,
    pytest.mark.softhsm,
    pytest.mark.skipif(
        not Path(CLIENT_MODULE).is_file(), reason=f"p11-kit-modules missing: {CLIENT_MODULE}"
    ),
]

# A client application: one p11-kit connection for its life, commands on stdin.
_CLIENT = r"""
import hashlib, os, sys
import pkcs11
from pkcs11 import Attribute as A, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters
token = pkcs11.lib(sys.argv[1]).get_token()
with token.open(user_pin=os.environ["PQHSM_TEST_PIN"], rw=True) as s:
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, label = line.split()
        if cmd == "sign":
            key = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label=label)
            sig = key.sign(hashlib.sha256(b"processes").digest(), mechanism=Mechanism.ECDSA)
            print(sig.hex(), flush=True)
        elif cmd == "gen":
            params = s.create_domain_parameters(
                KeyType.EC, {A.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
            )
            pub, _ = params.generate_keypair(
                store=True, label=label, capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY
            )
            print(pub[A.EC_POINT].hex(), flush=True)
"""


class Client:
    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, CLIENT_MODULE],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.ask(None) == "ready"

    def ask(self, command: str | None, timeout: float = 30.0) -> str:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no answer to {command!r} within {timeout} s"
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, dict[str, str]]]:
    home, secrets = make_home(tmp_path, [("ecdsa-p256", "pp-ec")])
    pin = (secrets / "token-pin").read_text().strip()
    sock = tmp_path / "run" / "p11.sock"
    server = subprocess.Popen(
        serve_argv(home, sock, secrets, extra=("--processes", "2")),
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdout.readline().strip() == f"P11_KIT_SERVER_ADDRESS=unix:path={sock}"
    env = {**child_env(), **pin_env(pin), "P11_KIT_SERVER_ADDRESS": f"unix:path={sock}"}
    try:
        yield server, home, env
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGCONT)
            server.terminate()
            server.wait(timeout=30)


def _verify(point_or_spki: bytes, sig_hex: str) -> None:
    if point_or_spki[0] == 0x04:  # DER OCTET STRING around an uncompressed point
        point = point_or_spki[2:]
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    else:
        loaded = serialization.load_der_public_key(point_or_spki)
        assert isinstance(loaded, ec.EllipticCurvePublicKey)
        key = loaded
    sig = bytes.fromhex(sig_hex)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    key.verify(der, hashlib.sha256(b"processes").digest(), ec.ECDSA(Prehashed(hashes.SHA256())))


def test_a_follower_serves_signs_and_creates_through_the_owner(
    served: tuple[subprocess.Popen[str], Path, dict[str, str]],
) -> None:
    server, home, env = served
    followers = _children(server.pid)
    assert len(followers) == 1, followers
    first = Client(env)  # the owner's turn
    second = Client(env)  # the follower's
    try:
        # with the owner stopped, only the follower can answer
        os.kill(server.pid, signal.SIGSTOP)
        try:
            sig = second.ask("sign pp-ec")
        finally:
            os.kill(server.pid, signal.SIGCONT)
        spki = _public_spki(home, "pp-ec")
        _verify(spki, sig)
        _verify(spki, first.ask("sign pp-ec"))
        # a key generated through the follower: the owner creates and commits it, the
        # follower signs with it, and the owner's client finds it
        point = bytes.fromhex(second.ask("gen pp-new"))
        _verify(point, second.ask("sign pp-new"))
        _verify(point, first.ask("sign pp-new"))
    finally:
        first.close()
        second.close()
    server.terminate()
    assert server.wait(timeout=30) == 0
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in followers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in followers)
    assert not list((home.parent / "run").iterdir())  # both sockets removed


def test_a_dead_follower_leaves_the_owner_serving(
    served: tuple[subprocess.Popen[str], Path, dict[str, str]],
) -> None:
    server, home, env = served
    (follower,) = _children(server.pid)
    os.kill(follower, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while _alive(follower) and time.monotonic() < deadline:
        time.sleep(0.05)
    spki = _public_spki(home, "pp-ec")
    clients = [Client(env) for _ in range(3)]  # one would have been the follower's
    try:
        for client in clients:
            _verify(spki, client.ask("sign pp-ec"))
    finally:
        for client in clients:
            client.close()


def _public_spki(home: Path, label: str) -> bytes:
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "--home", str(home), "key", "export-public", label],
        env=child_env(),
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    key = serialization.load_pem_public_key(out)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
