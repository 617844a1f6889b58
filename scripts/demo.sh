#!/usr/bin/env bash
# Set everything up and run the demo: train on real MNIST (bundled), print held-out bits/dim,
# write samples to runs/demo/samples.png. About six minutes on two CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/realnvp demo --run-dir runs/demo "$@"
