"""Command-line flags and config files for recipes, generated from an options dataclass.

A recipe declares one dataclass; ``parse_options`` builds ``--flag`` per field (types from
the annotations), reads ``--config file.yaml|json`` first and applies flags on top. An
unknown key, in a file or on the command line, is an error naming the valid ones before
anything runs. Config files hold plain values only, never dotted paths to Python objects.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from adapterkit.errors import InvalidOptionError, did_you_mean

T = TypeVar("T")


def _parse_value(text: str) -> Any:
    """A flag value: JSON where it parses (numbers, lists, dicts, true/false/null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def read_config(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of option values."""
    path = Path(path)
    if not path.is_file():
        raise InvalidOptionError(f"Config file {path} does not exist.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise InvalidOptionError(f"Config file {path} must hold a mapping of option names to values.")
    return data


def _check_types(cls: type, values: dict[str, Any]) -> list[str]:
    hints = typing.get_type_hints(cls)
    problems = []
    for key, value in values.items():
        hint = hints[key]
        origin = typing.get_origin(hint)
        allowed = typing.get_args(hint) if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (hint,)
        ok = False
        for a in allowed:
            base = typing.get_origin(a) or a
            if a is type(None) and value is None:
                ok = True
            elif base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                ok = True
            elif base is int and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            elif isinstance(base, type) and base not in (float, int) and isinstance(value, base):
                ok = True
            elif base is Any:
                ok = True
        if not ok:
            problems.append(f"{key}: expected {hint}, got {value!r}")
    return problems


def parse_options(cls: type[T], argv: list[str] | None = None, *, description: str | None = None) -> T:
    """Options of type ``cls`` from ``--config`` and ``--field value`` flags.

    Raises:
        InvalidOptionError: unknown keys or badly typed values, all listed at once.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").split("\n")[0])
    parser.add_argument("--config", help="YAML or JSON file with option values (flags override it)")
    for name, f in fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"(default: {f.default if f.default is not dataclasses.MISSING else 'required'})")
    args, unknown = parser.parse_known_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values.update(read_config(args.config))
        if "recipe" not in fields:  # names the recipe for `adapterkit train config.yaml`
            values.pop("recipe", None)
    values.update({k: _parse_value(v) for k, v in vars(args).items() if k != "config"})
    problems = []
    for flag in unknown:
        if flag.startswith("--"):
            key = flag[2:].split("=")[0].replace("-", "_")
            problems.append(f"unknown option '{key}'.{did_you_mean(key, fields)}")
    for key in values:
        if key not in fields:
            problems.append(f"unknown option '{key}'.{did_you_mean(key, fields)}")
    known = {k: v for k, v in values.items() if k in fields}
    for f in fields.values():
        if f.type in ("str", str) and isinstance(known.get(f.name), (int, float)):
            known[f.name] = str(known[f.name])
    problems += _check_types(cls, known)
    if problems:
        raise InvalidOptionError(
            f"Invalid options for {cls.__name__}:\n  - " + "\n  - ".join(problems) + f"\nValid options: {', '.join(sorted(fields))}."
        )
    return cls(**known)


def report_results(results: dict[str, Any], results_json: str | None = None) -> None:
    """Print a recipe's results as an aligned table (for people) and optionally write them as JSON."""
    flat = {k: v for k, v in results.items() if not isinstance(v, (list, dict))}
    width = max(len(k) for k in flat)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in flat.items()))
    if results_json:
        Path(results_json).write_text(json.dumps(results, indent=2) + "\n")
