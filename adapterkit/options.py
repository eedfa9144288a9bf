"""Command-line flags and config files for recipes, generated from an options dataclass.

A recipe declares one dataclass; ``parse_options`` builds ``--flag`` per field (types from
the annotations), reads ``--config file.yaml|json`` first and applies flags on top. An
unknown key, in a file or on the command line, is an error naming the valid ones before
anything runs. Config files hold plain values only, never dotted paths to Python objects.

``run_script`` is a recipe's ``__main__``: an adapterkit error prints one line and exits 2
(``--debug`` shows the traceback), and hints in errors name the flags (``--max-length 64``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import re
import sys
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from adapterkit.errors import cli_spelling
from adapterkit.errors import AdapterKitError, InvalidOptionError, did_you_mean

T = TypeVar("T")


def parse_value(text: str) -> Any:
    """A flag value: JSON where it parses (numbers, lists, dicts, true/false/null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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


def default_of(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (its factory's product), or ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _shown(value: Any) -> str:
    # As it would be typed on the command line: flag values are parsed as JSON, else taken as text.
    if value is dataclasses.MISSING:
        return "required"
    if value is None or isinstance(value, str):
        return str(value)
    return json.dumps(value)


def _field_comments(cls: type) -> dict[str, str]:
    """The ``# comment`` after each field in the dataclass's source: the recipe's own documentation."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = {}
    for line in source.splitlines():
        match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def check_values(cls: type, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Values for fields of the options dataclass ``cls``, checked as :func:`parse_options` checks flags.

    A number given for a ``str`` field becomes its text (``--name 7`` is the name "7").

    Returns:
        ``(values, problems)``: the values as the dataclass takes them, and one line per value of
        the wrong type (empty when all fit). Keys must be fields of ``cls``.
    """
    checked = dict(values)
    for f in dataclasses.fields(cls):
        if f.type in ("str", str) and isinstance(checked.get(f.name), (int, float)):
            checked[f.name] = str(checked[f.name])
    return checked, _check_types(cls, checked)


def parse_options(
    cls: type[T], argv: list[str] | None = None, *, description: str | None = None, epilog: str | None = None
) -> T:
    """Options of type ``cls`` from ``--config`` and ``--field value`` flags.

    ``epilog`` is shown at the end of ``--help`` (flags handled before this parser sees them).

    Raises:
        InvalidOptionError: unknown keys or badly typed values, all listed at once.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    comments = _field_comments(cls)
    module = getattr(cls, "__module__", "")
    # `adapterkit train <recipe>` loads recipes as modules named adapterkit_recipe_<recipe>.
    prog = f"adapterkit train {module[len('adapterkit_recipe_'):]}" if module.startswith("adapterkit_recipe_") else None
    # allow_abbrev=False: `--learning 0.1` is an unknown option (with a suggestion), not a silent prefix match.
    parser = argparse.ArgumentParser(
        prog=prog, description=description or (cls.__doc__ or "").split("\n")[0], epilog=epilog, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML or JSON file with option values (flags override it)")
    for name, f in fields.items():
        text = f"{comments[name]} " if name in comments else ""
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"{text}(default: {_shown(default_of(f))})".replace("%", "%%"))
    args, unknown = parser.parse_known_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values.update(read_config(args.config))
        if "recipe" not in fields:  # names the recipe for `adapterkit train config.yaml`
            values.pop("recipe", None)
    values.update({k: parse_value(v) for k, v in vars(args).items() if k != "config"})
    problems = []
    after_flag = False
    for flag in unknown:
        if flag.startswith("-") and not _parse_number(flag):
            key = flag.lstrip("-").split("=")[0].replace("-", "_")
            problems.append(f"unknown option '{key}'.{did_you_mean(key, fields)}")
            after_flag = "=" not in flag
        elif after_flag:  # the value of the unknown flag just named
            after_flag = False
        else:  # a value without a flag (a missing `--name`, or one value too many)
            problems.append(f"unexpected argument {flag!r}: options are given as `--name value`")
    for key in values:
        if key not in fields:
            problems.append(f"unknown option '{key}'.{did_you_mean(key, fields)}")
    known, wrong_types = check_values(cls, {k: v for k, v in values.items() if k in fields})
    problems += wrong_types
    if problems:
        raise InvalidOptionError(
            f"Invalid options for {cls.__name__}:\n  - " + "\n  - ".join(problems) + f"\nValid options: {', '.join(sorted(fields))}."
        )
    return cls(**known)


F = TypeVar("F", bound=Callable[..., Any])


def recipe_main(main: F) -> F:
    """Decorate a recipe's ``main(argv)``: within it, error hints name command-line flags."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cli_spelling():
            return main(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def run_script(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a recipe from the shell; returns the exit status.

    An adapterkit error (or an ``OSError``) prints ``error: <Type>: <message>`` on stderr, no
    traceback, and returns 2; ``--debug`` anywhere in ``argv`` prints the full traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except (AdapterKitError, OSError) as err:  # OSError: files the recipe could not read or write
        if debug:
            traceback.print_exc()
        else:
            print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


def report_results(results: dict[str, Any], results_json: str | None = None) -> None:
    """Print a recipe's results as an aligned table (for people) and optionally write them as JSON."""
    flat = {k: v for k, v in results.items() if not isinstance(v, (list, dict))}
    width = max(len(k) for k in flat)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in flat.items()))
    if results_json:
        Path(results_json).write_text(json.dumps(results, indent=2) + "\n")
