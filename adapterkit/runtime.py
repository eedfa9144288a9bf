"""Serving many adapters from one base: a batch whose rows use different LoRA adapters.

Inside ``mixed_batch(model, names)``, row ``i`` of every forward pass (and of ``generate``)
goes through adapter ``names[i]``; ``None`` rows use the bare base. adapterkit routes each
row's label head the same way. Only strategies that declare ``supports_mixed_batch`` (LoRA)
can take part: a prefix changes the sequence length and a head adapter has nothing to batch.

In inference, each LoRA layer gathers the per-row A and B matrices and applies them with two
batched matmuls. peft's own mixed-batch path loops over the adapters of every layer (a
select, two matmuls and a scatter per adapter), which for 8 adapters costs more than the
base layer itself. Layers where that gather does not apply (training mode with dropout,
adapters of different ranks, DoRA, embeddings) keep peft's path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from adapterkit.errors import IncompatibleModelError
from adapterkit.registry import default_registry
from adapterkit.state import require_store, unwrap

BASE_ROW = "__base__"  # peft's name for rows that use no adapter


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str | None]) -> Iterator[nn.Module]:
    """Run each row of the next forward passes through its own LoRA adapter.

    Args:
        model: a model carrying LoRA adapters.
        adapter_names: one adapter name (or None for the base) per batch row.

    Example:
        >>> with adapterkit.mixed_batch(model, ["sst2", "trec", None]):
        ...     logits = model(**batch).logits
    """
    base = unwrap(model)
    store = require_store(base)
    for name in {n for n in adapter_names if n is not None}:
        strategy = store.record(name).strategy
        if not getattr(default_registry.get(strategy), "supports_mixed_batch", False):
            raise IncompatibleModelError(
                f"Adapter '{name}' is a '{strategy}' adapter; a mixed batch can only route rows through adapters "
                "whose strategy supports it (lora). Run it alone with adapterkit.use()."
            )
        if getattr(store.record(name).config, "use_dora", False):
            raise IncompatibleModelError(f"Adapter '{name}' uses DoRA, which peft cannot run in a mixed batch.")
    names = _peft_names(adapter_names)
    rows: dict[str, torch.Tensor] = {}
    for i, n in enumerate(names):
        rows.setdefault(n, []).append(i)  # type: ignore[arg-type]
    index = {n: torch.tensor(r) for n, r in rows.items()}

    def inject(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "adapter_names": names}

    patched = []

    def route_head(path: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            out = output.clone()
            for name, idx in index.items():
                head = store.heads.get(name, {}).get(path, store.base_heads[path])
                if head is module:
                    continue
                idx = idx.to(x.device)
                out[idx] = head(x[idx]).to(out.dtype)
            return out

        return hook

    handles = []
    for _, layer in store.extra.get("lora_layers", []):
        forward = _gathered_forward(layer, adapter_names)
        if forward is None:
            handles.append(layer.register_forward_pre_hook(inject, with_kwargs=True))
        else:
            layer.forward = forward
            patched.append(layer)
    try:
        for path in store.base_heads:
            widths = {getattr(store.heads.get(n, {}).get(path, store.base_heads[path]), "out_features", None) for n in index}
            if len(widths) > 1:
                raise IncompatibleModelError(
                    f"The adapters {sorted(index)} have heads of different widths at '{path}' ({sorted(map(str, widths))}); "
                    "a mixed batch needs one output shape. Group rows by task instead."
                )
            handles.append(base.get_submodule(path).register_forward_hook(route_head(path)))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for layer in patched:
            del layer.forward  # back to the class's forward


def _gathered_forward(layer: nn.Module, adapter_names: list[str | None]):
    """A forward for ``layer`` that applies each row's LoRA update with batched matmuls, or None.

    None means the layer keeps peft's per-adapter path (see the module docstring for when).
    """
    lora_a, lora_b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
        return None
    if getattr(layer, "merged_adapters", None) or getattr(layer, "lora_embedding_A", None):
        return None
    present = sorted({n for n in adapter_names if n is not None and n in lora_a})
    if any(getattr(layer, "use_dora", {}).get(n) for n in present):
        return None
    if any(getattr(layer, "lora_bias", {}).get(n) for n in present):
        return None
    if len({layer.r[n] for n in present}) > 1:
        return None
    if not all(isinstance(lora_a[n], nn.Linear) and isinstance(lora_b[n], nn.Linear) for n in present):
        return None
    base_layer = layer.get_base_layer()
    rows = len(adapter_names)
    peft_names = _peft_names(adapter_names)
    if present:
        # Rows without an adapter on this layer get a zero update.
        zero_a = lora_a[present[0]].weight.new_zeros(lora_a[present[0]].weight.shape)
        zero_b = lora_b[present[0]].weight.new_zeros(lora_b[present[0]].weight.shape)
        scales = [float(layer.scaling[n]) if n in lora_a else 0.0 for n in adapter_names]

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        kwargs.pop("adapter_names", None)
        dropout_on = layer.training and any(
            getattr(layer.lora_dropout[n], "p", 0) > 0 for n in present if n in layer.lora_dropout
        )
        if dropout_on or x.dim() != 3 or x.shape[0] != rows:
            return type(layer).forward(layer, x, *args, adapter_names=peft_names, **kwargs)
        result = base_layer(x, *args, **kwargs)
        if not present:
            return result
        a = torch.stack([lora_a[n].weight if n in lora_a else zero_a for n in adapter_names])
        b = torch.stack([lora_b[n].weight if n in lora_b else zero_b for n in adapter_names])
        scale = torch.tensor(scales, dtype=a.dtype, device=a.device).view(-1, 1, 1)
        xa = torch.bmm(x.to(a.dtype), a.transpose(1, 2))
        delta = torch.bmm(xa, b.transpose(1, 2)) * scale
        return result + delta.to(result.dtype)

    return forward


def _peft_names(adapter_names: list[str | None]) -> list[str]:
    return [n if n is not None else BASE_ROW for n in adapter_names]
