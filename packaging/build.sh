#!/usr/bin/env bash
# Builds dist/sn1-gateway, the one-file executable, with PyInstaller (`make binary` runs this).
# PYTHON is the interpreter whose environment holds the project and PyInstaller (default: .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
# This checkout's modules come first, whatever checkout the environment has installed in editable mode.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)
"$PYTHON" -m PyInstaller --noconfirm --clean --log-level WARN \
  --distpath dist --workpath build/pyinstaller packaging/sn1-gateway.spec
echo "built dist/sn1-gateway: $(du -m dist/sn1-gateway | cut -f1) MB in $(( $(date +%s) - started )) s"
