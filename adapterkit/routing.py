"""Which adapter a forward pass goes through: the model's default, or the caller's own choice.

A model carrying adapters has one *default* adapter (what :func:`adapterkit.use` sets as a
statement, and what training uses). On top of it, each thread and each asyncio task may
choose its own adapter for the forwards it runs (``with adapterkit.use(model, name):``,
``with adapterkit.mixed_batch(model, names):``). That choice lives in a
:class:`contextvars.ContextVar`, so concurrent requests never see each other's adapter and
nothing shared is written on the hot path.

The modules an adapter changes read the choice at forward time:

- peft's LoRA layers get a subclass (made once per layer class) whose ``_active_adapter`` is
  the routed choice, and whose ``forward`` serves a per-row route (``strategies/lora.py``);
- each label/task head module gets a subclass whose ``forward`` hands the input to the head
  module of the routed adapter (``heads.py``);
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

from torch import nn

from adapterkit.errors import IncompatibleModelError

_KEYS = itertools.count(1)
_NO_ROUTES: types.MappingProxyType = types.MappingProxyType({})
_ROUTES: contextvars.ContextVar[types.MappingProxyType] = contextvars.ContextVar("adapterkit_routes", default=_NO_ROUTES)

#: attribute, in a routed module's ``__dict__``, holding the model's adapter store
STORE_ATTR = "_adapterkit_store"


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


# --- routed modules ---------------------------------------------------------------------------
# A module follows routes by becoming an instance of a subclass of its own class, made once per
# (kind, class). Each kind's namespace (its forward, descriptors) belongs to the file that owns
# that kind of module: heads.py ("head"), strategies/lora.py ("lora").
_KINDS: dict[str, Callable[[type], dict[str, Any]]] = {}
_ROUTED_CLASSES: dict[tuple[str, type], type] = {}
_LOCK = threading.Lock()


def register_kind(kind: str, namespace: Callable[[type], dict[str, Any]]) -> None:
    """Declare how modules of ``kind`` follow routes: ``namespace(cls)`` returns the attributes
    (a ``forward``, descriptors) of the routed subclass of ``cls``."""
    _KINDS[kind] = namespace


def route_of(module: nn.Module) -> Route | None:
    """The calling context's route for the model a routed ``module`` belongs to, or None."""
    routes = _ROUTES.get()
    return routes.get(module.__dict__[STORE_ATTR].key) if routes else None


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
                **_KINDS[kind](cls),
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


def reroute(module: nn.Module, store: Any, kind: str) -> None:
    """Make ``module`` (of a model carrying ``store``) follow routes as a module of ``kind``."""
    module.__dict__[STORE_ATTR] = store
    module.__class__ = _routed_class(kind, type(module))


def own_forward(module: nn.Module) -> Callable:
    """``module``'s forward without routing (its original class's)."""
    cls = type(module)
    if cls.__dict__.get("_adapterkit_routed"):
        cls = cls.__mro__[1]
    return cls.forward.__get__(module, type(module))


def unroute(module: nn.Module, *attrs: str) -> None:
    """Give ``module`` back its own class and drop routing's attributes (and ``attrs``) from it."""
    if type(module).__dict__.get("_adapterkit_routed"):
        module.__class__ = type(module).__mro__[1]
    for attr in (STORE_ATTR, *attrs):
        module.__dict__.pop(attr, None)
