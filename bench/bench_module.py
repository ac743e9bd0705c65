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
  ``MLDSA87PrivateKey.sign`` in a process of its own (the baseline; no token involved).
  python-pkcs11 makes one round trip per signature (the module answers the size query
  itself and sends a repeated ``C_SignInit`` with the ``C_Sign``, extension v4); the C
  client (``driver mldsa``) passes a 4627-byte buffer at once, with one thread and with two
  threads (each on its own session) sharing the process's one multiplexed connection,
  against ``cryptography`` signing in one process on as many threads.  Every ML-DSA setup's
  clients are started first and then sign in turns of WINDOW_MS (200 ms; the others
  idle) until each has signed for SHARE x SECONDS: load from elsewhere on a shared machine
  swings the rate by +-15 % within seconds, and turns this short hit every setup alike
  (3 s turns left the baseline and the module rows seconds apart, and their ratio moved
  with the machine more than with the code).
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
from pathlib import Path

from hardware.lab import make_home
from pkcs11_shim.launch import serve_argv

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "pkcs11_shim" / "c"
DRIVER = ROOT / "tests" / "module" / "driver.c"
P11KIT_CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
CC = ("gcc", "-std=c11", "-O2", "-pthread")
#: Each ML-DSA-87 setup signs for SHARE x SECONDS in all, in turns of WINDOW_MS.
SHARE = 3
WINDOW_MS = 200
SOFTHSM = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")

#: Windows paced from standard input, for the ML-DSA rows: a client prints "ready", then
#: for each line "MS" signs for MS milliseconds (on THREADS threads) and prints one line,
#: the window's length in ns and then each signature's latency in ns, as ``driver mldsa
#: LABEL -`` does.  Prepended to the ML-DSA scripts below.
PACED = r"""
import sys, threading, time
def paced(sign, threads=1):
    print("ready", flush=True)
    for line in sys.stdin:
        end = time.perf_counter() + float(line) / 1e3
        lats = [[] for _ in range(threads)]
        def run(lat):
            while time.perf_counter() < end:
                t0 = time.perf_counter_ns()
                sign()
                lat.append(time.perf_counter_ns() - t0)
        start = time.perf_counter_ns()
        if threads == 1:
            run(lats[0])
        else:
            ts = [threading.Thread(target=run, args=(lat,)) for lat in lats]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        took = time.perf_counter_ns() - start
        print(took, *(x for lat in lats for x in lat), flush=True)
"""

WORKER = r"""
import hashlib, json, os, sys, time
import pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass
module, label, seconds, mech = sys.argv[1:5]
pin = os.environ["PQHSM_TEST_PIN"]  # not argv: ps shows argv to everyone
lib = pkcs11.lib(module)
token = next(s.get_token() for s in lib.get_slots(token_present=True))
with token.open(user_pin=pin) as s:
    key = next(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}))
    data = hashlib.sha256(b"bench").digest() if mech == "ECDSA" else bytes(range(64))
    mechanism = getattr(Mechanism, mech)
    if seconds == "-":
        paced(lambda: key.sign(data, mechanism=mechanism))
        sys.exit(0)
    lat = []
    end = time.perf_counter() + float(seconds)
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        key.sign(data, mechanism=mechanism)
        lat.append(time.perf_counter() - t0)
print(json.dumps(lat))
"""

#: The baseline: ``cryptography`` signing in a process of its own (paced).
INPROCESS_MLDSA = r"""
from cryptography.hazmat.primitives.asymmetric import mldsa
key = mldsa.MLDSA87PrivateKey.generate()
data = bytes(range(64))
paced(lambda: key.sign(data), int(sys.argv[1]))  # cryptography signs without the GIL
"""


