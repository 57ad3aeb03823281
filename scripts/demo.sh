#!/usr/bin/env bash
# Quick start demo: Tansu + strait-edge from examples/quickstart/edge.yaml, a few records through the edge.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/strait/target}"
VENV="${VENV:-$HOME/.cache/strait/venv}"
exec "$VENV/bin/python" "$ROOT/scripts/demo.py"
