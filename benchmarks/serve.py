"""The server under load: requests/s and p50/p95 latency, 16 concurrent clients, 1 and 64 adapters.

One base (smollm2-135m by default) and LoRA r=8 adapters on every linear layer, made by
attaching and perturbing (a fresh LoRA's B is zero), saved to a temporary folder. Each scenario
serves them with ``adapterkit serve``'s app (uvicorn on 127.0.0.1, in this process) and runs
closed-loop clients (``httpx``), each sending a completion as soon as its last one came back,
with a random adapter of the working set per request:

- base only (no adapter), for scale;
- 1 adapter;
- 64 adapters, all in the pool's slots (slots = 64);
- 64 adapters on 32 slots: a working set of 2x the slots, so routing evicts and brings back
  adapters all the time (target: p95 <= 3x the in-cache p95);
- beside it, when an environment with vLLM is found (``--vllm-python`` or
  ``$ADAPTERKIT_VLLM_PYTHON``; ``scripts/setup-vllm-env.sh`` makes one): vLLM's OpenAI server on
  the same base and adapter folders (``--max-loras`` = the slots, float32 as the embedded engine
  serves), the same clients and requests, for 1 and 64 adapters. ``--no-vllm`` skips it.

``python -m benchmarks.serve`` writes ``benchmarks/results/serve.json``; ``--quick`` is a
seconds-long smoke run (pass ``--base`` a tiny model folder).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

import adapterkit as ak
from adapterkit.serve.pool import AdapterPool
from adapterkit.serve.app import BackgroundServer, create_app
from adapterkit.serve.engine import Engine
from adapterkit.serve import vllm
from benchmarks.common import RESULTS, environment, save_json, table
# One maker of perturbed LoRA adapters for the pool and serve benchmarks (a fresh LoRA's B is zero).
from benchmarks.pool import _adapters as make_adapters

PROMPTS = [
    "The movie was surprisingly",
    "Write one sentence about the sea:",
    "Question: what is the capital of France? Answer:",
    "Translate to French: good morning",
]
#: p95 of the churning working set over the in-cache p95 (issue 10, section 5)
CHURN_TARGET = 3.0


async def _clients(url: str, names: list[str | None], base: str, *, clients: int, seconds: float, max_tokens: int,
                   seed: int) -> dict[str, Any]:
    """Closed-loop clients for ``seconds``: per request, a random adapter of ``names``."""
    latencies: list[float] = []
    errors = 0
    rng = random.Random(seed)
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            name = rng.choice(names)
            body = {"model": name or base, "prompt": rng.choice(PROMPTS), "max_tokens": max_tokens, "temperature": 0}
            started = time.perf_counter()
            response = await http.post("/v1/completions", json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return round(1e3 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else 0.0

    return {
        "requests": len(latencies), "errors": errors, "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 2), "p50_ms": pct(0.5), "p95_ms": pct(0.95),
        "mean_ms": round(1e3 * statistics.fmean(latencies), 1) if latencies else 0.0,
    }


def scenario(model, tokenizer, base: str, label: str, folders: list[Path], *, slots: int, args: argparse.Namespace
             ) -> dict[str, Any]:
    """Serve ``folders`` from a pool of ``slots`` slots and measure the clients against it."""
    pool = AdapterPool(model, slots=slots, max_rank=args.rank)
    engine = Engine(model, tokenizer, pool, base_names=[base], batch_window=args.batch_window_ms / 1000,
                    max_batch_size=args.max_batch_size)
    engine.start()
    try:
        names: list[str | None] = [None]
        if folders:
            names = [f"a{i}" for i in range(len(folders))]
            for name, folder in zip(names, folders):
                engine.load(name, str(folder), folder)
        with BackgroundServer(create_app(engine)) as server:
            kwargs = {"clients": args.clients, "max_tokens": args.max_tokens}
            asyncio.run(_clients(server.url, names, base, seconds=args.warmup, seed=1, **kwargs))
            before = pool.stats()
            result = asyncio.run(_clients(server.url, names, base, seconds=args.seconds, seed=2, **kwargs))
            after = pool.stats()
    finally:
        engine.close()
        pool.close()
    counters = ("hits", "misses", "cpu_hits", "evictions", "loads")
    result.update({
        "scenario": label, "engine": "adapterkit", "adapters": len(folders), "slots": slots,
        "pool": {k: after[k] - before[k] for k in counters} | {
            "load_seconds": round(after["load_seconds"] - before["load_seconds"], 4)},
    })
    return result


def measure(url: str, names: list[str | None], base: str, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, then the measured closed-loop run, against the server at ``url``."""
    kwargs = {"clients": args.clients, "max_tokens": args.max_tokens}
    asyncio.run(_clients(url, names, base, seconds=args.warmup, seed=1, **kwargs))
    return asyncio.run(_clients(url, names, base, seconds=args.seconds, seed=2, **kwargs))


