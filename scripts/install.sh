#!/usr/bin/env bash
# Installs everything mu2net needs on a fresh machine: the Fashion-MNIST Debian package
# (where apt-get exists) and a virtual environment in .venv with the pinned packages.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: no apt-get here; builtin:fashion_mnist needs the files of Debian's dataset-fashion-mnist" \
         "(set MU2NET_FASHION_MNIST_DIR to a folder holding *-idx?-ubyte.gz)" >&2
  fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ./clients
.venv/bin/python -m pip install -q -e ".[test]"
