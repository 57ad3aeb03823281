#!/usr/bin/env bash
# `make test`, what CI runs (.ci/run). Formatting and lints first (cheap, they fail fast), the unit
# tests, the scenarios on Apache Kafka, then the README's quick-start demo, the Tansu subset and
# fuzz-smoke.
#
# The Kafka scenarios spend most of their 30 minutes waiting on brokers and clients, so what only the
# later steps need (Tansu, about 12 minutes to build cold, for the demo and the Tansu subset; cargo-fuzz
# and the fuzz targets, about 8)
# is built meanwhile in the background at the lowest CPU priority, and waited for before those steps.
# On a warm cache the background job finds everything present and ends at once.
#
#   scripts/test.sh             everything (make test)
#   scripts/test.sh scenarios   only the Kafka scenarios and the Tansu subset (make pytest; assumes
#                               setup and build were done)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE="${STRAIT_CACHE:-$HOME/.cache/strait}"
PYTHON="${PYTHON:-$CACHE/venv/bin/python}"
# The Tansu compatibility subset: edge core and bad input, with the two libraries Tansu was proven with.
TANSU_SUBSET=(integration/tests/test_edge_core.py integration/tests/test_bad_input.py -k "not java")
read -r -a PYTEST_ARGS <<< "${PYTEST_ARGS:-}"

step() { printf '\n[test] %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

scenarios_only=0
[ "${1:-}" = scenarios ] && scenarios_only=1

if ((scenarios_only)); then
    step "scenarios on Apache Kafka"
    "$PYTHON" -m pytest integration/ "${PYTEST_ARGS[@]}"
    step "Tansu subset"
    STRAIT_BROKER=tansu "$PYTHON" -m pytest "${TANSU_SUBSET[@]}" "${PYTEST_ARGS[@]}"
    exit 0
fi

# A clean clone never reuses incremental state, and it is the largest part of the cache; old
# artifacts are pruned when the disk runs short (scripts/prune-cache.sh says why).
export CARGO_INCREMENTAL=0
step "build cache check"
scripts/prune-cache.sh
step "setup (Tansu later, in the background)"
STRAIT_SETUP_TANSU=0 scripts/setup.sh
step "cargo build --workspace --bins"
cargo build --workspace --bins
step "cargo fmt --check"
cargo fmt --all -- --check
(cd edge/fuzz && cargo fmt -- --check)
step "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
# The one cargo test that needs Tansu runs with the Tansu subset, once Tansu is built.
TANSU_CARGO_TEST=real_clients_through_the_edge_against_tansu
step "cargo test --workspace (but $TANSU_CARGO_TEST)"
cargo test --workspace -- --skip "$TANSU_CARGO_TEST"
mkdir -p "$CACHE"
BACKGROUND_LOG="$CACHE/test-background.log"
step "background: Tansu, cargo-fuzz, fuzz targets (log: $BACKGROUND_LOG)"
# Its own process group, so that a failing step (which ends the run) takes the whole build with it.
setsid nice -n 19 bash -c 'scripts/setup-tansu.sh && scripts/setup-fuzz.sh && python3 scripts/fuzz.py build' \
    > "$BACKGROUND_LOG" 2>&1 &
background=$!
trap 'kill -- "-$background" 2>/dev/null || true' EXIT

step "scenarios on Apache Kafka"
"$PYTHON" -m pytest integration/ "${PYTEST_ARGS[@]}"

step "waiting for the background build"
if ! wait "$background"; then
    tail -n 40 "$BACKGROUND_LOG"
    echo "[test] the background build failed, see $BACKGROUND_LOG" >&2
    exit 1
fi
trap - EXIT
tail -n 5 "$BACKGROUND_LOG"

# The quick start runs on Tansu, so it waits for the background build too.
step "quick-start demo"
scripts/demo.sh
step "Tansu subset"
cargo test -p strait-authz --test tansu_e2e -- --exact "$TANSU_CARGO_TEST"
STRAIT_BROKER=tansu "$PYTHON" -m pytest "${TANSU_SUBSET[@]}" "${PYTEST_ARGS[@]}"
step "fuzz smoke"
python3 scripts/fuzz.py smoke
step "done"
