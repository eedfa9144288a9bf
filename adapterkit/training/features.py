"""Head-only training on cached features: the frozen backbone runs once per example.

When nothing in the backbone trains (the ``head`` strategy), every epoch would recompute
the same backbone outputs. ``cached_backbone`` runs the backbone once over the data (no
grad, length-sorted batches, so no padding work), keeps each row's hidden states keyed by
its token ids, and swaps the backbone for a small module that looks them up; the model's
own forward (dropout, pooling, classifier, loss) is unchanged. The pooler, which the head
strategy trains, is applied to the cached states on every step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from adapterkit.targets import backbone_name

logger = logging.getLogger(__name__)


def _key(ids: Iterable[int]) -> tuple[int, ...]:
    # Plain tuples: hashing them is cheaper than any tensor round trip, and this runs per row per step.
    return tuple(int(i) for i in ids)


class CachedBackbone(nn.Module):
    """Stands in for a frozen backbone: returns the hidden states cached for each row."""

    def __init__(self, cache: dict[tuple[int, ...], torch.Tensor], pooler: nn.Module | None, pad_id: int) -> None:
        super().__init__()
        self.cache = cache
        self.pooler = pooler
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        masks = attention_mask.tolist()
        rows = []
        for ids, mask in zip(input_ids.tolist(), masks):
            key = _key(i for i, m in zip(ids, mask) if m)
            if key not in self.cache:
                raise KeyError("a row outside the cached data reached the cached backbone")
            rows.append(self.cache[key])
        width = input_ids.shape[1]
        if all(sum(m) == len(r) and all(m[: len(r)]) for m, r in zip(masks, rows)):
            # Right padding (the usual case): one padded stack instead of a masked write per row.
            hidden = nn.utils.rnn.pad_sequence(rows, batch_first=True)
            if hidden.shape[1] < width:
                hidden = nn.functional.pad(hidden, (0, 0, 0, width - hidden.shape[1]))
        else:
            hidden = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
            for i, (row, mask) in enumerate(zip(rows, attention_mask)):
                hidden[i, mask.bool()] = row
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


@torch.inference_mode()
def compute_features(backbone: nn.Module, datasets: Sequence, batch_size: int = 64) -> dict[tuple[int, ...], torch.Tensor]:
    """Hidden states of every distinct row of the tokenized datasets, keyed by token ids."""
    rows: dict[tuple[int, ...], list[int]] = {}
    for ds in datasets:
        for ids in ds["input_ids"][:]:
            rows.setdefault(_key(ids), list(ids))
    ordered = sorted(rows.values(), key=len)  # similar lengths together: almost no padding
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    cache: dict[tuple[int, ...], torch.Tensor] = {}
    try:
        for start in range(0, len(ordered), batch_size):
            chunk = ordered[start : start + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in chunk], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            for r, h in zip(chunk, hidden):
                cache[_key(r)] = h[: len(r)].detach().clone()
    finally:
        backbone.train(was_training)
    return cache


@contextlib.contextmanager
def cached_backbone(model: nn.Module, datasets: Sequence, *, batch_size: int = 64, pad_id: int = 0) -> Iterator[None]:
    """Within, ``model``'s backbone is replaced by its cached outputs over ``datasets``."""
    name = backbone_name(model)
    if name is None:
        yield
        return
    backbone = model.get_submodule(name)
    pooler = getattr(backbone, "pooler", None)
    cache = compute_features(backbone, datasets, batch_size=batch_size)
    logger.info("Cached backbone features for %d distinct rows; only the head runs while training.", len(cache))
    stub = CachedBackbone(cache, pooler if isinstance(pooler, nn.Module) else None, pad_id)
    setattr(model, name, stub)
    try:
        yield
    finally:
        stub.pooler = None
        setattr(model, name, backbone)
