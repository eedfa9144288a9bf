"""Serving many adapters from one base: a batch whose rows use different LoRA adapters.

Inside ``mixed_batch(model, names)``, row ``i`` of every forward pass (and of ``generate``)
goes through adapter ``names[i]``; ``None`` rows use the bare base, and each row's label head
is routed the same way. Only strategies that accept it take
part (``Strategy.check_mixed_batch``): a prefix changes the sequence length and a head adapter
has nothing to batch.

The choice of rows belongs to the calling thread or asyncio task (``adapterkit.routing``):
concurrent mixed batches on one model, and a mixed batch nested in another or in a
``with adapterkit.use(...)`` block, each see their own rows. How a LoRA layer computes a
per-row batch is the LoRA strategy's business (``strategies/lora.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

import adapterkit.heads as heads
import adapterkit.routing as routing
from adapterkit.errors import IncompatibleModelError, InvalidOptionError
from adapterkit.registry import default_registry
from adapterkit.state import require_store, unwrap


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
    if isinstance(adapter_names, str) or not hasattr(adapter_names, "__iter__"):
        raise InvalidOptionError(
            f"mixed_batch takes one adapter name (or None) per batch row, as a list; got {adapter_names!r}."
        )
    rows = tuple(adapter_names)
    if not rows:
        raise InvalidOptionError("mixed_batch needs one adapter name (or None) per batch row; the list is empty.")
    for name in {n for n in rows if n is not None}:
        if not isinstance(name, str):
            raise InvalidOptionError(f"mixed_batch: adapter names are strings or None, got {name!r}.")
        record = store.record(name)
        try:
            default_registry.get(record.strategy)().check_mixed_batch(record.config)
        except IncompatibleModelError as exc:
            raise IncompatibleModelError(f"mixed_batch: adapter '{name}' ({record.strategy}): {exc}") from None
    for path in store.base_heads:
        widths = {getattr(heads.head_for(store, n, path), "out_features", None) for n in set(rows)}
        if len(widths) > 1:
            raise IncompatibleModelError(
                f"The adapters {sorted(set(map(str, rows)))} have heads of different widths at '{path}' "
                f"({sorted(map(str, widths))}); a mixed batch needs one output shape. Group rows by task instead."
            )
    token = routing.push(store, routing.Route(rows=rows))
    try:
        yield model
    finally:
        routing.pop(token)
