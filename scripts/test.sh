#!/usr/bin/env bash
# Run the whole suite twice, as msgpack does: on the compiled hot path, then on its pure-Python
# twin. The tests start every server they need (redis-server, PostgreSQL, QuestDB, chdb).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/ruff check acm_module tests benchmarks opensips_scripts
# The import contracts of pyproject.toml: no cycle, no import up the layers.
.venv/bin/lint-imports
echo "=== compiled hot path ==="
ACM_PUREPYTHON=0 .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
echo "=== pure-Python twin ==="
ACM_PUREPYTHON=1 .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
