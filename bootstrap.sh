#!/usr/bin/env bash
# pqhsm bootstrap: install everything this project needs on Debian, then run one job.
#
#   ./bootstrap.sh demo   the appliance on its embedded SoftHSM2 token: init, one key of
#                         each classical type, sign a file with each, verify with openssl
#   ./bootstrap.sh test   lint, type-check and the whole test suite (what CI runs)
#
# Idempotent: Debian packages are installed only when missing (after `apt-get update`),
# the virtualenv in .venv is reused, and pip runs again only when pyproject.toml changed.
# Needs root or sudo for apt-get; never reads standard input.
set -euo pipefail
cd "$(dirname "$0")"

mode=${1:-}
case "$mode" in
  demo|test) ;;
  *) echo "usage: $0 demo|test" >&2; exit 2 ;;
esac

debs=(softhsm2 opensc p11-kit p11-kit-modules libengine-pkcs11-openssl spin openssl
      python3 python3-venv python3-dev gcc make valgrind)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($python --version)" >&2
  $python -m venv .venv
fi
stamp=.venv/.pqhsm-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing pqhsm and its Python dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi

# the project's own PKCS#11 module (C); make rebuilds only when its sources changed
make -s -C pkcs11_shim/c

export PATH="$PWD/.venv/bin:$PATH"
case "$mode" in
  demo) exec bash scripts/demo.sh ;;
  test) exec bash scripts/test.sh ;;
esac
