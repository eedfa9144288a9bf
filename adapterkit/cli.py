"""The ``adapterkit`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

import adapterkit as ak


def _cmd_list(args: argparse.Namespace) -> int:
    print("strategies:", ", ".join(ak.list_strategies()))
    cached = cached_adapters()
    print(f"cached adapters ({len(cached)}):")
    for repo_id, revision, sidecar in cached:
        print(f"  {repo_id}@{revision[:8]}  {sidecar.get('strategy')}  base={sidecar.get('base_model', {}).get('id')}")
    return 0


def cached_adapters() -> list[tuple[str, str, dict]]:
    """Adapters in the local Hub cache: (repo id, commit, sidecar) for folders with a sidecar."""
    import json

    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        from huggingface_hub import constants

        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        for rev in repo.revisions:
            sidecar = rev.snapshot_path / "adapterkit.json"
            if sidecar.is_file():
                found.append((repo.repo_id, rev.commit_hash, json.loads(sidecar.read_text())))
    return found


def _describe(folder) -> str:
    from adapterkit.artifacts import read_sidecar

    sidecar = read_sidecar(folder)
    if sidecar is None:
        return f"{folder}: a plain peft adapter (no adapterkit sidecar)"
    lines = [
        f"adapter     {sidecar['name']} ({sidecar['strategy']}, format v{sidecar['format_version']})",
        f"base        {sidecar['base_model'].get('id')}  fingerprint {sidecar['base_model'].get('fingerprint', {}).get('weights')}",
        f"quantized   {sidecar.get('quantization') or 'no'}",
        f"task        {sidecar.get('task')}  labels {sidecar.get('label_names')}",
        f"options     {sidecar.get('options')}",
        f"metrics     {sidecar.get('metrics')}",
        f"files       {sorted(p.name for p in folder.iterdir())}",
        f"size        {sum(p.stat().st_size for p in folder.iterdir() if p.is_file()):,} bytes",
    ]
    return "\n".join(lines)


def _folder(source: str, revision: str | None):
    from pathlib import Path

    from adapterkit.hub import download

    path = Path(source)
    return path if path.is_dir() else download(source, revision=revision)


def _cmd_info(args: argparse.Namespace) -> int:
    print(_describe(_folder(args.source, args.revision)))
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    folder = _folder(args.repo, args.revision)
    print(folder)
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    url = ak.publish(args.folder, args.repo, private=args.private, revision=args.revision, commit_message=args.message)
    print(url)
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
    p = sub.add_parser("info", help="describe a saved adapter (folder or Hub repo)")
    p.add_argument("source")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("pull", help="download an adapter into the Hub cache and print its folder")
    p.add_argument("repo")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=_cmd_pull)
    p = sub.add_parser("publish", help="upload a saved adapter folder to the Hub in one commit")
    p.add_argument("folder")
    p.add_argument("repo")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None)
    p.add_argument("--message", default=None)
    p.set_defaults(func=_cmd_publish)
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
    except (ak.AdapterKitError, OSError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
