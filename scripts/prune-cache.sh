#!/usr/bin/env bash
# Keeps the build cache (~/.cache/strait/target) from filling the disk. Cargo never deletes old
# artifacts: every dependency bump and every incremental session leaves its files behind, and a
# machine that runs CI day after day ran out of space mid-link (ld: Bus error, then ENOSPC). When
# the debug tree is larger than STRAIT_TARGET_MAX_GIB or the disk has less than
# STRAIT_MIN_FREE_GIB free, the debug artifacts are removed and the next build starts cold
# (about 10 minutes on 2 cores). Release artifacts, used by the benchmarks, are kept unless the
# disk is still short after that.
set -euo pipefail

target="${CARGO_TARGET_DIR:-$HOME/.cache/strait/target}"
max_gib="${STRAIT_TARGET_MAX_GIB:-40}"
min_free_gib="${STRAIT_MIN_FREE_GIB:-25}"
[ -d "$target" ] || exit 0

free_gib() { df -P -BG "$target" | awk 'NR == 2 { sub("G", "", $4); print $4 }'; }
used_gib() { du -s -BG "$1" 2>/dev/null | awk '{ sub("G", "", $1); print $1 }'; }

prune() {
    echo "[prune-cache] $1: removing $2 ($(used_gib "$2") GiB, $(free_gib) GiB free)"
    rm -rf "$2/incremental" "$2/deps" "$2/build" "$2/.fingerprint"
}

debug_gib=0
[ -d "$target/debug" ] && debug_gib="$(used_gib "$target/debug")"
if ((debug_gib > max_gib)); then
    prune "debug tree over $max_gib GiB" "$target/debug"
fi
if (($(free_gib) < min_free_gib)) && [ -d "$target/debug" ]; then
    prune "less than $min_free_gib GiB free" "$target/debug"
fi
if (($(free_gib) < min_free_gib)) && [ -d "$target/release" ]; then
    prune "still less than $min_free_gib GiB free" "$target/release"
fi
if (($(free_gib) < min_free_gib)); then
    echo "[prune-cache] warning: only $(free_gib) GiB free on $(df -P "$target" | awk 'NR == 2 { print $6 }')" >&2
fi
