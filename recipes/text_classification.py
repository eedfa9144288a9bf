"""Text classification with any adapter strategy: the classic BERT fine-tuning scenario.

Loads labelled text (an embedded data set such as SST-2, local CSV/TSV/JSONL/parquet files,
or a Hub dataset id), attaches a strategy to a base model, trains with transformers' Trainer,
evaluates accuracy and macro-F1, saves the adapter with its card, prints a results table,
and optionally publishes to the Hub.

    python recipes/text_classification.py --strategy lora --dataset sst2
    python recipes/text_classification.py --config recipes/configs/sst2_minilm_lora.yaml --num-epochs 1
    adapterkit train text_classification --strategy head
    python recipes/text_classification.py --sweep learning_rate=5e-4,2e-3 num_epochs=1,3   # picked on a dev split
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from typing import Any

import transformers

import adapterkit as ak
import adapterkit.sweep as sweep
from adapterkit import data as akdata
from adapterkit.evaluate import evaluate_classifier
from adapterkit.options import recipe_main, report_results, run_script


@dataclasses.dataclass
class Options:
    """Text classification: train, evaluate and save one adapter."""

    # what to adapt
    model: str = "minilm-l6"           # embedded alias, local folder or Hub id
    strategy: str = "lora"             # any registered strategy
    adapter: dict = dataclasses.field(default_factory=dict)  # strategy options, e.g. {"r": 8}
    bits: int | None = None            # 4 or 8 for a bitsandbytes base
    # data: an embedded set (sst2, trec, ag_news) or files / a Hub dataset id
    dataset: str | None = "sst2"       # sst2, trec, ag_news or a Hub dataset id; train_file wins over it
    train_file: str | None = None      # CSV/TSV/JSONL/parquet with text and label columns
    eval_file: str | None = None       # needs train_file; default: 10% of train_file held out
    text_column: str = "text"
    label_column: str = "label"
    label_names: list | None = None
    max_train_rows: int | None = None  # a stratified subset, for quick runs
    max_eval_rows: int | None = None
    # training (see adapterkit.TrainSettings)
    learning_rate: float | None = None  # None: the strategy's default
    num_epochs: float = 3.0
    batch_size: int = 16
    max_length: int = 128
    length_policy: str = "truncate"     # "error": refuse texts longer than max_length
    seed: int = 0
    max_steps: int = -1
    # output
    output_dir: str = "runs/text-classification"
    name: str = "default"
    publish: str | None = None          # a Hub repo id to upload the adapter to
    results_json: str | None = None     # also write the results here


@recipe_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts, tuning = sweep.parse_options(Options, argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()

    # 1. data, checked before anything heavy is loaded; `source` records what is actually read
    source = akdata.data_source(dataset=opts.dataset, train_file=opts.train_file, eval_file=opts.eval_file)
    train, evaluation, labels = akdata.classification_splits(
        dataset=opts.dataset, train_file=opts.train_file, eval_file=opts.eval_file, text_column=opts.text_column,
        label_column=opts.label_column, label_names=opts.label_names, seed=opts.seed,
    )
    train = akdata.subset(train, opts.max_train_rows, seed=opts.seed)
    evaluation = akdata.subset(evaluation, opts.max_eval_rows, seed=opts.seed)

    # 2-3. base model, adapter, training and evaluation (see fit); with --sweep, once per trial on a dev
    # split of the training rows, then once more for the configuration picked
    if tuning:
        tuned = tuning.run(opts, train, evaluation, fit=functools.partial(fit, labels=labels, source=source),
                           evaluate=functools.partial(evaluate, labels=labels))
        opts, fitted = tuned.options, tuned.fitted
        print(tuned.table())
    else:
        fitted = fit(opts, train, evaluation, labels=labels, source=source)
    model, metrics = fitted.model, fitted.metrics

    # 4. save (and publish): once, from the first process when torchrun runs several
    if not fitted.result.trainer.is_world_process_zero():
        return {"rank": fitted.result.trainer.args.process_index, **fitted.result}
    summary = ak.summary(model)
    print(summary)
    folder = ak.save(model, f"{opts.output_dir}/adapter", name=opts.name)
    results = {
        "model": opts.model, "strategy": opts.strategy, "bits": opts.bits,
        "dataset": source["dataset"] or source["train_file"], "eval_data": source["eval_data"],
        "train_rows": len(train), "eval_rows": len(evaluation),
        "accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
        "trainable_params": summary.adapters[0].parameters if summary.adapters else summary.trainable_parameters,
        # head-only training spends part of its time building the feature cache: it counts
        "train_seconds": round(fitted.train_seconds, 1), "total_seconds": round(time.perf_counter() - started, 1),
        "adapter": str(folder), **(tuned.summary() if tuning else {}),
    }
    if opts.publish:
        results["commit_url"] = ak.publish(folder, opts.publish)
    report_results(results, opts.results_json)
    return results


def fit(opts: Options, train, evaluation, *, labels: list[str], source: dict) -> sweep.Fitted:
    """A fresh base with ``opts.strategy`` attached, trained on ``train`` and measured on ``evaluation``."""
    # A new label head and the adapter's initial weights come from the global RNG: seeded here, so
    # a run does not depend on what used it earlier in the process.
    transformers.set_seed(opts.seed)
    model, tokenizer = ak.load_base(opts.model, task="classification", label_names=labels, bits=opts.bits)
    ak.attach(model, opts.strategy, name=opts.name, **opts.adapter)
    # settings and over-long texts are checked before the first step
    metrics = ak.train(
        model, tokenizer, train, evaluation,
        learning_rate=opts.learning_rate, num_epochs=opts.num_epochs, batch_size=opts.batch_size,
        max_length=opts.max_length, length_policy=opts.length_policy, seed=opts.seed, max_steps=opts.max_steps,
        output_dir=f"{opts.output_dir}/checkpoints",
        recipe={"recipe": "text_classification", **dataclasses.asdict(opts), **source},
    )
    scores = {k: metrics.get(f"eval_{k}", float("nan")) for k in ("accuracy", "macro_f1", "loss")}
    return sweep.Fitted(model, tokenizer, scores, metrics["train_seconds"], name=opts.name, result=metrics)


def evaluate(opts: Options, fitted: sweep.Fitted, rows, *, labels: list[str]) -> dict[str, Any]:
    """A trained adapter's accuracy and macro-F1 on ``rows`` (the sweep's kept trial on the evaluation split)."""
    return evaluate_classifier(fitted.model, fitted.tokenizer, rows, max_length=opts.max_length, num_labels=len(labels))


if __name__ == "__main__":
    sys.exit(run_script(main))
