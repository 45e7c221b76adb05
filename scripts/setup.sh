#!/usr/bin/env bash
# Create .venv and install mt into it (idempotent: re-runs only when pyproject.toml or this file change).
# torch and torchvision are pinned as a pair: timm needs torchvision, and a mismatched pair breaks imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
stamp=.venv/.mt-installed
want=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
echo "installing $TORCH_PINS and mt into .venv (first time: a few minutes)" >&2
.venv/bin/python -m pip install -q $TORCH_PINS 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e ".[dev]" $TORCH_PINS 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, torchvision, timm, albumentations, multitask" \
  || { echo "setup failed: .venv cannot import mt's dependencies" >&2; exit 1; }
echo "$want" > "$stamp"
