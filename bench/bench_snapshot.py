"""Backup and restore of 10,000 keys: time and size, against raw tar.gz of the same bytes.

Run: ``.venv/bin/python bench/bench_snapshot.py [N]`` (about a minute for N=10,000).  The
raw baseline writes the same files into a .tar.gz with tarfile in the same run, so the
ratio shows what signing, hashing and verification add.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import time

from _setup import bench_appliance, softhsm_sandbox


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    tmp = softhsm_sandbox("pqhsm-bench-snap-")

    from appliance.secret import SecretBytes
    from appliance.service import restore_backup

    app, _ = bench_appliance(tmp)
    cfg = app.cfg
    ids = [os.urandom(16).hex() for _ in range(n)]
    for start in range(0, n, 500):
        chunk = ids[start : start + 500]
        blobs = app.keystore.new_mldsa_many(chunk)
        for key_id in chunk:
            public, digest = blobs[key_id]
            app.append_record(
                "key.create",
                {
                    "key_id": key_id,
                    "label": f"k-{key_id[:12]}",
                    "kind": "ml-dsa-87",
                    "state": "PQC_ONLY",
                    "pqc_public": public,
                    "blob_sha3": digest,
                    "origin": "generated",
                },
            )
        app.wal.commit()
    out = tmp / "backups"
    out.mkdir()
    t0 = time.perf_counter()
    info = app.backup(out)
    backup_s = time.perf_counter() - t0
    # raw baseline: the same state files into a .tar.gz, nothing signed or hashed
    t0 = time.perf_counter()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for p in [app.wal.path, app.keystore.path, *sorted(app.keystore.blob_dir.glob("*.blob"))]:
            tar.add(p, arcname=p.name)
    raw_s = time.perf_counter() - t0
    app.close()
    t0 = time.perf_counter()
    restore_backup(cfg, info.path, pin=SecretBytes(b"pin-bench"), passphrase=SecretBytes(b"bench"))
    restore_s = time.perf_counter() - t0
    print(f"# pqhsm snapshot bench, {n} ML-DSA-87 keys\n")
    print("| measurement | value | note |")
    print("|---|---|---|")
    print(
        f"| backup (sign + hash + tar.gz) | {backup_s:.2f} s | "
        f"{backup_s / raw_s:.2f}x raw tar.gz of the same files ({raw_s:.2f} s) |"
    )
    print(
        f"| backup size | {info.size / 1e6:.1f} MB | {info.size / n:.0f} bytes/key; raw tar.gz "
        f"{len(raw.getvalue()) / 1e6:.1f} MB |"
    )
    print(
        "| verified restore (read, verify, stage, swap, reopen, record, checkpoint) | "
        f"{restore_s:.2f} s | |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
