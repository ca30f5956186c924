#!/usr/bin/env bash
# Fetch the QuestDB server jar from Maven Central into .cache/questdb/ (used by tests/persist and
# benchmarks/bench_writer.py; production runs QuestDB as its own service).
#
#   scripts/fetch-questdb.sh [VERSION]      (default below; QUESTDB_VERSION overrides too)
#
# Needs Java 17+ to run (QuestDB 9.x is built for class file 61) and Maven to fetch.
# Run the server:
#   java -p .cache/questdb/questdb.jar -m io.questdb/io.questdb.ServerMain -d DIR
# The jar carries its native libraries (io/questdb/bin/linux-x86-64/*.so) and unpacks them itself.
set -euo pipefail

VERSION="${1:-${QUESTDB_VERSION:-9.3.4}}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${QUESTDB_CACHE:-$ROOT/.cache/questdb}"
JAR="$DEST/questdb-$VERSION.jar"

mkdir -p "$DEST"
if [[ ! -s "$JAR" ]]; then
    mvn -q -B dependency:copy -Dartifact="org.questdb:questdb:$VERSION" -Dtransitive=false \
        -DoutputDirectory="$DEST"
fi
ln -sf "questdb-$VERSION.jar" "$DEST/questdb.jar"
echo "$DEST/questdb.jar"
