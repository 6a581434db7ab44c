#!/usr/bin/env bash
# Regenerates the checked-in gRPC/protobuf Python code from protos/ (grpcio-tools, pinned in
# pyproject.toml). Imports in the *_pb2_grpc.py files are made package-relative.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
gen() {  # gen PROTO_DIR FILE OUT_DIR
  "$PY" -m grpc_tools.protoc -I "$1" --python_out="$3" --pyi_out="$3" --grpc_python_out="$3" "$1/$2"
  local base="${2%.proto}"
  sed -i "s/^import ${base}_pb2 as /from . import ${base}_pb2 as /" "$3/${base}_pb2_grpc.py"
}
gen protos/mu2net/v1 mu2net.proto clients/mu2net_client/_proto
gen protos/mu2net/kserve grpc_predict_v2.proto server/_proto
