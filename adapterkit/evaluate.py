"""The one evaluator: accuracy and macro-F1 of a classifier, or of a causal LM by its label words.

``adapterkit eval``, the prompting and few-shot recipes and the benchmarks all measure with these
two functions, so a number means the same wherever it is printed. Both read the columns
:func:`adapterkit.data.prepare_classification` writes (``text``, optional ``text_pair``,
``label``), the same ones :func:`adapterkit.train` reads; both return
:func:`adapterkit.metrics.classification_metrics` plus ``rows`` and ``seconds`` (the label-word
evaluator also the share of each predicted class, and the raw scores' metrics when calibrated).
(Training-time evaluation stays in ``ak.train``, on Trainer's own loop.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import datasets
from torch import nn
from tqdm.auto import tqdm

from adapterkit.errors import DataError, InvalidOptionError
from adapterkit.metrics import classification_metrics, label_metrics
from adapterkit.prompting import (
    CONTENT_FREE,
    Calibration,
    PromptTemplate,
    evaluation_mode,
    predict_by_generation,
    score_texts,
)

Rows = datasets.Dataset | Sequence[dict[str, Any]] | dict[str, Sequence[Any]]


def _table(data: Rows, *columns: str) -> datasets.Dataset:
    if isinstance(data, dict):
        data = datasets.Dataset.from_dict(data)
    elif not isinstance(data, datasets.Dataset):
        data = datasets.Dataset.from_list(list(data))
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise DataError(
            f"The evaluation rows lack column(s) {missing} (they have {data.column_names}); evaluate rows as "
            "adapterkit.data.prepare_classification returns them: 'text', optional 'text_pair', and 'label'."
        )
    if len(data) == 0:
        raise DataError("No rows to evaluate: the evaluation set is empty.")
    return data


def _batches(rows: int, batch_size: int, *, show_progress: bool, desc: str) -> Iterator[slice]:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidOptionError(f"batch_size must be a positive int, got {batch_size!r}.")
    starts = range(0, rows, batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not show_progress):
        yield slice(start, start + batch_size)


def _result(preds: list[int], labels: list[int], num_labels: int | None, started: float) -> dict[str, float]:
    metrics = classification_metrics(preds, labels, num_labels=num_labels)
    return {**metrics, "rows": len(labels), "seconds": time.perf_counter() - started}


def evaluate_classifier(
    model: nn.Module,
    tokenizer: Any,
    rows: Rows,
    *,
    batch_size: int = 64,
    max_length: int = 256,
    num_labels: int | None = None,
    show_progress: bool = False,
) -> dict[str, float]:
    """Accuracy and macro-F1 of a sequence classifier's argmax on ``rows``.

    Args:
        model: A sequence-classification model (with or without an adapter), on any device.
        tokenizer: Its tokenizer.
        rows: Columns ``text`` and ``label`` (class ids), and ``text_pair`` for sentence-pair tasks
            (tokenized as the second text, as in training).
        batch_size: Rows per forward pass.
        max_length: Texts are truncated to this many tokens.
        num_labels: Classes to score (macro-F1 averages over ``0..num_labels-1``); default: the
            model config's ``num_labels``.
        show_progress: A tqdm bar over the batches.

    Returns:
        ``{"accuracy", "macro_f1", "rows", "seconds"}``.
    """
    table = _table(rows, "text", "label")
    texts, labels = table["text"][:], table["label"][:]
    pairs = table["text_pair"][:] if "text_pair" in table.column_names else None
    if num_labels is None:
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    started = time.perf_counter()
    preds: list[int] = []
    with evaluation_mode(model) as device:
        for batch in _batches(len(texts), batch_size, show_progress=show_progress, desc="evaluate"):
            enc = tokenizer(texts[batch], pairs[batch] if pairs is not None else None, return_tensors="pt",
                            padding=True, truncation=True, max_length=max_length).to(device)
            preds += model(**enc).logits.argmax(-1).tolist()
    return _result(preds, labels, num_labels, started)


def evaluate_label_words(
    model: nn.Module,
    tokenizer: Any,
    rows: Rows,
    label_words: Sequence[str],
    *,
    template: PromptTemplate | None = None,
    examples: Sequence[tuple[str, str]] = (),
    method: Literal["scoring", "generation"] = "scoring",
    calibration: Calibration = "contextual",
    content_free: Sequence[str] = CONTENT_FREE,
    reuse_prefix: bool = True,
    batch_size: int = 8,
    max_length: int = 1024,
    max_new_tokens: int = 5,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Accuracy and macro-F1 of a causal LM that answers each row's prompt with a label word.

    Args:
        model: A causal LM (with or without an adapter), on any device.
        tokenizer: Its tokenizer (its chat template is used when it has one, unless
            ``template.chat`` is False).
        rows: Columns ``text`` and ``label``; label ``i`` is ``label_words[i]``.
        label_words: One word per class, in class-id order.
        template: Renders each text into a prompt (default: ``PromptTemplate()``).
        examples: (text, label word) in-context examples put before every text; encoded once and
            their KV cache reused for every row (``reuse_prefix=False`` re-encodes them per row).
        method: ``"scoring"`` picks the most likely label word
            (:func:`~adapterkit.prompting.score_texts`); ``"generation"`` generates greedily
            and takes the first label word in the answer (none found counts as wrong).
        calibration: Scoring only: ``"contextual"`` divides out the label-word prior measured on
            the ``content_free`` inputs; None scores raw.
        content_free: The content-free inputs for calibration.
        reuse_prefix: Scoring only: reuse the KV cache of the shared instruction and examples.
        batch_size: Prompts per forward pass (scoring batches rows of similar length).
        max_length: Scoring keeps the last ``max_length`` tokens of each row's own part.
        max_new_tokens: Generation's answer length.
        show_progress: A tqdm bar over the batches.

    Returns:
        ``{"accuracy", "macro_f1", "class_shares", "rows", "seconds"}``, where ``class_shares[i]`` is
        the share of rows predicted as class ``i`` (a collapse to one class shows as a share of 1.0;
        generation's answers with no label word are the remainder). Calibrated scoring adds
        ``raw_accuracy``, ``raw_macro_f1`` and ``raw_class_shares`` of the uncalibrated scores.
    """
    if method not in ("scoring", "generation"):
        raise InvalidOptionError(f"method must be 'scoring' or 'generation', got {method!r}.")
    table = _table(rows, "text", "label")
    labels = table["label"][:]
    outside = sorted({y for y in labels if not 0 <= y < len(label_words)})
    if outside:
        raise DataError(
            f"Labels {outside[:10]} have no label word: {len(label_words)} label words {list(label_words)} name "
            f"classes 0..{len(label_words) - 1}. Pass one label word per class."
        )
    template = template or PromptTemplate()
    texts = table["text"][:]
    started = time.perf_counter()
    if method == "generation":
        prefix, queries = template.split(tokenizer, texts, examples)
        prompts = [prefix + query for query in queries]
        preds: list[int] = []
        with evaluation_mode(model):
            for batch in _batches(len(prompts), batch_size, show_progress=show_progress, desc="evaluate (generation)"):
                preds += predict_by_generation(model, tokenizer, prompts[batch], label_words, batch_size=batch_size,
                                               max_new_tokens=max_new_tokens)
        return _label_word_result(preds, labels, len(label_words), started)
    scores = score_texts(
        model, tokenizer, texts, label_words, template=template, examples=examples, calibration=calibration,
        content_free=content_free, reuse_prefix=reuse_prefix, batch_size=batch_size, max_length=max_length,
        show_progress=show_progress,
    )
    result = _label_word_result(scores.predictions(), labels, len(label_words), started)
    if scores.calibrated is not None:
        raw = _label_word_result(scores.raw.argmax(-1).tolist(), labels, len(label_words), started)
        result.update({f"raw_{key}": raw[key] for key in ("accuracy", "macro_f1", "class_shares")})
    return result


def _label_word_result(preds: list[int], labels: list[int], num_labels: int, started: float) -> dict[str, Any]:
    return {**label_metrics(preds, labels, num_labels), "rows": len(labels), "seconds": time.perf_counter() - started}
