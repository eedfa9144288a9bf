"""Zero-shot and in-context few-shot prompting: no training, the baselines adapters must beat.

The same task prompt, label words and metric as ``recipes/fewshot_causal_lm.py``: with
``--shots 0`` the model sees only the instruction; with ``--shots k`` it also sees k solved
examples per class (drawn with the seed, classes alternating in a seeded order) before each
text, encoded once and reused from their KV cache. Defaults suit instruct models: the
tokenizer's chat template when it has one (``--chat false`` turns it off), label words from
the label names, and contextual calibration (``--calibration none`` for raw scores; the raw
accuracy is reported beside the calibrated one). ``--adapter`` loads a saved adapter first, so
trained adapters are evaluated by the very same code.

    python recipes/prompting.py --shots 0
    python recipes/prompting.py --shots 4 --seed 1 --max-eval-rows 200 --progress
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

from accelerate import PartialState

import adapterkit as ak
from adapterkit import data as akdata
from adapterkit.evaluate import evaluate_label_words
from adapterkit.options import parse_options, recipe_main, report_results, run_script
from adapterkit.prompting import PromptTemplate, balanced_examples


@dataclasses.dataclass
class Options:
    """Zero/few-shot prompting of a causal LM, scored like the few-shot recipe."""

    model: str = "smollm2-135m"
    adapter: str | None = None          # a saved adapter (folder or Hub id) to load first
    bits: int | None = None
    dataset: str | None = "sst2"       # sst2, trec, ag_news or a Hub dataset id; train_file wins over it
    train_file: str | None = None      # labelled rows: in-context examples are drawn from them
    eval_file: str | None = None       # needs train_file; default: 10% of train_file held out
    text_column: str = "text"
    label_column: str = "label"
    label_names: list | None = None
    label_words: list | None = None     # default: the label names, lower-cased
    instruction: str = "Classify the sentiment of the following text."
    text_prefix: str = "Text: "
    answer_prefix: str = "Answer:"      # plain prompts only; under a chat template the answer is the reply
    chat: bool | None = None            # the tokenizer's chat template; default: when it has one
    calibration: str | None = "contextual"  # or none: raw label-word scores
    shots: int = 0                      # in-context examples per class
    predict: str = "scoring"
    progress: bool = False              # a tqdm bar over the evaluation batches
    batch_size: int = 8
    seed: int = 0
    max_eval_rows: int | None = None
    results_json: str | None = None


@recipe_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse_options(Options, argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    source = akdata.data_source(dataset=opts.dataset, train_file=opts.train_file, eval_file=opts.eval_file)
    train, evaluation, labels = akdata.classification_splits(
        dataset=opts.dataset, train_file=opts.train_file, eval_file=opts.eval_file, text_column=opts.text_column,
        label_column=opts.label_column, label_names=opts.label_names, seed=opts.seed,
    )
    evaluation = akdata.subset(evaluation, opts.max_eval_rows, seed=opts.seed)
    words = opts.label_words or [name.lower() for name in labels]
    examples: list[tuple[str, str]] = []
    if opts.shots:
        picked = akdata.few_shot(train, opts.shots, seed=opts.seed)
        examples = balanced_examples(picked["text"][:], picked["label"][:], words, seed=opts.seed)
    template = PromptTemplate(instruction=opts.instruction, text_prefix=opts.text_prefix,
                              answer_prefix=opts.answer_prefix, chat=opts.chat)
    calibration = None if str(opts.calibration).lower() in ("none", "false", "") else opts.calibration

    # Nothing here is split across processes: under torchrun the first one evaluates and reports.
    if not PartialState().is_main_process:
        return {}
    model, tokenizer = ak.load_base(opts.model, task="causal-lm", bits=opts.bits)
    if opts.adapter:
        ak.load(model, opts.adapter)
    metrics = evaluate_label_words(model, tokenizer, evaluation, words, template=template, examples=examples,
                                   method=opts.predict, calibration=calibration, batch_size=opts.batch_size,
                                   show_progress=opts.progress)
    results = {
        "model": opts.model, "adapter": opts.adapter,
        "dataset": source["dataset"] or source["train_file"], "eval_data": source["eval_data"],
        "shots_per_class": opts.shots, "seed": opts.seed, "predict": opts.predict, "eval_rows": len(evaluation),
        "chat_template": template.uses_chat(tokenizer), "calibration": calibration if opts.predict == "scoring" else None,
        "label_words": words, **{k: _rounded(v) for k, v in metrics.items() if k not in ("rows", "seconds")},
        "eval_seconds": round(metrics["seconds"], 1),
    }
    report_results(results, opts.results_json)
    return results


def _rounded(value: Any) -> Any:
    return [round(v, 4) for v in value] if isinstance(value, list) else round(value, 4)


if __name__ == "__main__":
    sys.exit(run_script(main))
