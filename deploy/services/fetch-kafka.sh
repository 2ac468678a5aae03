#!/usr/bin/env bash
# Copy the Kafka broker's runtime jars from Maven Central into the cache, once.
#
#   deploy/services/fetch-kafka.sh [CACHE_DIR]      (default ~/.cache/kto-loop)
#
# The jars land in CACHE_DIR/kafka-<version>/libs (outside the checkout), <version> being
# kafka.version in pom.xml; Maven keeps its own cache in ~/.m2, so a second checkout is fast.
# Prints the libs folder. Does nothing when it is already there.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${1:-$HOME/.cache/kto-loop}"
version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml")"
[[ -n "$version" ]] || { echo "no <kafka.version> in $here/pom.xml" >&2; exit 1; }
libs="$cache/kafka-$version/libs"
if [[ -f "$libs/.complete" ]]; then
    echo "$libs"
    exit 0
fi
command -v mvn >/dev/null || { echo "mvn not found: install Maven 3 (apt-get install -y maven)" >&2; exit 1; }
# Copy into a fresh folder and rename it at the end, so an interrupted run never leaves a
# half-filled libs folder that would pass for a complete one.
mkdir -p "$cache/kafka-$version"
tmp="$(mktemp -d "$cache/kafka-$version/libs.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "fetching Kafka $version jars from Maven Central (first run only)..." >&2
# Debian's Maven 3.8 prints colour resets even with -B; strip them (pipefail keeps mvn's status).
mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$tmp" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' >&2
ls "$tmp"/kafka_2.13-"$version".jar >/dev/null
touch "$tmp/.complete"
rm -rf "$libs"
mv "$tmp" "$libs"
trap - EXIT
echo "$libs"
