"""The benchmark scripts run and write well-formed results (the numbers are not checked here).

Numbers come from ``python -m benchmarks.run --suite full``, never from timed tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_recipes import skip_without_minilm_and_sst2

ROOT = Path(__file__).resolve().parents[1]

ROW_NUMBERS = ("seconds", "real_tokens", "processed_tokens", "real_tokens_per_s", "peak_rss_mb", "peak_rss_after_load_mb",
               "accuracy", "trainable_params", "padding_fraction", "process_seconds")


@pytest.mark.slow
def test_smoke_suite_writes_json_markdown_and_plot(tmp_path):
    skip_without_minilm_and_sst2()
    # The smoke suite takes about a minute on 2 shared cores; the timeout only stops a hang.
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())

    env = result["env"]
    assert env["commit"] is not None and env["cpu_count"] >= 1 and env["cpu"] is not None
    for package in ("torch", "transformers", "peft", "adapterkit"):
        assert env["versions"][package], package
    assert result["matmul_peak_gflops"] > 0

    section = result["train_speed"]
    assert section["settings"]["batch_size"] == 16 and section["settings"]["max_length"] == 64
    rows = section["rows"]
    assert {r["side"] for r in rows} == {"peft_savvy:lora", "adapterkit:lora:query,value",
                                         "adapterkit:lora:query,value:stock_dropout"}
    for row in rows:
        for key in ROW_NUMBERS:
            assert isinstance(row[key], (int, float)) and not isinstance(row[key], bool), key
        assert 0 <= row["padding_fraction"] < 1 and 0 <= row["accuracy"] <= 1
        assert 0 < row["real_tokens"] <= row["processed_tokens"]
        assert row["peak_rss_mb"] >= row["peak_rss_after_load_mb"] > 0
        assert row["gflops_fraction_of_peak"] > 0  # LoRA rows get an achieved-FLOP/s estimate
    assert "lora_tokens_per_s_vs_savvy" in section["ratios"] and "lora_bulk_dropout_speedup" in section["ratios"]
    assert section["ratios_per_round"]["lora_tokens_per_s_vs_savvy"]

    measures = {t["measure"]: t for t in result["targets"] if t["section"] != "train_speed_smollm2"}
    assert measures["lora_tokens_per_s_vs_savvy"]["met"] in ("yes", "NO")
    assert measures["switch_ms_2"]["met"] == "not measured"  # the smoke suite skips the runtime section

    assert (tmp_path / "smoke.md").read_text().startswith("# Benchmark results")
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    assert not (tmp_path / "smoke.partial.json").exists()


def test_merge_combines_sections_without_measuring(tmp_path):
    """``--merge`` rebuilds the report of a run split across invocations (a timing part and a quality part)."""
    env = {"commit": "abc", "cpu": "cpu", "cpu_count": 2, "load_average": [0.0, 0.0, 0.0], "time": "t",
           "versions": {"torch": "2", "transformers": "5", "peft": "0.21", "bitsandbytes": None, "setfit": None}}
    runtime = {"switch_ms_2": 0.5, "peft_set_adapter_ms_2": 3.0, "switch_ms_16": 0.6, "peft_set_adapter_ms_16": 15.0,
               "load_ms": 50.0, "peft_load_adapter_ms": 80.0, "mixed_batch_ms": 100.0, "one_at_a_time_ms": 400.0,
               "peft_mixed_batch_ms": 110.0, "peft_one_at_a_time_ms": 420.0, "mixed_speedup": 4.0,
               "size_bytes": {"lora": 10, "base_model": 100}}
    quality = {"settings": {"eval_rows": 10}, "rows": [{"side": "setfit:8:0", "method": "setfit", "k": 8, "accuracy": 0.7}],
               "summary": [{"method": "setfit", "k_per_class": 8, "seeds": 1, "accuracy_mean": 0.7, "accuracy_std": 0.0}]}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"suite": "full", "env": env, "matmul_peak_gflops": 90.0, "runtime": runtime}))
    b.write_text(json.dumps({"suite": "full", "env": env, "matmul_peak_gflops": 80.0, "quality": quality}))
    from benchmarks.run import main

    assert main(["--merge", str(a), str(b), "--out", str(tmp_path / "out"), "--name", "merged"]) == 0
    merged = json.loads((tmp_path / "out" / "merged.json").read_text())
    assert merged["runtime"] == runtime and merged["quality"] == quality
    measures = {t["measure"]: t["met"] for t in merged["targets"]}
    assert measures["switch_ms_16"] == "yes" and measures["mixed_speedup"] == "yes"
    text = (tmp_path / "out" / "merged.md").read_text()
    assert "## Runtime on smollm2-135m" in text and "## Few-shot SST-2" in text


def test_gpu_benchmark_quick_runs_its_code_path_on_the_cpu(tmp_path):
    # benchmarks/gpu_check.sh runs this module on a lent GPU; here the same code runs on tiny shapes.
    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    result = gpu.main(["--quick", "--device", "cpu", "--sides", "ak-qlora-nf4", "peft-trainer-bf16", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    sides = {row["side"]: row for row in result["training"]}
    assert set(sides) == {"ak-qlora-nf4", "peft-trainer-bf16"}
    for row in sides.values():
        assert row["tokens"] == 2 * 2 * 16 and row["tokens_per_s"] > 0 and row["train_loss"] > 0
    assert result["pool"]["load_ms"] > 0
    assert [r["distinct_adapters"] for r in result["pool"]["mixed"]] == [1, 4]
