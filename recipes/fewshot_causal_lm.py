"""Few-shot adaptation of a causal LM: k examples per class, a task prompt, label-word scoring.

The model reads "Review: ...\nSentiment:" (a task's config sets its own instruction and
prefixes) and learns (with LoRA by default) to continue with the right label word from k
examples per class. It
predicts by comparing the likelihood of each label word (or, with ``--predict generation``,
by generating an answer), so the same evaluation serves the zero/few-shot prompting
baselines in ``recipes/prompting.py``.

    python recipes/fewshot_causal_lm.py --k 16 --seed 1
    python recipes/fewshot_causal_lm.py --config recipes/configs/sst2_smollm2_fewshot.yaml
    python recipes/fewshot_causal_lm.py --sweep learning_rate=3e-4,1e-3 num_epochs=3,5   # dev: 200 other training rows
    python recipes/fewshot_causal_lm.py --ensemble 3

``--ensemble N`` (scoring only) trains N adapters on the same k examples, member ``i`` seeded
``seed + 1000 * i`` (member 0 is the plain run), all on one base under the names ``NAME``,
``NAME-1``, ...; a row's prediction is the label word with the highest mean probability over the
members (each member's distribution calibrated first when calibration is on). It costs N
trainings and N evaluations. Member 0 is saved to ``OUTPUT_DIR/adapter``, member ``i`` to
``OUTPUT_DIR/adapter-i``; each folder alone is a plain adapter (``adapterkit eval`` scores one
member, not the ensemble).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from typing import Any

import torch
import transformers

import adapterkit as ak
import adapterkit.sweep as sweep
from adapterkit import data as akdata
from adapterkit.evaluate import evaluate_label_words
from adapterkit.metrics import label_metrics
from adapterkit.options import recipe_main, report_results, run_script
from adapterkit.prompting import PromptTemplate, score_texts

#: Member ``i`` of an ensemble trains with seed ``seed + MEMBER_SEED_STEP * i``.
MEMBER_SEED_STEP = 1000


@dataclasses.dataclass
class Options:
    """Few-shot causal-LM classification: train an adapter on k examples per class."""

    model: str = "smollm2-135m"
    strategy: str = "lora"
    adapter: dict = dataclasses.field(default_factory=dict)
    bits: int | None = None
    dataset: str | None = "sst2"       # sst2, trec, ag_news or a Hub dataset id; train_file wins over it
    train_file: str | None = None      # CSV/TSV/JSONL/parquet with text and label columns
    eval_file: str | None = None       # needs train_file; default: 10% of train_file held out
    text_column: str = "text"
    label_column: str = "label"
    label_names: list | None = None
    label_words: list | None = None     # default: the label names, lower-cased
    instruction: str = ""               # a line before the text; the SST-2 defaults need none
    text_prefix: str = "Review: "       # put before each text
    answer_prefix: str = "Sentiment:"   # the label word follows it after a space
    k: int = 16                         # training examples per class
    predict: str = "scoring"            # or "generation"
    calibration: str | None = "contextual"  # of the label-word scores at evaluation; none: raw
    learning_rate: float | None = 1e-3
    num_epochs: float = 5.0
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0
    max_steps: int = -1
    ensemble: int = 1                   # adapters trained on the same k examples, probabilities averaged
    max_eval_rows: int | None = None
    output_dir: str = "runs/fewshot"
    name: str = "default"
    publish: str | None = None
    results_json: str | None = None


@recipe_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    # Under --sweep the shots (k, seed) stay those of the plain run; dev rows are 200 other training rows.
    opts, tuning = sweep.parse_options(Options, argv, description=__doc__, fixed=(*sweep.FIXED_OPTIONS, "k", "seed"),
                                       dev=200)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if opts.predict not in ("scoring", "generation"):
        raise ak.InvalidOptionError(f"predict must be 'scoring' or 'generation', got {opts.predict!r}.")
    if not isinstance(opts.ensemble, int) or opts.ensemble < 1:
        raise ak.InvalidOptionError(f"ensemble must be a whole number of adapters >= 1, got {opts.ensemble!r}.")
    if opts.ensemble > 1 and opts.predict != "scoring":
        raise ak.InvalidOptionError("ensemble averages label-word probabilities: it needs --predict scoring.")

    # 1. data: k shots per class, the full evaluation split
    source = akdata.data_source(dataset=opts.dataset, train_file=opts.train_file, eval_file=opts.eval_file)
    train, evaluation, labels = akdata.classification_splits(
        dataset=opts.dataset, train_file=opts.train_file, eval_file=opts.eval_file, text_column=opts.text_column,
        label_column=opts.label_column, label_names=opts.label_names, seed=opts.seed,
    )
    shots = akdata.few_shot(train, opts.k, seed=opts.seed)
    evaluation = akdata.subset(evaluation, opts.max_eval_rows, seed=opts.seed)
    prompting(opts, labels)  # label words checked before the model loads

    # 2-3. model, adapter, training on the k-shot prompts, classification of the evaluation split (see fit);
    # with --sweep, once per trial scored on dev rows, then once more for the configuration picked
    if tuning:
        tuned = tuning.run(opts, shots, evaluation, fit=functools.partial(fit, labels=labels, source=source),
                           evaluate=functools.partial(evaluate, labels=labels),
                           dev=tuning.dev_split(train, exclude=shots)[1])
        opts, fitted = tuned.options, tuned.fitted
        print(tuned.table())
    else:
        fitted = fit(opts, shots, evaluation, labels=labels, source=source)
    if not fitted.result.trainer.is_world_process_zero():  # torchrun: print, save and publish once
        return fitted.result
    model, metrics, train_metrics = fitted.model, fitted.metrics, fitted.result
    print(ak.summary(model))

    # 4. save and report
    folders = [ak.save(model, f"{opts.output_dir}/adapter" + (f"-{i}" if i else ""), name=name,
                       metrics={f"eval_{k}": metrics[k] for k in ("accuracy", "macro_f1")})
               for i, name in enumerate(member_names(opts))]
    folder = folders[0]
    results = {
        "model": opts.model, "strategy": opts.strategy, "bits": opts.bits,
        "dataset": source["dataset"] or source["train_file"], "eval_data": source["eval_data"],
        "k_per_class": opts.k, "seed": opts.seed, "predict": opts.predict, "eval_rows": len(evaluation),
        "accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
        "train_loss": round(train_metrics["train_loss"], 4), "train_seconds": round(fitted.train_seconds, 1),
        "eval_seconds": round(metrics["seconds"], 1),
        "adapter": str(folder), **(tuned.summary() if tuning else {}),
    }
    if opts.ensemble > 1:
        results.update(ensemble=opts.ensemble, members=[str(f) for f in folders],
                       member_accuracy=metrics["member_accuracy"])
    if opts.publish:
        results["commit_url"] = ak.publish(folder, opts.publish)
    report_results(results, opts.results_json)
    return results


def prompting(opts: Options, labels: list[str]) -> tuple[list[str], PromptTemplate, str | None]:
    """The label words, prompt template and calibration that ``opts`` asks for."""
    words = opts.label_words or [name.lower() for name in labels]
    if len(words) != len(labels):
        raise ak.InvalidOptionError(f"{len(words)} label_words for {len(labels)} labels ({labels}).")
    # Plain prompts (no chat template): the adapter is trained and evaluated on the same rendered text.
    template = PromptTemplate(instruction=opts.instruction, text_prefix=opts.text_prefix,
                              answer_prefix=opts.answer_prefix, chat=False)
    calibration = None if str(opts.calibration).lower() in ("none", "false", "") else opts.calibration
    return words, template, calibration


def member_names(opts: Options) -> list[str]:
    """The adapter names of the ensemble's members on the model (just ``opts.name`` without one)."""
    return [opts.name] + [f"{opts.name}-{i}" for i in range(1, opts.ensemble)]


