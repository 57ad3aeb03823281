#!/usr/bin/env bash
# Installs cargo-fuzz into ~/.cache/strait/tools (built once, cached; a version check when present).
# Called by the fuzz make targets (docs/fuzzing.md), and by scripts/setup.sh only with STRAIT_FUZZ=1,
# so `make setup` costs nobody who does not fuzz anything. The targets build on the stable compiler
# (`--sanitizer none`: the edge has no unsafe code for a sanitizer to watch).
set -euo pipefail

CACHE="${STRAIT_CACHE:-$HOME/.cache/strait}"
TOOLS="$CACHE/tools"
CARGO_FUZZ_VERSION="0.13.2"

say() { printf '[setup-fuzz] %s\n' "$*"; }

if [ -x "$TOOLS/bin/cargo-fuzz" ] && "$TOOLS/bin/cargo-fuzz" --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION\$"; then
    say "cargo-fuzz $CARGO_FUZZ_VERSION present: $TOOLS/bin/cargo-fuzz"
    exit 0
fi
say "building cargo-fuzz $CARGO_FUZZ_VERSION (about 2 minutes on 2 cores; cached afterwards in $TOOLS)"
CARGO_TARGET_DIR="$CACHE/cargo-fuzz-target" cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" \
    --locked --root "$TOOLS" 2>&1 | grep -E "^ *(Installing|Installed|Finished|error)" || true
[ -x "$TOOLS/bin/cargo-fuzz" ] || { say "ERROR: cargo-fuzz install failed"; exit 1; }
rm -rf "$CACHE/cargo-fuzz-target"
