#!/usr/bin/env bash
# Installs easy_context and what it needs on a fresh CPU machine (Python >= 3.10).
# torch first (the CPU wheel pinned below; keep your own CUDA torch on a GPU box: it is kept if present),
# then DeepSpeed without build isolation (its setup imports torch; isolation would pull a second torch),
# then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
python3 -c "import deepspeed" 2>/dev/null || python3 -m pip install -q --no-build-isolation deepspeed
python3 -m pip install -q -e ".[test]"
