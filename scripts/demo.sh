#!/usr/bin/env bash
# Install (first run only) and run `mt demo`: synthetic data → train → pseudo-label → submit, under demo_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mt demo --out "${1:-demo_out}"
