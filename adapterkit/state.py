"""Where adapterkit keeps the adapters of one model, and which one is active.

The store is a plain object on the model (``model._adapterkit``), not a submodule: only
the *default* adapter's head and prefix are registered in the model, so the model's own
``state_dict``/``save_pretrained``/optimizer see exactly the base plus what is in use.
LoRA adapters are the exception; peft keeps every LoRA adapter inside the adapted layers.
A caller's own choice of adapter for its forwards is not stored here but in its context
(``adapterkit.routing``); switching the default takes the store's lock.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from adapterkit.compat.torch import compiled_inner
from adapterkit.config import AdapterConfig
from adapterkit.errors import AdapterNotFoundError, did_you_mean
from adapterkit.routing import new_key

_ATTR = "_adapterkit"


@dataclasses.dataclass
class AdapterRecord:
    """One adapter loaded on a model: its strategy, options and metadata."""

    name: str
    strategy: str
    config: AdapterConfig
    #: task, label names, metrics, recipe, source: what the sidecar records.
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)
class DefaultSwitch:
    """One change of a model's default adapter that may still be taken back (``with use(...)``)."""

    name: str | None
    previous: str | None
    generation: int
    previous_generation: int


_GENERATIONS = itertools.count(1)


class AdapterStore:
    """All adapters of one model, their private modules and the active name."""

    def __init__(self) -> None:
        self.records: dict[str, AdapterRecord] = {}
        #: the default adapter: what forwards without a routed choice of their own use
        self.active: str | None = None
        #: identifies this store in context-local routes
        self.key = new_key()
        #: held while the default adapter (or the set of adapters) changes
        self.lock = threading.RLock()
        #: the switch that set the current default (0: none that can be taken back)
        self.generation = 0
        #: switches not yet taken back, by the generation they replaced
        self.successors: weakref.WeakValueDictionary[int, DefaultSwitch] = weakref.WeakValueDictionary()
        #: per adapter, head modules by model path (the label head, or what `head` trains)
        self.heads: dict[str, dict[str, nn.Module]] = {}
        #: the base model's own modules at every path some adapter replaces
        self.base_heads: dict[str, nn.Module] = {}
        #: free-form per-strategy state (prefix encoders, cached layer lists, hooks)
        self.extra: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("lock", "key", "successors", "generation"):
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copied model (deepcopy, pickle) is routed on its own, never by the original's routes.
        self.__dict__.update(state)
        self.key = new_key()
        self.lock = threading.RLock()
        self.generation = 0
        self.successors = weakref.WeakValueDictionary()

    # the default adapter ---------------------------------------------------------------
    def set_default(self, name: str | None, apply: Callable[[str | None], None]) -> None:
        """Make ``name`` the default for good (attach, detach, train)."""
        with self.lock:
            apply(name)
            self.generation = next(_GENERATIONS)

    def switch_default(self, name: str | None, apply: Callable[[str | None], None]) -> DefaultSwitch:
        """Make ``name`` the default, returning a ticket :meth:`take_back` can undo."""
        with self.lock:
            previous = self.active
            apply(name)
            switch = DefaultSwitch(name, previous, next(_GENERATIONS), self.generation)
            self.successors[self.generation] = switch
            self.generation = switch.generation
            return switch

    def take_back(self, switch: DefaultSwitch, apply: Callable[[str | None], None]) -> None:
        """Undo ``switch`` as if it never happened, even after later switches by other threads.

        If it still set the current default, the previous one comes back. If another switch
        followed it, that one now remembers what came before ``switch``, so taking it back in
        turn restores the right adapter; a later switch that is never taken back stays.
        """
        with self.lock:
            successor = self.successors.pop(switch.generation, None)
            if self.successors.get(switch.previous_generation) is switch:
                del self.successors[switch.previous_generation]
            if self.generation == switch.generation:
                apply(switch.previous if switch.previous is None or switch.previous in self.records else None)
                self.generation = switch.previous_generation
            elif successor is not None:
                successor.previous = switch.previous
                successor.previous_generation = switch.previous_generation
                self.successors[switch.previous_generation] = successor

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
        inner = getattr(model, "module", None) or compiled_inner(model)
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
