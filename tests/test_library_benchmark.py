"""benchmarks/library.py: the adapter library and leave-one-task-out composition, on a tiny model.

The numbers of a --quick run mean nothing; this checks that every method runs on the same
rows, that the library is cached and reused, and that the report has what the issue asks for.
"""

from __future__ import annotations

import json

import pytest
import torch

import adapterkit as ak
from adapterkit import data as akdata
from adapterkit.prompting import score_texts
from benchmarks import library as bench


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shared_data():
    try:
        akdata.data_dir()
    except ak.DataError as err:
        pytest.skip(str(err))


def test_quick_run_reports_every_method_and_reuses_the_library(tmp_path, shared_data):
    argv = ["--quick", "--no-setfit", "--tasks", "sst2", "--seeds", "0", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "library.json")]
    result = bench.main([*argv, "--fold-check"])
    written = json.loads((tmp_path / "library.json").read_text())
    assert (tmp_path / "library.png").stat().st_size > 1000
    assert set(written["library"]) == set(bench.LIBRARY) and not any(v["cached"] for v in written["library"].values())

    sst2 = written["tasks"]["sst2"]
    rows = sst2["eval_rows"]
    assert sst2["zero_shot"]["accuracy"] is not None
    for method in ("in_context", "fewshot_lora", "compose"):
        assert len(sst2[method]["runs"]) == 1, method
        assert 0 <= sst2[method]["accuracy_min"] <= sst2[method]["accuracy_mean"] <= sst2[method]["accuracy_max"] <= 1
    assert sst2["setfit"] == {"skipped": "--no-setfit"}
    compose = sst2["compose"]["runs"][0]
    assert set(compose["weights"]) == set(bench.LIBRARY) - {"sst2"}  # left out of its own composition
    assert compose["forward_tokens"] == compose["example_tokens"] * compose["evaluations"] > 0
    assert sst2["fewshot_lora"]["runs"][0]["train_tokens"] > 0
    assert set(sst2["diagnostics"]["single_adapter"]) == set(bench.LIBRARY)
    for run in (sst2["zero_shot"], *(sst2[m]["runs"][0] for m in ("in_context", "fewshot_lora", "compose"))):
        # Each run's scoring is the one its dev rows prefer, and both scorings are kept.
        prefers_raw = run["dev_raw"] > run["dev_calibrated"]
        assert run["scoring"] == ("raw" if prefers_raw else "calibrated")
        assert run["accuracy"] == (run["raw_accuracy"] if prefers_raw else run["calibrated_accuracy"])
    for method in ("in_context", "fewshot_lora", "compose"):
        # A method's summary uses the scoring its dev rows prefer, pooled over its seeds.
        section = sst2[method]
        key = "raw_accuracy" if section["dev_raw_mean"] > section["dev_calibrated_mean"] else "calibrated_accuracy"
        assert section["accuracy_mean"] == pytest.approx(sum(r[key] for r in section["runs"]) / len(section["runs"]))
    assert len(compose["curve"]) == compose["evaluations"] and compose["evaluation"] == "folded into the base weights"
    # Through the adapter, or with the prefix in every row: the same search, the same weights.
    unfolded, unshared = sst2["compose_unfolded_check"], sst2["compose_unshared_prefix_check"]
    assert unfolded["evaluation"] == "through the adapter (fold=False)"
    assert unshared["forward_tokens"] > compose["forward_tokens"]
    for check in (unfolded, unshared):
        assert check["weights"] == pytest.approx(compose["weights"], abs=1e-3) and check["loss"] == pytest.approx(compose["loss"], abs=1e-3)
    assert set(sst2["met"]) == {"compose_beats_zero_shot_by_5_points", "compose_at_a_tenth_of_fewshot_lora_compute"}
    assert rows == result["settings"]["eval_rows"]

    # Same library settings, same cache: the library is loaded, not trained again; composition alone,
    # on the calibrated loss.
    again = bench.main([*argv, "--methods", "compose", "--compose-loss", "calibrated"])
    assert all(v["cached"] for v in again["library"].values())
    redo = again["tasks"]["sst2"]
    timing = {k: redo["zero_shot"][k] for k in ("seconds", "dev_seconds")}
    assert redo["zero_shot"] == {**sst2["zero_shot"], **timing}
    assert redo["in_context"]["runs"] == [] and redo["fewshot_lora"]["runs"] == [] and len(redo["compose"]["runs"]) == 1
    assert list(redo["met"]) == ["compose_beats_zero_shot_by_5_points"] and "compute" not in redo
    assert redo["setfit"] == {"skipped": "--no-setfit"}

    # A long run in parts: few-shot LoRA added to the composition-only result just written, beside it.
    added = bench.main([*argv, "--methods", "fewshot_lora", "--seeds", "1", "--add-to", str(tmp_path / "library.json")])
    both = added["tasks"]["sst2"]
    assert [r["seed"] for r in both["fewshot_lora"]["runs"]] == [1] and both["zero_shot"] == redo["zero_shot"]
    assert "compose_at_a_tenth_of_fewshot_lora_compute" in both["met"]
    assert [r["seed"] for r in both["compose"]["runs"]] == [0] and added["settings"]["seeds"] == [0, 1]
    with pytest.raises(ak.InvalidOptionError, match="already has seeds"):
        bench.main([*argv, "--methods", "compose", "--add-to", str(tmp_path / "library.json")])
    with pytest.raises(ak.InvalidOptionError, match="data settings differ"):
        bench.main([*argv, "--seeds", "2", "--eval-rows", "9", "--add-to", str(tmp_path / "library.json")])

    # --report redoes the summaries, the table and the PNG from the JSON alone.
    (tmp_path / "library.md").unlink()
    reported = bench.main(["--report", str(tmp_path / "library.json")])
    assert reported["tasks"]["sst2"]["fewshot_lora"]["accuracy_mean"] == both["fewshot_lora"]["accuracy_mean"]
    assert "Dev rows pooled over every task and seed" in (tmp_path / "library.md").read_text()


