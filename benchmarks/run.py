"""Run a benchmark suite and write JSON, a markdown report and plots under benchmarks/results/.

    python -m benchmarks.run --suite smoke    # CI: the scripts run and results are well formed (~1 min)
    python -m benchmarks.run --suite quick    # under 10 minutes
    python -m benchmarks.run --suite full     # the numbers in benchmarks/README.md
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, environment, run_side, table, write_result

# Sides that are compared with each other form a group; a group runs ``rounds`` times, every
# other round in reverse order, so slow drift of this shared machine hits each side alike.
# peft_savvy (dynamic padding + length grouping) is the reference; peft_naive and peft_dynamic are
# the naive baselines, kept for comparison with earlier results.
LORA = ["peft_naive:lora", "peft_dynamic:lora", "peft_savvy:lora", "adapterkit:lora:query,value", "adapterkit:lora"]
HEAD = ["peft_naive:head", "peft_dynamic:head", "peft_savvy:head", "adapterkit:head"]
FULL = ["peft_naive:full", "peft_dynamic:full", "peft_savvy:full", "adapterkit:full"]
#: adapterkit beside the savvy peer alone: issue 12's comparison, 3 rounds in alternating order,
#: with adapterkit on torch's own dropout masks beside it (the bulk-mask speed-up's ablation).
SAVVY_LORA = ["peft_savvy:lora", "adapterkit:lora:query,value", "adapterkit:lora:query,value:stock_dropout"]

SUITES: dict[str, dict[str, Any]] = {
    "smoke": {
        "train": {"model": "minilm-l6", "train_rows": 32, "dev_rows": 32, "batch_size": 16, "max_length": 64, "epochs": 1},
        "train_groups": [(SAVVY_LORA, 1)],
        "runtime": None, "smollm2": None, "quality": None, "strategies": None,
    },
    "quick": {
        "train": {"model": "minilm-l6", "train_rows": 500, "dev_rows": 872, "batch_size": 16, "max_length": 64, "epochs": 1},
        "train_groups": [(LORA, 1), (HEAD, 1)],
        "runtime": {"model": "smollm2-135m", "repeat": 30, "load_repeat": 3, "mixed_repeat": 3, "targets": None},
        "smollm2": None, "quality": None, "strategies": None,
    },
    # issue 12: adapterkit LoRA against the savvy peer, minilm-l6 then smollm2-135m (q_proj, v_proj).
    "speed": {
        "train": {"model": "minilm-l6", "train_rows": 2000, "dev_rows": 872, "batch_size": 16, "max_length": 64, "epochs": 1,
                  "seed_per_round": True},
        "train_groups": [(SAVVY_LORA, 3)],
        # smollm2-135m has no dropout: there only the rest of adapterkit's training path is compared
        "train_smollm2": {"model": "smollm2-135m", "train_rows": 400, "dev_rows": 200, "batch_size": 16, "max_length": 64,
                          "epochs": 1, "seed_per_round": True, "baseline_targets": ["q_proj", "v_proj"]},
        "train_smollm2_groups": [(["peft_savvy:lora", "adapterkit:lora:q_proj,v_proj"], 3)],
        "runtime": None, "smollm2": None, "quality": None, "strategies": None,
    },
    "full": {
        "train": {"model": "minilm-l6", "train_rows": 2000, "dev_rows": 872, "batch_size": 16, "max_length": 64, "epochs": 1},
        # full fine-tuning last: its baseline numbers are known from the issue, the others matter more
        "train_groups": [(LORA, 1), (HEAD, 1)], "train_groups_late": [(FULL, 1), (list(reversed(LORA)), 1)],
        "runtime": {"model": "smollm2-135m", "repeat": 100, "load_repeat": 5, "mixed_repeat": 5, "targets": None},
        "smollm2": {"model": "smollm2-135m", "train_rows": 1000, "dev_rows": 400, "batch_size": 16, "max_length": 64,
                    "epochs": 1, "baseline_targets": ["q_proj", "v_proj"]},
        "quality": {"eval_rows": 300, "seeds": [0, 1, 2], "ks": [8, 16], "epochs": 5},
        # Head-only probes usually train several epochs; there the baselines rerun the frozen backbone every epoch.
        "head_epochs": {"epochs": 5},
        # SST-2 dev accuracy per strategy on the full training set (6,920 rows), 1 epoch
        "strategies": {"model": "minilm-l6", "train_rows": None, "dev_rows": 872, "batch_size": 16, "max_length": 64,
                       "epochs": 1, "sides": ["adapterkit:lora", "adapterkit:prefix", "adapterkit:head", "adapterkit:full"]},
    },
}

#: Linear-layer weights the backbone multiplies every token by (for achieved FLOP/s).
LINEAR_PARAMS = {
    "minilm-l6": 6 * (4 * 384 * 384 + 2 * 384 * 1536),
    "smollm2-135m": 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536),
}
#: FLOPs per linear weight per token of one training step: forward 2, input gradients 2, and
#: weight gradients 2 more when the weights themselves train (full fine-tuning).
STEP_FLOP_FACTOR = {"lora": 4, "prefix": 4, "full": 6}

#: The issue's targets: (ratio key, comparison, threshold).
TARGETS = [
    ("train_speed", "lora_tokens_per_s_vs_savvy", ">=", 1.3),
    ("train_speed", "lora_accuracy_minus_savvy", ">=", -0.005),
    ("train_speed_smollm2", "lora_tokens_per_s_vs_savvy", ">=", 1.3),
    ("train_speed_smollm2", "lora_accuracy_minus_savvy", ">=", -0.005),
    # The naive baselines (padding="max_length"; dynamic padding without length grouping).
    ("train_speed", "lora_tokens_per_s_vs_naive", ">=", 2.0),
    ("train_speed", "lora_tokens_per_s_vs_dynamic", ">=", 1.4),
    ("train_speed", "head_wall_speedup_vs_naive", ">=", 10.0),
    ("train_speed", "head_wall_speedup_vs_dynamic", ">=", 10.0),
    ("smollm2", "rss_4bit_vs_fp32", "<=", 0.5),
    ("smollm2", "accuracy_4bit_minus_fp32", ">=", -0.01),
    ("runtime", "switch_ms_2", "<=", 1.0),
    ("runtime", "switch_ms_16", "<=", 1.0),
    ("runtime", "load_ms", "<=", 100.0),
    ("runtime", "mixed_speedup", ">=", 3.0),
]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _merge_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per side: medians of the numeric measurements over its rounds."""
    merged = dict(rows[-1])
    for key in ("seconds", "loop_seconds", "real_tokens_per_s", "loop_real_tokens_per_s", "peak_rss_mb", "process_seconds"):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            merged[key] = statistics.median(values)
    merged["rounds"] = len(rows)
    merged["seconds_per_round"] = [r["seconds"] for r in rows]
    return merged


