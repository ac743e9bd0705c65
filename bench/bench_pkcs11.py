"""PKCS#11 server throughput (issue 6 targets), all in one run.

Run: ``.venv/bin/python bench/bench_pkcs11.py [SECONDS]`` (about a minute).  One appliance
on an embedded SoftHSM2 token serves its PKCS#11 server (``python -m pkcs11_shim serve``).

- ECDSA P-256: client processes load Debian's ``p11-kit-client.so`` and sign SHA-256
  digests with ``CKM_ECDSA`` for SECONDS each, 1 and 8 at once.  The baseline, in the same
  run, is one process signing with python-pkcs11 directly on the same SoftHSM2 token.
  Target: 8 clients >= 0.5x the baseline; p99 <= 5x p50.  The 8 clients also run
  against a second appliance (its own token, same keys) served with ``--processes 2``:
  the owner and one follower process, each serving half of the clients on its own core.
- ML-DSA-87: p11-kit's client cannot carry ``CKM_ML_DSA``, so 1 and 2 client processes
  load the project's own module (libpqhsm-pkcs11.so, built here from ``pkcs11_shim/c``).
  Target: 2 clients >= 1.8x one client (the server signs on both cores).

Setups alternate in four windows each (SECONDS in all per setup), so load from elsewhere
on a shared machine hits all of them alike.  Prints signs/s and p50/p99 latency per setup.
Every process signs the whole time; on a
2-core machine the clients compete with the server for the CPU, as they would on a real
host running its own applications.

It also prints the CPU time each signature costs, in the server process (what the
clients' connecting and logging in cost it measured apart and left out) and in the
client processes (their signing loops), and the ceiling that cost puts
on the machine: CPUs / (server + client CPU per signature), the rate every core busy would give.
A setup far below its ceiling waits (wake-ups, the GIL); one near it is CPU-bound, and
only a cheaper signature raises it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hardware.lab import make_home
from pkcs11_shim.launch import child_env, serve_argv

CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
#: Each setup runs in this many alternating windows of SECONDS / ROUNDS.
ROUNDS = 4

WORKER = r"""
import json, os, sys, time, hashlib
import pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass
module, label, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
pin = os.environ["PQHSM_TEST_PIN"]  # not argv: ps shows argv to everyone
lib = pkcs11.lib(module)
token = next(s.get_token() for s in lib.get_slots(token_present=True))
with token.open(user_pin=pin) as s:
    key = next(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}))
    digest = hashlib.sha256(b"bench").digest()
    lat = []
    cpu = time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        key.sign(digest, mechanism=Mechanism.ECDSA)
        lat.append(time.perf_counter() - t0)
print(json.dumps({"lat": lat, "cpu": time.process_time() - cpu}))
"""

MLDSA_WORKER = r"""
import json, os, sys, time
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
module, label, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
pin = os.environ["PQHSM_TEST_PIN"]  # not argv: ps shows argv to everyone
lib = pkcs11.lib(module)
token = lib.get_token()
with token.open(user_pin=pin) as s:
    key = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.ML_DSA, label=label)
    lat = []
    cpu = time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        key.sign(b"bench message", mechanism=Mechanism.ML_DSA)
        lat.append(time.perf_counter() - t0)
