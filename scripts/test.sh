#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up .venv (with vLLM's CPU build for the
# remote-teacher and rollout tests), then runs pytest (slow and dist included) on two workers, a test
# file per worker (most tests wait on processes they start; `-n 0` after the command runs them in turn).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
