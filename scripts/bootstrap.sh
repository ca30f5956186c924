#!/usr/bin/env bash
# Install everything acm needs on a fresh Debian 12 machine, idempotently:
# system packages (apt), a virtualenv in .venv with the package built from source (the Cython
# hot path is compiled here; a failed compile fails the install), and the QuestDB server jar.
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-tools: redis-cli forms the test Redis Cluster; openssl: the TLS store test's certificate.
APT_PACKAGES=(redis-server redis-tools openssl postgresql sip-tester python3-zmq python3-msgpack
              python3-venv python3-dev build-essential openjdk-17-jre-headless maven wrk
              chromium chromium-driver)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "bootstrap: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The Debian packages start their services; the suite runs its own servers on free ports.
for svc in redis-server postgresql; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel "Cython>=3.0"
# Editable install: builds ext/_hotpath.pyx into acm_module/ in place (no silent fallback).
.venv/bin/python -m pip install -q --no-build-isolation -e ".[writer,control,web,test]"

if [ -x scripts/fetch-questdb.sh ]; then
  scripts/fetch-questdb.sh
fi
