#!/usr/bin/env bash
# Installs everything the tests, demo and benchmark need. Idempotent; safe on a fresh Debian machine
# (as root) and on a developer machine. Prints each step.
#   - Debian packages: compiler toolchain, cmake, pkg-config, socat, python3-venv
#   - Tansu 0.6.0 (Kafka-compatible broker) into ~/.cache/strait/tools/bin, built once and cached
#     (scripts/setup-tansu.sh; not with STRAIT_SETUP_TANSU=0)
#   - Apache Kafka (broker, tools, MirrorMaker 2) from Maven Central into ~/.cache/strait/kafka/<version>
#   - Python venv ~/.cache/strait/venv from integration/requirements.txt (skipped when unchanged)
#   - with STRAIT_FUZZ=1: cargo-fuzz into ~/.cache/strait/tools/bin (scripts/setup-fuzz.sh)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${STRAIT_CACHE:-$HOME/.cache/strait}"
TOOLS="$CACHE/tools"
VENV="$CACHE/venv"

say() { printf '[setup] %s\n' "$*"; }

mkdir -p "$CACHE"

# ---- Debian packages
APT_PKGS=(build-essential cmake pkg-config socat python3-venv libssl-dev maven openjdk-17-jdk-headless)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if command -v apt-get >/dev/null; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        say "apt-get install ${missing[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        say "WARNING: missing ${missing[*]} and no apt-get; install them by hand"
    fi
else
    say "Debian packages present: ${APT_PKGS[*]}"
fi

# ---- Rust toolchain
if ! command -v cargo >/dev/null; then
    say "ERROR: cargo not found; install Rust (rustup) first"
    exit 1
fi
say "cargo: $(cargo --version)"

# ---- Apache Kafka (jars only: the harness in integration/lib/kafka.py writes configs and starts nodes)
KAFKA_POM="$ROOT/integration/kafka/pom.xml"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_POM")"
KAFKA_DIR="$CACHE/kafka/$KAFKA_VERSION"
KAFKA_STAMP="$KAFKA_DIR/.pom.sha256"
kafka_want="$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)"
if [ -f "$KAFKA_STAMP" ] && [ "$(cat "$KAFKA_STAMP")" = "$kafka_want" ]; then
    say "kafka $KAFKA_VERSION present: $KAFKA_DIR/libs"
else
    say "resolving kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_DIR/libs"
    rm -rf "$KAFKA_DIR/libs"
    mkdir -p "$KAFKA_DIR"
    mvn -q -B -f "$KAFKA_POM" dependency:copy-dependencies -DoutputDirectory="$KAFKA_DIR/libs" \
        > "$KAFKA_DIR/mvn.log" 2>&1 || { say "ERROR: mvn failed, see $KAFKA_DIR/mvn.log"; exit 1; }
    echo "$kafka_want" > "$KAFKA_STAMP"
fi

# ---- Tansu (skipped with STRAIT_SETUP_TANSU=0: `make test` builds it in the background later)
if [ "${STRAIT_SETUP_TANSU:-1}" = 1 ]; then
    "$ROOT/scripts/setup-tansu.sh"
fi

# ---- Python venv
REQ="$ROOT/integration/requirements.txt"
STAMP="$VENV/.strait-requirements.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
    say "creating venv $VENV"
    python3 -m venv "$VENV"
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    say "venv up to date ($VENV)"
else
    say "pip install -r integration/requirements.txt into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$REQ"
    echo "$want" > "$STAMP"
fi
"$VENV/bin/python" -c "import confluent_kafka, kafka; print('[setup] confluent-kafka', confluent_kafka.version(), 'librdkafka', confluent_kafka.libversion()[0], '| kafka-python', kafka.__version__)"

# ---- Kroxylicious (comparison benchmark, integration/bench/compare.py; owned by integration/bench)
# Proxy runtime, record-encryption filter and Vault KMS jars from Maven Central into
# ~/.cache/strait/kroxylicious/<version>, resolved once (install.sh is a no-op when complete).
"$ROOT/integration/bench/kroxylicious/install.sh" >/dev/null
# ---- end Kroxylicious

# ---- cargo-fuzz (only when asked: `STRAIT_FUZZ=1 scripts/setup.sh`; the fuzz make targets call it themselves)
if [ "${STRAIT_FUZZ:-0}" = 1 ]; then
    "$ROOT/scripts/setup-fuzz.sh"
fi

say "done"
