"""Where adapterkit keeps the adapters of one model, and which one is active.

The store is a plain object on the model (``model._adapterkit``), not a submodule: only
the *active* adapter's head and prefix are registered in the model, so the model's own
``state_dict``/``save_pretrained``/optimizer see exactly the base plus what is in use.
LoRA adapters are the exception; peft keeps every LoRA adapter inside the adapted layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from adapterkit.config import AdapterConfig
from adapterkit.errors import AdapterNotFoundError, did_you_mean
from adapterkit.quantized import trainable_copy

_ATTR = "_adapterkit"


@dataclasses.dataclass
class AdapterRecord:
    """One adapter loaded on a model: its strategy, options and metadata."""

    name: str
    strategy: str
    config: AdapterConfig
    #: task, label names, metrics, recipe, source: what the sidecar records.
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


class AdapterStore:
    """All adapters of one model, their private modules and the active name."""

    def __init__(self) -> None:
        self.records: dict[str, AdapterRecord] = {}
        self.active: str | None = None
        #: per adapter, head modules by model path (the label head, or what `head` trains)
        self.heads: dict[str, dict[str, nn.Module]] = {}
        #: the base model's own modules at every path some adapter replaces
        self.base_heads: dict[str, nn.Module] = {}
        #: free-form per-strategy state (prefix encoders, cached layer lists, hooks)
        self.extra: dict[str, Any] = {}

    def record(self, name: str) -> AdapterRecord:
        """The record of adapter ``name``, or a clear error listing the loaded ones."""
        try:
            return self.records[name]
        except KeyError:
            loaded = sorted(self.records)
            raise AdapterNotFoundError(
                f"No adapter named '{name}' is loaded on this model.{did_you_mean(name, loaded)} "
                f"Loaded: {', '.join(loaded) or '(none)'}. Use adapterkit.attach() or adapterkit.load() first."
            ) from None

    # heads -------------------------------------------------------------------------
    def add_head_copies(self, model: nn.Module, name: str, paths: list[str]) -> dict[str, nn.Module]:
        """Give adapter ``name`` its own copy of the modules at ``paths``.

        The copy starts from the base's current weights; a tied output embedding becomes an
        untied copy, so training it never touches the frozen input embeddings, and a quantized
        module a dequantized one.
        """
        copies = self.heads.setdefault(name, {})
        for path in paths:
            if path not in self.base_heads:
                self.base_heads[path] = model.get_submodule(path)
            source = self.base_heads[path]
            copies[path] = trainable_copy(source)
        return copies

    def install_heads(self, model: nn.Module, name: str | None) -> None:
        """Register adapter ``name``'s head modules in the model (the base's where it has none)."""
        own = self.heads.get(name, {}) if name is not None else {}
        for path, base_module in self.base_heads.items():
            module = own.get(path, base_module)
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            current = getattr(parent, attr)
            if current is module:
                continue
            _follow(module, current)
            setattr(parent, attr, module)


def _follow(module: nn.Module, current: nn.Module) -> None:
    """Move ``module`` to where ``current`` lives and match its train/eval mode."""
    ref = next(current.parameters(), None)
    mine = next(module.parameters(), None)
    if ref is not None and mine is not None and mine.device != ref.device:
        module.to(ref.device)
    module.train(current.training)


def get_store(model: nn.Module, *, create: bool = False) -> AdapterStore | None:
    """The adapter store of ``model`` (None if it has none and ``create`` is False)."""
    store = model.__dict__.get(_ATTR)
    if store is None and create:
        store = AdapterStore()
        model.__dict__[_ATTR] = store
    return store


def require_store(model: nn.Module) -> AdapterStore:
    """The adapter store, or an error saying no adapter was attached."""
    store = get_store(model)
    if store is None or not store.records:
        raise AdapterNotFoundError(
            "This model carries no adapterkit adapter. Attach one with adapterkit.attach(model, 'lora') "
            "or load one with adapterkit.load(model, source)."
        )
    return store


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/FSDP/compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module) and inner is not model:
            model = inner
        else:
            return model


def freeze_all_but(model: nn.Module, trainable: list[torch.nn.Parameter]) -> None:
    """Freeze every parameter of ``model`` except ``trainable``."""
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        want = id(p) in keep
        if p.requires_grad != want and (p.is_floating_point() or p.is_complex()):
            p.requires_grad_(want)
    for p in trainable:
        p.requires_grad_(True)
