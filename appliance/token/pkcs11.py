"""Token backend over python-pkcs11: any PKCS#11 module, SoftHSM2 by default.

hazardous: use the service API.  This module is the only one that imports ``pkcs11``.

Every python-pkcs11 exception is translated at this boundary through one table into the
appliance's own tree (python-pkcs11 drops the numeric rv; ours keep a CKR).

Security: classical private keys are generated with ``CKA_TOKEN``, ``CKA_PRIVATE`` and
``CKA_SENSITIVE`` true and ``CKA_EXTRACTABLE`` false; no code path reads a private value.
python-pkcs11 takes the PIN as ``str`` and returns decrypted data as ``bytes``; both are
immutable copies this module cannot wipe (see docs/threat-model.md).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import pkcs11
import pkcs11.exceptions as p11x
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams
from pkcs11.types import DecryptMixin, EncryptMixin, SignMixin

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Lib  # noqa: N812 - a class

from appliance import errors
from appliance.algorithms import Algorithm, alg_from_ec_params, der_oid, ec_point_to_spki
from appliance.fsio import fault_point
from appliance.secret import BytesLike, SecretBytes
from appliance.token import FoundKey, TokenConfig, TokenInfo
from appliance.token.nativesign import NativeSigner

__all__ = ["Pkcs11Token"]

_T = TypeVar("_T")

# python-pkcs11 exception -> ours.  Anything not listed becomes TokenError.
_ERRORS: Final[dict[type[Exception], type[errors.ApplianceError]]] = {
    p11x.PinIncorrect: errors.PinIncorrect,
    p11x.PinInvalid: errors.PinIncorrect,
    p11x.PinLenRange: errors.PinIncorrect,
    p11x.PinLocked: errors.PinLocked,
    p11x.UserPinNotInitialized: errors.CredentialError,
    p11x.UserNotLoggedIn: errors.CredentialError,
    p11x.NoSuchToken: errors.TokenNotPresent,
    p11x.TokenNotPresent: errors.TokenNotPresent,
    p11x.TokenNotRecognised: errors.TokenNotPresent,
    p11x.DeviceRemoved: errors.TokenNotPresent,
    p11x.NoSuchKey: errors.NoSuchObject,
    p11x.MultipleObjectsReturned: errors.MultipleObjectsReturned,
    p11x.MultipleTokensReturned: errors.ConfigError,
    p11x.MechanismInvalid: errors.PolicyDenied,
    p11x.AttributeSensitive: errors.PolicyDenied,
    p11x.TemplateInconsistent: errors.CallerError,
    p11x.TemplateIncomplete: errors.CallerError,
    p11x.DomainParamsInvalid: errors.CallerError,
}

_AES_GCM_NONCE = 12
_AES_GCM_TAG = 16


_WORDS: Final[dict[type[Exception], str]] = {
    p11x.PinIncorrect: "wrong token PIN",
    p11x.PinInvalid: "token PIN has invalid characters",
    p11x.PinLenRange: "token PIN has the wrong length",
    p11x.PinLocked: "token PIN is locked (too many failures)",
    p11x.UserPinNotInitialized: "token user PIN is not initialized",
    p11x.UserNotLoggedIn: "not logged in to the token",
    p11x.DeviceRemoved: "token was removed",
    p11x.MechanismInvalid: "token does not support this mechanism",
}


def _translate(exc: Exception, what: str) -> errors.ApplianceError:
    """One rv -> exception table; the message says what failed in words."""
    cls = _ERRORS.get(type(exc), errors.TokenError)
    detail = _WORDS.get(type(exc)) or f"token error {type(exc).__name__}"
    return cls(f"{what}: {detail}")


class _boundary:  # noqa: N801 - used as a context manager, like a function
    """Translate python-pkcs11 exceptions raised inside the block.

    A class, not a ``@contextmanager`` generator: it wraps every signature, and a
    generator's set-up costs a few microseconds more each time.
    """

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, _type: type[BaseException] | None, exc: BaseException | None, _tb: object
    ) -> None:
        if isinstance(exc, p11x.PKCS11Error):  # our own errors pass through untouched
            raise _translate(exc, self._what) from None


def _load_module(module: str) -> Pkcs11Lib:
    if not os.path.isfile(module):
        raise errors.TokenNotPresent(f"PKCS#11 module not found: {module}")
    try:
        return pkcs11.lib(module)
    except (RuntimeError, OSError, p11x.PKCS11Error) as exc:
        raise errors.TokenNotPresent(
            f"cannot load PKCS#11 module {module}: {type(exc).__name__}"
        ) from None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").rstrip(" \x00")
    return str(value).rstrip(" \x00")


class Pkcs11Token:
    """One logged-in user session on one token, shared by the appliance under a lock."""

    def __init__(
        self, config: TokenConfig, lib: Pkcs11Lib, token: pkcs11.Token, session: pkcs11.Session
    ) -> None:
        self._config = config
        self._lib = lib
        self._token = token
        self._session: pkcs11.Session | None = session
        self._lock = threading.RLock()
        self._keys: dict[bytes, SignMixin] = {}
        # Signatures take two module calls through ctypes instead of python-pkcs11's three
        # (nativesign.py); None: the module has no usable function list, python-pkcs11 signs.
        self._native = NativeSigner.load(config.module)

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, config: TokenConfig, pin: SecretBytes) -> Pkcs11Token:
        """Load the module, find the token and log in as the user.

        :raises TokenNotPresent: module or token missing.
        :raises PinIncorrect: wrong PIN.  :raises PinLocked: the token locked the PIN.
        """
        if not config.label and not config.serial:
            raise errors.ConfigError("token label or serial must be configured")
        lib = _load_module(config.module)
        with _boundary(f"token {config.describe()}"):
            try:
                token = lib.get_token(token_label=config.label, token_serial=config.serial)
            except p11x.NoSuchToken:
                raise errors.TokenNotPresent(f"no token with {config.describe()}") from None
            # python-pkcs11 needs the PIN as str; this copy cannot be wiped.
            pin_text = bytes(pin.view()).decode("utf-8")
            try:
                session = token.open(rw=True, user_pin=pin_text)
            except p11x.UserAlreadyLoggedIn:
                # Login state is per application: this process is already logged in to this
                # token (a second appliance object on it), so a plain session shares it.
                session = token.open(rw=True)
            finally:
                del pin_text
        return cls(config, lib, token, session)

    def close(self) -> None:
        """Log out and close the session; drop every cached handle."""
        with self._lock:
            self._keys.clear()
            if self._session is not None:
                try:
                    self._session.close()
                except p11x.PKCS11Error:
                    pass  # closing a session the token already dropped is not an error
                self._session = None

    @property
    def _s(self) -> pkcs11.Session:
        if self._session is None:
            raise errors.TokenError("token session is closed")
        return self._session

    def _locked(self, what: str, fn: Callable[[], _T]) -> _T:
        with self._lock, _boundary(what):
            return fn()

    def info(self) -> TokenInfo:
        t = self._token
        return TokenInfo(
            module=self._config.module,
            label=_text(t.label),
            serial=_text(t.serial),
            manufacturer=_text(t.manufacturer_id),
            model=_text(t.model),
        )

    # -- classical keys ----------------------------------------------------------------

    def generate_keypair(self, alg: Algorithm, cka_id: bytes, label: str) -> bytes:
        """Generate a keypair in the token: sensitive, never extractable; return its SPKI."""
        key_type = KeyType.EC_EDWARDS if alg.edwards else KeyType.EC
        mech = Mechanism.EC_EDWARDS_KEY_PAIR_GEN if alg.edwards else Mechanism.EC_KEY_PAIR_GEN

        def run() -> bytes:
            pub, priv = self._s.generate_keypair(
                key_type,
                mechanism=mech,
                store=True,
                label=label,
                id=cka_id,
                public_template={
                    Attribute.EC_PARAMS: der_oid(alg.curve_oid),
                    Attribute.VERIFY: True,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                },
                private_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                    Attribute.DECRYPT: False,
                    Attribute.DERIVE: False,
                },
            )
            fault_point("token.generate.after")
            if isinstance(priv, SignMixin):
                self._keys[cka_id] = priv
            return ec_point_to_spki(alg, bytes(pub[Attribute.EC_POINT]))

        return self._locked(f"generate {alg.name} key", run)

    def find_keypair(self, *, label: str | None = None, cka_id: bytes | None = None) -> FoundKey:
        """Find one signing private key by label or id, with its public half.

        :raises NoSuchObject: nothing matches.  :raises MultipleObjectsReturned: several do.
        """
        if label is None and cka_id is None:
            raise errors.CallerError("give a label or an id to find a token key")
        attrs: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
        if label is not None:
            attrs[Attribute.LABEL] = label
        if cka_id is not None:
            attrs[Attribute.ID] = cka_id
        what = f"label {label!r}" if label is not None else f"id {cka_id.hex() if cka_id else ''}"

        def run() -> FoundKey:
            found = list(self._s.get_objects(attrs))
            if not found:
                raise errors.NoSuchObject(f"no private key with {what} in the token")
            if len(found) > 1:
                raise errors.MultipleObjectsReturned(f"{len(found)} private keys with {what}")
            priv = found[0]
            key_type = priv[Attribute.KEY_TYPE]
            if key_type not in (KeyType.EC, KeyType.EC_EDWARDS):
                raise errors.CallerError(
                    f"key with {what} is {KeyType(key_type).name}, not EC/EdDSA"
                )
            found_id = bytes(priv[Attribute.ID])
            found_label = _text(priv[Attribute.LABEL])
            pubs = list(
                self._s.get_objects(
                    {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: found_id}
                )
            )
            if len(pubs) != 1:
                raise errors.NoSuchObject(
                    f"private key with {what} has no single public key with its CKA_ID"
                )
            pub = pubs[0]
            alg = alg_from_ec_params(bytes(pub[Attribute.EC_PARAMS]))
            spki = ec_point_to_spki(alg, bytes(pub[Attribute.EC_POINT]))
            return FoundKey(
                cka_id=found_id,
                label=found_label,
                alg=alg,
                spki=spki,
                sensitive=bool(priv[Attribute.SENSITIVE]),
                extractable=bool(priv[Attribute.EXTRACTABLE]),
            )

        return self._locked(f"find key with {what}", run)

    def _private(self, cka_id: bytes) -> SignMixin:
        cached = self._keys.get(cka_id)
        if cached is not None:
            return cached
        found = list(
            self._s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: cka_id})
        )
        if len(found) != 1:
            if not found:
                raise errors.NoSuchObject(f"token holds no private key {cka_id.hex()}")
            raise errors.MultipleObjectsReturned(
                f"{len(found)} private keys with id {cka_id.hex()}"
            )
        key = found[0]
        if not isinstance(key, SignMixin):
            raise errors.PolicyDenied(f"token key {cka_id.hex()} cannot sign")
        self._keys[cka_id] = key
        return key

    def sign(
        self,
        alg: Algorithm,
        cka_id: bytes,
        message: BytesLike,
        *,
        raw: bool = False,
        prehashed: bool = False,
    ) -> bytes:
        """Sign ``message`` with the token key ``cka_id``.

        EdDSA signs the message itself (pure Ed25519/Ed448).  ECDSA hashes on the host
        (SHA-256 for P-256 and secp256k1, SHA-384 for P-384), signs the digest with
        ``CKM_ECDSA`` and returns DER ``Ecdsa-Sig-Value`` (raw r||s when ``raw``);
        secp256k1 signatures are normalized to low-S.
        """
        if alg.edwards:
            data = bytes(message)
            mech = Mechanism.EDDSA
        elif prehashed:  # the caller hashed already (composite signatures: SHA-384 of M')
            data = bytes(message)
            mech = Mechanism.ECDSA
        else:
            h = hashes.Hash(alg.hash())
            h.update(bytes(message))
            data = h.finalize()
            mech = Mechanism.ECDSA

        what = f"sign with key {cka_id.hex()}"

        def run() -> bytes:
            key = self._private(cka_id)
            session: int | None = getattr(self._s, "handle", None)  # python-pkcs11's Cython
            if self._native is not None and session is not None and key.handle is not None:
                return self._native.sign(session, key.handle, int(mech), data, what)
            return bytes(key.sign(data, mechanism=mech))

        sig = self._locked(what, run)
        if alg.edwards:
            return sig
        n = alg.coord_len
        if len(sig) != 2 * n:
            raise errors.TokenError(f"token returned a {len(sig)}-byte ECDSA signature")
        r = int.from_bytes(sig[:n], "big")
        s = int.from_bytes(sig[n:], "big")
        if alg.low_s and alg.order is not None and s > alg.order // 2:
            s = alg.order - s
        if raw:
            return r.to_bytes(n, "big") + s.to_bytes(n, "big")
        return encode_dss_signature(r, s)

    def has_private_key(self, cka_id: bytes) -> bool:
        """Search for a private key with ``cka_id`` in a fresh session (not the cached one)."""

        def run() -> bool:
            with self._token.open(rw=False) as fresh:
                return any(
                    True
                    for _ in fresh.get_objects(
                        {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: cka_id}
                    )
                )

        return self._locked(f"search key {cka_id.hex()}", run)

    def private_key_ids(self) -> set[bytes]:
        """``CKA_ID`` of every private key, listed from a fresh session in one search.

        One listing is O(objects); a search per key would be O(objects) each (SoftHSM2's
        file store checks every object on every search).
        """

        def run() -> set[bytes]:
            with self._token.open(rw=False) as fresh:
                return {
                    bytes(o[Attribute.ID])
                    for o in fresh.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
                }

        return self._locked("list private keys", run)

    def exposed_private_keys(self) -> list[str]:
        """Labels of private keys that are not sensitive or are extractable (I2: none)."""

        def run() -> list[str]:
            with self._token.open(rw=False) as fresh:
                return [
                    _text(o[Attribute.LABEL])
                    for o in fresh.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
                    if not o[Attribute.SENSITIVE] or o[Attribute.EXTRACTABLE]
                ]

        return self._locked("audit private keys", run)

    def destroy_private_keys(self, cka_ids: list[bytes]) -> dict[bytes, int]:
        """Destroy every private key with any of ``cka_ids``; confirm with one fresh listing.

        :raises TokenError: any of them is still visible afterwards.
        """
        wanted = set(cka_ids)

        def run() -> dict[bytes, int]:
            counts = dict.fromkeys(cka_ids, 0)
            for obj in list(self._s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})):
                oid = bytes(obj[Attribute.ID])
                if oid in wanted:
                    self._keys.pop(oid, None)
                    fault_point("token.destroy.before")
                    obj.destroy()
                    fault_point("token.destroy.after")
                    counts[oid] += 1
            return counts

        counts = self._locked(f"destroy {len(wanted)} keys", run)
        left = wanted & self.private_key_ids()
        if left:
            raise errors.TokenError(
                f"{len(left)} private key(s) still present after C_DestroyObject"
            )
        return counts

    def destroy_private_key(self, cka_id: bytes) -> int:
        """``C_DestroyObject`` every private key with ``cka_id``; confirm from a fresh session.

        :raises TokenError: a private key with that id is still visible afterwards.
        """

        def run() -> int:
            self._keys.pop(cka_id, None)
            victims = list(
                self._s.get_objects(
                    {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: cka_id}
                )
            )
            for obj in victims:
                fault_point("token.destroy.before")
                obj.destroy()
                fault_point("token.destroy.after")
            return len(victims)

        count = self._locked(f"destroy key {cka_id.hex()}", run)
        if self.has_private_key(cka_id):
            raise errors.TokenError(
                f"private key {cka_id.hex()} still present after C_DestroyObject"
            )
        return count

    # -- token wrap key (AES-256-GCM inside the token) -----------------------------------

    def _wrap_key(self, label: str) -> Any:
        found = list(
            self._s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})
        )
        if not found:
            raise errors.TokenNotPresent(
                f"token has no wrap key {label!r} (wrong token for this keystore?)"
            )
        if len(found) > 1:
            raise errors.MultipleObjectsReturned(f"{len(found)} secret keys labelled {label!r}")
        key = found[0]
        if not isinstance(key, EncryptMixin) or not isinstance(key, DecryptMixin):
            raise errors.TokenError(f"token key {label!r} cannot encrypt and decrypt")
        return key

    def has_wrap_key(self, label: str) -> bool:
        def run() -> bool:
            return any(
                True
                for _ in self._s.get_objects(
                    {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
                )
            )

        return self._locked("search wrap key", run)

    def ensure_wrap_key(self, label: str) -> None:
        """Create the AES-256 token wrap key (sensitive, never extractable) if missing."""

        def run() -> None:
            if any(
                True
                for _ in self._s.get_objects(
                    {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
                )
            ):
                return
            self._s.generate_key(
                KeyType.AES,
                256,
                label=label,
                store=True,
                template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                    Attribute.WRAP: False,
                    Attribute.UNWRAP: False,
                },
            )

        self._locked("create wrap key", run)

    def wrap_encrypt(self, label: str, plaintext: SecretBytes, aad: bytes) -> bytes:
        """AES-256-GCM in the token; returns nonce || ciphertext || tag."""
        nonce = os.urandom(_AES_GCM_NONCE)

        def run() -> bytes:
            # python-pkcs11 wants bytes; the plaintext copy lives only for this call.
            return bytes(
                self._wrap_key(label).encrypt(
                    bytes(plaintext.view()),
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, aad, _AES_GCM_TAG * 8),
                )
            )

        return nonce + self._locked("token AES-GCM encrypt", run)

    def wrap_decrypt(self, label: str, sealed: bytes, aad: bytes) -> SecretBytes:
        """Open nonce || ciphertext || tag with the token wrap key.

        :raises BlobInvalid: the tag does not verify (wrong token, tampered data).
        """
        if len(sealed) < _AES_GCM_NONCE + _AES_GCM_TAG:
            raise errors.BlobInvalid("sealed value too short")
        nonce, body = sealed[:_AES_GCM_NONCE], sealed[_AES_GCM_NONCE:]

        def run() -> SecretBytes:
            key = self._wrap_key(label)
            try:
                plain = key.decrypt(
                    body,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, aad, _AES_GCM_TAG * 8),
                )
            except (
                p11x.GeneralError,
                p11x.EncryptedDataInvalid,
                p11x.FunctionFailed,
                p11x.DataInvalid,
                p11x.EncryptedDataLenRange,
            ):
                raise errors.BlobInvalid("token could not open the sealed value") from None
            # decrypt() returns bytes; copied into wipeable memory at once.
            return SecretBytes(plain)

        return self._locked("token AES-GCM decrypt", run)

    # -- data objects (anti-rollback counter) ------------------------------------------

    def read_data(self, label: str) -> list[bytes]:
        """Values of every private ``CKO_DATA`` object with ``label``."""

        def run() -> list[bytes]:
            objs = self._s.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label})
            return [bytes(o[Attribute.VALUE]) for o in objs]

        return self._locked(f"read data object {label!r}", run)

    def write_data(self, label: str, value: bytes) -> None:
        """Replace the data object ``label``: create the new one first, then destroy the old.

        A crash between the two leaves both; readers take the newest value they understand.
        """

        def run() -> None:
            old = list(
                self._s.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label})
            )
            self._s.create_object(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.LABEL: label,
                    Attribute.VALUE: value,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.MODIFIABLE: False,
                }
            )
            for o in old:
                o.destroy()

        self._locked(f"write data object {label!r}", run)
