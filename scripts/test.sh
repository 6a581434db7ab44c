#!/usr/bin/env bash
# Installs mu2net on a fresh machine and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q "$@"
