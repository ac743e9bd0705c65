"""PKCS#11 server throughput (issue 6 targets), all in one run.

Run: ``.venv/bin/python bench/bench_pkcs11.py [SECONDS]`` (about a minute).  One appliance
on an embedded SoftHSM2 token serves its PKCS#11 server (``python -m pkcs11_shim serve``).

- ECDSA P-256: client processes load Debian's ``p11-kit-client.so`` and sign SHA-256
  digests with ``CKM_ECDSA`` for SECONDS each, 1 and 8 at once.  The baseline, in the same
  run, is one process signing with python-pkcs11 directly on the same SoftHSM2 token.
  Target: 8 clients >= 0.5x the baseline; p99 <= 5x p50.
- ML-DSA-87: p11-kit's client cannot carry ``CKM_ML_DSA``, so 1 and 2 client processes
  load the project's own module (libpqhsm-pkcs11.so, built here from ``pkcs11_shim/c``).
  Target: 2 clients >= 1.8x one client (the server signs on both cores).

Setups alternate in four windows each (SECONDS in all per setup), so load from elsewhere
on a shared machine hits all of them alike.  Prints signs/s and p50/p99 latency per setup.
Every process signs the whole time; on a
2-core machine the clients compete with the server for the CPU, as they would on a real
host running its own applications.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pkcs11_shim.launch import child_env, serve_argv

CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
#: Each setup runs in this many alternating windows of SECONDS / ROUNDS.
ROUNDS = 4

WORKER = r"""
import json, os, sys, time, hashlib
import pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass
module, label, pin, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
lib = pkcs11.lib(module)
token = next(s.get_token() for s in lib.get_slots(token_present=True))
with token.open(user_pin=pin) as s:
    key = next(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}))
    digest = hashlib.sha256(b"bench").digest()
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        key.sign(digest, mechanism=Mechanism.ECDSA)
        lat.append(time.perf_counter() - t0)
print(json.dumps(lat))
"""

MLDSA_WORKER = r"""
import json, sys, time
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
module, label, pin, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
lib = pkcs11.lib(module)
token = lib.get_token()
with token.open(user_pin=pin) as s:
    key = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.ML_DSA, label=label)
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        key.sign(b"bench message", mechanism=Mechanism.ML_DSA)
        lat.append(time.perf_counter() - t0)
print(json.dumps(lat))
"""


def run_clients(
    n: int,
    module: str,
    env: dict[str, str],
    label: str,
    pin: str,
    seconds: float,
    worker: str = WORKER,
) -> list[float]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", worker, module, label, pin, str(seconds)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    lat: list[float] = []
    for p in procs:
        out, err = p.communicate(timeout=seconds + 120)
        if p.returncode != 0:
            raise RuntimeError(err[-500:])
        lat += json.loads(out.splitlines()[-1])
    return lat


def summary(name: str, lat: list[float], seconds: float, base: float | None) -> str:
    lat.sort()
    rate = len(lat) / seconds
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    ratio = f"{rate / base:.2f}x" if base else "baseline"
    return (
        f"| {name} | {rate:.0f}/s | {p50 * 1e3:.2f} ms | {p99 * 1e3:.2f} ms | "
        f"{p99 / p50:.1f} | {ratio} |"
    )


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    if not Path(CLIENT).is_file():
        print(f"p11-kit-client.so not found at {CLIENT}")
        return 1
    root = Path(tempfile.mkdtemp(prefix="pqhsm-bp-"))
    home, secrets = root / "home", root / "secrets"
    env = child_env()

    def pq(*args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "appliance", "--home", str(home), *args],
            env=env,
            check=True,
            capture_output=True,
        )

    pq(
        "init",
        "--embedded-softhsm",
        "--generate-secrets",
        str(secrets),
        "--pbkdf2-iterations",
        "1000",
    )
    pq("key", "create", "--type", "ecdsa-p256", "--label", "bench")
    unlock = ["--passphrase-file", str(secrets / "passphrase")]
    pq("key", "create", "--type", "ml-dsa-87", "--label", "bench-mldsa", *unlock)
    pin = (secrets / "token-pin").read_text().strip()
    own_module = root / "libpqhsm-pkcs11.so"
    subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(Path(__file__).resolve().parents[1] / "pkcs11_shim" / "c"),
            f"OUT={root}",
        ],
        check=True,
        capture_output=True,
    )
    sock = root / "p11.sock"
    server = subprocess.Popen(
        serve_argv(home, sock, secrets, unlock=True),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not sock.exists():
            time.sleep(0.05)
        direct_env = {**env, "SOFTHSM2_CONF": str(home / "softhsm" / "softhsm2.conf")}
        softhsm = next(
            m
            for m in (
                "/usr/lib/softhsm/libsofthsm2.so",
                "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
            )
            if Path(m).is_file()
        )
        client_env = {**env, "P11_KIT_SERVER_ADDRESS": f"unix:path={sock}"}
        module_env = {**env, "PQHSM_SERVER_ADDRESS": f"unix:path={sock}"}
        # Setups alternate in ROUNDS short windows, so that load from elsewhere on a
        # shared machine (and hedged ML-DSA's varying cost) hits every setup alike.
        window = seconds / ROUNDS
        setups: list[tuple[str, int, str, dict[str, str], str, str]] = [
            ("direct", 1, softhsm, direct_env, "bench", WORKER),
            ("p11kit-1", 1, CLIENT, client_env, "bench", WORKER),
            ("p11kit-8", 8, CLIENT, client_env, "bench", WORKER),
            ("mldsa-1", 1, str(own_module), module_env, "bench-mldsa", MLDSA_WORKER),
            ("mldsa-2", 2, str(own_module), module_env, "bench-mldsa", MLDSA_WORKER),
        ]
        lat: dict[str, list[float]] = {name: [] for name, *_ in setups}
        for _ in range(ROUNDS):
            for name, n, module, cenv, label, worker in setups:
                lat[name] += run_clients(n, module, cenv, label, pin, window, worker)
        base = len(lat["direct"]) / seconds
        rows = [
            summary("python-pkcs11 direct on SoftHSM2, 1 process", lat["direct"], seconds, None),
            summary("via p11-kit-client.so, 1 process", lat["p11kit-1"], seconds, base),
            summary("via p11-kit-client.so, 8 processes", lat["p11kit-8"], seconds, base),
        ]
        one = len(lat["mldsa-1"]) / seconds
        ml_rows = [
            summary("ML-DSA-87 via libpqhsm-pkcs11.so, 1 process", lat["mldsa-1"], seconds, None),
            summary("ML-DSA-87 via libpqhsm-pkcs11.so, 2 processes", lat["mldsa-2"], seconds, one),
        ]
    finally:
        server.terminate()
        server.wait(timeout=15)
        shutil.rmtree(root, ignore_errors=True)
    print("# pqhsm PKCS#11 bench: ECDSA P-256 (CKM_ECDSA over a SHA-256 digest)\n")
    print("| setup | signs/s | p50 | p99 | p99/p50 | vs direct |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    print("\n# ML-DSA-87 (CKM_ML_DSA, hedged, 13-byte message) through the project's module\n")
    print("| setup | signs/s | p50 | p99 | p99/p50 | vs 1 client |")
    print("|---|---|---|---|---|---|")
    for r in ml_rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
