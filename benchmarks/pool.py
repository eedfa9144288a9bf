"""AdapterPool: loading one adapter, and mixed batches over many adapters, beside ak.load and peft.

``python -m benchmarks.pool [--model smollm2-135m] [--quick] [--out benchmarks/results/pool.json]``
prints a table and writes the JSON. Sides, in one process on the same files and weights:

- load: ``pool.load`` vs ``ak.load`` vs peft's ``PeftModel.load_adapter``, the same folder
  (LoRA r=8 on every linear layer), each timed alone, alternating; with the parts of a pool
  load timed on their own: reading the weight file's bytes (the floor), hashing them, and
  ``read_folder`` (one read: hash, parse, every check), the rest being the copy into a slot;
- mixed batch: 64 rows of 8 tokens over 1, 8 and 64 distinct adapters, as a fraction of the
  base-only forward's throughput, beside peft's ``adapter_names`` mixed batch (its outputs
  are checked against the pool's). Only the last position's logits are computed
  (``logits_to_keep=1``), as a serving prefill does.

``--quick`` runs the same code on a tiny model (the test suite's smoke test). ``--threads``
(default 1): on this shared 2-core machine a 2-thread op waits for the other thread's turn on
a busy core (a 3 MB copy took 11 ms with 2 threads and 0.2 ms with 1), which measures the
machine's load, not the code; with one thread both sides of each ratio run alike.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import environment, median_ms, table

FULL = {"rows": 64, "tokens": 8, "distinct": [1, 8, 64], "repeat": 5, "load_repeat": 11, "rank": 8, "max_rank": 16}
QUICK = {"rows": 4, "tokens": 6, "distinct": [1, 2, 4], "repeat": 2, "load_repeat": 3, "rank": 4, "max_rank": 8}
TARGETS = {"load_ms": 20.0, "fraction_at_8": 0.9, "fraction_at_64": 0.8}


def _adapters(model_name: str, folder: Path, count: int, rank: int) -> list[Path]:
    """``count`` saved LoRA adapters (every linear layer, random non-zero B) of one base."""
    import adapterkit as ak

    trainer, _ = ak.load_base(model_name, task="causal-lm")
    ak.attach(trainer, "lora", name="x", r=rank)
    params = [p for key, p in ak.trainable_parameters(trainer, "x").items() if "lora_B" in key]
    folders = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for p in params:
                torch.nn.init.normal_(p, std=0.02)
        folders.append(ak.save(trainer, folder / f"a{i}", name="x"))
    return folders


def _load_times(model_name: str, pool, folder: Path, repeat: int) -> dict[str, Any]:
    import peft

    import adapterkit as ak
    from adapterkit import artifacts

    ak_base, _ = ak.load_base(model_name, task="causal-lm")
    peft_base, _ = ak.load_base(model_name, task="causal-lm")
    peft_model = peft.PeftModel.from_pretrained(peft_base, str(folder), adapter_name="init")
    # (load, unload) per side; each load is timed alone, under a new name, and undone untimed
    loaders = {
        "pool_ms": (lambda n: pool.load(folder, name=n), pool.unload),
        "ak_load_ms": (lambda n: ak.load(ak_base, str(folder), name=n), lambda n: ak.detach(ak_base, n)),
        "peft_load_adapter_ms": (lambda n: peft_model.load_adapter(str(folder), adapter_name=n), peft_model.delete_adapter),
    }
    sides: dict[str, list[float]] = {side: [] for side in loaders}
    for i in range(repeat):  # alternate the sides, so drift on a shared machine hits all alike
        for side, (load, unload) in loaders.items():
            times = [time.perf_counter()]
            load(f"t{i}")
            times.append(time.perf_counter())
            unload(f"t{i}")
            sides[side].append((times[1] - times[0]) * 1e3)
    result: dict[str, Any] = {side: round(statistics.median(times), 3) for side, times in sides.items()}
    weights = folder / "adapter_model.safetensors"
    result["file_read_ms"] = round(median_ms(weights.read_bytes, repeat), 3)
    data = weights.read_bytes()
    result["sha256_ms"] = round(median_ms(lambda: hashlib.sha256(data).hexdigest(), repeat), 3)
    result["read_folder_ms"] = round(median_ms(lambda: artifacts.read_folder(folder), repeat), 3)
    result["file_bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    result["pool_speedup_vs_ak_load"] = round(result["ak_load_ms"] / result["pool_ms"], 2)
    result["pool_speedup_vs_peft"] = round(result["peft_load_adapter_ms"] / result["pool_ms"], 2)
    result["repeat"] = repeat
    return result


def _mixed(model_name: str, model, pool, folders: list[Path], settings: dict[str, Any]) -> dict[str, Any]:
    import peft

    import adapterkit as ak

    rows_n, distinct = settings["rows"], settings["distinct"]
    names = [f"m{i}" for i in range(max(distinct))]
    for name, folder in zip(names, folders):
        pool.load(folder, name=name)
    peft_base, _ = ak.load_base(model_name, task="causal-lm")
    started = time.perf_counter()
    peft_model = peft.PeftModel.from_pretrained(peft_base, str(folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        peft_model.load_adapter(str(folder), adapter_name=name)
    peft_load_s = time.perf_counter() - started
    peft_model.eval()
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (rows_n, settings["tokens"]))
    extra = {"logits_to_keep": 1}

    def base_forward():
        model(input_ids=ids, **extra)

    out_rows = []
    with torch.inference_mode():
        for k in distinct:
            rows = [names[i % k] for i in range(rows_n)]

            def pooled():
                with pool.route(rows):
                    return model(input_ids=ids, **extra).logits

            def theirs():
                return peft_model(input_ids=ids, adapter_names=rows, **extra).logits

            difference = (pooled() - theirs()).abs().max().item()
            base_ms, pool_ms, peft_ms = [], [], []
            for _ in range(settings["repeat"]):  # interleaved rounds: each ratio compares neighbours in time
                base_ms.append(median_ms(base_forward, 1))
                pool_ms.append(median_ms(pooled, 1))
                peft_ms.append(median_ms(theirs, 1))
            base, ours, peft_t = (statistics.median(t) for t in (base_ms, pool_ms, peft_ms))
            out_rows.append({
                "distinct_adapters": k,
                "base_ms": round(base, 2),
                "pool_ms": round(ours, 2),
                "peft_ms": round(peft_t, 2),
                "pool_fraction_of_base": round(statistics.median(b / p for b, p in zip(base_ms, pool_ms)), 3),
                "peft_fraction_of_base": round(statistics.median(b / p for b, p in zip(base_ms, peft_ms)), 3),
                "max_abs_difference_pool_vs_peft": difference,
            })
    return {"settings": settings, "rows": out_rows, "peft_load_seconds_all_adapters": round(peft_load_s, 2)}


def run(model_name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Both sections on ``model_name`` (an embedded alias or a folder); adapters go to a temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix="ak-pool-bench-"))
    try:
        return _run(model_name, settings, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(model_name: str, settings: dict[str, Any], tmp: Path) -> dict[str, Any]:
    import adapterkit as ak
    from adapterkit.serve.pool import AdapterPool

    started = time.perf_counter()
    folders = _adapters(model_name, tmp, max(settings["distinct"]), settings["rank"])
    setup_s = time.perf_counter() - started
    model, _ = ak.load_base(model_name, task="causal-lm")
    model.eval()
    pool = AdapterPool(model, slots=max(settings["distinct"]) + 2, max_rank=settings["max_rank"])
    result: dict[str, Any] = {
        "benchmark": "pool",
        "model": model_name,
        "lora": {"r": settings["rank"], "target_modules": "all-linear", "layers": pool.stats()["layers"]},
        "pool": {"slots": pool.slots, "max_rank": pool.max_rank},
        "adapter_setup_seconds": round(setup_s, 2),
    }
    result["load"] = _load_times(model_name, pool, folders[0], settings["load_repeat"])
    result["mixed"] = _mixed(model_name, model, pool, folders, settings)
    result["pool_stats"] = pool.stats()
    by_k = {r["distinct_adapters"]: r for r in result["mixed"]["rows"]}
    result["targets"] = [
        {"measure": "pool load (ms)", "target": f"<= {TARGETS['load_ms']}", "value": result["load"]["pool_ms"],
         "met": result["load"]["pool_ms"] <= TARGETS["load_ms"]},
        *[{"measure": f"mixed batch, {k} adapters (fraction of base)", "target": f">= {TARGETS[key]}",
           "value": by_k[k]["pool_fraction_of_base"], "met": by_k[k]["pool_fraction_of_base"] >= TARGETS[key]}
          for k, key in ((8, "fraction_at_8"), (64, "fraction_at_64")) if k in by_k],
    ]
    return result


def report(result: dict[str, Any]) -> str:
    """The result as markdown tables."""
    load = result["load"]
    lines = [
        f"## AdapterPool on {result['model']} (LoRA r={result['lora']['r']}, {result['lora']['layers']} layers; "
        f"pool: {result['pool']['slots']} slots, max_rank {result['pool']['max_rank']})",
        f"load average at start: {result['env']['load_average']}",
        "",
        table([
            {"side": "pool.load", "ms": load["pool_ms"]},
            {"side": "ak.load", "ms": load["ak_load_ms"]},
            {"side": "peft load_adapter", "ms": load["peft_load_adapter_ms"]},
            {"side": "(part of pool.load) read the weight file's bytes", "ms": load["file_read_ms"]},
            {"side": "(part of pool.load) sha256 of those bytes", "ms": load["sha256_ms"]},
            {"side": "(part of pool.load) read_folder: one read, hash, parse, checks", "ms": load["read_folder_ms"]},
        ], ["side", "ms"]),
        "",
        table(result["mixed"]["rows"], ["distinct_adapters", "base_ms", "pool_ms", "pool_fraction_of_base", "peft_ms",
                                        "peft_fraction_of_base", "max_abs_difference_pool_vs_peft"]),
        "",
        table([{**t, "met": "yes" if t["met"] else "NO"} for t in result["targets"]], ["measure", "target", "value", "met"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="an embedded alias or a model folder")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test on a tiny model")
    parser.add_argument("--out", default="benchmarks/results/pool.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings["threads"] = torch.get_num_threads()
    result = {"env": environment(), **run(args.model, settings)}
    result["env"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(report(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    return result


if __name__ == "__main__":
    main()
