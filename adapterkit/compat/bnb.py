"""bitsandbytes internals: 4-bit storage layouts, the CPU inference repacking, 8-bit scales.

Checked against bitsandbytes 0.50.2. Nothing here imports bitsandbytes until a function that
needs it runs.
"""

from __future__ import annotations

import torch
from torch import nn


def disable_cpu_repacking(module: nn.Module) -> bool:
    """Stop a ``Linear4bit`` from repacking its weight for CPU inference; False if it has no such switch.

    bitsandbytes 0.50.2 sets ``Linear4bit.support_avx512bf16_for_cpu`` from the CPU's features,
    and ``forward`` repacks the weight (``_convert_weight_packed_for_cpu``) when it is true, the
    input is on the CPU and needs no grad, and the module is in eval mode.
    """
    if not hasattr(module, "support_avx512bf16_for_cpu"):
        return False
    module.support_avx512bf16_for_cpu = False
    return True


def is_cpu_packed(quant_state) -> bool:
    """Whether a 4-bit ``QuantState`` describes bitsandbytes' CPU inference layout
    (``QuantState.packing_format_for_cpu``, set by the repacking, bitsandbytes 0.50.2)."""
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def unpack_cpu_weight(module: nn.Module) -> bool:
    """Put a repacked ``Linear4bit``'s weight back in the standard 4-bit layout; False if it was not packed.

    Uses ``bitsandbytes.functional._convert_weight_packed_for_cpu_inverse`` (bitsandbytes 0.50.2),
    the function ``Params4bit`` itself calls before moving or saving a packed weight.
    """
    state = getattr(module.weight, "quant_state", None)
    if state is None or not is_cpu_packed(state):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
    return True


def int8_scales(weight: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor | None:
    """The per-row absmax scales of an 8-bit weight (``value = int8 * SCB / 127``), or None.

    bitsandbytes 0.50.2 keeps them as ``Int8Params.SCB``; older releases kept them on the
    ``Linear8bitLt``'s ``state.SCB`` only.
    """
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    return scb


def _take(tensor: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # index_select, not advanced indexing: see adapterkit.fingerprint._take.
    return tensor.reshape(-1).index_select(0, idx.to(tensor.device))


def values_4bit(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Dequantized values of a bitsandbytes 4-bit weight at flat (out, in) indices, reading only those.

    Relies on bitsandbytes 0.50.2's storage: two 4-bit codes per byte, high nibble first,
    ``QuantState.code``/``absmax``/``blocksize``, nested absmax (``state2``, ``offset``), and the
    CPU inference layout ``_convert_weight_packed_for_cpu`` writes ([N, K/2] bytes interleaved in
    blocks of 32 rows, absmax [K/blocksize, N] in bf16).
    """
    state = p.quant_state
    data = p.data.view(torch.uint8)
    code = state.code.float()
    if is_cpu_packed(state):
        rows, cols = int(state.shape[0]), int(state.shape[1])
        n, k = idx // cols, idx % cols
        f = (((n // 32) * (cols // 2) + k // 2) * 32 + n % 32) * 2 + k % 2
        chunk, j = f // 64, f % 64
        byte = _take(data, chunk * 32 + j % 32).to(torch.int64)
        nibble = torch.where(j < 32, byte & 0xF, byte >> 4)
        absmax = _take(state.absmax, (k // state.blocksize) * rows + n).float()
        return _take(code, nibble) * absmax
    byte = _take(data, idx // 2).to(torch.int64)
    nibble = torch.where(idx % 2 == 0, byte >> 4, byte & 0xF)
    block = idx // state.blocksize
    if state.nested:
        inner = state.state2
        absmax = _take(inner.code, _take(state.absmax, block).to(torch.int64)).float()
        absmax = absmax * _take(inner.absmax, block // inner.blocksize).float()
        absmax = absmax + state.offset.float()
    else:
        absmax = _take(state.absmax, block).float()
    return _take(code, nibble) * absmax