print(json.dumps({"lat": lat, "cpu": time.process_time() - cpu}))
"""


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def process_cpu(pid: int) -> float:
    """User + system CPU seconds a running server has used (``/proc/PID/stat``), with
    its child processes (a ``--processes`` server's followers) while they run."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat(int(entry))[1]) == pid:
                    pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total = 0
    for p in pids:
        try:
            fields = _stat(p)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def run_clients(
    n: int,
    module: str,
    env: dict[str, str],
    label: str,
    pin: str,
    seconds: float,
    worker: str = WORKER,
) -> tuple[list[float], float]:
    """All the clients' latencies, and the CPU seconds their signing loops used."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", worker, module, label, str(seconds)],
            env={**env, "PQHSM_TEST_PIN": pin},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    lat: list[float] = []
    cpu = 0.0
    for p in procs:
        out, err = p.communicate(timeout=seconds + 120)
        if p.returncode != 0:
            raise RuntimeError(err[-500:])
        result = json.loads(out.splitlines()[-1])
        lat += result["lat"]
        cpu += result["cpu"]
    return lat, cpu


def summary(
    name: str, lat: list[float], seconds: float, base: float | None, cpu: tuple[float, float]
) -> str:
    lat.sort()
    rate = len(lat) / seconds
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    ratio = f"{rate / base:.2f}x" if base else "baseline"
    server, clients = (c / len(lat) for c in cpu)
    ceiling = (os.cpu_count() or 1) / (server + clients)
    cap = f" ({ceiling / base:.2f}x)" if base else ""
    return (
        f"| {name} | {rate:.0f}/s | {p50 * 1e3:.2f} ms | {p99 * 1e3:.2f} ms | "
        f"{p99 / p50:.1f} | {ratio} | {server * 1e6:.0f} us | {clients * 1e6:.0f} us | "
        f"{ceiling:.0f}/s{cap} |"
    )


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    if not Path(CLIENT).is_file():
        print(f"p11-kit-client.so not found at {CLIENT}")
        return 1
    root = Path(tempfile.mkdtemp(prefix="pqhsm-bp-"))
    env = child_env()
    home, secrets = make_home(root, [("ecdsa-p256", "bench"), ("ml-dsa-87", "bench-mldsa")])
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
    (root / "two").mkdir()
    home2, secrets2 = make_home(root / "two", [("ecdsa-p256", "bench")])
    pin2 = (secrets2 / "token-pin").read_text().strip()
    sock2 = root / "p11-2.sock"
    server2 = subprocess.Popen(
        serve_argv(home2, sock2, secrets2, extra=("--processes", "2")),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not sock.exists() or not sock2.exists():
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
        client2_env = {**env, "P11_KIT_SERVER_ADDRESS": f"unix:path={sock2}"}
        module_env = {**env, "PQHSM_SERVER_ADDRESS": f"unix:path={sock}"}
        # Setups alternate in ROUNDS short windows, so that load from elsewhere on a
        # shared machine (and hedged ML-DSA's varying cost) hits every setup alike.
        window = seconds / ROUNDS
        first, second = (server.pid, pin), (server2.pid, pin2)
        setups: list[tuple[str, int, str, dict[str, str], str, str, tuple[int, str]]] = [
            ("direct", 1, softhsm, direct_env, "bench", WORKER, first),
            ("p11kit-1", 1, CLIENT, client_env, "bench", WORKER, first),
            ("p11kit-8", 8, CLIENT, client_env, "bench", WORKER, first),
            ("p11kit-8-x2", 8, CLIENT, client2_env, "bench", WORKER, second),
            ("mldsa-1", 1, str(own_module), module_env, "bench-mldsa", MLDSA_WORKER, first),
            ("mldsa-2", 2, str(own_module), module_env, "bench-mldsa", MLDSA_WORKER, first),
        ]
        lat: dict[str, list[float]] = {name: [] for name, *_ in setups}
        cpu = {name: [0.0, 0.0] for name, *_ in setups}  # server, clients
        for name, n, module, cenv, label, worker, (spid, spin) in setups:
            # what connecting costs the server (a client PIN login is an Argon2id check),
            # taken off the windows' server CPU below so that it counts signatures only
            s0 = process_cpu(spid)
            run_clients(n, module, cenv, label, spin, 0.0, worker)
            cpu[name][0] -= ROUNDS * (process_cpu(spid) - s0)
        for _ in range(ROUNDS):
            for name, n, module, cenv, label, worker, (spid, spin) in setups:
                s0 = process_cpu(spid)
                got, client_cpu = run_clients(n, module, cenv, label, spin, window, worker)
                lat[name] += got
                cpu[name][0] += process_cpu(spid) - s0
                cpu[name][1] += client_cpu
        cpu["direct"][0] = 0.0  # the server idles meanwhile

        def row(title: str, name: str, base: float | None) -> str:
            server_cpu, client_cpu = cpu[name]
            return summary(title, lat[name], seconds, base, (server_cpu, client_cpu))

        base = len(lat["direct"]) / seconds
        rows = [
            row("python-pkcs11 direct on SoftHSM2, 1 process", "direct", None),
            row("via p11-kit-client.so, 1 process", "p11kit-1", base),
            row("via p11-kit-client.so, 8 processes", "p11kit-8", base),
            row("via p11-kit-client.so, 8 processes, serve --processes 2", "p11kit-8-x2", base),
        ]
        one = len(lat["mldsa-1"]) / seconds
        ml_rows = [
            row("ML-DSA-87 via libpqhsm-pkcs11.so, 1 process", "mldsa-1", None),
            row("ML-DSA-87 via libpqhsm-pkcs11.so, 2 processes", "mldsa-2", one),
        ]
    finally:
        for srv in (server, server2):
            srv.terminate()
            srv.wait(timeout=15)
        shutil.rmtree(root, ignore_errors=True)
    print("# pqhsm PKCS#11 bench: ECDSA P-256 (CKM_ECDSA over a SHA-256 digest)\n")
    head = "| server CPU/sig | clients CPU/sig | CPU ceiling |"
    print(f"| setup | signs/s | p50 | p99 | p99/p50 | vs direct {head}")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    print("\n# ML-DSA-87 (CKM_ML_DSA, hedged, 13-byte message) through the project's module\n")
    print(f"| setup | signs/s | p50 | p99 | p99/p50 | vs 1 client {head}")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in ml_rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
