#!/usr/bin/env bash
# Install (first run only) and run the test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NO_ALBUMENTATIONS_UPDATE=1
exec .venv/bin/python -m pytest tests "$@"
