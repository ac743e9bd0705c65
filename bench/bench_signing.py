"""Signing benchmark: each signature kind against its raw parts, measured in one run.

Run: ``.venv/bin/python bench/bench_signing.py`` (about a minute).  Raw baselines: the
token's own sign through python-pkcs11 (same token, same key) and ``cryptography``'s
ML-DSA-87 sign/verify.  Then ML-DSA signing with 1 and 2 threads, and 10,000 ML-DSA keys
in the keystore: signing throughput over random keys and resident memory.
"""

from __future__ import annotations

import os
import random
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from _setup import bench_appliance, softhsm_sandbox


def paired(
    fa: Callable[[], object], fb: Callable[[], object], n: int = 1500
) -> tuple[float, float]:
    """Alternate a and b n times; return the trimmed mean seconds of each.

    Interleaving cancels drift and load changes; a mean over many calls averages out
    ML-DSA's rejection-sampling rounds; dropping the slowest and fastest 2 % of each side
    (the same share on both) keeps a preempted call on this shared VM -- tens of
    milliseconds now and then -- from deciding a ratio of a few percent.
    """
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return _trimmed_mean(ta), _trimmed_mean(tb)


def _trimmed_mean(xs: list[float], cut: float = 0.02) -> float:
    xs = sorted(xs)
    k = int(len(xs) * cut)
    kept = xs[k : len(xs) - k] or xs
    return sum(kept) / len(kept)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    tmp = softhsm_sandbox("pqhsm-bench-sig-")

    import pkcs11
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, mldsa
    from pkcs11 import Attribute, Mechanism, ObjectClass

    from appliance.keys import KeyInfo, KeyState
    from appliance.service import Appliance
    from appliance.signing.dual import dual_context, parse_dual
    from appliance.signing.policy import Policy, PublicKeys, load_public_keys, verify

    app, module = bench_appliance(tmp)
    session = pkcs11.lib(module).get_token(token_label="bench").open()
    msg = os.urandom(256)
    rows: list[tuple[str, str, str]] = []

    raw_ml = mldsa.MLDSA87PrivateKey.generate()
    raw_ml_pub = raw_ml.public_key()

    for key_type in ("ed25519", "ecdsa-p256"):
        k = app.migrate(app.create_key(key_type, f"b-{key_type}"), KeyState.HYBRID)
        priv: Any = next(
            iter(
                session.get_objects(
                    {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: k.cka_id}
                )
            )
        )
        keys = load_public_keys(Appliance.public_key_pem_of(k))
        classical_pub: Any = keys.classical
        dual_sig = app.sign(k, msg)
        dcsig = parse_dual(dual_sig).classical_sig
        dual_ctx = dual_context(keys.classical_spki(), dcsig)
        raw_dual_sig = raw_ml.sign(msg, dual_ctx)
        is_ed = key_type == "ed25519"

        def raw_classical(priv: Any = priv, is_ed: bool = is_ed) -> None:
            if is_ed:
                priv.sign(msg, mechanism=Mechanism.EDDSA)
            else:
                h = hashes.Hash(hashes.SHA256())
                h.update(msg)
                priv.sign(h.finalize(), mechanism=Mechanism.ECDSA)

        def raw_cverify(pub: Any = classical_pub, c: bytes = dcsig, is_ed: bool = is_ed) -> None:
            if is_ed:
                pub.verify(c, msg)
            else:
                pub.verify(c, msg, ec.ECDSA(hashes.SHA256()))

        def raw_dual(rc: Callable[[], None] = raw_classical) -> None:
            rc()
            raw_ml.sign(msg)

        def raw_dual_verify(
            cv: Callable[[], None] = raw_cverify, s: bytes = raw_dual_sig, ctx: bytes = dual_ctx
        ) -> None:
            cv()
            raw_ml_pub.verify(s, msg, ctx)

        def app_classical(k: KeyInfo = k) -> None:
            app.sign(k, msg, kind="classical")

        def app_mldsa(k: KeyInfo = k) -> None:
            app.sign(k, msg, kind="ml-dsa")

        def app_dual(k: KeyInfo = k) -> None:
            app.sign(k, msg, kind="dual")

        def app_verify(keys: PublicKeys = keys, s: bytes = dual_sig) -> None:
            verify(keys, msg, s, policy=Policy.STRICT)

        def raw_mldsa() -> None:
            raw_ml.sign(msg)

        raw_c, app_c = paired(raw_classical, app_classical, 1000)
        raw_m, app_m = paired(raw_mldsa, app_mldsa)
        raw_d, app_d = paired(raw_dual, app_dual)
        raw_v, app_v = paired(raw_dual_verify, app_verify)
        rows += [
            (
                f"{key_type}: classical sign via appliance",
                f"{app_c * 1e6:.0f} µs",
                f"{app_c / raw_c:.2f}x raw token sign {raw_c * 1e6:.0f} µs",
            ),
            (
                f"{key_type}: ML-DSA-87 sign via appliance",
                f"{app_m * 1e6:.0f} µs",
                f"{app_m / raw_m:.2f}x raw ML-DSA {raw_m * 1e6:.0f} µs",
            ),
            (
                f"{key_type}: dual sign via appliance",
                f"{app_d * 1e6:.0f} µs",
                f"{app_d / raw_d:.2f}x raw token + raw ML-DSA {raw_d * 1e6:.0f} µs "
                "(target ≤ 1.10x)",
            ),
            (
                f"{key_type}: verify dual, strict",
                f"{app_v * 1e6:.0f} µs",
                f"{app_v / raw_v:.2f}x raw verifies {raw_v * 1e6:.0f} µs (target ≤ 1.05x)",
            ),
        ]

    # two threads signing ML-DSA through the appliance
    pq = app.create_key("ml-dsa-87", "threads")
    app.sign(pq, msg)

    def burst(count: int) -> None:
        for _ in range(count):
            app.sign(pq, msg)

    total = 400
    t0 = time.perf_counter()
    burst(total)
    one = total / (time.perf_counter() - t0)
    workers = [threading.Thread(target=burst, args=(total // 2,)) for _ in range(2)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    two = total / (time.perf_counter() - t0)
    rows.append(("ML-DSA-87 signs/s, 1 thread", f"{one:.0f}/s", "baseline"))
    rows.append(
        ("ML-DSA-87 signs/s, 2 threads", f"{two:.0f}/s", f"{two / one:.2f}x one thread (2 cores)")
    )

    # 10,000 ML-DSA keys in the keystore
    many = 10_000
    before = rss_mib()
    ids = [os.urandom(16).hex() for _ in range(many)]
    t0 = time.perf_counter()
    for start in range(0, many, 500):
        chunk = ids[start : start + 500]
        blobs = app.keystore.new_mldsa_many(chunk)
        for key_id in chunk:
            public, digest = blobs[key_id]
            app.append_record(
                "key.create",
                {
                    "key_id": key_id,
                    "label": f"m-{key_id[:12]}",
                    "kind": "ml-dsa-87",
                    "state": "PQC_ONLY",
                    "pqc_public": public,
                    "blob_sha3": digest,
                    "origin": "generated",
                },
            )
        app.wal.commit()
    made = time.perf_counter() - t0
    after_create = rss_mib()
    infos = [app.key(i) for i in ids]
    rng = random.Random(7)  # noqa: S311 - picks keys for a benchmark, not a secret
    count = 3000
    t0 = time.perf_counter()
    for _ in range(count):
        app.sign(rng.choice(infos), msg)
    rate = count / (time.perf_counter() - t0)
    after_sign = rss_mib()
    rows.append((f"create {many} ML-DSA-87 keys (batches of 500)", f"{many / made:.0f} keys/s", ""))
    rows.append(
        (
            f"sign over {many} keys at random (cache {app.signer_cache_size})",
            f"{rate:.0f}/s",
            "misses open a blob",
        )
    )
    rows.append(
        (
            f"RSS: before / after {many} keys / after signing",
            f"{before:.0f} / {after_create:.0f} / {after_sign:.0f} MiB",
            "signer cache is bounded",
        )
    )
    app.close()

    print("# pqhsm signing bench\n")
    print("| measurement | p50 / rate | note |")
    print("|---|---|---|")
    for a, b, c in rows:
        print(f"| {a} | {b} | {c} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
