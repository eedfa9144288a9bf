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
    result = bench.main(argv)
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
    assert set(sst2["met"]) == {"compose_beats_zero_shot_by_5_points", "compose_at_a_tenth_of_fewshot_lora_compute"}
    assert rows == result["settings"]["eval_rows"]

    # Same library settings, same cache: the library is loaded, not trained again; composition alone,
    # on the calibrated loss.
    again = bench.main([*argv, "--methods", "compose", "--compose-loss", "calibrated"])
    assert all(v["cached"] for v in again["library"].values())
    redo = again["tasks"]["sst2"]
    assert redo["zero_shot"] == {**sst2["zero_shot"], "seconds": redo["zero_shot"]["seconds"]}
    assert redo["in_context"]["runs"] == [] and redo["fewshot_lora"]["runs"] == [] and len(redo["compose"]["runs"]) == 1
    assert list(redo["met"]) == ["compose_beats_zero_shot_by_5_points"] and "compute" not in redo
    assert redo["setfit"] == {"skipped": "--no-setfit"}


@pytest.mark.parametrize("calibrated", [False, True])
def test_the_composition_loss_is_cross_entropy_of_the_evaluators_scores(tmp_path, shared_data, calibrated):
    model, tokenizer = ak.load_base(bench.quick_model(tmp_path / "tiny"), task="causal-lm")
    train, _ = akdata.local_dataset("ag_news", "train")
    shots = akdata.few_shot(train, 3, seed=0)  # 12 rows of different lengths, in batches of 5
    batches = bench.label_word_batches(tokenizer, "ag_news", shots, size=5, calibrated=calibrated)
    assert [len(b["label"]) for b in batches] == [5, 5, 2]
    spec = bench.LABEL_TASKS["ag_news"]
    # What the evaluation scores: each row unpadded, after the shared instruction, calibrated or raw.
    scores = score_texts(model, tokenizer, shots["text"][:], list(spec.words), template=spec.template,
                         calibration="contextual" if calibrated else None).scores
    expected = torch.nn.functional.cross_entropy(scores.log_softmax(-1), torch.tensor(shots["label"][:]))
    with torch.no_grad():
        got = sum(bench.label_word_loss(model, b) * len(b["label"]) for b in batches) / len(shots)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