def test_the_dev_rows_are_held_out_of_the_examples_and_the_evaluation(shared_data):
    settings = {**bench.QUICK, "dev_rows": 20}
    pool, dev, evaluation = bench.task_split("trec", settings)
    assert len(dev) == 20 and not set(dev["text"][:]) & set(pool["text"][:])
    assert not set(dev["text"][:]) & set(evaluation["text"][:])
    shots = akdata.few_shot(pool, 4, seed=1)
    assert not set(shots["text"][:]) & set(dev["text"][:])


@pytest.mark.parametrize("calibrated, shared_prefix", [(False, False), (True, False), (False, True), (True, True)])
def test_the_composition_loss_is_cross_entropy_of_the_evaluators_scores(tmp_path, shared_data, calibrated, shared_prefix):
    model, tokenizer = ak.load_base(bench.quick_model(tmp_path / "tiny"), task="causal-lm")
    train, _ = akdata.local_dataset("ag_news", "train")
    shots = akdata.few_shot(train, 3, seed=0)  # 12 rows of different lengths, in batches of 5
    batches = bench.label_word_batches(tokenizer, "ag_news", shots, size=5, calibrated=calibrated,
                                       shared_prefix=shared_prefix)
    assert [len(b["label"]) for b in batches] == [5, 5, 2]
    whole = bench.label_word_batches(tokenizer, "ag_news", shots, size=5, calibrated=calibrated)
    if shared_prefix:
        # The instruction line goes once per batch, not once per row.
        cut = batches[0]["prefix_ids"].shape[1]
        assert cut > 5
        rows = 12 + (3 * len(bench.CONTENT_FREE) if calibrated else 0)
        assert sum(map(bench.batch_tokens, batches)) == sum(map(bench.batch_tokens, whole)) - rows * cut + 3 * cut
    spec = bench.LABEL_TASKS["ag_news"]
    # What the evaluation scores: each row unpadded, after the shared instruction, calibrated or raw.
    scores = score_texts(model, tokenizer, shots["text"][:], list(spec.words), template=spec.template,
                         calibration="contextual" if calibrated else None).scores
    expected = torch.nn.functional.cross_entropy(scores.log_softmax(-1), torch.tensor(shots["label"][:]))
    with torch.no_grad():
        got = sum(bench.label_word_loss(model, b) * len(b["label"]) for b in batches) / len(shots)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
