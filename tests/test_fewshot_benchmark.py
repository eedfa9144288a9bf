"""benchmarks/fewshot.py end to end on a tiny model: every method, the JSON, the PNG, the search split."""

from __future__ import annotations

import json

import pytest
import torch

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


def test_ensemble_averages_member_probabilities_and_saves_every_members_scores(tiny_llama, tmp_path):
    common = ["--tasks", "sst2", "--methods", "lora", "--seeds", "0", "--rows", "6", "--k", "2", "--no-plot",
              "--output-dir", str(tmp_path / "run"), "--save-scores", str(tmp_path / "scores")]
    tiny = [f"model={tiny_llama}", "label_words=[w7, w8]", "num_epochs=1", "max_length=32", "r=2"]
    single = fewshot.main([*common, "--out", str(tmp_path / "one.json"), "--label", "one", "--set", *tiny])
    pair = fewshot.main([*common, "--out", str(tmp_path / "two.json"), "--label", "two", "--set", *tiny, "ensemble=2"])
    alone, both = single["tasks"]["sst2"]["runs"][0], pair["tasks"]["sst2"]["runs"][0]
    assert len(both["member_accuracy"]) == 2 and both["member_accuracy"][0] == alone["accuracy"]
    saved = torch.load(tmp_path / "scores" / "sst2-lora-s0-two.pt")
    first = torch.load(tmp_path / "scores" / "sst2-lora-s0-one.pt")
    assert len(saved["raw"]) == 2 and torch.equal(saved["raw"][0], first["raw"][0])
    # The ensemble's prediction: the highest mean of the members' calibrated label-word probabilities.
    probs = [(raw.log_softmax(-1) - prior.log()).softmax(-1) for raw, prior in zip(saved["raw"], saved["prior"])]
    expected = fewshot.label_metrics(torch.stack(probs).mean(0), saved["labels"].tolist())["accuracy"]
    assert both["accuracy"] == both["calibrated_accuracy"] == expected


def test_a_rerun_of_one_method_keeps_the_others_only_with_the_same_prompt_and_rows(tiny_llama, tmp_path):
    out = tmp_path / "fewshot.json"
    common = ["--tasks", "sst2", "--seeds", "0", "--rows", "6", "--k", "2", "--no-plot", "--out", str(out),
              "--output-dir", str(tmp_path / "run")]
    tiny = [f"model={tiny_llama}", "label_words=[w7, w8]", "num_epochs=1", "max_length=32", "r=2"]
    first = fewshot.main([*common, "--methods", "zero-shot", "lora", "--set", *tiny])
    later = fewshot.main([*common, "--methods", "lora", "--keep-other-methods", "--set", *tiny, "r=4"])
    methods = later["tasks"]["sst2"]["methods"]
    assert list(methods) == ["zero-shot", "lora"] and methods["zero-shot"]["kept_from"]["report_commit"]
    kept = {key: value for key, value in methods["zero-shot"].items() if key != "kept_from"}
    assert kept == first["tasks"]["sst2"]["methods"]["zero-shot"]
    assert [r["method"] for r in later["tasks"]["sst2"]["runs"]] == ["zero-shot", "lora"]
    with pytest.raises(SystemExit, match="label_words"):  # other label words: the baselines must be rerun
        fewshot.main([*common, "--methods", "lora", "--keep-other-methods", "--set", *tiny, "label_words=[w8, w9]"])
