"""Core benchmark: unlock time, blob seal/open, token signing through the appliance vs raw.

Run: ``.venv/bin/python bench/bench_core.py`` (about 30 s).  Everything runs on a throw-away
SoftHSM2 token in a temporary directory; the raw baselines are measured in the same run on
the same token, so the ratios are what matter, not the absolute numbers.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

from _setup import bench_appliance, softhsm_sandbox

N_SIGN = 2000
N_BLOB = 300
N_UNLOCK = 3


def _timeit(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _us(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e6:9.1f}"


def main() -> int:
    tmp = softhsm_sandbox("pqhsm-bench-")

    import pkcs11
    from cryptography.hazmat.primitives import hashes
    from pkcs11 import Attribute, Mechanism, ObjectClass

    from appliance.keystore import PBKDF2_SHA3, calibrate
    from appliance.secret import SecretBytes

    passphrase = b"bench passphrase"
    kdf = calibrate(PBKDF2_SHA3, target_seconds=1.0)
    app, module = bench_appliance(tmp, passphrase=passphrase, kdf=kdf)
    rows: list[tuple[str, str, str, str]] = []

    # -- unlock: PBKDF2 (calibrated to ~1 s) + token unwrap of the KEM seed + check blob
    unlock = _timeit(lambda: app.keystore.unlock(SecretBytes(passphrase)), N_UNLOCK)
    rows.append(
        (
            f"unlock (PBKDF2 {kdf.iterations} it.)",
            f"{statistics.median(unlock) * 1e3:9.1f} ms",
            "-",
            "target ~1 s",
        )
    )

    # -- blob seal/open for an ML-DSA-87 private key (seed || public key)
    plain = SecretBytes(os.urandom(32 + 2592))
    seal = _timeit(lambda: app.keystore.seal("bench-key", "ML-DSA-87", plain), N_BLOB)
    blob = app.keystore.seal("bench-key", "ML-DSA-87", plain)
    open_ = _timeit(lambda: app.keystore.open("bench-key", "ML-DSA-87", blob).wipe(), N_BLOB)
    rows.append(("blob seal (ML-KEM encaps + HKDF + GCM)", f"{_us(seal)} µs", "-", ""))
    rows.append(("blob open (ML-KEM decaps + HKDF + GCM)", f"{_us(open_)} µs", "-", ""))

    # -- signing: appliance vs python-pkcs11 directly on the same token, same run
    lib = pkcs11.lib(module)
    tok = lib.get_token(token_label="bench")
    session = tok.open()  # this process is already logged in (the appliance)
    msg = b"x" * 64
    for key_type, mech in (("ecdsa-p256", Mechanism.ECDSA), ("ed25519", Mechanism.EDDSA)):
        key = app.create_key(key_type, f"bench-{key_type}")
        assert key.cka_id is not None
        priv = next(
            iter(
                session.get_objects(
                    {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key.cka_id}
                )
            )
        )

        def raw(priv: object = priv, mech: Mechanism = mech, key_type: str = key_type) -> None:
            if key_type.startswith("ecdsa"):
                h = hashes.Hash(hashes.SHA256())
                h.update(msg)
                data = h.finalize()
            else:
                data = msg
            priv.sign(data, mechanism=mech)  # type: ignore[attr-defined]

        def through(key: object = key) -> None:
            app.sign(key, msg)  # type: ignore[arg-type]

        for _ in range(100):  # warm up
            raw()
            through()
        r = _timeit(raw, N_SIGN)
        a = _timeit(through, N_SIGN)
        ratio = statistics.median(a) / statistics.median(r)
        rows.append(
            (
                f"sign {key_type}: python-pkcs11 direct",
                f"{1 / statistics.mean(r):9.0f} ops/s",
                f"{_us(r)} µs",
                "baseline",
            )
        )
        rows.append(
            (
                f"sign {key_type}: through appliance",
                f"{1 / statistics.mean(a):9.0f} ops/s",
                f"{_us(a)} µs",
                f"{ratio:.2f}x raw (p50)",
            )
        )
    session.close()
    app.close()

    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"# pqhsm core bench ({sys.platform}, python {sys.version.split()[0]}, "
        f"peak RSS {rss_mib:.0f} MiB)"
    )
    print()
    print("| measurement | rate / time | p50 | note |")
    print("|---|---|---|---|")
    for name, value, p50, note in rows:
        print(f"| {name} | {value.strip()} | {p50.strip()} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
