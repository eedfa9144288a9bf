"""Which adapter a forward pass goes through: the model's default, or the caller's own choice.

A model carrying adapters has one *default* adapter (what :func:`adapterkit.use` sets as a
statement, and what training uses). On top of it, each thread and each asyncio task may
choose its own adapter for the forwards it runs (``with adapterkit.use(model, name):``,
``with adapterkit.mixed_batch(model, names):``). That choice lives in a
:class:`contextvars.ContextVar`, so concurrent requests never see each other's adapter and
nothing shared is written on the hot path.

The modules an adapter changes read the choice at forward time:

- peft's LoRA layers get a subclass (made once per layer class) whose ``_active_adapter`` is
  the routed choice, and whose ``forward`` serves a per-row route (see ``adapterkit.runtime``);
- each label/task head module gets a subclass whose ``forward`` hands the input to the head
  module of the routed adapter;
- the prefix strategy's pre-hook looks the routed prefix up itself.

Swapping ``__class__`` keeps every ``isinstance`` check (peft's, transformers') true, keeps
``repr`` and the class's name and module unchanged, and costs one context-variable read when
no route is set. A routed module pickles and deep-copies as its original class plus routing.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import threading
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from adapterkit.errors import IncompatibleModelError

from adapterkit.compat.peft import ACTIVE_ADAPTER_ATTR

_KEYS = itertools.count(1)
_NO_ROUTES: types.MappingProxyType = types.MappingProxyType({})
_ROUTES: contextvars.ContextVar[types.MappingProxyType] = contextvars.ContextVar("adapterkit_routes", default=_NO_ROUTES)

#: attribute, in a routed module's ``__dict__``, holding the model's adapter store
STORE_ATTR = "_adapterkit_store"
#: attribute, in a routed head's ``__dict__``, holding its path in the model
PATH_ATTR = "_adapterkit_head_path"


@dataclasses.dataclass(frozen=True, eq=False)
class Route:
    """One caller's choice for one model: a single adapter (``name``, None = the bare base) or
    one adapter per batch row (``rows``)."""

    name: str | None = None
    rows: tuple[str | None, ...] | None = None
    #: per-layer plans a per-row forward prepared once for this route (see strategies/lora.py)
    plans: dict = dataclasses.field(default_factory=dict, repr=False)

    def check_rows(self, batch: int, where: str = "") -> None:
        """Refuse a batch whose row count is not the number of adapters this route names."""
        if batch != len(self.rows):
            raise IncompatibleModelError(
                f"The mixed batch names {len(self.rows)} adapters but the batch has {batch} rows{where}. Pass one "
                "adapter name per row (generate with num_beams or num_return_sequences > 1 multiplies rows)."
            )


def new_key() -> int:
    """A key identifying one adapter store in routes (never reused, unlike ``id()``)."""
    return next(_KEYS)


def current(store: Any) -> Route | None:
    """The calling context's route for ``store``'s model, or None (the model's default)."""
    routes = _ROUTES.get()
    return routes.get(store.key) if routes else None


def push(store: Any, route: Route) -> contextvars.Token:
    """Choose ``route`` for ``store``'s model in the calling context until :func:`pop`."""
    routes = dict(_ROUTES.get())
    routes[store.key] = route
    return _ROUTES.set(types.MappingProxyType(routes))


def pop(token: contextvars.Token) -> None:
    """Undo the :func:`push` that returned ``token``."""
    _ROUTES.reset(token)


def effective_name(store: Any) -> str | None:
    """The adapter a forward in the calling context uses (per-row routes: the default)."""
    route = current(store)
    if route is None or route.rows is not None:
        return store.active
    return route.name


# --- routed LoRA layers -------------------------------------------------------------------------
class _ActiveAdapter:
    """``_active_adapter`` of a routed peft layer: the context's choice, else the layer's own."""

    def __get__(self, layer: nn.Module | None, owner: type) -> Any:
        if layer is None:
            return self
        own = layer.__dict__.get(ACTIVE_ADAPTER_ATTR, [])
        routes = _ROUTES.get()
        if not routes:
            return own
        route = routes.get(layer.__dict__[STORE_ATTR].key)
        if route is None:
            return own
        if route.rows is not None:  # a per-row forward names its adapters itself
            return own
        return [route.name] if route.name is not None else []

    def __set__(self, layer: nn.Module, value: Any) -> None:
        layer.__dict__[ACTIVE_ADAPTER_ATTR] = value


_ROUTED_CLASSES: dict[tuple[str, type], type] = {}
_LOCK = threading.Lock()
#: attribute, in a routed LoRA layer's ``__dict__``, holding the strategy's per-row forward
ROWS_ATTR = "_adapterkit_rows_forward"


def _lora_namespace(cls: type) -> dict[str, Any]:
    def forward(self, x, *args, **kwargs):
        routes = _ROUTES.get()
        route = routes.get(self.__dict__[STORE_ATTR].key) if routes else None
        if route is None or route.rows is None or "adapter_names" in kwargs:
            return cls.forward(self, x, *args, **kwargs)
        return self.__dict__[ROWS_ATTR](self, cls, route, x, *args, **kwargs)

    return {ACTIVE_ADAPTER_ATTR: _ActiveAdapter(), "forward": forward}


def _head_namespace(cls: type) -> dict[str, Any]:
    def forward(self, *args, **kwargs):
        routes = _ROUTES.get()
        route = routes.get(self.__dict__[STORE_ATTR].key) if routes else None
        if route is None:
            return cls.forward(self, *args, **kwargs)
        heads = self.__dict__[STORE_ATTR].head_for
        where = self.__dict__[PATH_ATTR]
        if route.rows is None:
            target = heads(route.name, where)
            if target is self:
                return cls.forward(self, *args, **kwargs)
            return own_forward(target)(*args, **kwargs)
        return _per_row_head(route, heads, where, args, kwargs)

    return {"forward": forward}


_NAMESPACES = {"lora": _lora_namespace, "head": _head_namespace}


def _routed_class(kind: str, cls: type) -> type:
    """The subclass of ``cls`` that follows routes; same name and module, so type checks by
    name (transformers', bitsandbytes') still hold."""
    if cls.__dict__.get("_adapterkit_routed"):
        return cls
    with _LOCK:
        sub = _ROUTED_CLASSES.get((kind, cls))
        if sub is None:
            namespace = {
                "_adapterkit_routed": kind,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__reduce_ex__": _reduce_ex,
                **_NAMESPACES[kind](cls),
            }
            sub = type(cls.__name__, (cls,), namespace)
            _ROUTED_CLASSES[(kind, cls)] = sub
    return sub


def _reduce_ex(self: nn.Module, protocol: int):
    # Rebuilt from the original class by reference (pickle and deepcopy both), never by name.
    cls = type(self)
    return _rebuild, (cls.__dict__["_adapterkit_routed"], cls.__mro__[1]), dict(self.__dict__)


def _rebuild(kind: str, cls: type) -> nn.Module:
    return object.__new__(_routed_class(kind, cls))


def route_lora_layer(layer: nn.Module, store: Any, per_row_forward: Callable) -> None:
    """Make a peft LoRA layer follow routes. ``per_row_forward(layer, cls, route, x, *args,
    **kwargs)`` (a module-level function) serves per-row routes."""
    layer.__dict__[STORE_ATTR] = store
    layer.__dict__[ROWS_ATTR] = per_row_forward
    layer.__class__ = _routed_class("lora", type(layer))


# --- routed heads -------------------------------------------------------------------------------
def own_forward(module: nn.Module) -> Callable:
    """``module``'s forward without routing (its original class's)."""
    cls = type(module)
    if cls.__dict__.get("_adapterkit_routed"):
        cls = cls.__mro__[1]
    return cls.forward.__get__(module, type(module))


def route_head(module: nn.Module, store: Any, path: str) -> None:
    """Make a head module (the base's or an adapter's copy, at ``path``) follow routes."""
    module.__dict__[STORE_ATTR] = store
    module.__dict__[PATH_ATTR] = path
    module.__class__ = _routed_class("head", type(module))


def unroute(module: nn.Module) -> None:
    """Give ``module`` back its own class (when the model carries no adapter any more)."""
    if type(module).__dict__.get("_adapterkit_routed"):
        module.__class__ = type(module).__mro__[1]
    for attr in (STORE_ATTR, PATH_ATTR, ROWS_ATTR):
        module.__dict__.pop(attr, None)


def _per_row_head(route: Route, heads: Callable, path: str, args: tuple, kwargs: dict):
    x, rest = args[0], args[1:]
    rows = route.rows
    route.check_rows(x.shape[0], f" at '{path}'")
    groups: dict[int, tuple[nn.Module, list[int]]] = {}
    for i, name in enumerate(rows):
        head = heads(name, path)
        groups.setdefault(id(head), (head, []))[1].append(i)
    if len(groups) == 1:
        (head, _), = groups.values()
        return own_forward(head)(*args, **kwargs)
    out = None
    for head, idx in groups.values():
        index = torch.tensor(idx, dtype=torch.long, device=x.device)
        part = own_forward(head)(x[index], *rest, **kwargs)
        if out is None:
            out = part.new_empty((len(rows), *part.shape[1:]))
        out[index] = part.to(out.dtype)
    return out