def vllm_scenario(python: str, base: str, label: str, folders: list[Path], *, slots: int, args: argparse.Namespace
                  ) -> dict[str, Any]:
    """The same clients against vLLM's OpenAI server on the same base and adapter folders."""
    names: list[str | None] = [f"a{i}" for i in range(len(folders))] or [None]
    plan = vllm.prepare(base, [(n, str(f)) for n, f in zip(names, folders)])
    port = _free_port()
    argv = vllm.vllm_command(plan, python=python, host="127.0.0.1", port=port, max_loras=slots,
                             extra=["--dtype=float32", f"--max-num-seqs={args.max_batch_size}"])
    env = {**vllm.vllm_env(None), "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_cache_gib)}
    started = time.perf_counter()
    with vllm.VllmServer(argv, env=env, url=vllm.local_url("127.0.0.1", port)) as server:
        server.wait_ready(900)
        ready = time.perf_counter() - started
        result = measure(server.url, names, plan.served_names[0], args)
    result.update({"scenario": label, "engine": "vllm", "adapters": len(folders), "slots": slots,
                   "startup_s": round(ready, 1)})
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--slots", type=int, default=32, help="slots of the churn scenario (working set: --adapters)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured time per scenario")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (4 adapters, 2 slots)")
    parser.add_argument("--vllm-python", default=None, help=f"vLLM's Python (default: ${vllm.VLLM_PYTHON_ENV})")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM side even when vLLM is found")
    parser.add_argument("--vllm-kv-cache-gib", type=float, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--out", default=None, help=f"JSON result (default: {RESULTS / 'serve.json'}; --quick: none)")
    args = parser.parse_args(argv)
    if args.quick:
        args.adapters, args.slots, args.clients, args.seconds, args.warmup, args.max_tokens = 4, 2, 4, 1.0, 0.3, 4
    model, tokenizer = ak.load_base(args.base, task="causal-lm")
    model = model.eval()
    with tempfile.TemporaryDirectory(prefix="ak-serve-bench-") as tmp:
        folders = make_adapters(args.base, Path(tmp), args.adapters, args.rank)
        plan = [
            ("base only", [], args.slots),
            ("1 adapter", folders[:1], args.slots),
            (f"{args.adapters} adapters, all in slots", folders, args.adapters),
            (f"{args.adapters} adapters on {args.slots} slots", folders, args.slots),
        ]
        rows = [scenario(model, tokenizer, args.base, label, chosen, slots=slots, args=args)
                for label, chosen, slots in plan]
        vllm_python = None
        if not (args.quick or args.no_vllm):
            try:
                vllm_python = vllm.find_python(args.vllm_python)
            except vllm.VllmError as err:
                print(f"vLLM side skipped: {err}")
        if vllm_python:
            del model  # vLLM loads its own copy of the base
            rows += [vllm_scenario(vllm_python, args.base, f"vLLM: {label}", chosen, slots=slots, args=args)
                     for label, chosen, slots in (plan[1], plan[3])]
    in_cache, churn = rows[2], rows[3]
    ratio = round(churn["p95_ms"] / in_cache["p95_ms"], 2) if in_cache["p95_ms"] else None
    result = {
        "benchmark": "serve",
        "environment": environment(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "scenarios": rows,
        "targets": {"churn_p95_over_in_cache_p95": ratio, "target": CHURN_TARGET,
                    "met": ratio is not None and ratio <= CHURN_TARGET},
    }
    print(f"{args.base}: {args.clients} concurrent clients, max_tokens={args.max_tokens}, LoRA r={args.rank}, "
          f"load average {result['environment']['load_average']}")
    print(table(rows, ["scenario", "engine", "adapters", "slots", "requests", "errors", "requests_per_s", "p50_ms",
                       "p95_ms"]))
    print(f"p95 with a working set of 2x the slots / in-cache p95: {ratio} (target <= {CHURN_TARGET})")
    save_json(args.out, "serve", result, quick=args.quick)
    return result


if __name__ == "__main__":
    main()
