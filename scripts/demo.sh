#!/usr/bin/env bash
# The main job: an appliance on the embedded SoftHSM2 token under ./var/pqhsm, one key of
# each classical type, a file signed by each, every signature verified by openssl.
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

echo
pq key list
echo
pq status
echo
echo "demo OK: signatures and public keys are in $work; secrets (0600) in $secrets"
