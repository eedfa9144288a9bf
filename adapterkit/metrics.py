"""Evaluation metrics: accuracy, macro-F1, normalised exact match and GSM8K answer extraction.

Implemented here (no scikit-learn dependency); macro-F1 follows scikit-learn's
``f1_score(average="macro", zero_division=0)``.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from adapterkit.errors import DataError

logger = logging.getLogger(__name__)


def _paired(preds: Any, labels: Any) -> tuple[list, list]:
    preds, labels = np.asarray(preds).tolist(), np.asarray(labels).tolist()
    if len(preds) != len(labels):
        raise DataError(f"Got {len(preds)} predictions for {len(labels)} labels; they must pair up one to one.")
    if not labels:
        raise DataError("No predictions to score: the evaluation set is empty.")
    return preds, labels


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label.

    Raises:
        DataError: Different lengths, or nothing to score.
    """
    preds, labels = _paired(preds, labels)
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def macro_f1(preds: Sequence[int], labels: Sequence[int], num_labels: int | None = None) -> float:
    """Unweighted mean of per-class F1.

    Args:
        preds: Predicted class ids.
        labels: True class ids.
        num_labels: Score classes ``0..num_labels-1`` (a class never predicted nor present scores 0,
            as in scikit-learn). Default: the classes seen in ``preds`` or ``labels``.

    Raises:
        DataError: Different lengths, or nothing to score.
    """
    preds, labels = _paired(preds, labels)
    classes = range(num_labels) if num_labels is not None else sorted(set(labels) | set(preds))
    scores = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        # 2tp / (2tp + fp + fn) equals 2PR / (P + R) and stays defined when P or R is 0/0.
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def classification_metrics(
    preds: Sequence[int], labels: Sequence[int], num_labels: int | None = None
) -> dict[str, float]:
    """``{"accuracy": ..., "macro_f1": ...}`` for class-id predictions."""
    return {"accuracy": float(accuracy(preds, labels)), "macro_f1": float(macro_f1(preds, labels, num_labels))}


def label_metrics(preds: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, Any]:
    """:func:`classification_metrics` plus ``class_shares``, the share of rows predicted as each
    class: a classifier that collapses to one class shows there."""
    shares = [sum(p == c for p in preds) / len(preds) for c in range(num_labels)]
    return {**classification_metrics(preds, labels, num_labels=num_labels), "class_shares": shares}


def compute_metrics_for_trainer(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for transformers' ``Trainer``: argmax of the logits, then accuracy and macro-F1.

    Args:
        eval_pred: An ``EvalPrediction`` (or a ``(logits, label_ids)`` pair). A tuple of model outputs
            uses its first element; labels of -100 (ignored positions) are left out.
    """
    logits, label_ids = (eval_pred.predictions, eval_pred.label_ids) if hasattr(eval_pred, "label_ids") else eval_pred
    # Models that also return hidden states or past key values hand Trainer a tuple; logits come first.
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if isinstance(label_ids, (tuple, list)):
        label_ids = label_ids[0]
    preds = np.asarray(logits).argmax(-1).reshape(-1)
    labels = np.asarray(label_ids).reshape(-1)
    keep = labels != -100
    return classification_metrics(preds[keep], labels[keep])


#: The name :mod:`adapterkit.training.tasks` hands to ``Trainer`` for classification.
compute_metrics = compute_metrics_for_trainer

# Trainer reports bookkeeping next to the metrics; none of it says how good an adapter is.
_BOOKKEEPING = re.compile(r"(^|_)(epoch|runtime|samples|steps|total_flos|flos)$|_per_second$|^(cached_features|feature_cache_seconds|train_seconds)$")


def quality_metrics(values: dict[str, Any]) -> dict[str, float]:
    """Only the metrics of ``values`` (accuracy, macro-F1, losses, perplexity), as floats.

    Drops what Trainer logs beside them (``epoch``, ``*_runtime``, ``*_per_second``,
    ``total_flos``, sample counts) and anything that is not a number: this is what
    an adapter's sidecar and card record.
    """
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not _BOOKKEEPING.search(key)
    }


_TRAILING_PUNCT = string.punctuation + "。！？"


def _normalise(text: Any) -> str:
    text = " ".join(str(text).lower().split())
    return text.rstrip(_TRAILING_PUNCT).strip()


def exact_match(predictions: Sequence[str | None], references: Sequence[str | Sequence[str]]) -> float:
    """Fraction of predictions equal to their reference after normalisation.

    Both sides are lower-cased, stripped, inner whitespace collapsed and trailing punctuation removed.
    A reference may be a list of acceptable answers; a ``None`` prediction (no answer found) is wrong.

    Raises:
        DataError: Different lengths, or nothing to score.
    """
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise DataError(
            f"Got {len(predictions)} predictions for {len(references)} references; they must pair up one to one."
        )
    if not references:
        raise DataError("No predictions to score: the evaluation set is empty.")
    hits = 0
    for pred, ref in zip(predictions, references):
        if pred is None:
            continue
        options = [ref] if isinstance(ref, str) else list(ref)
        hits += _normalise(pred) in {_normalise(o) for o in options}
    return hits / len(references)


# A sign counts only when not glued to a word or digit: "5-3" is 5 and 3, not 5 and -3.
_NUMBER = r"(?:(?<![\w)])[-+])?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"


def _clean_number(raw: str) -> str:
    number = raw.replace(",", "").lstrip("+")
    # "18.00" and "18" are the same answer; models print either.
    if "." in number:
        number = number.rstrip("0").rstrip(".") or "0"
    return number


def gsm8k_answer(text: str | None) -> str | None:
    """The final numeric answer of a GSM8K solution or model output.

    The number after ``####`` (GSM8K's answer marker) if present, else the last number in the text;
    thousands separators removed and trailing decimal zeros dropped (``"1,000.50"`` -> ``"1000.5"``).
    None if the text has no number.
    """
    if not text:
        return None
    marked = re.search(r"####\s*\$?\s*(" + _NUMBER + ")", text)
    if marked:
        return _clean_number(marked.group(1))
    numbers = re.findall(_NUMBER, text)
    return _clean_number(numbers[-1]) if numbers else None


def gsm8k_exact_match(outputs: Sequence[str | None], references: Sequence[str]) -> float:
    """Fraction of model outputs whose final number equals the GSM8K reference answer.

    Both sides go through :func:`gsm8k_answer`, so a reference may be the full GSM8K ``answer``
    (worked solution ending in ``#### 42``) or just the number; an output with no number is wrong.

    Raises:
        DataError: Different lengths, nothing to score, or a reference without a number.
    """
    refs = [gsm8k_answer(r) for r in references]
    missing = [i for i, r in enumerate(refs) if r is None]
    if missing:
        raise DataError(f"References {missing[:5]} hold no number; GSM8K answers end in '#### <number>'.")
    return exact_match([gsm8k_answer(o) for o in outputs], refs)
