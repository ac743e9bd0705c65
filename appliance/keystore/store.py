"""The dual-compromise keystore: header, unlock/lock, blob storage, passphrase change.

hazardous: use the service API.

``keystore.cbor`` on disk::

    magic   8 bytes  b"PQHSMK1\\0"
    hlen    u32 BE
    header  canonical CBOR {v, keystore_id, created, twk_label,
                            kem: {alg, ek, seed_sealed}, kdf: {...}, check}

* ``seed_sealed`` is the 64-byte ML-KEM-1024 seed d||z, AES-256-GCM-encrypted *by the
  token* with the token wrap key (nonce || ct || tag, AAD = ``pqhsm/kem-seed/v1`` ||
  keystore_id).  Only the token can turn it back into a decapsulation key.
* ``ek`` is the matching encapsulation key, so blobs can be sealed; at unlock the unwrapped
  seed must reproduce it (a swapped header is caught).
* ``check`` is an ordinary blob (key id ``unlock-check``) sealed under the current
  passphrase.  It lets unlock say "wrong passphrase" at once instead of after a new key was
  sealed under a mistyped one.  It is no offline verifier: like every blob it needs the
  token's decapsulation key before a guess can be tested.
* ``kdf`` holds the KDF parameters and the passphrase generation ``gen``.

Passphrase change (crash-safe, the WAL record is the commit point): (1) reseal every blob
under the new passphrase into ``<id>.blob.new``; (2) write ``keystore.next.cbor`` (new
salt, gen+1, new check blob); the service then appends the WAL record naming the new
generation and blob digests; (3) rename every ``.new`` blob over its old one; (4) rename
the next header over ``keystore.cbor``.  Recovery rolls forward when the WAL has the record
and back when it does not, so each blob always opens under exactly one of the two
passphrases and the WAL digests always describe the blobs in use.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from appliance import codec
from appliance.errors import (
    BlobInvalid,
    CallerError,
    DeviceError,
    KeyExists,
    NotInitialized,
    StateError,
)
from appliance.fsio import (
    atomic_write,
    ensure_private_dir,
    fault_point,
    fsync_dir,
    read_file,
    write_synced,
)
from appliance.keystore.blob import open_blob, parse_blob, seal_blob, valid_key_id
from appliance.keystore.kdf import KdfParams, derive_pw_key
from appliance.pqc import (
    MLDSA87_PUBLIC_LEN,
    MLDSA87_SEED_LEN,
    MLKEM1024_EK_LEN,
    MLKEM1024_SEED_LEN,
    MlDsaSigner,
    MlKemDecapsulator,
    PqcBackend,
)
from appliance.secret import SecretBytes, ct_equal
from appliance.token import TokenBackend

__all__ = ["KEYSTORE_FILE", "MLDSA_ALG", "Keystore", "KeystoreHeader"]

KEYSTORE_MAGIC: Final = b"PQHSMK1\x00"
PREFIX: Final = struct.Struct(">8sI")
KEYSTORE_VERSION: Final = 1
KEYSTORE_FILE: Final = "keystore.cbor"
NEXT_FILE: Final = "keystore.next.cbor"
TWK_LABEL: Final = "pqhsm:twk"
SEED_AAD: Final = b"pqhsm/kem-seed/v1"
CHECK_ID: Final = "unlock-check"
CHECK_ALG: Final = "check"
MLDSA_ALG: Final = "ML-DSA-87"
_CHECK_PLAINTEXT: Final = b"pqhsm unlock check v1"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class KeystoreHeader:
    keystore_id: bytes
    created: int
    twk_label: str
    ek: bytes
    seed_sealed: bytes
    kdf: KdfParams
    check: bytes
    v: int = KEYSTORE_VERSION

    def encode(self) -> bytes:
        body = codec.dumps(
            {
                "v": self.v,
                "keystore_id": self.keystore_id,
                "created": self.created,
                "twk_label": self.twk_label,
                "kem": {"alg": "ML-KEM-1024", "ek": self.ek, "seed_sealed": self.seed_sealed},
                "kdf": self.kdf.to_cbor(),
                "check": self.check,
            }
        )
        return PREFIX.pack(KEYSTORE_MAGIC, len(body)) + body

    @classmethod
    def decode(cls, data: bytes, path: Path) -> KeystoreHeader:
        if len(data) < PREFIX.size:
            raise DeviceError(f"{path}: truncated keystore header")
        magic, hlen = PREFIX.unpack_from(data)
        if magic != KEYSTORE_MAGIC or PREFIX.size + hlen != len(data):
            raise DeviceError(f"{path}: not a pqhsm keystore header")
        try:
            m = codec.loads_map(data[PREFIX.size :], "keystore header")
            kem: Any = m.get("kem")
            kdf = KdfParams.from_cbor(m.get("kdf"))
        except CallerError as exc:
            raise DeviceError(f"{path}: {exc}") from None
        ok = (
            m.get("v") == KEYSTORE_VERSION
            and isinstance(m.get("keystore_id"), bytes)
            and isinstance(m.get("created"), int)
            and isinstance(m.get("twk_label"), str)
            and isinstance(m.get("check"), bytes)
            and isinstance(kem, dict)
            and kem.get("alg") == "ML-KEM-1024"
            and isinstance(kem.get("ek"), bytes)
            and len(kem["ek"]) == MLKEM1024_EK_LEN
            and isinstance(kem.get("seed_sealed"), bytes)
        )
        if not ok:
            raise DeviceError(f"{path}: keystore header has the wrong version or fields")
        return cls(
            m["keystore_id"],
            m["created"],
            m["twk_label"],
            kem["ek"],
            kem["seed_sealed"],
            kdf,
            m["check"],
        )


class Keystore:
    """The keystore of one appliance home.  Locked until :meth:`unlock`."""

    def __init__(self, home: Path, token: TokenBackend, backend: PqcBackend) -> None:
        self.home = home
        self.blob_dir = home / "blobs"
        self._token = token
        self._pqc = backend
        self._header: KeystoreHeader | None = None
        self._decaps: MlKemDecapsulator | None = None
        self._pw_key: SecretBytes | None = None

    # -- files ----------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.home / KEYSTORE_FILE

    def exists(self) -> bool:
        return self.path.exists()

    def header(self) -> KeystoreHeader:
        if self._header is None:
            if not self.exists():
                raise NotInitialized(f"{self.home}: no keystore (run `pqhsm init`)")
            self._header = KeystoreHeader.decode(read_file(self.path), self.path)
        return self._header

    def blob_path(self, key_id: str) -> Path:
        return self.blob_dir / f"{valid_key_id(key_id)}.blob"

    @property
    def pending_change(self) -> bool:
        return (self.home / NEXT_FILE).exists()

    # -- init -------------------------------------------------------------------------------

    def create(self, passphrase: SecretBytes, kdf: KdfParams) -> KeystoreHeader:
        """Create the token wrap key, the ML-KEM-1024 key and the header; leave it unlocked."""
        if self.exists():
            raise KeyExists(f"{self.path} already exists")
        ensure_private_dir(self.home)
        ensure_private_dir(self.blob_dir)
        keystore_id = os.urandom(16)
        self._token.ensure_wrap_key(TWK_LABEL)
        seed = SecretBytes.random(MLKEM1024_SEED_LEN)
        try:
            decaps = self._pqc.mlkem1024_from_seed(seed.view())
            sealed = self._token.wrap_encrypt(TWK_LABEL, seed, SEED_AAD + keystore_id)
        finally:
            seed.wipe()
        ek = decaps.encapsulation_key()
        pw_key = derive_pw_key(kdf, passphrase)
        check = self._seal_check(ek, pw_key, kdf.gen)
        header = KeystoreHeader(keystore_id, _now_ms(), TWK_LABEL, ek, sealed, kdf, check)
        atomic_write(self.path, header.encode(), point="keystore.header")
        self._header, self._decaps, self._pw_key = header, decaps, pw_key
        return header

    # -- unlock / lock ------------------------------------------------------------------------

    @property
    def unlocked(self) -> bool:
        return self._pw_key is not None and self._decaps is not None

    def _unwrap_kem(self, header: KeystoreHeader) -> MlKemDecapsulator:
        seed = self._token.wrap_decrypt(
            header.twk_label, header.seed_sealed, SEED_AAD + header.keystore_id
        )
        try:
            if len(seed) != MLKEM1024_SEED_LEN:
                raise BlobInvalid("keystore KEM seed has the wrong length")
            decaps = self._pqc.mlkem1024_from_seed(seed.view())
        finally:
            seed.wipe()
        if not ct_equal(decaps.encapsulation_key(), header.ek):
            raise BlobInvalid("keystore header does not match the token's KEM key")
        return decaps

    def unwrap_seed(self) -> SecretBytes:
        """The ML-KEM-1024 seed, unwrapped by the token (for a recovery-key backup only).

        Security: the caller wipes it as soon as it is sealed again.
        """
        header = self.header()
        return self._token.wrap_decrypt(
            header.twk_label, header.seed_sealed, SEED_AAD + header.keystore_id
        )

    def header_for_new_token(self, header_bytes: bytes, seed: SecretBytes) -> bytes:
        """Re-seal a backup's KEM seed with this (new) token's wrap key; same keystore otherwise.

        :raises BlobInvalid: the seed does not reproduce the header's encapsulation key.
        """
        old = KeystoreHeader.decode(header_bytes, self.path)
        if not ct_equal(self._pqc.mlkem1024_from_seed(seed.view()).encapsulation_key(), old.ek):
            raise BlobInvalid("the recovered KEM seed does not match the backup's keystore")
        self._token.ensure_wrap_key(old.twk_label)
        sealed = self._token.wrap_encrypt(old.twk_label, seed, SEED_AAD + old.keystore_id)
        new = KeystoreHeader(
            old.keystore_id, old.created, old.twk_label, old.ek, sealed, old.kdf, old.check
        )
        return new.encode()

    def unlock(self, passphrase: SecretBytes) -> None:
        """Unwrap the KEM key in the token and derive the passphrase key.

        :raises BlobInvalid: the passphrase is wrong (or the header/token do not match).
        :raises StateError: a passphrase change was interrupted; finish it first.
        """
        if self.pending_change:
            raise StateError("an interrupted passphrase change must be recovered first")
        header = self.header()
        decaps = self._unwrap_kem(header)
        pw_key = derive_pw_key(header.kdf, passphrase)
        try:
            self._open_check(decaps, pw_key, header.check)
        except BlobInvalid:
            pw_key.wipe()
            raise BlobInvalid(
                "wrong passphrase (or this keystore does not belong to this token)"
            ) from None
        self.lock()
        self._decaps, self._pw_key = decaps, pw_key

    def lock(self) -> None:
        """Zeroize the passphrase key and drop the decapsulation key."""
        if self._pw_key is not None:
            self._pw_key.wipe()
        self._pw_key = None
        self._decaps = None

    def _require(self) -> tuple[MlKemDecapsulator, SecretBytes]:
        if self._decaps is None or self._pw_key is None:
            raise StateError("keystore is locked")
        return self._decaps, self._pw_key

    def _seal_check(self, ek: bytes, pw_key: SecretBytes, gen: int) -> bytes:
        with SecretBytes(_CHECK_PLAINTEXT) as plain:
            return seal_blob(
                self._pqc,
                ek,
                pw_key,
                key_id=CHECK_ID,
                alg=CHECK_ALG,
                plaintext=plain,
                created=_now_ms(),
                kdf_gen=gen,
            )

    def _open_check(self, decaps: MlKemDecapsulator, pw_key: SecretBytes, check: bytes) -> None:
        with open_blob(decaps, pw_key, check, key_id=CHECK_ID, alg=CHECK_ALG) as plain:
            if not ct_equal(plain, _CHECK_PLAINTEXT):
                raise BlobInvalid("unlock check does not match")

    # -- blobs ---------------------------------------------------------------------------------

    def seal(self, key_id: str, alg: str, plaintext: SecretBytes) -> bytes:
        """Seal ``plaintext`` as the blob of ``key_id`` (not written)."""
        _, pw_key = self._require()
        header = self.header()
        return seal_blob(
            self._pqc,
            header.ek,
            pw_key,
            key_id=key_id,
            alg=alg,
            plaintext=plaintext,
            created=_now_ms(),
            kdf_gen=header.kdf.gen,
        )

    def write_blob(self, key_id: str, blob: bytes) -> bytes:
        """Write a blob atomically; return its SHA3-256 (what the WAL records)."""
        ensure_private_dir(self.blob_dir)
        atomic_write(self.blob_path(key_id), blob, point="blob")
        return hashlib.sha3_256(blob).digest()

    def read_blob(self, key_id: str) -> bytes:
        path = self.blob_path(key_id)
        if not path.exists():
            raise BlobInvalid(f"blob for key {key_id} is missing")
        return read_file(path, limit=1 << 20)

    def open(self, key_id: str, alg: str, blob: bytes | None = None) -> SecretBytes:
        decaps, pw_key = self._require()
        return open_blob(
            decaps, pw_key, self.read_blob(key_id) if blob is None else blob, key_id=key_id, alg=alg
        )

    def remove_blob(self, key_id: str) -> None:
        path = self.blob_path(key_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.blob_dir)

    # ML-DSA-87 private keys: plaintext = seed (32) || public key (2592).

    def new_mldsa(self, key_id: str) -> tuple[bytes, bytes]:
        """Generate an ML-DSA-87 key, seal and write its blob; return (public key, blob SHA3)."""
        if self.blob_path(key_id).exists():
            raise KeyExists(f"blob for key {key_id} already exists")
        plain = SecretBytes(MLDSA87_SEED_LEN + MLDSA87_PUBLIC_LEN)
        try:
            plain.view()[:MLDSA87_SEED_LEN] = os.urandom(MLDSA87_SEED_LEN)
            public = self._pqc.mldsa87_from_seed(plain.view()[:MLDSA87_SEED_LEN]).public_bytes()
            plain.view()[MLDSA87_SEED_LEN:] = public
            blob = self.seal(key_id, MLDSA_ALG, plain)
        finally:
            plain.wipe()
        return public, self.write_blob(key_id, blob)

    def new_mldsa_many(self, key_ids: list[str]) -> dict[str, tuple[bytes, bytes]]:
        """:meth:`new_mldsa` for many keys with one directory fsync for the whole batch.

        Each blob is written to a temp file and fsync'd, then all are renamed into place
        and the folder is fsync'd once.  A blob with no WAL record naming it is an orphan
        that recovery removes, so a crash anywhere in here loses nothing.
        """
        ensure_private_dir(self.blob_dir)
        out: dict[str, tuple[bytes, bytes]] = {}
        temps: list[tuple[Path, Path]] = []
        try:
            for key_id in key_ids:
                final = self.blob_path(key_id)
                plain = SecretBytes(MLDSA87_SEED_LEN + MLDSA87_PUBLIC_LEN)
                try:
                    plain.view()[:MLDSA87_SEED_LEN] = os.urandom(MLDSA87_SEED_LEN)
                    signer = self._pqc.mldsa87_from_seed(plain.view()[:MLDSA87_SEED_LEN])
                    public = signer.public_bytes()
                    plain.view()[MLDSA87_SEED_LEN:] = public
                    blob = self.seal(key_id, MLDSA_ALG, plain)
                finally:
                    plain.wipe()
                tmp = final.with_name(f".{final.name}.tmp")
                write_synced(tmp, blob, point="blob.batch")
                temps.append((tmp, final))
                out[key_id] = (public, hashlib.sha3_256(blob).digest())
            for tmp, final in temps:
                os.replace(tmp, final)
            fault_point("blob.batch.rename")
            fsync_dir(self.blob_dir)
            fault_point("blob.batch.dirsync")
        except BaseException:
            for tmp, _ in temps:
                tmp.unlink(missing_ok=True)
            raise
        return out

    def open_mldsa(
        self, key_id: str, *, expect_public: bytes | None = None, expect_digest: bytes | None = None
    ) -> MlDsaSigner:
        """Open an ML-DSA-87 blob and check the seed reproduces the stored public key.

        :raises BlobInvalid: the blob does not open, does not match the WAL digest, or holds a
            seed that does not reproduce its public key.
        """
        blob = self.read_blob(key_id)
        if expect_digest is not None and not ct_equal(
            hashlib.sha3_256(blob).digest(), expect_digest
        ):
            raise BlobInvalid(f"blob for key {key_id} does not match the digest in the log")
        with self.open(key_id, MLDSA_ALG, blob) as plain:
            if len(plain) != MLDSA87_SEED_LEN + MLDSA87_PUBLIC_LEN:
                raise BlobInvalid(f"blob for key {key_id} has the wrong length")
            signer = self._pqc.mldsa87_from_seed(plain.view()[:MLDSA87_SEED_LEN])
            stored = bytes(plain.view()[MLDSA87_SEED_LEN:])
        if not ct_equal(signer.public_bytes(), stored):
            raise BlobInvalid(f"blob for key {key_id}: seed does not match its public key")
        if expect_public is not None and not ct_equal(stored, expect_public):
            raise BlobInvalid(f"blob for key {key_id}: public key differs from the log")
        return signer

    def blob_ids(self) -> list[str]:
        if not self.blob_dir.exists():
            return []
        return sorted(p.name[: -len(".blob")] for p in self.blob_dir.glob("*.blob"))

    # -- passphrase change -----------------------------------------------------------------------

    def prepare_change(self, old: SecretBytes, new: SecretBytes) -> tuple[int, dict[str, bytes]]:
        """Steps (1)-(2) of a passphrase change: the next header and a ``.new`` twin per blob.

        Nothing the running keystore reads is touched.  Returns the new generation and the
        SHA3-256 of every new blob: the caller's WAL record is the commit point.

        :raises BlobInvalid: ``old`` is wrong.
        """
        header = self.header()
        decaps = self._unwrap_kem(header)
        old_key = derive_pw_key(header.kdf, old)
        new_key: SecretBytes | None = None
        try:
            try:
                self._open_check(decaps, old_key, header.check)
            except BlobInvalid:
                raise BlobInvalid("the current passphrase is wrong") from None
            self.rollback_change()
            kdf = header.kdf.fresh()
            new_key = derive_pw_key(kdf, new)
            nxt = KeystoreHeader(
                header.keystore_id,
                header.created,
                header.twk_label,
                header.ek,
                header.seed_sealed,
                kdf,
                self._seal_check(header.ek, new_key, kdf.gen),
            )
            digests: dict[str, bytes] = {}
            for key_id in self.blob_ids():
                blob = self.read_blob(key_id)
                bh, _ = parse_blob(blob)
                with open_blob(decaps, old_key, blob, key_id=bh.key_id, alg=bh.alg) as plain:
                    fresh = seal_blob(
                        self._pqc,
                        header.ek,
                        new_key,
                        key_id=bh.key_id,
                        alg=bh.alg,
                        plaintext=plain,
                        created=bh.created,
                        kdf_gen=kdf.gen,
                    )
                atomic_write(self._new_path(key_id), fresh, point="passphrase.blob")
                digests[key_id] = hashlib.sha3_256(fresh).digest()
            atomic_write(self.home / NEXT_FILE, nxt.encode(), point="passphrase.next")
            return kdf.gen, digests
        finally:
            old_key.wipe()
            if new_key is not None:
                new_key.wipe()

    def _new_path(self, key_id: str) -> Path:
        return self.blob_dir / f"{valid_key_id(key_id)}.blob.new"

    def commit_change(self) -> None:
        """Steps (3)-(4), after the WAL record: move every ``.new`` blob and the next header in.

        Idempotent: recovery calls it again after a crash anywhere in here.
        """
        if self.blob_dir.exists():
            for new_path in sorted(self.blob_dir.glob("*.blob.new")):
                os.replace(new_path, new_path.with_suffix(""))
                fault_point("passphrase.commit.rename")
            fsync_dir(self.blob_dir)
        next_path = self.home / NEXT_FILE
        if next_path.exists():
            os.replace(next_path, self.path)
            fsync_dir(self.home)
            fault_point("passphrase.commit.header")
        self._header = None
        self.lock()

    def rollback_change(self) -> None:
        """Forget a change whose WAL record was never written (the old passphrase stays)."""
        removed = False
        if self.blob_dir.exists():
            for new_path in self.blob_dir.glob("*.blob.new"):
                new_path.unlink()
                removed = True
            if removed:
                fsync_dir(self.blob_dir)
        next_path = self.home / NEXT_FILE
        if next_path.exists():
            next_path.unlink()
            fsync_dir(self.home)

    def pending_generation(self) -> int | None:
        """The generation of an interrupted change's next header, if there is one."""
        next_path = self.home / NEXT_FILE
        if not next_path.exists():
            return None
        return KeystoreHeader.decode(read_file(next_path), next_path).kdf.gen
