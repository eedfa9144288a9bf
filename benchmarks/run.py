"""Run a benchmark suite and write JSON, a markdown report and plots under benchmarks/results/.

    python -m benchmarks.run --suite smoke    # CI: the scripts run and results are well formed (~1 min)
    python -m benchmarks.run --suite quick    # under 10 minutes
    python -m benchmarks.run --suite full     # the numbers in benchmarks/README.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, environment, run_side, table, write_result

SUITES: dict[str, dict[str, Any]] = {
    "smoke": {
        "train": {"model": "minilm-l6", "train_rows": 64, "dev_rows": 64, "batch_size": 16, "max_length": 64, "epochs": 1},
        "train_sides": ["peft_dynamic:lora", "adapterkit:lora:query,value"],
        "runtime": None, "smollm2": None, "quality": None,
    },
    "quick": {
        "train": {"model": "minilm-l6", "train_rows": 500, "dev_rows": 872, "batch_size": 16, "max_length": 64, "epochs": 1},
        "train_sides": ["peft_naive:lora", "peft_dynamic:lora", "adapterkit:lora:query,value", "adapterkit:lora",
                        "peft_naive:head", "peft_dynamic:head", "adapterkit:head"],
        "runtime": {"model": "smollm2-135m", "repeat": 30, "load_repeat": 3, "mixed_repeat": 3, "targets": None},
        "smollm2": None, "quality": None,
    },
    "full": {
        "train": {"model": "minilm-l6", "train_rows": 2000, "dev_rows": 872, "batch_size": 16, "max_length": 64, "epochs": 1},
        "train_sides": ["peft_naive:lora", "peft_dynamic:lora", "adapterkit:lora:query,value", "adapterkit:lora",
                        "peft_naive:head", "peft_dynamic:head", "adapterkit:head",
                        "peft_naive:full", "peft_dynamic:full", "adapterkit:full", "adapterkit:prefix"],
        "runtime": {"model": "smollm2-135m", "repeat": 100, "load_repeat": 5, "mixed_repeat": 5, "targets": None},
        "smollm2": {"model": "smollm2-135m", "train_rows": 1000, "dev_rows": 872, "batch_size": 16, "max_length": 64,
                    "epochs": 1, "baseline_targets": ["q_proj", "v_proj"]},
        "quality": {"eval_rows": 400, "seeds": [0, 1, 2], "ks": [8, 16], "epochs": 5},
    },
}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def train_speed(cfg: dict[str, Any], sides: list[str]) -> dict[str, Any]:
    rows = []
    for side in sides:
        settings = {**cfg, "tmp": tempfile.mkdtemp(prefix="ak-bench-")}
        print(f"  train_speed {side} ...", flush=True)
        rows.append(run_side("benchmarks.train_speed", side, settings))
    by_side = {r["side"]: r for r in rows}
    ratios = {}
    for strategy in ("lora", "head", "full"):
        ours = by_side.get(f"adapterkit:{strategy}:query,value") or by_side.get(f"adapterkit:{strategy}")
        for kind in ("naive", "dynamic"):
            base = by_side.get(f"peft_{kind}:{strategy}")
            if ours and base:
                ratios[f"{strategy}_tokens_per_s_vs_{kind}"] = _ratio(ours["real_tokens_per_s"], base["real_tokens_per_s"])
                ratios[f"{strategy}_wall_speedup_vs_{kind}"] = _ratio(base["seconds"], ours["seconds"])
    return {"settings": cfg, "rows": rows, "ratios": ratios}


def smollm2_memory(cfg: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for side, bits in (("adapterkit:lora", None), ("adapterkit:lora", 8), ("adapterkit:lora", 4)):
        settings = {**cfg, "bits": bits, "tmp": tempfile.mkdtemp(prefix="ak-bench-")}
        print(f"  smollm2 lora bits={bits} ...", flush=True)
        row = run_side("benchmarks.train_speed", side, settings)
        row["bits"] = bits
        rows.append(row)
    fp32 = rows[0]
    return {"settings": cfg, "rows": rows, "ratios": {
        f"rss_{r['bits']}bit_vs_fp32": _ratio(r["peak_rss_mb"], fp32["peak_rss_mb"]) for r in rows[1:]} | {
        f"accuracy_{r['bits']}bit_minus_fp32": r["accuracy"] - fp32["accuracy"] for r in rows[1:]}}


def matmul_peak_gflops(size: int = 1024, repeat: int = 10) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * size**3 * repeat / (time.perf_counter() - started) / 1e9


def quality(cfg: dict[str, Any]) -> dict[str, Any]:
    rows = []
    sides = [f"prompt:0:0"] + [f"prompt:{k}:{s}" for k in (1, 2) for s in cfg["seeds"][:1]]
    sides += [f"{m}:{k}:{s}" for k in cfg["ks"] for s in cfg["seeds"] for m in ("fewshot", "setfit")]
    for side in sides:
        print(f"  quality {side} ...", flush=True)
        try:
            rows.append(run_side("benchmarks.quality", side, cfg))
        except Exception as err:  # one failed side must not hide the others
            rows.append({"side": side, "error": str(err)[-500:]})
    summary = []
    for method, k in sorted({(r.get("method"), r.get("k")) for r in rows if "accuracy" in r}, key=str):
        accs = [r["accuracy"] for r in rows if r.get("method") == method and r.get("k") == k and "accuracy" in r]
        summary.append({"method": method, "k_per_class": k, "seeds": len(accs), "accuracy_mean": statistics.mean(accs),
                        "accuracy_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0})
    return {"settings": cfg, "rows": rows, "summary": summary}


def report(results: dict[str, Any]) -> str:
    parts = [f"# Benchmark results ({results['suite']} suite)", "",
             f"commit `{results['env']['commit']}`, {results['env']['cpu']} x{results['env']['cpu_count']}, "
             f"torch {results['env']['versions']['torch']}, transformers {results['env']['versions']['transformers']}, "
             f"peft {results['env']['versions']['peft']}, {results['env']['time']}", ""]
    for section, error in results.get("errors", {}).items():
        parts += [f"**{section} failed**: `{error.strip().splitlines()[-1] if error.strip() else error}`", ""]
    ts = results.get("train_speed")
    if ts:
        parts += ["## Training: SST-2 on minilm-l6 "
                  f"({ts['settings']['train_rows']} rows, batch {ts['settings']['batch_size']}, max length "
                  f"{ts['settings']['max_length']}, {ts['settings']['epochs']} epoch)", "",
                  table(ts["rows"], ["side", "seconds", "real_tokens_per_s", "padding_fraction", "peak_rss_mb", "accuracy",
                                     "trainable_params", "gflops_fraction_of_peak"]), "",
                  "Ratios (adapterkit / baseline; LoRA compared at the same targets, query+value):", "",
                  table([{"ratio": k, "value": v} for k, v in ts["ratios"].items()], ["ratio", "value"]), ""]
    sm = results.get("smollm2")
    if sm:
        parts += ["## LoRA on smollm2-135m: fp32, 8-bit, 4-bit", "",
                  table(sm["rows"], ["side", "bits", "seconds", "real_tokens_per_s", "peak_rss_mb", "accuracy"]), "",
                  table([{"ratio": k, "value": v} for k, v in sm["ratios"].items()], ["ratio", "value"]), ""]
    rt = results.get("runtime")
    if rt:
        parts += ["## Runtime on smollm2-135m", "", table([
            {"measure": "switch, 2 loaded (ms)", "adapterkit": rt["switch_ms_2"], "peft": rt["peft_set_adapter_ms_2"]},
            {"measure": "switch, 16 loaded (ms)", "adapterkit": rt["switch_ms_16"], "peft": rt["peft_set_adapter_ms_16"]},
            {"measure": "LoRA load from disk (ms)", "adapterkit": rt["load_ms"], "peft": rt["peft_load_adapter_ms"]},
            {"measure": "LoRA load from loopback Hub, empty cache (ms)", "adapterkit": rt.get("hub_load_cold_ms")},
            {"measure": "LoRA load from loopback Hub, cached (ms)", "adapterkit": rt.get("hub_load_cached_ms")},
            {"measure": "8 rows x 8 adapters, mixed batch (ms)", "adapterkit": rt["mixed_batch_ms"], "peft": rt["peft_mixed_batch_ms"]},
            {"measure": "8 rows, one adapter at a time (ms)", "adapterkit": rt["one_at_a_time_ms"]},
        ], ["measure", "adapterkit", "peft"]), "", "Sizes on disk (bytes):", "",
            table([{"artifact": k, "bytes": v} for k, v in rt["size_bytes"].items()], ["artifact", "bytes"]), ""]
    q = results.get("quality")
    if q:
        parts += ["## Few-shot SST-2 (dev accuracy)", "", table(q["summary"], ["method", "k_per_class", "seeds",
                                                                                "accuracy_mean", "accuracy_std"]), ""]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--only", nargs="*", default=None, help="train_speed smollm2 runtime quality")
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    out = Path(args.out)
    results: dict[str, Any] = {"suite": args.suite, "env": environment()}
    want = set(args.only or ["train_speed", "smollm2", "runtime", "quality"])
    peak = matmul_peak_gflops()
    results["matmul_peak_gflops"] = peak
    name = f"{args.suite}" + (f"-{'-'.join(sorted(want))}" if args.only else "")
    sections = {
        "train_speed": lambda: train_speed(suite["train"], suite["train_sides"]),
        "smollm2": lambda: smollm2_memory(suite["smollm2"]),
        "runtime": lambda: run_side("benchmarks.runtime", "runtime", suite["runtime"]),
        "quality": lambda: quality(suite["quality"]),
    }
    for section, measure in sections.items():
        if section not in want or (section != "train_speed" and not suite.get(section)):
            continue
        print(section, flush=True)
        try:
            results[section] = measure()
        except Exception as err:  # keep what was measured; say what failed
            results.setdefault("errors", {})[section] = str(err)[-2000:]
            print(f"  {section} failed: {str(err)[-500:]}", flush=True)
        write_result(out, name, results)  # partial results survive a later failure
    linear_params = 6 * (4 * 384 * 384 + 2 * 384 * 1536)  # MiniLM-L6's encoder linears
    for row in (results.get("train_speed") or {}).get("rows", []):
        row["gflops_fraction_of_peak"] = 4 * linear_params * row["processed_tokens"] / row["seconds"] / 1e9 / peak
    write_result(out, name, results)
    text = report(results)
    (out / f"{name}.md").write_text(text)
    try:
        from benchmarks.plots import plot

        plot(results, out / f"{name}.png")
    except ImportError:
        pass
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
