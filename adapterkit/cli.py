"""The ``adapterkit`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

import adapterkit as ak


def _cmd_list(args: argparse.Namespace) -> int:
    print("strategies:", ", ".join(ak.list_strategies()))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Attach each built-in strategy to a base model and print its summary."""
    for strategy in args.strategies:
        model, _ = ak.load_base(args.model, task=args.task, bits=args.bits)
        ak.attach(model, strategy, name=strategy)
        print(f"--- {strategy} on {args.model}")
        print(ak.summary(model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``adapterkit`` command."""
    parser = argparse.ArgumentParser(prog="adapterkit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list strategies (and cached adapters)")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("demo", help="attach strategies to a base model and print summaries")
    p.add_argument("model", nargs="?", default="minilm-l6")
    p.add_argument("--task", default=None)
    p.add_argument("--bits", type=int, default=None, choices=[4, 8])
    p.add_argument("--strategies", nargs="+", default=["lora", "prefix", "head", "full"])
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``adapterkit`` console command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ak.AdapterKitError as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
