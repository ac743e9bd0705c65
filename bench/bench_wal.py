"""Write-ahead log benchmark: durable append latency against raw write+fsync, and replay.

Run: ``.venv/bin/python bench/bench_wal.py`` (well under a minute).  Everything happens in
one temporary directory, so the raw baseline and the log share a filesystem and a disk.

(a) baseline: ``os.write`` + ``os.fsync`` of a typical record frame (same bytes, same size,
    ``O_APPEND``) N times;
(b) ``Wal.append_commit`` of such records N times (one fsync each);
    (a) and (b) run in alternating rounds so that drift in the disk or the machine hits both;
(c) replay: a log of 100,000 such records written with group commits, then ``Wal.open``
    (scan, check every frame and link, build the index) and ``verify_chain``;
(d) peak RSS of the whole run.
Targets (DESIGN §5 brief): (b) <= 1.3x (a) at p50; (c) open <= 2 s.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

N_LATENCY = 2000
ROUNDS = 4
WARMUP = 100
N_REPLAY = 100_000
GROUP = 1000
REPEAT_OPEN = 3


def record(i: int) -> dict[str, Any]:
    """A typical migration record (DESIGN §6): about 200 bytes as a frame."""
    return {
        "key_id": f"{i:016x}",
        "from": "HYBRID",
        "to": "PQC_PREFERRED",
        "alg": "ML-DSA-87",
        "actor": "operator",
        "reason": "scheduled",
        "rid": i.to_bytes(16, "big"),
        "meta": {"batch": i // 1000, "dry_run": False},
    }


def timed(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds per call, one sample per call."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from appliance.wal import Wal, verify_chain

    tmp = Path(tempfile.mkdtemp(prefix="pqhsm-bench-wal-"))
    try:
        # -- (a) and (b): latency, alternating rounds ------------------------------------------
        wal = Wal.open(tmp / "latency")
        probe = wal.append_commit("key.transition", record(0))
        frame = (8 + len(probe.body)) * b"\x5a"  # the same number of bytes as a real frame
        raw_fd = os.open(
            tmp / "raw.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        counter = iter(range(1, 10**9))

        def raw() -> None:
            os.write(raw_fd, frame)
            os.fsync(raw_fd)

        def through() -> None:
            wal.append_commit("key.transition", record(next(counter)))

        timed(raw, WARMUP)
        timed(through, WARMUP)
        fsyncs_before, appended_before = wal.fsync_count, len(wal)
        raw_s: list[float] = []
        wal_s: list[float] = []
        for _ in range(ROUNDS):
            raw_s += timed(raw, N_LATENCY // ROUNDS)
            wal_s += timed(through, N_LATENCY // ROUNDS)
        per_record = (wal.fsync_count - fsyncs_before) / (len(wal) - appended_before)
        wal.close()
        os.close(raw_fd)

        # -- (c): replay ------------------------------------------------------------------
        t0 = time.perf_counter()
        with Wal.open(tmp / "replay") as big:
            for i in range(N_REPLAY):
                big.append("key.transition", record(i))
                if (i + 1) % GROUP == 0:
                    big.commit()
            big.commit()
            group_fsyncs = (big.fsync_count - 1) / N_REPLAY
        build_s = time.perf_counter() - t0
        log_mib = (tmp / "replay" / "wal.log").stat().st_size / 2**20
        opens = []
        for _ in range(REPEAT_OPEN):
            t0 = time.perf_counter()
            replayed = Wal.open(tmp / "replay")
            opens.append(time.perf_counter() - t0)
            assert len(replayed) == N_REPLAY
            replayed.close()
        t0 = time.perf_counter()
        verify_chain(tmp / "replay")
        verify_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    raw_p50, wal_p50 = statistics.median(raw_s), statistics.median(wal_s)
    raw_mean, wal_mean = statistics.mean(raw_s), statistics.mean(wal_s)
    us = 1e6
    print(
        f"# pqhsm WAL bench ({sys.platform}, python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, frame {len(frame)} bytes, N={N_LATENCY})"
    )
    print()
    print("| measurement | p50 | mean | note |")
    print("|---|---|---|---|")
    print(
        f"| (a) raw os.write + os.fsync | {raw_p50 * us:.1f} µs | {raw_mean * us:.1f} µs "
        "| baseline, same bytes, O_APPEND |"
    )
    print(
        f"| (b) Wal.append_commit | {wal_p50 * us:.1f} µs | {wal_mean * us:.1f} µs "
        f"| {wal_p50 / raw_p50:.2f}x raw at p50, {wal_mean / raw_mean:.2f}x mean "
        "(target <= 1.3x) |"
    )
    print(f"| fsyncs per record, append_commit | {per_record:.3f} | | one per commit |")
    print(f"| fsyncs per record, groups of {GROUP} | {group_fsyncs:.4f} | | group commit |")
    print(
        f"| (c) build {N_REPLAY:,} records | {build_s:.2f} s | | "
        f"{log_mib:.1f} MiB log, group commits |"
    )
    print(
        f"| (c) Wal.open: scan + check + index | {statistics.median(opens):.2f} s "
        f"| {statistics.mean(opens):.2f} s | best {min(opens):.2f} s of {REPEAT_OPEN} "
        "(target <= 2 s) |"
    )
    print(f"| (c) verify_chain | {verify_s:.2f} s | | read-only, no lock |")
    print(f"| (d) peak RSS | {rss_mib:.0f} MiB | | whole run |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
