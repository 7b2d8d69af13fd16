#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up .venv (with vLLM's CPU build for the remote-teacher and
# rollout tests), then runs pytest on two workers. Arguments go to pytest:
#   ./scripts/test.sh                  everything (slow and dist included)
#   ./scripts/test.sh -m "not slow"    the fast tier for the edit loop (about a minute here): no torchrun, no
#                                      server, no vLLM engine, no killed runs, no real SmolLM2
#   ./scripts/test.sh -n 0 ...         in turn, in this process
# --dist loadgroup, as tests/conftest.py groups them: the slow tests of a file share a worker, the tests reading
# the session's training runs (tests/helpers.py: Runs) share one and its launches, the longest groups start
# first and the other tests fill in, so that the two workers finish together.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh
exec .venv/bin/python -m pytest -n 2 --dist loadgroup "$@"
