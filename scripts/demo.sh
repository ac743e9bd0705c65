#!/usr/bin/env bash
# The main job: an appliance on the embedded SoftHSM2 token under ./var/pqhsm, one key of
# each classical type, a file signed by each, every signature verified by openssl; an
# ML-DSA-87 key, a key migrated to HYBRID signing dual; then the appliance served over
# PKCS#11 (pqhsm serve) and a signature made through pqhsm's own module.
# Safe to run again: it reuses the appliance and the keys it already made.
set -euo pipefail
cd "$(dirname "$0")/.."
home=var/pqhsm
secrets=var/pqhsm-secrets
work=var/demo
mkdir -p "$work"
pq() { pqhsm --home "$home" "$@"; }

if [ ! -f "$home/keystore.cbor" ]; then
  pq init --embedded-softhsm --generate-secrets "$secrets"
else
  echo "reusing the appliance in $home"
fi

msg="$work/message.txt"
printf 'pqhsm demo message, %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$msg"

declare -A dgst=([ecdsa-p256]=sha256 [ecdsa-p384]=sha384 [ecdsa-secp256k1]=sha256)
for t in ed25519 ed448 ecdsa-p256 ecdsa-p384 ecdsa-secp256k1; do
  label="demo-$t"
  pq key show "$label" >/dev/null 2>&1 || pq key create --type "$t" --label "$label"
  pq key export-public "$label" --out "$work/$t.pem"
  pq sign "$label" --kind classical --in "$msg" --out "$work/$t.sig" 2>/dev/null
  if [ -n "${dgst[$t]:-}" ]; then
    openssl dgst "-${dgst[$t]}" -verify "$work/$t.pem" -signature "$work/$t.sig" "$msg" >/dev/null
  else
    openssl pkeyutl -verify -pubin -inkey "$work/$t.pem" -rawin -in "$msg" -sigfile "$work/$t.sig" >/dev/null
  fi
  printf '%-16s signed in the token, verified by %s\n' "$t" "$(openssl version | cut -d' ' -f1-2)"
done

# a post-quantum key, born ML-DSA-87 in a dual-compromise blob
pq key show demo-ml-dsa-87 >/dev/null 2>&1 || pq key create --type ml-dsa-87 --label demo-ml-dsa-87
pq key export-public demo-ml-dsa-87 --out "$work/ml-dsa-87.pem"
pq sign demo-ml-dsa-87 --in "$msg" --out "$work/ml-dsa-87.sig" 2>/dev/null
pq verify --pub "$work/ml-dsa-87.pem" --in "$msg" --sig "$work/ml-dsa-87.sig" >/dev/null
printf '%-16s signed from its sealed blob, verified from the public key alone\n' "ml-dsa-87"

# migration: a classical key moved to HYBRID signs dual (OR-mode) signatures
pq key show demo-migrating >/dev/null 2>&1 || pq key create --type ed25519 --label demo-migrating >/dev/null
if pq key show demo-migrating --json | grep -q '"state": "CLASSICAL"'; then
  pq migrate demo-migrating --to HYBRID --reason "demo" >/dev/null
fi
pq key export-public demo-migrating --out "$work/migrating.pem"
pq sign demo-migrating --in "$msg" --out "$work/migrating.dual" 2>/dev/null
for policy in legacy pqc strict; do
  pq verify --policy "$policy" --pub "$work/migrating.pem" --in "$msg" --sig "$work/migrating.dual" >/dev/null
done
printf '%-16s HYBRID: dual signature verified under the legacy, pqc and strict policies\n' "ed25519"
pq audit verify | head -1

# the network-HSM face: serve PKCS#11 on a Unix socket and sign through pqhsm's own
# module, as any PKCS#11 application would (here python-pkcs11; pkcs11-tool works too)
if [ ! -f "$secrets/client-pin" ]; then
  (umask 077 && head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$secrets/client-pin")
  python -m pkcs11_shim set-pin --home "$home" --pin-file "$secrets/client-pin" >/dev/null
fi
sockdir=$(mktemp -d /tmp/pqhsm-demo.XXXXXX)  # 0700; AF_UNIX paths must stay short
pqhsm --home "$home" serve --socket "$sockdir/p11.sock" --unlock >/dev/null 2>"$work/serve.log" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$sockdir"' EXIT
for _ in $(seq 200); do [ -S "$sockdir/p11.sock" ] && break; sleep 0.05; done
export PQHSM_SERVER_ADDRESS="unix:path=$sockdir/p11.sock"
module=$(pqhsm module-path)
pkcs11-tool --module "$module" -M 2>/dev/null | grep -c ',' | xargs printf '%-16s the module lists %s mechanisms (ML-DSA, EdDSA, ECDSA-SHA*, dual, composite)\n' "pkcs11"
python - "$module" "$secrets/client-pin" "$msg" "$work/pkcs11-ed25519.sig" <<'PY'
import sys
import pkcs11
from pkcs11 import KeyType, Mechanism, ObjectClass
module, pin_file, msg_file, out = sys.argv[1:]
with open(pin_file) as f:
    pin = f.read().strip()
token = pkcs11.lib(module).get_token()
with token.open(user_pin=pin) as session:
    key = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC_EDWARDS, label="demo-ed25519")
    with open(msg_file, "rb") as f:
        sig = key.sign(f.read(), mechanism=Mechanism.EDDSA)
with open(out, "wb") as f:
    f.write(sig)
PY
openssl pkeyutl -verify -pubin -inkey "$work/ed25519.pem" -rawin -in "$msg" \
  -sigfile "$work/pkcs11-ed25519.sig" >/dev/null
printf '%-16s Ed25519 signed through libpqhsm-pkcs11.so and the server, verified by openssl\n' "pkcs11"
kill "$server"
wait "$server" 2>/dev/null || true
trap - EXIT
rm -rf "$sockdir"

echo
pq key list
echo
pq status
echo
echo "demo OK: signatures and public keys are in $work; secrets (0600) in $secrets"
