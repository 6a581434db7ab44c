#!/usr/bin/env bash
# The main job: the mu2Net evolver on real data (Fashion-MNIST, MNIST-5k, private digits),
# on the embedded default store in ./data. Extra arguments go to `mu2net evolve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/mu2net evolve --data-dir "${MU2NET_DATA_DIR:-data}" \
  --task fashion_mnist=builtin:fashion_mnist --task mnist5k=builtin:mnist5k --task digits=builtin:digits \
  --private digits --root-hparam mu=0.3 --root-hparam learning_rate=0.05 --root-hparam flip=false \
  --root-hparam crop_area_min=0.5 --width 64 --mlp-dim 128 --cycles 6 --sample-cap 8192 "$@"
