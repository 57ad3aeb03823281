#!/usr/bin/env bash
# Builds Tansu (the Kafka-compatible broker of the compatibility subset) into ~/.cache/strait/tools/bin,
# once: about 12 minutes on 2 cores, then cached. Called by scripts/setup.sh, and by scripts/test.sh in
# the background while the Kafka scenarios run.
set -euo pipefail

CACHE="${STRAIT_CACHE:-$HOME/.cache/strait}"
TOOLS="$CACHE/tools"
TANSU_VERSION="0.6.0"

say() { printf '[setup-tansu] %s\n' "$*"; }

mkdir -p "$TOOLS"
TANSU="$TOOLS/bin/tansu"
tansu_building() { pgrep -f "cargo install tansu" >/dev/null 2>&1; }
if [ ! -x "$TANSU" ] && tansu_building; then
    # Another process is already building it into the same root: wait instead of racing it.
    say "a Tansu build is already running; waiting for $TANSU (up to 40 min)"
    for _ in $(seq 1 480); do
        [ -x "$TANSU" ] && break
        tansu_building || break
        sleep 5
    done
fi
if [ -x "$TANSU" ]; then
    say "tansu present: $TANSU"
else
    say "building tansu $TANSU_VERSION (about 12 minutes on 2 cores; cached afterwards in $TOOLS)"
    CARGO_TARGET_DIR="$CACHE/tansu-target" cargo install tansu --version "$TANSU_VERSION" --locked \
        --features dynostore,libsql --root "$TOOLS" 2>&1 | tee "$CACHE/tansu-build.log" | grep -E "^ *(Installing|Installed|Finished|error)" || true
    [ -x "$TANSU" ] || { say "ERROR: tansu build failed, see $CACHE/tansu-build.log"; exit 1; }
fi
