"""PKCS#11 signing through libpqhsm-pkcs11.so vs p11-kit-client.so vs direct, in one run.

Run: ``.venv/bin/python bench/bench_module.py [SECONDS]`` (about 2.5 min with the default 3 s).

Setup: one appliance (``pqhsm init --embedded-softhsm``) with an ECDSA P-256, an Ed25519
and an ML-DSA-87 key, served by ``python -m pkcs11_shim serve`` in its own process.  The
module is built with its Makefile into a temporary directory.  Each row runs client
processes (python-pkcs11) that sign for SECONDS and records every call's latency:

* ECDSA P-256 (``CKM_ECDSA`` over a SHA-256 digest): through our module, through
  ``p11-kit-client.so`` (the only one of the three it can carry), and directly with
  python-pkcs11 on the same SoftHSM2 token (the baseline);
* Ed25519 (``CKM_EDDSA``, 64-byte message): our module vs SoftHSM2 directly;
* ML-DSA-87 (``CKM_ML_DSA``, 64-byte message, hedged): our module vs ``cryptography``'s
  ``MLDSA87PrivateKey.sign`` in one process (the baseline; no token involved).  python-pkcs11
  makes two round trips per signature (``C_SignInit``, ``C_Sign``; the module answers the
  size query between them itself); the ``driver mldsa`` rows are a C client passing a
  4627-byte buffer at once, with one thread and with two threads (each on its own session)
  sharing the process's one multiplexed connection (extension v3), against
  ``cryptography`` signing in one process on as many threads.  The ML-DSA setups run in
  WINDOWS alternating windows of SECONDS each (one row: WINDOWS x SECONDS), as load
  from elsewhere on a shared machine swings single runs by +-15 %.
* The round-trip floor: a minimal signer (``cryptography`` in a forked process, one
  thread blocked on a Unix socket: receive, sign, send) and a client making one round
  trip per signature, no PKCS#11 and no server logic.  No design that signs in another
  process beats it on the same machine, so the one-client module rows also print their
  ratio to it: what pqhsm adds, apart from what a round trip costs here.
* All on CPU 0 (with ``taskset``): the server (every thread), one client and the
  in-process baseline pinned to one CPU.  On a VM, waking a halted virtual CPU is most of
  a cross-CPU round trip's cost; pinned, what remains is the software's own.

Per-call overhead of the module itself (target <= 20 us).  ``tests/module/driver.c`` is
linked against the module and, in C, (a) times N ``C_GetSessionInfo`` calls through the
module and (b) N round trips of the same request frame written by hand on a socket of its
own (one ``send`` of header + options + body, an exact-length read of the reply).  Both
talk to the same server, so the server's time cancels and the difference of the medians is
what the module adds on the client side: argument checks, the mutex, encoding, reply
validation, allocations.  Against the Python server the round trip is ~100 us and noisy,
so the same pair is also timed against ``driver echo``, a C server that answers from
canned replies, with client and echo server pinned to one CPU (``taskset``) to take the
scheduler's cross-CPU wake-up out of the figure.  Prints signs/s, p50/p99 and ratios.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hardware.lab import make_home
from pkcs11_shim.launch import serve_argv

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "pkcs11_shim" / "c"
DRIVER = ROOT / "tests" / "module" / "driver.c"
P11KIT_CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
CC = ("gcc", "-std=c11", "-O2", "-pthread")
#: The ML-DSA-87 setups alternate in this many windows of SECONDS each.
WINDOWS = 3
SOFTHSM = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")

WORKER = r"""
import hashlib, json, os, sys, time
import pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass
module, label, seconds, mech = sys.argv[1:5]
pin = os.environ["PQHSM_TEST_PIN"]  # not argv: ps shows argv to everyone
seconds = float(seconds)
lib = pkcs11.lib(module)
token = next(s.get_token() for s in lib.get_slots(token_present=True))
with token.open(user_pin=pin) as s:
    key = next(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}))
    data = hashlib.sha256(b"bench").digest() if mech == "ECDSA" else bytes(range(64))
    mechanism = getattr(Mechanism, mech)
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        key.sign(data, mechanism=mechanism)
        lat.append(time.perf_counter() - t0)
