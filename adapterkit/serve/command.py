"""``adapterkit serve``: the command that loads a base and its adapters and serves them over HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from adapterkit.base_model import load_base
from adapterkit.errors import InvalidOptionError
from adapterkit.model_info import base_model_id
import adapterkit.serve.vllm as vllm
from adapterkit.serve.engine import ControlJob, Engine, default_name
from adapterkit.serve.pool import AdapterPool

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
#: where the API key is read from when --api-key is not given (keeps it out of `ps`)
API_KEY_ENV = "ADAPTERKIT_API_KEY"
#: the embedded engine's own options and their defaults (``--engine vllm`` refuses them when changed)
EMBEDDED_OPTIONS = {"max_rank": 16, "batch_window_ms": 5.0, "max_batch_size": 16, "max_tokens_limit": None,
                    "task": None, "bits": None, "device": None}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to the ``adapterkit`` command's subparsers."""
    p = subparsers.add_parser(
        "serve", help="serve a base and its adapters over an OpenAI-compatible HTTP API",
        description="Serve a base model and its adapters over an OpenAI-compatible HTTP API: adapterkit's own "
        "engine (FastAPI + uvicorn), or, with --engine vllm, vLLM's server on the same verified LoRA adapters. "
        "A request's `model` names the adapter, or the base.",
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``adapterkit serve``."""
    d = EMBEDDED_OPTIONS
    p.add_argument("--base", required=True, help="base model: an alias (smollm2-135m), a folder or a Hub id")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]SOURCE",
                   help="an adapter folder or Hub repo id to serve, optionally under NAME (repeatable)")
    p.add_argument("--engine", default="embedded", choices=["embedded", "vllm"],
                   help="embedded: adapterkit's adapter pool in this process (every strategy); vllm: start vLLM's "
                   "OpenAI server on the same, verified LoRA adapters (a separate environment, see --vllm-python)")
    p.add_argument("--slots", type=int, default=32,
                   help="adapters held in the pool's slots at once (with --engine vllm: its --max-loras)")
    p.add_argument("--max-rank", type=int, default=d["max_rank"], help="largest LoRA rank the slots take")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV})")
    p.add_argument("--batch-window-ms", type=float, default=d["batch_window_ms"],
                   help="wait this long for requests to batch together")
    p.add_argument("--max-batch-size", type=int, default=d["max_batch_size"], help="rows per model batch")
    p.add_argument("--max-tokens-limit", type=int, default=d["max_tokens_limit"],
                   help="largest max_tokens a request may ask for")
    p.add_argument("--task", default=d["task"], choices=["causal-lm", "classification"],
                   help="the base's task (default: inferred from the checkpoint)")
    p.add_argument("--bits", type=int, default=d["bits"], choices=[4, 8], help="load the base quantized (bitsandbytes)")
    p.add_argument("--device", default=d["device"], help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--vllm-python", default=None, metavar="PATH",
                   help=f"with --engine vllm: the Python of the environment vLLM is installed in (default: "
                   f"${vllm.VLLM_PYTHON_ENV}, else this one)")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="with --engine vllm: an argument passed to vLLM's server as is, e.g. --vllm-arg=--dtype=float32 "
                   "(repeatable)")


def parse_adapter(text: str) -> tuple[str, str]:
    """``NAME=SOURCE`` or ``SOURCE`` as ``(name, source)``; the default name is the folder's name or the repo id."""
    name, sep, source = text.partition("=")
    if sep and _NAME.match(name) and not Path(text).exists():
        if not source:
            raise InvalidOptionError(f"--adapter {text!r} names no source after '='; write NAME=FOLDER or NAME=OWNER/REPO.")
        return name, source
    return default_name(text), text


def build_engine(
    base: str, adapters: Sequence[str] = (), *, slots: int = 32, max_rank: int = 16, task: str | None = None,
    bits: int | None = None, device: str | None = None, batch_window_ms: float = 5.0, max_batch_size: int = 16,
    max_tokens_limit: int | None = None,
) -> Engine:
    """Load ``base``, make its adapter pool, start an :class:`Engine` and load ``adapters`` (``[NAME=]SOURCE``)."""
    pairs = [parse_adapter(a) for a in adapters]
    check_names(pairs)
    model, tokenizer = load_base(base, task=task, bits=bits)
    if bits is None:
        model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pool = AdapterPool(model, slots=slots, max_rank=max_rank)
    aliases = [base] + [n for n in (base_model_id(model),) if n and n != base]
    engine = Engine(model, tokenizer, pool, base_names=aliases, batch_window=batch_window_ms / 1000,
                    max_batch_size=max_batch_size, max_tokens_limit=max_tokens_limit)
    engine.start()
    try:
        for name, source in pairs:
            folder = engine.fetch(source)
            engine.submit(ControlJob(lambda name=name, source=source, folder=folder: engine.load(name, source, folder))).result()
    except BaseException:
        engine.close()
        raise
    return engine


def check_names(pairs: Sequence[tuple[str, str]]) -> None:
    """Refuse two adapters under one name."""
    names = [n for n, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidOptionError(f"Two --adapter flags use the name(s) {repeated}; give each a NAME= of its own.")


def run_vllm(args: argparse.Namespace, api_key: str | None) -> int:
    """``--engine vllm``: verify the adapters here, then run vLLM's OpenAI server on them."""
    vllm.check_options(**{k: getattr(args, k) != default for k, default in EMBEDDED_OPTIONS.items()})
    python = vllm.find_python(args.vllm_python)
    pairs = [parse_adapter(a) for a in args.adapter]
    check_names(pairs)
    plan = vllm.prepare(args.base, pairs)
    return vllm.serve(plan, python=python, host=args.host, port=args.port, max_loras=args.slots, api_key=api_key,
                      extra=args.vllm_arg)


def run(args: argparse.Namespace) -> int:
    """Run the server until interrupted."""
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("Serving on %s without an API key: anyone who can reach it may use it.", args.host)
    if args.engine == "vllm":
        return run_vllm(args, api_key)
    if args.vllm_python or args.vllm_arg:
        raise InvalidOptionError("--vllm-python and --vllm-arg apply to --engine vllm only.")
    # FastAPI and uvicorn are the optional `serve` extra: imported when a server starts, so the
    # rest of the command line works without them.
    try:
        import uvicorn

        from adapterkit.serve.app import create_app
    except ImportError as err:
        raise InvalidOptionError(
            f"`adapterkit serve` needs FastAPI and uvicorn ({err}). Install them: pip install 'adapterkit[serve]'."
        ) from err
    engine = build_engine(
        args.base, args.adapter, slots=args.slots, max_rank=args.max_rank, task=args.task, bits=args.bits,
        device=args.device, batch_window_ms=args.batch_window_ms, max_batch_size=args.max_batch_size,
        max_tokens_limit=args.max_tokens_limit,
    )
    app = create_app(engine, api_key=api_key)
    print(f"adapterkit serve: {engine.base_names[0]} with {len(engine.adapters)} adapter(s) on http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``adapterkit serve`` on its own: parse ``argv`` and serve."""
    parser = argparse.ArgumentParser(prog="adapterkit serve", allow_abbrev=False)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))
