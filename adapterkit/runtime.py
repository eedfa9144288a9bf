"""Serving many adapters from one base: a batch whose rows use different LoRA adapters.

Inside ``mixed_batch(model, names)``, row ``i`` of every forward pass (and of ``generate``)
goes through adapter ``names[i]``; ``None`` rows use the bare base. peft's LoRA layers do
the per-row maths; adapterkit routes each row's label head the same way. Only strategies
that declare ``supports_mixed_batch`` (LoRA) can take part: a prefix changes the sequence
length and a head adapter has nothing to batch.
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
    names = [n if n is not None else BASE_ROW for n in adapter_names]
    rows: dict[str, torch.Tensor] = {}
    for i, n in enumerate(names):
        rows.setdefault(n, []).append(i)  # type: ignore[arg-type]
    index = {n: torch.tensor(r) for n, r in rows.items()}

    def inject(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "adapter_names": names}

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

    handles = [layer.register_forward_pre_hook(inject, with_kwargs=True) for _, layer in store.extra.get("lora_layers", [])]
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
