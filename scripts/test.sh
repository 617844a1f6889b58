#!/usr/bin/env bash
# Set everything up from scratch and run the whole test suite (lint, then pytest).
# Tests read the real datasets from ../shared/data; a missing file fails them (never skips).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# jemalloc, for the tests of `--malloc jemalloc` (tests/test_allocator.py): Debian's package
if ! ldconfig -p 2>/dev/null | grep 'libjemalloc\.so\.2' >/dev/null; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo apt-get install -y -qq libjemalloc2 >/dev/null 2>&1 \
    || { $sudo apt-get update -qq && $sudo apt-get install -y -qq libjemalloc2; } \
    || { echo "the tests need jemalloc: apt install libjemalloc2" >&2; exit 1; }
fi
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/python -m pytest -q "$@"
