"""Exceptions raised by adapterkit.

Every error subclasses :class:`AdapterKitError` and the builtin it refines, so callers can
catch either. Messages say what was received, what was expected and what to do next.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    match = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""
