#!/usr/bin/env bash
# The GPU check, one command for a lent GPU machine (an H200 here; any CUDA GPU works):
# QLoRA 4-bit vs bf16 LoRA training (tokens/s, peak memory) beside peft + Trainer, and the
# adapter pool's load time and mixed-batch throughput, on a Llama of smollm2-135m's shapes.
# About 3-5 minutes. Prints the tables; writes benchmarks/results/gpu.json (and a copy to $OUT).
#
# The lent machine has torch, transformers, peft and accelerate but no bitsandbytes or datasets,
# and no network: make the wheels here first (they travel with the working tree via `carry`):
#   bash benchmarks/gpu_check.sh --wheels        # here: downloads into .whl/ (ignored by git)
#   then, on the device: bash benchmarks/gpu_check.sh     (with .whl carried)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    PY=${PYTHON:-.venv/bin/python}
    versions=$("$PY" -c "import bitsandbytes, datasets, dill, multiprocess, transformers, peft, tokenizers, huggingface_hub as h
print(f'bitsandbytes=={bitsandbytes.__version__} datasets=={datasets.__version__} dill=={dill.__version__} multiprocess=={multiprocess.__version__} transformers=={transformers.__version__} peft=={peft.__version__} tokenizers=={tokenizers.__version__} huggingface_hub=={h.__version__}')")
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $versions
    du -sh .whl
    exit 0
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__)"
python3 -m benchmarks.gpu --device cuda "$@"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu.json "$OUT/"; fi
