"""benchmarks/fewshot.py end to end on a tiny model: every method, the JSON, the PNG, the search split."""

from __future__ import annotations

import json

import pytest

import adapterkit.data as akdata
from benchmarks import fewshot
from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


def test_benchmark_runs_every_method_on_the_same_rows(tiny_llama, tmp_path):
    out = tmp_path / "fewshot.json"
    log = tmp_path / "search.jsonl"
    result = fewshot.main([
        "--tasks", "sst2", "--seeds", "0", "1", "--rows", "6", "--k", "2", "--out", str(out), "--log", str(log),
        "--output-dir", str(tmp_path / "run"),
        "--set", f"model={tiny_llama}", "label_words=[w7, w8]", "num_epochs=1", "max_length=32", "r=2",
    ])
    section = result["tasks"]["sst2"]
    assert section["eval_rows"] == 6 and set(section["methods"]) == {"zero-shot", "in-context", "lora"}
    assert section["methods"]["zero-shot"]["seeds"] == [0]  # nothing is drawn, so one run
    lora = section["methods"]["lora"]
    assert lora["seeds"] == [0, 1] and lora["train_seconds_mean"] > 0 and 0 <= lora["accuracy_mean"] <= 1
    assert all(r["eval_rows"] == 6 and "load_average" in r for r in section["runs"])
    assert section["settings"]["adapter"] == {"r": 2} and section["settings"]["k"] == 2
    assert json.loads(out.read_text())["tasks"]["sst2"]["methods"]["lora"] == lora
    assert out.with_suffix(".png").stat().st_size > 0
    assert len(log.read_text().splitlines()) == len(section["runs"]) == 5
    # A task run on its own later joins the same report, the earlier task's section kept.
    later = fewshot.main([
        "--tasks", "trec", "--methods", "zero-shot", "lora", "--seeds", "0", "--rows", "6", "--k", "2",
        "--out", str(out), "--output-dir", str(tmp_path / "run"), "--keep-other-tasks", "--no-plot",
        "--set", f"model={tiny_llama}", "label_words=[w3, w4, w5, w6, w7, w8]", "num_epochs=1", "max_length=32", "r=2",
    ])
    assert set(later["tasks"]) == {"sst2", "trec"} and later["tasks"]["sst2"]["methods"]["lora"] == lora
    # TREC's config scores its adapter raw (calibration: none); the prompting baselines stay calibrated.
    zero, trained = later["tasks"]["trec"]["runs"]
    assert zero["calibration"] == "contextual" and zero["accuracy"] == zero["calibrated_accuracy"]
    assert trained["calibration"] is None and trained["accuracy"] == trained["raw_accuracy"]


def test_held_out_rows_come_from_training_and_avoid_the_search_seeds_examples():
    rows = fewshot.held_out_rows("trec", 200)
    train, _ = akdata.local_dataset("trec", "train")
    shots = {t for seed in fewshot.SEARCH_SEEDS for t in akdata.few_shot(train, 16, seed=seed)["text"][:]}
    texts = rows["text"][:]
    assert len(texts) == 200 and not shots & set(texts) and set(texts) <= set(train["text"][:])
    assert len(set(rows["label"][:])) == 6  # stratified: every class is there


def test_settings_come_from_the_task_config_and_changes_apply():
    settings = fewshot.settings_for("sst2", {"learning_rate": 3e-4, "target_modules": ["q_proj", "v_proj"]})
    assert settings["learning_rate"] == 3e-4 and settings["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert settings["label_words"] == ["negative", "positive"]
    assert fewshot.parse_changes(['text_prefix="Review: "', "r=16"]) == {"text_prefix": "Review: ", "r": 16}
