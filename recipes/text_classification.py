"""Text classification with any adapter strategy: the classic BERT fine-tuning scenario.

Loads labelled text (an embedded data set such as SST-2, local CSV/TSV/JSONL/parquet files,
or a Hub dataset id), attaches a strategy to a base model, trains with transformers' Trainer,
evaluates accuracy and macro-F1, saves the adapter with its card, prints a results table,
and optionally publishes to the Hub.

    python recipes/text_classification.py --strategy lora --dataset sst2
    python recipes/text_classification.py --config recipes/configs/sst2_minilm_lora.yaml --num-epochs 1
    adapterkit train text_classification --strategy head
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any

import adapterkit as ak
from adapterkit import data as akdata
from adapterkit.options import parse_options, recipe_main, report_results, run_script


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
    opts = parse_options(Options, argv, description=__doc__)
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

    # 2. base model and adapter
    model, tokenizer = ak.load_base(opts.model, task="classification", label_names=labels, bits=opts.bits)
    ak.attach(model, opts.strategy, name=opts.name, **opts.adapter)

    # 3. train and evaluate; settings and over-long texts are checked before the first step
    metrics = ak.train(
        model, tokenizer, train, evaluation,
        learning_rate=opts.learning_rate, num_epochs=opts.num_epochs, batch_size=opts.batch_size,
        max_length=opts.max_length, length_policy=opts.length_policy, seed=opts.seed, max_steps=opts.max_steps,
        output_dir=f"{opts.output_dir}/checkpoints",
        recipe={"recipe": "text_classification", **dataclasses.asdict(opts), **source},
    )

    # 4. save (and publish): once, from the first process when torchrun runs several
    if not metrics.trainer.is_world_process_zero():
        return {"rank": metrics.trainer.args.process_index, **metrics}
    summary = ak.summary(model)
    print(summary)
    folder = ak.save(model, f"{opts.output_dir}/adapter", name=opts.name)
    results = {
        "model": opts.model, "strategy": opts.strategy, "bits": opts.bits,
        "dataset": source["dataset"] or source["train_file"], "eval_data": source["eval_data"],
        "train_rows": len(train), "eval_rows": len(evaluation),
        "accuracy": round(metrics.get("eval_accuracy", float("nan")), 4),
        "macro_f1": round(metrics.get("eval_macro_f1", float("nan")), 4),
        "trainable_params": summary.adapters[0].parameters if summary.adapters else summary.trainable_parameters,
        # head-only training spends part of its time building the feature cache: it counts
        "train_seconds": round(metrics["train_seconds"], 1), "total_seconds": round(time.perf_counter() - started, 1),
        "adapter": str(folder),
    }
    if opts.publish:
        results["commit_url"] = ak.publish(folder, opts.publish)
    report_results(results, opts.results_json)
    return results


if __name__ == "__main__":
    sys.exit(run_script(main))