print(json.dumps(lat))
"""

INPROCESS_MLDSA = r"""
import json, sys, threading, time
from cryptography.hazmat.primitives.asymmetric import mldsa
seconds, threads = float(sys.argv[1]), int(sys.argv[2])
key = mldsa.MLDSA87PrivateKey.generate()
data = bytes(range(64))
lats = [[] for _ in range(threads)]
end = time.perf_counter() + seconds
def run(lat):
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        key.sign(data)  # cryptography signs without the GIL
        lat.append(time.perf_counter() - t0)
ts = [threading.Thread(target=run, args=(lat,)) for lat in lats]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(json.dumps([x for lat in lats for x in lat]))
"""


#: The floor of any design that signs in another process: a minimal signer (one thread
#: blocked on a Unix socket: receive, sign, send) and a client making one round trip per
#: signature, no PKCS#11 and no server logic.  What it loses against in-process signing
#: is what a round trip costs on this machine; the module rows are measured against it too.
ROUND_TRIP_FLOOR = r"""
import json, os, socket, sys, time
from cryptography.hazmat.primitives.asymmetric import mldsa
seconds = float(sys.argv[1])
data = bytes(range(64))
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
pid = os.fork()
if pid == 0:
    ours.close()
    key = mldsa.MLDSA87PrivateKey.generate()
    while True:
        message = b""
        while len(message) < 64 and (part := theirs.recv(64 - len(message))):
            message += part
        if len(message) < 64:
            os._exit(0)
        theirs.sendall(key.sign(message))
theirs.close()
lat = []
end = time.perf_counter() + seconds
while time.perf_counter() < end:
    t0 = time.perf_counter()
    ours.sendall(data)
    got = 0
    while got < 4627:
        got += len(ours.recv(8192))
    lat.append(time.perf_counter() - t0)
