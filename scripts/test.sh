#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the whole test suite: lint and formatting (ruff), types (mypy),
# then pytest.
# Exits non-zero on any failure, and also when any test was skipped (a skipped component is a failure).
#   bash scripts/test.sh            everything (CI)
#   bash scripts/test.sh --fast     the fast lane: every test not marked slow (docs/testing.md)
# Other arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
select=()
if [[ "${1:-}" == "--fast" ]]; then
  shift
  select=(-m "not slow")
fi
bash scripts/setup.sh
export OMP_NUM_THREADS=1
echo "[test] ruff check"
.venv/bin/ruff check commcomp launch benchmarks tests
echo "[test] ruff format --check"
.venv/bin/ruff format --check commcomp launch benchmarks tests
echo "[test] mypy"
.venv/bin/mypy
echo "[test] pytest ${select[*]}"
.venv/bin/pytest -q -ra --durations=15 "${select[@]}" "$@"