def fit(opts: Options, shots, evaluation, *, labels: list[str], source: dict) -> sweep.Fitted:
    """A fresh base with an adapter (or ``opts.ensemble`` of them) trained on the k-shot prompts, then scored."""
    words, template, _ = prompting(opts, labels)
    pairs = zip(shots["text"][:], shots["label"][:])
    rows = [{"prompt": template.render(t), "completion": " " + words[y]} for t, y in pairs]
    model, tokenizer = ak.load_base(opts.model, task="causal-lm", bits=opts.bits)
    started, results = time.perf_counter(), []
    for i, name in enumerate(member_names(opts)):
        seed = opts.seed + MEMBER_SEED_STEP * i
        # The adapter's initial weights (LoRA's random A) come from the global RNG: seeded here, so a
        # run does not depend on what used it earlier in the process.
        transformers.set_seed(seed)
        ak.attach(model, opts.strategy, name=name, **opts.adapter)
        results.append(ak.train(
            model, tokenizer, rows, name=name, learning_rate=opts.learning_rate, num_epochs=opts.num_epochs,
            batch_size=opts.batch_size, max_length=opts.max_length, seed=seed, max_steps=opts.max_steps,
            output_dir=f"{opts.output_dir}/checkpoints" + (f"-{i}" if i else ""), eval_strategy="no",
            recipe={"recipe": "fewshot_causal_lm", **dataclasses.asdict(opts), **source, "label_words": words,
                    "ensemble_member": i},
        ))
    train_metrics = results[0]  # the report's train loss and Trainer are member 0's
    ak.use(model, opts.name)
    fitted = sweep.Fitted(model, tokenizer, {}, time.perf_counter() - started, name=opts.name, result=train_metrics)
    if train_metrics.trainer.is_world_process_zero():  # torchrun: evaluate (and later save) once
        fitted.metrics = evaluate(opts, fitted, evaluation, labels=labels)
    return fitted


def evaluate(opts: Options, fitted: sweep.Fitted, rows, *, labels: list[str]) -> dict[str, Any]:
    """Classify ``rows`` by the label words with the trained adapter (or the ensemble's mean probabilities)."""
    words, template, calibration = prompting(opts, labels)
    if opts.ensemble == 1:
        return evaluate_label_words(fitted.model, fitted.tokenizer, rows, words, template=template,
                                    method=opts.predict, calibration=calibration)
    started = time.perf_counter()
    probabilities = []
    for name in member_names(opts):
        ak.use(fitted.model, name)
        scores = score_texts(fitted.model, fitted.tokenizer, rows["text"][:], words, template=template,
                             calibration=calibration)
        probabilities.append(scores.scores.log_softmax(-1).exp())  # calibrated scores renormalized
    ak.use(fitted.model, opts.name)
    truth = rows["label"][:]
    return {**_metrics(torch.stack(probabilities).mean(0), truth), "rows": len(truth),
            "seconds": time.perf_counter() - started,
            "member_accuracy": [round(_metrics(p, truth)["accuracy"], 4) for p in probabilities]}


def _metrics(probabilities: torch.Tensor, labels: list[int]) -> dict[str, Any]:
    return label_metrics(probabilities.argmax(-1).tolist(), labels, probabilities.shape[-1])


if __name__ == "__main__":
    sys.exit(run_script(main))
