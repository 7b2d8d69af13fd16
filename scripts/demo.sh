#!/usr/bin/env bash
# The main job on its embedded default, from a fresh machine: sets up .venv, then distils
# SmolLM2-135M-Instruct into a depth-pruned copy of itself on built-in prompts (see `gkd demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gkd demo "$@"