#: The floor of any design that signs in another process: a minimal signer (one thread
#: blocked on a Unix socket: receive, sign, send) and a client making one round trip per
#: signature, no PKCS#11 and no server logic.  What it loses against in-process signing
#: is what a round trip costs on this machine; the module rows are measured against it too.
ROUND_TRIP_FLOOR = r"""
import os, socket
from cryptography.hazmat.primitives.asymmetric import mldsa
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
def round_trip():
    ours.sendall(data)
    got = 0
    while got < 4627:
        got += len(ours.recv(8192))
paced(round_trip)
ours.close()
os.waitpid(pid, 0)
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


class Paced:
    """One ML-DSA setup's client processes, signing in windows paced on their stdin (all
    of them at once for each window)."""

    def __init__(self, argvs: list[list[str]], env: dict[str, str]) -> None:
        self.procs = [
            subprocess.Popen(
                argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            for argv in argvs
        ]
        self.lat: list[float] = []
        self.seconds = 0.0
        for p in self.procs:
            if p.stdout is None or p.stdout.readline().strip() != "ready":
                self.close()
                raise RuntimeError(f"{argvs[0][:4]} did not start")

    def window(self, ms: int) -> None:
        for p in self.procs:
            if p.stdin is not None:
                p.stdin.write(f"{ms}\n")
                p.stdin.flush()
        took = 0
        for p in self.procs:
            line = p.stdout.readline() if p.stdout is not None else ""
            if not line:
                raise RuntimeError(f"a paced client ended (exit {p.wait()})")
            ns, *lat = (int(x) for x in line.split())
            took = max(took, ns)
            self.lat += [x / 1e9 for x in lat]
        self.seconds += took / 1e9

    def close(self) -> None:
        for p in self.procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def interleave(setups: dict[str, Paced], seconds: float) -> None:
    """Give each setup windows of :data:`WINDOW_MS` in turn until each has signed for
    ``seconds``: a slow stretch of the shared machine then hits every setup alike."""
    for _ in range(max(1, round(seconds * 1e3 / WINDOW_MS))):
        for setup in setups.values():
            setup.window(WINDOW_MS)


def close_all(setups: dict[str, Paced]) -> None:
    """Stop every setup's clients (the ML-DSA rows' one place for it, on any outcome)."""
    for setup in setups.values():
        setup.close()


def mldsa_rows(
    seconds: float,
    env: dict[str, str],
    ours: dict[str, str],
    py_client: list[str],
    c_client: list[str],
    server: int | None,
) -> list[str]:
    """The ML-DSA-87 rows: every setup's clients run at once and sign in turns of
    :data:`WINDOW_MS` (the others idle), SHARE x ``seconds`` each in all.

    With ``server`` (its pid; needs ``taskset``), one client and the server (all its
    threads) are also measured on CPU 0 only, against in-process signing on CPU 0: what
    the software costs without the machine's cross-CPU wake-ups (on a VM, waking a halted
    virtual CPU is most of what a round trip costs).
    """
    inproc = [sys.executable, "-c", PACED + INPROCESS_MLDSA]
    floor = [sys.executable, "-c", PACED + ROUND_TRIP_FLOOR]
    one_cpu = ["taskset", "-c", "0"]
    total = seconds * SHARE
    setups: dict[str, Paced] = {}
    try:
        setups["in1"] = Paced([[*inproc, "1"]], env)
        setups["in2"] = Paced([[*inproc, "2"]], env)
        setups["floor"] = Paced([floor], env)
        setups["py1"] = Paced([py_client], ours)
        setups["py2"] = Paced([py_client] * 2, ours)
        setups["c1"] = Paced([[*c_client, "1"]], ours)
        setups["c2"] = Paced([[*c_client, "2"]], ours)
        interleave(setups, total)
    finally:
        close_all(setups)
    if server is not None:
        every = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        subprocess.run(
            ["taskset", "-a", "-p", "-c", "0", str(server)], capture_output=True, check=True
        )
        pinned: dict[str, Paced] = {}
        try:
            pinned["cpu0 in1"] = Paced([[*one_cpu, *inproc, "1"]], env)
            pinned["cpu0 py1"] = Paced([[*one_cpu, *py_client]], ours)
            pinned["cpu0 c1"] = Paced([[*one_cpu, *c_client, "1"]], ours)
            interleave(pinned, total)
        finally:
            close_all(pinned)
            subprocess.run(["taskset", "-a", "-p", "-c", every, str(server)], capture_output=True)
        setups.update(pinned)
    rate = {name: len(p.lat) / p.seconds for name, p in setups.items()}
    in1, in2, floor_rate = rate["in1"], rate["in2"], rate["floor"]
    table = (
        ("in1", "ML-DSA-87: cryptography in-process, 1 thread", None, None),
        ("in2", "ML-DSA-87: cryptography in-process, 2 threads", None, None),
        ("floor", "ML-DSA-87: round-trip floor (a minimal signer in another process)", in1, None),
        ("py1", "ML-DSA-87: via libpqhsm-pkcs11.so, python-pkcs11, 1 proc", in1, floor_rate),
        ("py2", "ML-DSA-87: via libpqhsm-pkcs11.so, python-pkcs11, 2 procs", in1, None),
        ("c1", "ML-DSA-87: via libpqhsm-pkcs11.so, C client, 1 thread", in1, floor_rate),
        ("c2", "ML-DSA-87: via libpqhsm-pkcs11.so, C client, 2 threads, one connection", in2, None),
        ("cpu0 in1", "ML-DSA-87, all on CPU 0: cryptography in-process, 1 thread", None, None),
        ("cpu0 py1", "ML-DSA-87, all on CPU 0: via libpqhsm-pkcs11.so, python-pkcs11", None, None),
        ("cpu0 c1", "ML-DSA-87, all on CPU 0: via libpqhsm-pkcs11.so, C client", None, None),
    )
    rows = []
    for name, title, base, floor_of in table:
        if name not in setups:
            continue
        if name.startswith("cpu0 ") and name != "cpu0 in1":
            base = rate["cpu0 in1"]
        rows.append(row(title, setups[name].lat, setups[name].seconds, base, floor_of)[0])
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
        c_client = [str(driver), "mldsa", "b-ml", "-"]
        py_paced = [sys.executable, "-c", PACED + WORKER, str(module), "b-ml", "-", "ML_DSA"]
        rows += mldsa_rows(
            seconds,
            env,
            ours,
            py_paced,
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
        f"# pqhsm module bench ({seconds:.0f} s per row, ML-DSA {SHARE} x {seconds:.0f} s "
        f"in turns of {WINDOW_MS} ms, "
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
