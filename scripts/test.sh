#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up .venv, then runs pytest (slow and dist included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_vllm.sh  # a real vLLM server for the remote-teacher tests
exec .venv/bin/python -m pytest "$@"
