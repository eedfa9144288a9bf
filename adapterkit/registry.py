"""The strategy registry: built-ins, ``@register_strategy`` and entry-point plugins.

Third-party packages add strategies through the entry-point group
``adapterkit.strategies``. Discovery reads entry-point *names* only; a plugin module is
imported the first time its name is requested. ``ADAPTERKIT_DISABLE_PLUGINS=1`` turns
discovery off. Plugins cannot shadow built-ins.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import logging
import os
import re
from collections.abc import Callable
from typing import TypeVar

from adapterkit.errors import InvalidOptionError, StrategyImportError, UnknownStrategyError, did_you_mean
from adapterkit.strategy import Strategy

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "adapterkit.strategies"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

S = TypeVar("S", bound="type[Strategy]")


class Registry:
    """A name -> strategy class mapping with lazy entry-point discovery.

    Args:
        entry_point_group: group scanned for plugins, or None for no plugins.
    """

    def __init__(self, entry_point_group: str | None = ENTRY_POINT_GROUP) -> None:
        self._strategies: dict[str, type[Strategy]] = {}
        self._builtin: set[str] = set()
        self._group = entry_point_group
        self._plugins: dict[str, importlib.metadata.EntryPoint] | None = None

    def register(self, name: str, cls: type[Strategy], *, override: bool = False, builtin: bool = False) -> None:
        """Register ``cls`` under ``name``; a taken name raises unless ``override=True``."""
        if not _NAME_RE.match(name):
            raise InvalidOptionError(f"Strategy name '{name}' is invalid: use lower case letters, digits and '_'.")
        if name in self._builtin and not builtin and not override:
            raise InvalidOptionError(f"'{name}' is a built-in strategy and cannot be shadowed; pick another name.")
        if name in self._strategies and not override:
            raise InvalidOptionError(
                f"A strategy named '{name}' is already registered ({self._strategies[name].__qualname__}); "
                "pass override=True to replace it."
            )
        cls.name = name
        self._strategies[name] = cls
        if builtin:
            self._builtin.add(name)

    def _entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        if self._group is None or os.environ.get("ADAPTERKIT_DISABLE_PLUGINS", "") not in ("", "0"):
            return {}
        if self._plugins is None:
            found = importlib.metadata.entry_points(group=self._group)
            self._plugins = {}
            for ep in found:
                if ep.name in self._builtin:
                    logger.warning(
                        "Ignoring plugin strategy '%s' from %s: it would shadow the built-in of that name.",
                        ep.name,
                        ep.value,
                    )
                    continue
                self._plugins.setdefault(ep.name, ep)
        return self._plugins

    def refresh(self) -> None:
        """Forget discovered entry points so newly installed plugins are seen."""
        self._plugins = None

    def get(self, name: str) -> type[Strategy]:
        """Return the strategy class for ``name``, importing a plugin on first use.

        Raises:
            UnknownStrategyError: nothing of that name is registered or installed.
            StrategyImportError: the plugin was found but failed to import.
        """
        if name in self._strategies:
            return self._strategies[name]
        ep = self._entry_points().get(name)
        if ep is None:
            available = self.list()
            raise UnknownStrategyError(
                f"Unknown adapter strategy '{name}'.{did_you_mean(name, available)}\n"
                f"Available: {', '.join(available)}. Third-party strategies appear after installing their package."
            )
        try:
            cls = ep.load()
        except Exception as err:
            raise StrategyImportError(
                f"The plugin strategy '{name}' ({ep.value}, from {getattr(ep.dist, 'name', 'unknown package')}) "
                f"failed to import: {err}. Reinstall or fix that package, or set ADAPTERKIT_DISABLE_PLUGINS=1."
            ) from err
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise StrategyImportError(
                f"The plugin strategy '{name}' ({ep.value}) is {cls!r}, not a subclass of adapterkit.Strategy."
            )
        if name not in self._strategies:  # the plugin may have registered itself on import
            self.register(name, cls)
        return self._strategies[name]

    def list(self, pattern: str | None = None) -> list[str]:
        """Sorted names of registered and installed strategies, filtered by a shell-style wildcard."""
        names = set(self._strategies) | set(self._entry_points())
        if pattern:
            names = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        return sorted(names)

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` is one of adapterkit's own strategies."""
        return name in self._builtin


default_registry = Registry()


def register_strategy(name: str, *, override: bool = False, registry: Registry | None = None) -> Callable[[S], S]:
    """Class decorator registering a :class:`~adapterkit.Strategy` under ``name``.

    Example:
        >>> @register_strategy("my_method")
        ... class MyStrategy(Strategy): ...
    """

    def decorator(cls: S) -> S:
        target = registry or default_registry
        builtin = cls.__module__.startswith("adapterkit.strategies.")
        target.register(name, cls, override=override, builtin=builtin and target is default_registry)
        return cls

    return decorator


def list_strategies(pattern: str | None = None) -> list[str]:
    """Names of the built-in and installed strategies, sorted; ``pattern`` takes wildcards like ``"lo*"``."""
    return default_registry.list(pattern)


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered under ``name`` (plugins imported on first use)."""
    return default_registry.get(name)
