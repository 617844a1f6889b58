#!/usr/bin/env bash
# Set everything up from scratch and run the whole test suite (lint, then pytest).
# Tests read the real datasets from ../shared/data; a missing file fails them (never skips).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/python -m pytest -q "$@"
