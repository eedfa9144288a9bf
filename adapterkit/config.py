"""Strategy configuration: one dataclass per strategy, validated as a whole.

A config is what a user passes as options to :func:`adapterkit.attach` and what a saved
adapter records in its sidecar. Unknown options are an error when constructing, and a
warning naming the upgrade when reading a file written by a newer adapterkit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from typing import Any, ClassVar

from adapterkit.errors import InvalidOptionError, did_you_mean

logger = logging.getLogger(__name__)

#: Version of the on-disk sidecar format. Bump on any incompatible change.
FORMAT_VERSION = 1


@dataclasses.dataclass(kw_only=True)
class AdapterConfig:
    """Base class of every strategy's options.

    Subclasses are keyword-only dataclasses; ``strategy`` names the registry entry that
    reads them. ``validate`` returns every problem at once so one error lists them all.
    """

    strategy: ClassVar[str] = ""

    def validate(self) -> list[str]:
        """Return human-readable problems with the values (empty when valid)."""
        return []

    @classmethod
    def option_names(cls) -> list[str]:
        """Sorted names of the options this config accepts."""
        return sorted(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> AdapterConfig:
        """Build and validate a config from keyword options, raising once for all problems.

        Raises:
            InvalidOptionError: an option is unknown or a value is invalid.
        """
        valid = cls.option_names()
        problems = [
            f"unknown option '{key}'.{did_you_mean(key, valid)}" for key in sorted(options) if key not in valid
        ]
        config = None
        if not problems:
            try:
                config = cls(**options)
            except TypeError as err:  # e.g. a required option is missing
                problems.append(str(err))
            else:
                try:
                    problems.extend(config.validate())
                except (TypeError, ValueError, AttributeError) as err:  # e.g. comparing a str option with a number
                    problems.append(f"an option has a value of the wrong type ({err})")
        if problems or config is None:
            label = cls.strategy or cls.__name__
            raise InvalidOptionError(
                f"Invalid options for strategy '{label}':\n  - "
                + "\n  - ".join(problems)
                + f"\nValid options: {', '.join(valid) or '(none)'}."
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the options; a value that cannot be serialised is an error."""
        data = dataclasses.asdict(self)
        for key, value in data.items():
            try:
                json.dumps(value)
            except TypeError as err:
                raise InvalidOptionError(
                    f"Option '{key}' of strategy '{self.strategy}' has a value of type "
                    f"{type(value).__name__} that cannot be saved as JSON; use plain numbers, strings or lists."
                ) from err
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> AdapterConfig:
        """Rebuild a config from :meth:`to_dict` output.

        Args:
            data: the saved options.
            strict: raise on unknown keys (True) or warn and drop them (False, used when
                reading files written by a newer adapterkit).

        Raises:
            InvalidOptionError: ``data`` is not a mapping, or holds an unknown option or bad value.
        """
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise InvalidOptionError(
                f"Options of strategy '{cls.strategy or cls.__name__}' must be a mapping of option names to values, "
                f"got {type(data).__name__} {data!r:.60}."
            )
        valid = set(cls.option_names())
        unknown = sorted(set(data) - valid)
        if unknown and not strict:
            warnings.warn(
                f"Ignoring options {unknown} of strategy '{cls.strategy}': they were written by a newer "
                "adapterkit. Upgrade adapterkit (pip install -U adapterkit) to use them.",
                UserWarning,
                stacklevel=2,
            )
            data = {k: v for k, v in data.items() if k in valid}
        return cls.from_options(dict(data))
