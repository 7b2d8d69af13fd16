#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up .venv (with vLLM's CPU build for the
# remote-teacher and rollout tests), then runs pytest (slow and dist included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh
exec .venv/bin/python -m pytest "$@"
