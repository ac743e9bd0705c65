"""Bulk migration benchmark: 1,000 keys CLASSICAL -> HYBRID -> PQC_ONLY on SoftHSM2.

Run: ``.venv/bin/python bench/bench_migration.py [N]`` (about a minute for N=1000).
Reports keys/s per phase, WAL fsyncs per key (group commit) and every fsync per key
(blob files and folders too), the replay time of the resulting log, and peak RSS.  The
raw baselines printed alongside are measured in the same run: the token's own keygen and
C_DestroyObject rate through python-pkcs11, and ML-DSA-87 keygen + one fsync'd file write.
"""

from __future__ import annotations

import os
import resource
import sys
import time

from _setup import bench_appliance, softhsm_sandbox


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    tmp = softhsm_sandbox("pqhsm-bench-mig-")

    from appliance import fsio
    from appliance.keys import KeyState
    from appliance.pqc import active_backend
    from appliance.secret import SecretBytes
    from appliance.service import Appliance
    from appliance.token.initdev import init_token

    fsyncs = 0
    real_sync = fsio._durable_sync

    def counting_sync(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_sync(fd)

    fsio._durable_sync = counting_sync  # count every fsync: WAL, blobs, folders

    app, module = bench_appliance(tmp)
    rows: list[tuple[str, str, str]] = []

    t0 = time.perf_counter()
    for i in range(n):
        app.create_key("ed25519", f"k{i:05d}")
    create_s = time.perf_counter() - t0
    rows.append(
        (
            f"create {n} Ed25519 keys in the token",
            f"{n / create_s:8.0f} keys/s",
            "1 WAL fsync per key",
        )
    )

    # raw baseline: ML-DSA-87 keygen + one fsync'd write of a blob-sized file
    backend = active_backend()
    raw_dir = tmp / "raw"
    raw_dir.mkdir()
    t0 = time.perf_counter()
    for i in range(200):
        backend.mldsa87_from_seed(os.urandom(32)).public_bytes()
        fd = os.open(raw_dir / f"{i}", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, os.urandom(4300))
        os.fsync(fd)
        os.close(fd)
    raw_hybrid = 200 / (time.perf_counter() - t0)

    for target in (KeyState.HYBRID, KeyState.PQC_ONLY):
        before = fsyncs
        t0 = time.perf_counter()
        res = app.migrate_all(target, batch=256)
        took = time.perf_counter() - t0
        assert len(res.migrated) == n, res.failed
        note = f"WAL {res.fsyncs / n:.4f} fsync/key; all fsyncs {(fsyncs - before) / n:.3f}/key"
        rows.append(
            (f"bulk -> {target.value} ({n} keys, batch 256)", f"{n / took:8.0f} keys/s", note)
        )
        if target is KeyState.HYBRID:
            rows.append(
                (
                    "  raw: ML-DSA-87 keygen + fsync'd 4.3 KB write",
                    f"{raw_hybrid:8.0f} keys/s",
                    "lower bound for one blob per key",
                )
            )
    # raw baselines on a second token holding as many keys: python-pkcs11 alone
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    from appliance.algorithms import der_oid

    init_token(module, "raw", SecretBytes(b"so-pin-bench"), SecretBytes(b"pin-bench"))
    lib = pkcs11.lib(module)
    raw = lib.get_token(token_label="raw").open(rw=True, user_pin="pin-bench")
    t0 = time.perf_counter()
    for i in range(n):
        raw.generate_keypair(
            KeyType.EC_EDWARDS,
            mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
            store=True,
            id=b"%06d" % i,
            label=f"r{i}",
            public_template={Attribute.EC_PARAMS: der_oid("1.3.101.112")},
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
        )
    rows.insert(
        1,
        (
            "  raw: python-pkcs11 C_GenerateKeyPair, same token size",
            f"{n / (time.perf_counter() - t0):8.0f} keys/s",
            "baseline",
        ),
    )
    t0 = time.perf_counter()
    for obj in list(raw.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})):
        obj.destroy()
    rows.append(
        (
            "  raw: python-pkcs11 C_DestroyObject of as many keys",
            f"{n / (time.perf_counter() - t0):8.0f} keys/s",
            "baseline for the erasure step",
        )
    )
    raw.close()
    records = len(app.wal)
    cfg_home = app.cfg
    app.close()
    t0 = time.perf_counter()
    app = Appliance.open(cfg_home, pin=SecretBytes(b"pin-bench"), passphrase=None)
    reopen = time.perf_counter() - t0
    app.close()
    rows.append(
        (
            f"open: replay {records} records + recovery checks",
            f"{reopen:8.2f} s",
            f"{n} keys checked against the token",
        )
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"# pqhsm migration bench, {n} keys (peak RSS {rss:.0f} MiB)\n")
    print("| measurement | rate | note |")
    print("|---|---|---|")
    for name, rate, note in rows:
        print(f"| {name} | {rate.strip()} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
