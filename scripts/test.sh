#!/usr/bin/env bash
# Lint, type-check and run the whole test suite.  Called by `./bootstrap.sh test` (and CI).
# PQHSM_FULL=1 also runs the full crash/soak tier (marked slow).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy --strict"
mypy
echo "== pytest"
args=(-q)
if [ "${PQHSM_FULL:-0}" != "1" ]; then args+=(-m "not slow"); fi
exec pytest "${args[@]}" "$@"
