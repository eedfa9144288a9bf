"""Train and evaluation splits for classification, from a bundled set, local files or a Hub id.

What the recipes and ``adapterkit`` read for ``dataset`` / ``train_file`` / ``eval_file``, and
what they record about it with their results.
"""

from __future__ import annotations

import datasets

from adapterkit.data.bundled import LOCAL_SPLITS, local_dataset
from adapterkit.data.classification import prepare_classification, stratified_split
from adapterkit.data.loading import load_table
from adapterkit.errors import DataError, InvalidOptionError, option_hint
from adapterkit.sources import Source, resolve_source


def dataset_source(dataset: str) -> Source:
    """What ``dataset`` names: a bundled set (``kind="alias"``), a Hub dataset id, or a local path.

    Raises:
        DataError: a path that does not exist, or neither a bundled name nor a valid Hub id.
    """
    return resolve_source(dataset, what="dataset", aliases=LOCAL_SPLITS, error=DataError)


def _eval_split(source: Source) -> str:
    if source.kind == "alias":
        return "dev" if "dev" in LOCAL_SPLITS[source.text] else "test"
    return "validation"


def classification_splits(
    *,
    dataset: str | None = None,
    train_file: str | None = None,
    eval_file: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    label_names: list[str] | None = None,
    seed: int = 0,
) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """Train and evaluation splits (``text`` + ``label``) and the label names, from any source.

    ``train_file`` (+ ``eval_file``, else 10% held out, stratified) wins; otherwise ``dataset``
    is a bundled set (``sst2`` evaluates on dev, ``trec``/``ag_news`` on test) or a Hub id
    (``train`` / ``validation`` splits).

    Raises:
        DataError: no source given, ``dataset`` names a local file or nothing, or the data does
            not fit (see :func:`~adapterkit.data.prepare_classification`).
        InvalidOptionError: ``eval_file`` without ``train_file``.
    """
    data_source(dataset=dataset, train_file=train_file, eval_file=eval_file)  # refuses half-given files

    def prepared(table, names=None):
        return prepare_classification(table, text_column=text_column, label_column=label_column, label_names=names)

    if train_file:
        train, labels = prepared(load_table(train_file), label_names)
        if eval_file:
            return train, prepared(load_table(eval_file), labels)[0], labels
        return (*stratified_split(train, 0.1, seed=seed), labels)
    if not dataset:
        raise DataError(
            f"No data given: pass {option_hint('dataset')} (sst2, trec, ag_news or a Hub dataset id) "
            f"or {option_hint('train_file')}."
        )
    source = dataset_source(dataset)
    if source.kind == "alias":
        train, labels = local_dataset(dataset, "train")
        return train, local_dataset(dataset, _eval_split(source))[0], labels
    if source.is_local:
        raise DataError(
            f"{option_hint('dataset', dataset)} is a local path; {option_hint('dataset')} names a bundled set "
            f"({', '.join(sorted(LOCAL_SPLITS))}) or a Hub dataset id. Pass the file as "
            f"{option_hint('train_file')} (and {option_hint('eval_file')}, else 10% is held out)."
        )
    train, labels = prepared(load_table(dataset, split="train"), label_names)
    return train, prepared(load_table(dataset, split=_eval_split(source)), labels)[0], labels


def data_source(
    *, dataset: str | None = None, train_file: str | None = None, eval_file: str | None = None
) -> dict[str, str | None]:
    """What :func:`classification_splits` reads for these arguments, to record with results.

    Returns:
        ``{"dataset", "train_file", "eval_file", "eval_data"}``: ``dataset`` is None when a
        ``train_file`` wins over it, and ``eval_data`` says where the evaluation rows come from.

    Raises:
        InvalidOptionError: ``eval_file`` without ``train_file`` (it would silently evaluate a
            model trained on ``dataset`` on other data).
        DataError: ``dataset`` (when it is what is read) names no bundled set, path or Hub id.
    """
    if eval_file and not train_file:
        raise InvalidOptionError(
            f"{option_hint('eval_file')} needs {option_hint('train_file')} too: an evaluation file alone would "
            f"train on {dataset or 'no data'!r} and evaluate on other data. Pass both files, or neither "
            f"(and choose {option_hint('dataset')})."
        )
    if train_file:
        held_out = f"10% of {train_file}, held out (stratified)"
        return {"dataset": None, "train_file": str(train_file), "eval_file": eval_file, "eval_data": eval_file or held_out}
    eval_data = f"{dataset} ({_eval_split(dataset_source(dataset))})" if dataset else None
    return {"dataset": dataset, "train_file": None, "eval_file": None, "eval_data": eval_data}
