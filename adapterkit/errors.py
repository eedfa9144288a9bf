"""Exceptions raised by adapterkit.

Every error subclasses :class:`AdapterKitError` and the builtin it refines, so callers can
catch either. Messages say what was received, what was expected and what to do next.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import json
from collections.abc import Iterable, Iterator
from typing import Any


class AdapterKitError(Exception):
    """Base class of every error adapterkit raises on purpose."""


class UnknownStrategyError(AdapterKitError, LookupError):
    """No strategy is registered under the requested name."""


class StrategyImportError(AdapterKitError, ImportError):
    """A plugin strategy was found through its entry point but failed to import."""


class InvalidOptionError(AdapterKitError, ValueError):
    """An option given to a strategy or recipe is unknown or has a bad value."""


class IncompatibleModelError(AdapterKitError, ValueError):
    """The strategy cannot be applied to this model (architecture, quantization, ...)."""


class AdapterNotFoundError(AdapterKitError, LookupError):
    """No adapter of that name is loaded, or no adapter exists at that location."""


class AdapterExistsError(AdapterKitError, ValueError):
    """An adapter of that name is already loaded on the model."""


class AdapterMismatchError(AdapterKitError, ValueError):
    """A saved adapter does not fit the base model it is being loaded into."""


class AdapterFormatError(AdapterKitError, ValueError):
    """A saved adapter is corrupt, truncated, of an unsupported format version or unsafe."""


class ModelNotAvailableError(AdapterKitError, OSError):
    """A base model could not be found locally, in a package or on the Hub."""


class HubError(AdapterKitError, OSError):
    """The Hub refused or could not be reached, and no cached copy can stand in."""


class DataError(AdapterKitError, ValueError):
    """Training or evaluation data is missing, empty or does not match the task."""


class PoolFullError(AdapterKitError, RuntimeError):
    """Every slot of an :class:`adapterkit.AdapterPool` holds an adapter that is pinned or in use."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    match = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""


# Recipes and the `adapterkit` command read the same errors as the Python API, but their users set
# options as flags: hints must say `--length-policy truncate` there and `length_policy="truncate"` here.
_CLI_SPELLING: contextvars.ContextVar[bool] = contextvars.ContextVar("adapterkit_cli_spelling", default=False)
_NO_VALUE = object()


@contextlib.contextmanager
def cli_spelling() -> Iterator[None]:
    """Within, error hints name options as command-line flags (``--max-length 128``)."""
    token = _CLI_SPELLING.set(True)
    try:
        yield
    finally:
        _CLI_SPELLING.reset(token)


def option_hint(name: str, value: Any = _NO_VALUE) -> str:
    """How to set option ``name`` (to ``value``), spelt for the reader: a flag or a keyword.

    Example:
        ``option_hint("length_policy", "truncate")`` is ``length_policy="truncate"`` from Python
        and ``--length-policy truncate`` under :func:`cli_spelling`.
    """
    if _CLI_SPELLING.get():
        flag = "--" + name.replace("_", "-")
        if value is _NO_VALUE:
            return flag
        return f"{flag} {value if isinstance(value, str) else json.dumps(value)}"
    if value is _NO_VALUE:
        return f"{name}="
    return f"{name}={json.dumps(value) if isinstance(value, str) else repr(value)}"


def exception_chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or during (``__cause__``/``__context__``), once each.

    transformers and datasets re-raise huggingface_hub's typed errors as plain ``OSError``s; the
    typed one is found by walking this chain with ``isinstance``.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
