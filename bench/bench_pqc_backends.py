"""Post-quantum backends side by side: ``cryptography`` (OpenSSL) and liboqs (ctypes).

Run: ``.venv/bin/python bench/bench_pqc_backends.py [--n 2000]`` (about half a minute).
Without an installed liboqs it measures ``cryptography`` alone and says why liboqs is
missing.  Each row times the two backends in alternating blocks of calls (so drift and load
changes hit both alike), through the same :class:`appliance.pqc.PqcBackend` interface
the appliance uses; the ratio is cryptography's median over liboqs' (above 1: liboqs is
faster).  Then signing throughput with one and two threads per backend.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

from appliance.errors import ConfigError
from appliance.pqc import CryptographyBackend, PqcBackend, liboqs_backend

Op = Callable[[], object]


def interleaved(ops: list[Op], n: int, block: int) -> list[float]:
    """Run each op ``block`` times in turn until each has run about ``n`` times; return each
    op's median seconds per call.  Blocks keep one backend's code and tables in the caches
    (as in a server signing steadily), alternation spreads drift and load over both."""
    times: list[list[float]] = [[] for _ in ops]
    for op in ops:  # warm-up
        op()
    for _ in range(max(1, n // block)):
        for i, op in enumerate(ops):
            for _ in range(block):
                t0 = time.perf_counter()
                op()
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def operations(backend: PqcBackend) -> dict[str, Op]:
    msg = os.urandom(256)
    ctx = b"pqhsm-bench"
    dsa_seed, kem_seed = os.urandom(32), os.urandom(64)
    signer = backend.mldsa87_from_seed(dsa_seed)
    public = signer.public_bytes()
    sig = signer.sign(msg, ctx)
    kem = backend.mlkem1024_from_seed(kem_seed)
    ek = kem.encapsulation_key()
    _, ct = backend.mlkem1024_encapsulate(ek)
    return {
        "ML-DSA-87 key from seed": lambda: backend.mldsa87_from_seed(dsa_seed),
        "ML-DSA-87 sign (256 B, context)": lambda: signer.sign(msg, ctx),
        "ML-DSA-87 verify": lambda: backend.mldsa87_verify(public, msg, sig, ctx),
        "ML-KEM-1024 key from seed": lambda: backend.mlkem1024_from_seed(kem_seed),
        "ML-KEM-1024 encapsulate": lambda: backend.mlkem1024_encapsulate(ek)[0].wipe(),
        "ML-KEM-1024 decapsulate": lambda: kem.decapsulate(ct).wipe(),
    }


def signs_per_second(backend: PqcBackend, threads: int, total: int) -> float:
    signer = backend.mldsa87_from_seed(os.urandom(32))
    msg = os.urandom(256)

    def burst(count: int) -> None:
        for _ in range(count):
            signer.sign(msg)

    workers = [threading.Thread(target=burst, args=(total // threads,)) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return total / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=2000, help="calls per backend and row")
    ap.add_argument(
        "--block", type=int, default=50, help="calls in a row before switching backend (1: strict)"
    )
    args = ap.parse_args(argv)

    backends: list[PqcBackend] = [CryptographyBackend()]
    note = ""
    try:
        oqs = liboqs_backend()
        backends.append(oqs)
        note = f"liboqs {oqs.version} ({oqs.library})"
    except ConfigError as exc:
        note = f"liboqs not measured: {exc}"

    ops = [operations(b) for b in backends]
    names = list(ops[0])
    print("# pqhsm post-quantum backends\n")
    print(
        f"{note}; {os.cpu_count()} CPU(s); median of {args.n} calls per cell, "
        f"backends alternating every {args.block} calls\n"
    )
    header = "| operation | " + " | ".join(f"{b.name} µs" for b in backends)
    rule = "|---|" + "---|" * len(backends)
    if len(backends) == 2:
        header += " | cryptography / liboqs"
        rule += "---|"
    print(header + " |")
    print(rule)
    for name in names:
        medians = interleaved([o[name] for o in ops], args.n, args.block)
        cells = " | ".join(f"{m * 1e6:.0f}" for m in medians)
        ratio = f" | {medians[0] / medians[1]:.2f}x" if len(medians) == 2 else ""
        print(f"| {name} | {cells}{ratio} |")

    print("\n| ML-DSA-87 signs/s | " + " | ".join(b.name for b in backends) + " |")
    print("|---|" + "---|" * len(backends))
    total = max(200, args.n // 4)
    for threads in (1, 2):
        rates = [signs_per_second(b, threads, total) for b in backends]
        print(f"| {threads} thread(s) | " + " | ".join(f"{r:.0f}/s" for r in rates) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
