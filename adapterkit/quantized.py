"""bitsandbytes 4/8-bit bases: configuration, preparation for training, and CPU fixes.

transformers quantizes the base on load and peft already dispatches LoRA onto
``Linear4bit``/``Linear8bitLt``; this module adds only what they lack. Nothing here imports
bitsandbytes until a quantized model is actually used.
"""

from __future__ import annotations

import copy
import gc
import logging

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from adapterkit.compat import bnb as bnb_compat

logger = logging.getLogger(__name__)


def bnb_config(
    bits: int,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
):
    """A ``BitsAndBytesConfig`` for 8 or 4 bits.

    4-bit defaults to NF4 with double quantization (the QLoRA recipe); transformers'
    own default is FP4. The compute dtype defaults to bf16 on CUDA and fp32 on the CPU.
    """
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def quantization_of(model: nn.Module) -> str | None:
    """``"bnb-4bit-nf4"``, ``"bnb-8bit"``... for a quantized model, else None."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(config, "load_in_4bit", False):
        kind = getattr(config, "bnb_4bit_quant_type", "fp4")
        return f"bnb-4bit-{kind}"
    if getattr(model, "is_loaded_in_8bit", False) or getattr(config, "load_in_8bit", False):
        return "bnb-8bit"
    return None


def is_bnb(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes quantized linear layer (4-bit or 8-bit)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith("bitsandbytes")


def keep_4bit_trainable(model: nn.Module) -> int:
    """Stop bitsandbytes' CPU inference repacking, which silently breaks 4-bit training.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight the first time it runs in
    eval mode on an input that needs no grad (any evaluation or ``generate``); afterwards
    ``matmul_4bit`` takes the ``gemv_4bit`` kernel, which has no autograd, and LoRA layers
    before it stop receiving gradients. We turn the repacking off and undo it where it
    already happened. Returns the number of layers unpacked.
    """
    unpacked = 0
    for module in model.modules():
        if type(module).__name__ != "Linear4bit" or not bnb_compat.disable_cpu_repacking(module):
            continue
        if bnb_compat.unpack_cpu_weight(module):
            unpacked += 1
    if unpacked:
        logger.info("Unpacked %d 4-bit layers from bitsandbytes' CPU inference format so they train.", unpacked)
    return unpacked


def dequantize_linear(module: nn.Module) -> nn.Linear:
    """A plain float ``nn.Linear`` with the dequantized weights of a bnb layer."""
    import bitsandbytes.functional as F  # only for quantized bases: bitsandbytes is slow to import

    weight = module.weight
    if type(module).__name__ == "Linear4bit":
        keep_4bit_trainable(module)
        dense = F.dequantize_4bit(weight.data, weight.quant_state)
    else:
        scb = bnb_compat.int8_scales(weight, module)
        dense = weight.data.float() * scb.float().unsqueeze(1) / 127.0
    bias = module.bias
    out = nn.Linear(dense.shape[1], dense.shape[0], bias=bias is not None, device=dense.device)
    with torch.no_grad():
        out.weight.copy_(dense.float())
        if bias is not None:
            out.bias.copy_(bias.float())
    return out


def trainable_copy(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """A deep copy of ``module`` whose bnb layers are replaced by dequantized float ones.

    ``memo`` is :func:`copy.deepcopy`'s: objects in it are shared, not copied.
    """
    if is_bnb(module):
        return dequantize_linear(module)
    clone = copy.deepcopy(module, memo)
    for name, child in list(clone.named_modules()):
        if name and is_bnb(child):
            parent_path, _, attr = name.rpartition(".")
            parent = clone.get_submodule(parent_path) if parent_path else clone
            setattr(parent, attr, dequantize_linear(child))
    return clone


def prepare_for_kbit_training(model: nn.Module, *, gradient_checkpointing: bool = False) -> nn.Module:
    """peft's k-bit preparation (frozen base, fp32 norms, input grads) plus the CPU fix.

    Gradient checkpointing is off by default: on a CPU it made a 4-bit 135M model train
    1.65x slower for barely lower peak memory (measured, see ASSETS.md).
    """
    from peft import prepare_model_for_kbit_training  # peft takes seconds to import: only for quantized training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    keep_4bit_trainable(model)
    own_unquantized_weights(model)
    return model


def own_unquantized_weights(model: nn.Module) -> int:
    """Give the weights that stay in full precision (embeddings, norms, heads) their own memory.

    transformers leaves them as views into the memory-mapped checkpoint, and quantizing read
    every page of that file: the mapping then keeps the whole full-precision checkpoint
    resident for as long as one view lives (on SmolLM2-135M, 415 MB of file pages for 110 MB of
    weights). Copying those weights lets the mapping go. Returns how many tensors were copied.
    """
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module.parameters(recurse=False), module.buffers(recurse=False)):
                for tensor in tensors:
                    if id(tensor) in seen or not tensor.is_floating_point():
                        continue
                    if type(tensor).__name__ in ("Params4bit", "Int8Params"):
                        continue
                    seen.add(id(tensor))
                    tensor.data = tensor.data.clone()
    gc.collect()
    return len(seen)
