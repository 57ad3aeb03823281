#!/usr/bin/env bash
# Installs Kroxylicious (the proxy runtime, its record-encryption filter and its HashiCorp Vault KMS)
# for the comparison benchmark into ~/.cache/strait/kroxylicious/<version>/, once; later runs reuse it.
#
#   pom.xml     written here: the artifacts below
#   libs/       every runtime jar (`mvn dependency:copy-dependencies`), plus log4j2 as SLF4J's backend
#   launcher/   StraitBenchKroxylicious.class: starts KafkaProxy from a YAML file (see that file: the
#               kroxylicious-app artifact is not served by this machine's registry)
#   .complete   a hash of the pom and the launcher source, written last: present and equal = whole
#
# Unattended and idempotent; prints the folder on its last line (progress goes to stderr).
# KROXYLICIOUS_VERSION overrides the version; the default is the newest that resolves here (see
# docs/benchmarks.md for the versions tried).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERSION="${KROXYLICIOUS_VERSION:-0.12.0}"
LOG4J_VERSION="2.24.3"
CACHE="${STRAIT_CACHE:-$HOME/.cache/strait}"
DEST="$CACHE/kroxylicious/$VERSION"
LAUNCHER="$HERE/StraitBenchKroxylicious.java"

say() { printf '[kroxylicious] %s\n' "$*" >&2; }

dep() { printf '    <dependency><groupId>%s</groupId><artifactId>%s</artifactId><version>%s</version></dependency>\n' "$1" "$2" "$3"; }
pom() {
    cat <<POM
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by integration/bench/kroxylicious/install.sh: the jars the comparison benchmark runs. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>strait.bench</groupId>
  <artifactId>kroxylicious-bench-runtime</artifactId>
  <version>$VERSION</version>
  <packaging>pom</packaging>
  <dependencies>
$(dep io.kroxylicious kroxylicious-runtime "$VERSION")
$(dep io.kroxylicious kroxylicious-record-encryption "$VERSION")
$(dep io.kroxylicious kroxylicious-kms-provider-hashicorp-vault "$VERSION")
$(dep org.apache.logging.log4j log4j-slf4j2-impl "$LOG4J_VERSION")
$(dep org.apache.logging.log4j log4j-core "$LOG4J_VERSION")
  </dependencies>
</project>
POM
}

POM_TEXT="$(pom)"
WANT="$( { echo "$POM_TEXT"; cat "$LAUNCHER"; } | sha256sum | cut -d' ' -f1)"
complete() { [ -f "$DEST/.complete" ] && [ "$(cat "$DEST/.complete")" = "$WANT" ]; }

if complete; then
    say "present: $DEST"
    echo "$DEST"
    exit 0
fi

command -v mvn >/dev/null || { say "ERROR: mvn not found (apt-get install maven)"; exit 1; }
command -v javac >/dev/null || { say "ERROR: javac not found (apt-get install openjdk-17-jdk-headless)"; exit 1; }

mkdir -p "$DEST"
# One installer at a time per version (setup.sh and a benchmark may both call this).
exec 9>"$DEST/.lock"
flock 9
if complete; then
    echo "$DEST"
    exit 0
fi
rm -f "$DEST/.complete"

if [ -f "$DEST/pom.xml" ] && [ "$(cat "$DEST/pom.xml")" = "$POM_TEXT" ] && [ -f "$DEST/libs/.resolved" ]; then
    say "jars present in $DEST/libs"
else
    echo "$POM_TEXT" > "$DEST/pom.xml"
    say "resolving Kroxylicious $VERSION with mvn into $DEST/libs"
    rm -rf "$DEST/libs"
    if ! mvn -B -q -f "$DEST/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
            -DoutputDirectory="$DEST/libs" > "$DEST/mvn.log" 2>&1; then
        tail -30 "$DEST/mvn.log" >&2
        say "ERROR: mvn could not resolve Kroxylicious $VERSION (log: $DEST/mvn.log)"
        exit 1
    fi
    ls "$DEST/libs"/kroxylicious-runtime-"$VERSION".jar >/dev/null
    touch "$DEST/libs/.resolved"
fi

say "compiling the launcher"
rm -rf "$DEST/launcher"
mkdir -p "$DEST/launcher"
javac -nowarn -d "$DEST/launcher" -cp "$DEST/libs/*" "$LAUNCHER"
echo "$WANT" > "$DEST/.complete"
say "installed: $DEST ($(ls "$DEST/libs" | wc -l) jars)"
echo "$DEST"
