#!/usr/bin/env bash
# Run the decision service on embedded defaults: an embedded Valkey store, one worker per core,
# requests on ipc:///run/acm/acm.sock, MI on 127.0.0.1:8899 (HTTP) and :8898 (datagram), the
# REST API and console on http://127.0.0.1:8080 (the first start prints the admin password once).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/acm serve "$@"