def train_speed(cfg: dict[str, Any], groups: list[tuple[list[str], int]], checkpoint=None,
                previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the groups; ``checkpoint(partial_section)`` is called after each round so partial results survive.

    ``previous`` is a section to extend (its runs and per-round ratios are kept).
    """
    runs: list[dict[str, Any]] = list((previous or {}).get("runs", []))
    per_round_ratios: dict[str, list[float]] = {k: list(v) for k, v in (previous or {}).get("ratios_per_round", {}).items()}
    for sides, rounds in groups:
        for rnd in range(rounds):
            order = sides if rnd % 2 == 0 else list(reversed(sides))
            this_round = {}
            for side in order:
                settings = {**cfg, "tmp": tempfile.mkdtemp(prefix="ak-bench-")}
                if cfg.get("seed_per_round"):
                    # Both sides of a round share its seed; accuracy is then a mean over seeds.
                    settings["seed"] = rnd
                print(f"  train_speed {side} (round {rnd + 1}/{rounds}) ...", flush=True)
                row = run_side("benchmarks.train_speed", side, settings)
                row["round"] = rnd
                runs.append(row)
                this_round[side] = row
            for key, value in _ratios(this_round).items():
                per_round_ratios.setdefault(key, []).append(value)
            if checkpoint is not None:  # after every round: a slow shared machine may not finish them all
                checkpoint(_train_section(cfg, runs, per_round_ratios))
    return _train_section(cfg, runs, per_round_ratios)


def _train_section(cfg: dict[str, Any], runs: list[dict[str, Any]], per_round_ratios: dict[str, list[float]]) -> dict[str, Any]:
    by_side: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_side.setdefault(r["side"], []).append(r)
    rows = [_merge_rounds(v) for v in by_side.values()]
    return {"settings": cfg, "rows": rows, "runs": runs,
            # Accuracy differences are averaged over the rounds' seeds; speed ratios take the median.
            "ratios": {k: (statistics.mean(v) if "accuracy" in k else statistics.median(v)) for k, v in per_round_ratios.items()},
            "ratios_per_round": per_round_ratios}


def _ratios(by_side: dict[str, dict[str, Any]]) -> dict[str, float]:
    """adapterkit over the baselines, from sides measured next to each other."""
    ratios = {}
    for strategy in ("lora", "head", "full"):
        # adapterkit at the baseline's targets (query,value on minilm-l6; q_proj,v_proj on smollm2-135m)
        at_targets = next((row for side, row in by_side.items()
                           if side.startswith(f"adapterkit:{strategy}:") and not side.endswith(":stock_dropout")), None)
        for label, ours in (("", at_targets or by_side.get(f"adapterkit:{strategy}")),
                            ("_all_linear", by_side.get(f"adapterkit:{strategy}") if strategy == "lora" else None)):
            for kind in ("savvy", "naive", "dynamic"):
                base = by_side.get(f"peft_{kind}:{strategy}")
                if ours and base:
                    ratios[f"{strategy}{label}_tokens_per_s_vs_{kind}"] = _ratio(ours["real_tokens_per_s"], base["real_tokens_per_s"])
                    ratios[f"{strategy}{label}_wall_speedup_vs_{kind}"] = _ratio(base["seconds"], ours["seconds"])
                    if kind == "savvy" and ours.get("loop_seconds") and base.get("loop_seconds"):
                        ratios[f"{strategy}{label}_loop_speedup_vs_savvy"] = _ratio(base["loop_seconds"], ours["loop_seconds"])
                    if kind == "savvy" and "accuracy" in ours and "accuracy" in base:
                        ratios[f"{strategy}{label}_accuracy_minus_savvy"] = ours["accuracy"] - base["accuracy"]
        stock = by_side.get(f"{at_targets['side']}:stock_dropout") if at_targets else None
        if stock:
            ratios[f"{strategy}_bulk_dropout_speedup"] = _ratio(at_targets["real_tokens_per_s"], stock["real_tokens_per_s"])
            ratios[f"{strategy}_bulk_dropout_loop_speedup"] = _ratio(stock["loop_seconds"], at_targets["loop_seconds"])
            ratios[f"{strategy}_bulk_dropout_accuracy_change"] = at_targets["accuracy"] - stock["accuracy"]
    return {k: v for k, v in ratios.items() if v is not None}


def add_flops(rows: list[dict[str, Any]], peak_gflops: float) -> None:
    """Achieved GFLOP/s (step FLOPs ~ factor x linear weights x processed tokens) and its fraction of the peak."""
    for row in rows:
        factor = STEP_FLOP_FACTOR.get(row.get("strategy"))
        linear = LINEAR_PARAMS.get(row.get("model"))
        if factor and linear and row.get("seconds"):
            gflops = factor * linear * row["processed_tokens"] / row["seconds"] / 1e9
            row["achieved_gflops"] = gflops
            row["gflops_fraction_of_peak"] = gflops / peak_gflops


def smollm2_memory(cfg: dict[str, Any], checkpoint=None) -> dict[str, Any]:
    """adapterkit LoRA at fp32, 4-bit, 8-bit, then plain peft (q, v) + Trainer at fp32 for reference."""
    rows: list[dict[str, Any]] = []
    sides = [("adapterkit:lora", None), ("adapterkit:lora", 4), ("adapterkit:lora", 8), ("peft_dynamic:lora", None)]
    for side, bits in sides:
        if checkpoint is not None and rows:
            checkpoint(_smollm2_section(cfg, rows))
        settings = {**cfg, "bits": bits, "tmp": tempfile.mkdtemp(prefix="ak-bench-")}
        print(f"  smollm2 {side} bits={bits} ...", flush=True)
        try:
            row = run_side("benchmarks.train_speed", side, settings)
        except Exception as err:  # one failed side must not hide the others
            print(f"    failed: {str(err)[-800:]}", flush=True)
            row = {"side": side, "error": str(err)[-800:]}
        row["bits"] = bits
        rows.append(row)
    return _smollm2_section(cfg, rows)


def _smollm2_section(cfg: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if "error" not in r]
    fp32 = next((r for r in ok if r["side"] == "adapterkit:lora" and r["bits"] is None), None)
    peft_row = next((r for r in ok if r["side"].startswith("peft")), None)
    ratios: dict[str, float] = {}
    for r in ok:
        if fp32 is None or r["side"] != "adapterkit:lora" or r["bits"] is None:
            continue
        ratios[f"rss_{r['bits']}bit_vs_fp32"] = _ratio(r["peak_rss_mb"], fp32["peak_rss_mb"])
        ratios[f"accuracy_{r['bits']}bit_minus_fp32"] = r["accuracy"] - fp32["accuracy"]
        ratios[f"tokens_per_s_{r['bits']}bit_vs_fp32"] = _ratio(r["real_tokens_per_s"], fp32["real_tokens_per_s"])
    if fp32 and peft_row:
        ratios["adapterkit_all_linear_tokens_per_s_vs_peft_dynamic_qv"] = _ratio(fp32["real_tokens_per_s"],
                                                                                 peft_row["real_tokens_per_s"])
    return {"settings": cfg, "rows": rows, "ratios": ratios}


def matmul_peak_gflops(size: int = 1024, repeat: int = 10, trials: int = 5) -> float:
    """Best of ``trials`` fp32 matmul throughputs: the machine's practical peak."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeat):
            a @ b
        best = max(best, 2 * size**3 * repeat / (time.perf_counter() - started) / 1e9)
    return best


def quality(cfg: dict[str, Any], checkpoint=None) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    sides = [f"{m}:{k}:{s}" for k in cfg["ks"] for s in cfg["seeds"] for m in ("fewshot", "setfit")]
    sides += ["prompt:0:0"] + [f"prompt:{k}:{s}" for k in (1, 2) for s in cfg["seeds"][:1]]
    for side in sides:
        if checkpoint is not None and rows:
            checkpoint(_quality_section(cfg, rows))
        print(f"  quality {side} ...", flush=True)
        try:
            rows.append(run_side("benchmarks.quality", side, cfg))
        except Exception as err:  # one failed side must not hide the others
            print(f"    failed: {str(err)[-800:]}", flush=True)
            rows.append({"side": side, "error": str(err)[-800:]})
    return _quality_section(cfg, rows)


def _quality_section(cfg: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary = []
    for method, k in sorted({(r.get("method"), r.get("k")) for r in rows if "accuracy" in r}, key=str):
        accs = [r["accuracy"] for r in rows if r.get("method") == method and r.get("k") == k and "accuracy" in r]
        summary.append({"method": method, "k_per_class": k, "seeds": len(accs), "accuracy_mean": statistics.mean(accs),
                        "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0})
    return {"settings": cfg, "rows": rows, "summary": summary}


def strategies(cfg: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for side in cfg["sides"]:
        print(f"  strategies {side} (full training set) ...", flush=True)
        try:
            rows.append(run_side("benchmarks.train_speed", side, {**cfg, "tmp": tempfile.mkdtemp(prefix="ak-bench-")}))
        except Exception as err:
            print(f"    failed: {str(err)[-800:]}", flush=True)
            rows.append({"side": side, "error": str(err)[-800:]})
    return {"settings": cfg, "rows": rows}


def padding_profile(cfg: dict[str, Any]) -> dict[str, Any]:
    """Tokens a batch order makes the backbone process, without training: the ceiling padding sets.

    If a step's cost is proportional to the tokens it processes, length-grouped batches can be at
    most ``processed(baseline) / processed(grouped)`` times faster in real tokens/s.
    """
    import torch
    import transformers
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from adapterkit import data as akdata
    from adapterkit.models import resolve_model

    train, _ = akdata.local_dataset("sst2", "train")
    train = akdata.subset(train, cfg["train_rows"], seed=0)
    tok = transformers.AutoTokenizer.from_pretrained(resolve_model(cfg["model"]).path)
    lengths = [len(x) for x in tok(train["text"][:], truncation=True, max_length=cfg["max_length"])["input_ids"]]
    n, bs, real = len(lengths), cfg["batch_size"], sum(lengths)

    def processed(order: list[int]) -> int:
        return sum(max(lengths[i] for i in order[s : s + bs]) * len(order[s : s + bs]) for s in range(0, n, bs))

    g = torch.Generator().manual_seed(0)
    rows = [{"batching": "padding=max_length", "processed_tokens": n * cfg["max_length"]},
            {"batching": "dynamic, random batches", "processed_tokens": processed(torch.randperm(n, generator=g).tolist())},
            {"batching": "dynamic, length-grouped", "processed_tokens": processed(get_length_grouped_indices(lengths, bs, generator=g))}]
    for row in rows:
        row["real_tokens"] = real
        row["padding_fraction"] = 1 - real / row["processed_tokens"]
    grouped = rows[2]["processed_tokens"]
    return {"settings": cfg, "rows": rows, "ceiling_vs_naive": rows[0]["processed_tokens"] / grouped,
            "ceiling_vs_dynamic": rows[1]["processed_tokens"] / grouped}


def runtime(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Adapter switching, loading and mixed batches (benchmarks/runtime.py); None when it fails."""
    try:
        return run_side("benchmarks.runtime", "runtime", cfg)
    except Exception as err:  # the other sections still run and report
        print(f"    failed: {str(err)[-800:]}", flush=True)
        return None


Checkpoint = Callable[[dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class Section:
    """One section of the results: ``results[key]``, run when ``--only`` names ``key`` and the suite has ``needs``."""

    key: str
    needs: str
    run: Callable[[dict[str, Any], Checkpoint, dict[str, Any]], dict[str, Any] | None]
    flops: bool = False  # rows get achieved GFLOP/s against the matmul peak
    title: str | None = None


#: In running order: the late training groups extend the ``train_speed`` section the first one wrote.
SECTIONS = [
    Section("padding", "train", lambda suite, checkpoint, results: padding_profile(suite["train"])),
    Section("train_speed", "train", flops=True, run=lambda suite, checkpoint, results: train_speed(
        suite["train"], suite["train_groups"], checkpoint=checkpoint)),
    Section("train_speed_smollm2", "train_smollm2", flops=True, run=lambda suite, checkpoint, results: train_speed(
        suite["train_smollm2"], suite["train_smollm2_groups"], checkpoint=checkpoint)),
    Section("runtime", "runtime", lambda suite, checkpoint, results: runtime(suite["runtime"])),
    Section("smollm2", "smollm2", flops=True, run=lambda suite, checkpoint, results: smollm2_memory(
        suite["smollm2"], checkpoint=checkpoint)),
    Section("train_speed", "train_groups_late", flops=True, title="train_speed (late groups)",
            run=lambda suite, checkpoint, results: train_speed(suite["train"], suite["train_groups_late"],
                                                               checkpoint=checkpoint, previous=results["train_speed"])),
    Section("head_epochs", "head_epochs", lambda suite, checkpoint, results: train_speed(
        {**suite["train"], **suite["head_epochs"]}, [(HEAD, 1)], checkpoint=checkpoint)),
    Section("quality", "quality", lambda suite, checkpoint, results: quality(suite["quality"], checkpoint=checkpoint)),
    Section("strategies", "strategies", lambda suite, checkpoint, results: strategies(suite["strategies"])),
]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for section, key, op, threshold in TARGETS:
        sec = results.get(section) or {}
        value = sec.get(key) if section == "runtime" else (sec.get("ratios") or {}).get(key)
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out.append({"section": section, "measure": key, "value": value, "target": f"{op} {threshold:g}",
                    "met": {None: "not measured", True: "yes", False: "NO"}[met]})
    return out


def _training_settings(cfg: dict[str, Any]) -> str:
    return f"{cfg['train_rows']} rows, batch {cfg['batch_size']}, max length {cfg['max_length']}, {cfg['epochs']} epoch"


def _train_speed_report(ts: dict[str, Any], model: str) -> list[str]:
    """The markdown of a training-speed section."""
    return [f"## Training: SST-2 on {model} ({_training_settings(ts['settings'])})", "",
           table(ts["rows"], ["side", "rounds", "seconds", "loop_seconds", "real_tokens_per_s", "padding_fraction",
                              "peak_rss_mb", "accuracy", "trainable_params", "achieved_gflops",
                              "gflops_fraction_of_peak"]), "",
           "`peft_savvy` (dynamic padding + `train_sampling_strategy=\"group_by_length\"`) is the reference; "
           "`peft_naive` (`padding=\"max_length\"`) and `peft_dynamic` (dynamic padding, random batches) are the "
           "naive baselines. `seconds` and `real_tokens_per_s` are medians over the rounds. adapterkit's seconds "
           "include its tokenization and Trainer set-up (and, for head, the one backbone pass that fills the "
           "feature cache); the baselines' exclude them. `loop_seconds` is Trainer's own `train_runtime` on every side.", "",
           "Ratios (adapterkit / baseline, median over rounds; accuracy differences: mean over the rounds' seeds; "
           "`lora` = adapterkit at the baseline's targets (query+value, q_proj+v_proj), `lora_all_linear` = adapterkit's default targets):", "",
           table([{"ratio": k, "value": v, "per round": ", ".join(f"{x:.2f}" for x in ts.get("ratios_per_round", {}).get(k, []))}
                  for k, v in ts["ratios"].items()], ["ratio", "value", "per round"]), ""]


def report(results: dict[str, Any]) -> str:
    env = results["env"]
    parts = [f"# Benchmark results ({results['suite']} suite)", "",
             f"commit `{env['commit']}`" + (" (adapterkit/ had uncommitted changes)" if env.get("adapterkit_changed_since_commit") else "")
             + f", {env['cpu']} x{env['cpu_count']}, load average at start {env.get('load_average')}, "
             f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
             f"peft {env['versions']['peft']}, bitsandbytes {env['versions']['bitsandbytes']}, setfit {env['versions']['setfit']}, "
             f"{env['time']}. Matmul peak (fp32, best of 5): {results.get('matmul_peak_gflops', 0):.1f} GFLOP/s.", "",
             *([f"Merged from {1 + len(results['merged_env'])} runs; the others: " + "; ".join(
                 f"commit `{e['commit'][:10]}` at {e['time']} (load average {e.get('load_average')})"
                 for e in results["merged_env"]) + ".", ""] if results.get("merged_env") else []),
             "Every side runs in a fresh process (peak RSS is its own); compared sides run next to each other in one "
             "invocation and the ratios come from those neighbours. The machine is shared: read ratios, not absolutes.", ""]
    tg = [t for t in targets(results) if t["met"] != "not measured" or results.get(t["section"])]
    if tg:
        parts += ["## Targets", "", table(tg, ["section", "measure", "value", "target", "met"]), ""]
    pad = results.get("padding")
    if pad:
        parts += ["## Padding profile (no training): tokens the backbone processes per batching", "",
                  table(pad["rows"], ["batching", "processed_tokens", "real_tokens", "padding_fraction"]), "",
                  f"If a step costs in proportion to the tokens it processes, length-grouped batches can reach at most "
                  f"{pad['ceiling_vs_naive']:.2f}x the real tokens/s of `padding=max_length` and "
                  f"{pad['ceiling_vs_dynamic']:.2f}x that of random dynamic batches.", ""]
    for key, model in (("train_speed", "minilm-l6"), ("train_speed_smollm2", "smollm2-135m")):
        ts = results.get(key)
        if ts:
            parts += _train_speed_report(ts, model)
    sm = results.get("smollm2")
    if sm:
        parts += [f"## LoRA on smollm2-135m: fp32, 8-bit, 4-bit (SST-2 {_training_settings(sm['settings'])})", "",
                  table(sm["rows"], ["side", "bits", "seconds", "real_tokens_per_s", "padding_fraction", "peak_rss_after_load_mb",
                                     "peak_rss_mb", "accuracy", "trainable_params", "achieved_gflops", "error"]), "",
                  "`peft_dynamic:lora` is plain peft (q_proj, v_proj) + Trainer with dynamic padding; `adapterkit:lora` "
                  "uses adapterkit's default targets (all linear layers).", "",
                  table([{"ratio": k, "value": v} for k, v in sm["ratios"].items()], ["ratio", "value"]), ""]
    rt = results.get("runtime")
    if rt:
        parts += ["## Runtime on smollm2-135m", "", table([
            {"measure": "switch, 2 loaded (ms, median)", "adapterkit": rt["switch_ms_2"], "peft": rt["peft_set_adapter_ms_2"]},
            {"measure": "switch, 16 loaded (ms, median)", "adapterkit": rt["switch_ms_16"], "peft": rt["peft_set_adapter_ms_16"]},
            {"measure": "LoRA load from disk (ms, median)", "adapterkit": rt["load_ms"], "peft": rt["peft_load_adapter_ms"]},
            {"measure": "LoRA load from loopback Hub, empty cache (ms)", "adapterkit": rt.get("hub_load_cold_ms")},
            {"measure": "LoRA load from loopback Hub, cached (ms)", "adapterkit": rt.get("hub_load_cached_ms")},
            {"measure": f"8 rows x 8 adapters, mixed batch (ms, {rt.get('tokens_per_row')} tokens/row)",
             "adapterkit": rt["mixed_batch_ms"], "peft": rt["peft_mixed_batch_ms"]},
            {"measure": "8 rows, one adapter at a time (ms)", "adapterkit": rt["one_at_a_time_ms"],
             "peft": rt.get("peft_one_at_a_time_ms")},
            {"measure": "mixed-batch speedup over one at a time", "adapterkit": rt["mixed_speedup"],
             "peft": _ratio(rt.get("peft_one_at_a_time_ms"), rt.get("peft_mixed_batch_ms"))},
        ], ["measure", "adapterkit", "peft"]), "", "Sizes on disk (bytes; `full` stores every weight, like the base):", "",
            table([{"artifact": k, "bytes": v, "fraction of base": v / rt["size_bytes"]["base_model"]}
                   for k, v in rt["size_bytes"].items()], ["artifact", "bytes", "fraction of base"]), ""]
        if rt.get("hub_error"):
            parts += [f"Hub load not measured: {rt['hub_error']}", ""]
    he = results.get("head_epochs")
    if he:
        parts += [f"## Head-only training at {he['settings']['epochs']} epochs (same data and settings otherwise)", "",
                  table(he["rows"], ["side", "seconds", "real_tokens_per_s", "padding_fraction", "peak_rss_mb", "accuracy"]), "",
                  "The baselines run the frozen backbone on every epoch; adapterkit runs it once and trains the head on "
                  "the cached states.", "",
                  table([{"ratio": k, "value": v} for k, v in he["ratios"].items()], ["ratio", "value"]), ""]
    st = results.get("strategies")
    if st:
        parts += [f"## SST-2 dev accuracy per strategy, full training set ({st['settings']['epochs']} epoch, minilm-l6)", "",
                  table(st["rows"], ["side", "accuracy", "seconds", "trainable_params", "peak_rss_mb", "error"]), ""]
    q = results.get("quality")
    if q:
        parts += [f"## Few-shot SST-2 (accuracy on {q['settings'].get('eval_rows') or 872} dev rows)", "",
                  "`fewshot`: adapterkit LoRA on smollm2-135m with a task prompt, label-word scoring; `setfit`: SetFit on "
                  "the minilm-l6 body, same examples; `prompt`: smollm2-135m with k in-context examples, no training. "
                  "std is the sample standard deviation over seeds.", "",
                  table(q["summary"], ["method", "k_per_class", "seeds", "accuracy_mean", "accuracy_std"]), ""]
        failed = [r for r in q["rows"] if "error" in r]
        if failed:
            parts += ["Failed sides: " + ", ".join(r["side"] for r in failed), ""]
    return "\n".join(parts) + "\n"


def _finish(out: Path, name: str, results: dict[str, Any]) -> None:
    results["targets"] = targets(results)
    write_result(out, name, results)
    text = report(results)
    (out / f"{name}.md").write_text(text)
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no PNG written (pip install 'adapterkit[benchmarks]')")
    else:
        from benchmarks.plots import plot

        plot(results, out / f"{name}.png")
    print(text)


def _run_section(section: Section, suite: dict[str, Any], results: dict[str, Any], peak: float,
                 write_partial: Callable[[dict[str, Any]], None]) -> None:
    """Run one section into ``results``; what it has measured so far is written after each of its steps."""
    print(section.title or section.key, flush=True)

    def finished(part: dict[str, Any]) -> dict[str, Any]:
        if section.flops:
            add_flops(part["rows"], peak)
        return part

    done = section.run(suite, lambda part: write_partial({**results, section.key: finished(part)}), results)
    if done is not None:
        results[section.key] = finished(done)
    write_partial(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--only", nargs="*", default=None, help=" ".join(dict.fromkeys(s.key for s in SECTIONS)))
    parser.add_argument("--name", default=None, help="file name of the results (default: the suite, plus --only)")
    parser.add_argument("--merge", nargs="*", default=None,
                        help="combine the sections of these result JSON files into one result (no measuring)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        results = {**parts[0]}
        for part in parts[1:]:
            results.update({k: v for k, v in part.items() if k not in ("suite", "env", "matmul_peak_gflops", "targets")})
            results.setdefault("merged_env", []).append(part["env"])
        _finish(out, args.name or results["suite"], results)
        return 0
    suite = SUITES[args.suite]
    results: dict[str, Any] = {"suite": args.suite, "env": environment()}
    want = set(args.only or [section.key for section in SECTIONS])
    peak = matmul_peak_gflops()
    results["matmul_peak_gflops"] = peak
    name = args.name or (f"{args.suite}" + (f"-{'-'.join(sorted(want))}" if args.only else ""))

    for section in SECTIONS:
        if section.key in want and suite.get(section.needs):
            _run_section(section, suite, results, peak, lambda partial: write_result(out, name + ".partial", partial))
    _finish(out, name, results)
    partial = out / f"{name}.partial.json"
    if partial.exists():
        partial.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