ours.close()
os.waitpid(pid, 0)
print(json.dumps(lat))
"""


def run(argvs: list[list[str]], env: dict[str, str], timeout: float) -> list[float]:
    """Run the client processes at once; all their latencies."""
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv in argvs
    ]
    lat: list[float] = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(err[-800:])
        lat += json.loads(out.splitlines()[-1])
    return lat


def row(
    name: str, lat: list[float], seconds: float, base: float | None, floor: float | None = None
) -> tuple[str, float]:
    lat.sort()
    rate = len(lat) / seconds
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    ratio = f"{rate / base:.2f}x" if base else "baseline"
    if floor:
        ratio += f" ({rate / floor:.2f}x the round-trip floor)"
    text = f"| {name} | {rate:.0f}/s | {p50 * 1e3:.3f} ms | {p99 * 1e3:.3f} ms | {ratio} |"
    return text, rate


def overhead(
    driver: Path, env: dict[str, str], sock: Path, n: int, pin: str | None
) -> dict[str, int]:
    cmd = [str(driver), "overhead", str(sock), str(n)]
    if pin is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", pin, *cmd]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=120)
    return {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}


def c_latencies(argv: list[str], env: dict[str, str]) -> list[float]:
    """Latencies printed by ``driver mldsa`` (nanoseconds after a count)."""
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=300)
    return [int(x) / 1e9 for x in out.stdout.split()[1:]]


def mldsa_rows(
    seconds: float,
    env: dict[str, str],
    ours: dict[str, str],
    py_client: list[str],
    c_client: list[str],
    server: int | None,
) -> list[str]:
    """The ML-DSA-87 rows, measured in WINDOWS alternating windows of SECONDS each so a
    slow stretch of a shared machine hits every setup alike.

    With ``server`` (its pid; needs ``taskset``), one client and the server (all its
    threads) are also measured on CPU 0 only, against in-process signing on CPU 0: what
    the software costs without the machine's cross-CPU wake-ups (on a VM, waking a halted
    virtual CPU is most of what a round trip costs).
    """
    timeout = seconds + 120
    inproc = [sys.executable, "-c", INPROCESS_MLDSA, str(seconds)]
    one_cpu = ["taskset", "-c", "0"]
    setups: dict[str, Callable[[], list[float]]] = {
        "in1": lambda: run([[*inproc, "1"]], env, timeout),
        "in2": lambda: run([[*inproc, "2"]], env, timeout),
        "floor": lambda: run(
            [[sys.executable, "-c", ROUND_TRIP_FLOOR, str(seconds)]], env, timeout
        ),
        "py1": lambda: run([py_client], ours, timeout),
        "py2": lambda: run([py_client] * 2, ours, timeout),
        "c1": lambda: c_latencies([*c_client, "1"], ours),
        "c2": lambda: c_latencies([*c_client, "2"], ours),
    }
    pinned: dict[str, Callable[[], list[float]]] = {
        "cpu0 in1": lambda: run([[*one_cpu, *inproc, "1"]], env, timeout),
        "cpu0 py1": lambda: run([[*one_cpu, *py_client]], ours, timeout),
        "cpu0 c1": lambda: c_latencies([*one_cpu, *c_client, "1"], ours),
    }
    lats: dict[str, list[float]] = {}
    every = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    for _ in range(WINDOWS):
        for name, measure in setups.items():
            lats.setdefault(name, []).extend(measure())
        if server is None:
            continue
        subprocess.run(
            ["taskset", "-a", "-p", "-c", "0", str(server)], capture_output=True, check=True
        )
        try:
            for name, measure in pinned.items():
                lats.setdefault(name, []).extend(measure())
        finally:
            subprocess.run(["taskset", "-a", "-p", "-c", every, str(server)], capture_output=True)
    total = seconds * WINDOWS
    rate = {name: len(lat) / total for name, lat in lats.items()}
    in1, in2, floor = rate["in1"], rate["in2"], rate["floor"]
    table = (
        ("in1", "ML-DSA-87: cryptography in-process, 1 thread", None, None),
        ("in2", "ML-DSA-87: cryptography in-process, 2 threads", None, None),
        ("floor", "ML-DSA-87: round-trip floor (a minimal signer in another process)", in1, None),
        ("py1", "ML-DSA-87: via libpqhsm-pkcs11.so, python-pkcs11, 1 proc", in1, floor),
        ("py2", "ML-DSA-87: via libpqhsm-pkcs11.so, python-pkcs11, 2 procs", in1, None),
        ("c1", "ML-DSA-87: via libpqhsm-pkcs11.so, C client, 1 thread", in1, floor),
        ("c2", "ML-DSA-87: via libpqhsm-pkcs11.so, C client, 2 threads, one connection", in2, None),
        ("cpu0 in1", "ML-DSA-87, all on CPU 0: cryptography in-process, 1 thread", None, None),
        ("cpu0 py1", "ML-DSA-87, all on CPU 0: via libpqhsm-pkcs11.so, python-pkcs11", None, None),
        ("cpu0 c1", "ML-DSA-87, all on CPU 0: via libpqhsm-pkcs11.so, C client", None, None),
    )
    rows = []
    for name, title, base, floor_rate in table:
        if name not in lats:
            continue
        if name.startswith("cpu0 ") and name != "cpu0 in1":
            base = rate["cpu0 in1"]
        rows.append(row(title, lats[name], total, base, floor_rate)[0])
    rows.append(
        f"| ML-DSA-87: 2 python-pkcs11 procs vs 1 | {rate['py2'] / rate['py1']:.2f}x | | | |"
    )
    return rows


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    softhsm = next((m for m in SOFTHSM if Path(m).is_file()), None)
    if softhsm is None or not Path(P11KIT_CLIENT).is_file():
        print("needs SoftHSM2 and p11-kit-client.so")
        return 1
    root = Path(tempfile.mkdtemp(prefix="pqhsm-bm-", dir="/tmp"))
    build = root / "build"
    build.mkdir()
    subprocess.run(
        ["make", "-s", "-C", str(SOURCE), f"OUT={build}"], check=True, capture_output=True
    )
    module = build / "libpqhsm-pkcs11.so"
    driver = build / "driver"
    subprocess.run(
        [
            *CC,
            "-I",
            str(SOURCE),
            str(DRIVER),
            "-o",
            str(driver),
            str(module),
            f"-Wl,-rpath,{build}",
        ],
        check=True,
        capture_output=True,
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PQHSM_", "P11_KIT_")) and k != "SOFTHSM2_CONF"
    }

    home, secrets = make_home(
        root, [("ecdsa-p256", "b-ec"), ("ed25519", "b-ed"), ("ml-dsa-87", "b-ml")]
    )
    pin = (secrets / "token-pin").read_text().strip()
    sock = root / "p11.sock"
    server = subprocess.Popen(
        serve_argv(home, sock, secrets, unlock=True),  # unlocked: ML-DSA signs
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    echo_sock = root / "echo.sock"
    pin_cpu = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    echo = subprocess.Popen(
        [*pin_cpu, str(driver), "echo", str(echo_sock)],
        stdout=subprocess.DEVNULL,
    )
    rows: list[str] = []
    timeout = seconds + 120
    try:
        while not sock.exists() or not echo_sock.exists():
            time.sleep(0.05)
        login = {"PQHSM_TEST_PIN": pin}  # the clients' PIN, in their environment only
        direct = {**env, **login, "SOFTHSM2_CONF": str(home / "softhsm" / "softhsm2.conf")}
        ours = {**env, **login, "PQHSM_SERVER_ADDRESS": f"unix:path={sock}"}
        p11kit = {**env, **login, "P11_KIT_SERVER_ADDRESS": f"unix:path={sock}"}

        def worker(mod: str, label: str, mech: str) -> list[str]:
            return [sys.executable, "-c", WORKER, mod, label, str(seconds), mech]

        for title, label, mech in (("ECDSA P-256", "b-ec", "ECDSA"), ("Ed25519", "b-ed", "EDDSA")):
            text, base = row(
                f"{title}: python-pkcs11 direct on SoftHSM2",
                run([worker(softhsm, label, mech)], direct, timeout),
                seconds,
                None,
            )
            rows.append(text)
            targets = [("libpqhsm-pkcs11.so", str(module), ours)]
            if mech == "ECDSA":
                targets.append(("p11-kit-client.so", P11KIT_CLIENT, p11kit))
            for name, mod, e in targets:
                for n in (1, 4):
                    lat = run([worker(mod, label, mech)] * n, e, timeout)
                    rows.append(row(f"{title}: via {name}, {n} proc", lat, seconds, base)[0])
        c_client = [str(driver), "mldsa", "b-ml", str(seconds)]
        rows += mldsa_rows(
            seconds,
            env,
            ours,
            worker(str(module), "b-ml", "ML_DSA"),
            c_client,
            server.pid if pin_cpu else None,
        )
        n_calls = 20000
        real = overhead(driver, ours, sock, n_calls, None)
        canned = overhead(
            driver,
            {**env, "PQHSM_SERVER_ADDRESS": f"unix:path={echo_sock}"},
            echo_sock,
            n_calls,
            "0",
        )
    finally:
        echo.terminate()
        server.terminate()
        server.wait(timeout=15)
        echo.wait(timeout=15)
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"# pqhsm module bench ({seconds:.0f} s per row, ML-DSA {WINDOWS} x {seconds:.0f} s, "
        f"{os.cpu_count()} CPUs)\n"
    )
    print("| setup | signs/s | p50 | p99 | vs baseline |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(r)
    print("\n# per-call overhead: C_GetSessionInfo through the module vs the same raw frame\n")
    print("| server | module p50 | raw p50 | module adds (p50) | module p99 | raw p99 |")
    print("|---|---|---|---|---|---|")
    for name, d in (("python server", real), ("C canned-reply server, 1 CPU", canned)):
        add = (d["module_p50_ns"] - d["raw_p50_ns"]) / 1e3
        print(
            f"| {name} | {d['module_p50_ns'] / 1e3:.1f} us | {d['raw_p50_ns'] / 1e3:.1f} us | "
            f"{add:.1f} us | {d['module_p99_ns'] / 1e3:.1f} us | {d['raw_p99_ns'] / 1e3:.1f} us |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
