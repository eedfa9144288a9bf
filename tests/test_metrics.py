"""adapterkit.metrics on hand-computed examples and the real GSM8K answers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from adapterkit.data import data_dir
from adapterkit.errors import DataError
from adapterkit.metrics import (
    accuracy,
    classification_metrics,
    compute_metrics,
    compute_metrics_for_trainer,
    exact_match,
    gsm8k_answer,
    gsm8k_exact_match,
    macro_f1,
)


def eval_prediction(predictions, label_ids):
    # What Trainer hands compute_metrics, by the attributes it is read through. Importing the real
    # class (transformers.trainer_utils) pulls in peft and bitsandbytes: 10+ s for this small file.
    return SimpleNamespace(predictions=predictions, label_ids=label_ids, inputs=None, losses=None)


# preds vs labels: class 0 has tp=1 fp=1 fn=1 (F1 2/4), class 1 tp=2 fp=1 fn=1 (F1 4/6)
PREDS = [0, 0, 1, 1, 1]
LABELS = [0, 1, 1, 1, 0]


def test_accuracy():
    assert accuracy(PREDS, LABELS) == pytest.approx(3 / 5)
    assert accuracy(np.array([1, 2]), np.array([1, 2])) == 1.0


def test_macro_f1():
    assert macro_f1(PREDS, LABELS) == pytest.approx((1 / 2 + 2 / 3) / 2)
    # a declared class never seen scores 0, as scikit-learn's zero_division=0
    assert macro_f1(PREDS, LABELS, num_labels=3) == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    # a predicted class absent from the labels counts (F1 0) by default
    assert macro_f1([0, 2], [0, 1]) == pytest.approx((1 + 0 + 0) / 3)
    assert macro_f1([1, 1], [1, 1]) == 1.0


def test_length_mismatch_and_empty():
    with pytest.raises(DataError, match="2 predictions for 3 labels"):
        accuracy([0, 1], [0, 1, 1])
    with pytest.raises(DataError, match="empty"):
        macro_f1([], [])
    with pytest.raises(DataError, match="1 predictions for 2 references"):
        exact_match(["a"], ["a", "b"])
    with pytest.raises(DataError, match="empty"):
        exact_match([], [])


def test_classification_metrics():
    out = classification_metrics(PREDS, LABELS)
    assert out == {"accuracy": pytest.approx(0.6), "macro_f1": pytest.approx(7 / 12)}
    assert all(type(v) is float for v in out.values())


def test_compute_metrics_tuple_and_ignored_labels():
    logits = np.array([[2.0, 0.1], [1.0, 0.0], [0.0, 3.0], [0.2, 0.9], [0.0, 1.0], [5.0, 0.0]])
    labels = np.array([0, 1, 1, 1, 0, -100])  # argmax = PREDS + a last, ignored row
    hidden = np.zeros((6, 3))
    out = compute_metrics_for_trainer(eval_prediction(predictions=(logits, hidden), label_ids=labels))
    assert out == {"accuracy": pytest.approx(0.6), "macro_f1": pytest.approx(7 / 12)}
    assert compute_metrics_for_trainer((logits[:5], labels[:5])) == out
    assert compute_metrics is compute_metrics_for_trainer  # the name training.py hands to Trainer


def test_compute_metrics_three_classes():
    # argmax -> [2, 0, 1, 2]; labels [2, 1, 1, 0]: class 0 F1 0, class 1 tp=1 fn=1 (2/3), class 2 tp=1 fp=1 (2/3)
    logits = np.array([[0.0, 0.1, 0.9], [0.8, 0.1, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]], dtype=np.float32)
    out = compute_metrics_for_trainer(eval_prediction(predictions=logits, label_ids=np.array([2, 1, 1, 0])))
    assert out == {"accuracy": pytest.approx(0.5), "macro_f1": pytest.approx((0 + 2 / 3 + 2 / 3) / 3)}


def test_exact_match():
    preds = ["  The   Answer.", "paris", None, "42", "Yes!!"]
    refs = ["the answer", "Paris!", "x", ["41", "42"], "no"]
    assert exact_match(preds, refs) == pytest.approx(3 / 5)
    assert exact_match(["a b"], ["ab"]) == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
        ("... so the total is\n#### 1,234", "1234"),
        ("#### -5", "-5"),
        ("#### $70", "70"),
        ("The answer is 3.50 dollars.", "3.5"),
        ("It costs 12.00, then 1,000 more, so 1,012.", "1012"),
        ("5-3 leaves 2", "2"),
        ("no number here", None),
        ("", None),
        (None, None),
    ],
)
def test_gsm8k_answer(text, expected):
    assert gsm8k_answer(text) == expected


def test_gsm8k_exact_match():
    refs = ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "#### 1,000", "5"]
    outputs = ["So she sold 72 clips.", "The answer is 1000.00", "I do not know"]
    assert gsm8k_exact_match(outputs, refs) == pytest.approx(2 / 3)
    with pytest.raises(DataError, match=r"References \[1\] hold no number"):
        gsm8k_exact_match(["1", "2"], ["#### 1", "none"])
    with pytest.raises(DataError, match="1 predictions for 2 references"):
        gsm8k_exact_match(["1"], ["1", "2"])


def test_gsm8k_answer_on_real_data():
    try:
        path = data_dir() / "gsm8k" / "test.jsonl"
    except DataError as exc:
        pytest.skip(f"shared data folder not found: {exc}")
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1319
    expected = [r["answer"].split("####")[-1].strip().replace(",", "") for r in rows]
    got = [gsm8k_answer(r["answer"]) for r in rows]
    assert got == expected
    assert exact_match(got, expected) == 1.0


def test_label_metrics_add_the_share_of_each_predicted_class():
    from adapterkit.metrics import label_metrics

    out = label_metrics([0, 0, 0, 1], [0, 1, 0, 1], num_labels=3)
    assert out["accuracy"] == 0.75 and out["class_shares"] == [0.75, 0.25, 0.0]
    assert out["macro_f1"] == classification_metrics([0, 0, 0, 1], [0, 1, 0, 1], num_labels=3)["macro_f1"]
