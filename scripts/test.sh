#!/usr/bin/env bash
# Installs mu2net on a fresh machine, type-checks server/ and clients/ strictly, runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/mypy clients/mu2net_client server
exec .venv/bin/python -m pytest -q "$@"
