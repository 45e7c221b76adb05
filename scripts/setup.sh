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
# torch's CUDA build alone is about 6 GB in .venv: say so up front rather than after a failed install
free_gb() { df -Pk . | awk 'NR==2 {printf "%.1f", $4 / 1048576}'; }
NEED_GB=7
if awk -v f="$(free_gb)" -v n="$NEED_GB" 'BEGIN {exit !(f < n)}'; then
  echo "warning: $(free_gb) GB free on this disk; .venv needs about $NEED_GB GB" >&2
fi
# a dropped connection mid-wheel resumes instead of failing the install (pip ignores names it does not know)
export PIP_RETRIES=10 PIP_RESUME_RETRIES=10 PIP_TIMEOUT=60
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
echo "installing $TORCH_PINS and mt into .venv (first time: a few minutes)" >&2
.venv/bin/python -m pip install -q $TORCH_PINS 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e ".[dev]" $TORCH_PINS 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, torchvision, timm, albumentations, multitask" \
  || { echo "setup failed: .venv cannot import mt's dependencies ($(free_gb) GB free on this disk; about $NEED_GB GB needed)" >&2; exit 1; }
echo "$want" > "$stamp"
