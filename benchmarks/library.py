"""An adapter library on smollm2-135m, and leave-one-task-out composition from it (issue 11, part 4).

``python -m benchmarks.library [--tasks sst2 trec ag_news] [--seeds 0 1 2] [--rows 128]
[--eval-rows 200] [--dev-rows 64] [--methods ...] [--compose-loss raw|calibrated] [--fold-check]
[--quick] [--out benchmarks/results/library.json]`` prints a table and writes the JSON, a
markdown table and a PNG beside it; ``--report JSON`` redoes the table and PNG of a run stopped
early; ``--add-to JSON`` adds more methods or seeds to a result with the same data settings.

1. The library: one LoRA task adapter per task of ``shared/data``, trained on ``--rows`` rows for
   one epoch: SST-2, TREC and AG News as label-word tasks, self-instruct and GSM8K as generation
   tasks. Every task is written in one prompt format (an instruction line, ``Text: ...``,
   ``Answer:`` and the answer), so the adapters learn compatible things and can be composed.
   The adapters are saved under ``--cache`` (default ``runs/library-adapters/``, not in git),
   one folder per task and settings, and reused when present.
2. Leave-one-task-out, for each label-word task T: ``ak.compose`` searches the weights of the
   OTHER tasks' adapters (CMA-ES on the few-shot label-word loss + L1) from k examples per class
   of T, beside, on the same examples (per seed) and the same evaluation rows:
   zero-shot (same prompt); in-context (as many of the
   examples as fit in ``--icl-tokens``, classes alternating); few-shot LoRA trained on them (the
   defaults of ``recipes/fewshot_causal_lm.py``, read from its ``Options``); and SetFit
   (minilm-l6 body) when the ``setfit`` package can be imported (``--setfit-path`` adds a folder
   it was installed into; otherwise it is recorded as skipped, with why).
   Diagnostics (seed-free): each candidate adapter alone on T, and T's own library adapter (the
   one left out; what a trained adapter reaches), on ``--diagnose-rows`` of the same rows.
   Scoring: every label-word run is scored raw and contextually calibrated in one pass; which
   of the two a run reports as its ``accuracy`` is chosen by its accuracy on ``--dev-rows``
   rows held out of T's training split (the examples are drawn from the rest), never on the
   evaluation rows. Both are kept. (Calibration helps the bare base and in-context prompts,
   whose label-word prior is skewed, and can hurt adapters trained on the label words.)
3. Compute: wall seconds of each method's adaptation and evaluation; the tokens each training-
   based method processes: few-shot LoRA forward+backward tokens (rows x epochs), composition
   forward tokens (evaluations x the examples' tokens). Forward-equivalents count a training
   token as 3 forwards (backward ~ 2x forward, the usual 6N vs 2N FLOP rule). Composition
   records its objective after every evaluation and its best weights after every CMA-ES
   generation: the search is deterministic, so these say exactly what fewer evaluations
   would have found. ``--fold-check`` runs the first task's first-seed composition a second
   time through the adapter (``fold=False``), and once more with the instruction prefix in
   every row, to time what folding the update into the base weights and encoding the shared
   prefix once per batch save, and to show that they find the same weights.

``--quick`` runs the whole code path in seconds on a tiny random Llama (built in a temporary
folder, unless ``--model`` names one) with a few rows: the numbers mean nothing, the shape does.
``--threads`` (default 1): on the shared 2-core machine one thread measures the code, not the load.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import adapterkit as ak
import adapterkit.models as akmodels
from adapterkit import data as akdata
from adapterkit.cli import load_recipe
from adapterkit.compat import transformers as transformers_compat
from adapterkit.prompting import CONTENT_FREE, PromptTemplate, balanced_examples, contextual_calibration
from benchmarks.common import ROOT, environment, run_side, side_arguments, table, write_result

logger = logging.getLogger("benchmarks.library")

TARGETS = {"compose_minus_zero_shot": 0.05, "compose_compute_fraction_of_fewshot_lora": 0.1}
METHODS = ("zero_shot", "in_context", "fewshot_lora", "compose", "setfit")


@dataclasses.dataclass(frozen=True)
class LabelTask:
    """A classification task cast as label words: ``instruction``, ``Text: ...``, ``Answer: <word>``."""

    dataset: str
    eval_split: str
    words: tuple[str, ...]
    question: str

    @property
    def template(self) -> PromptTemplate:
        instruction = f"{self.question} Answer with one of: {', '.join(self.words)}."
        return PromptTemplate(instruction=instruction, text_prefix="Text: ", answer_prefix="Answer:", chat=False)


LABEL_TASKS = {
    "sst2": LabelTask("sst2", "dev", ("negative", "positive"), "Classify the sentiment of the text."),
    # TREC's coarse names (ABBR, DESC, ...) spelt out: each is one smollm2 token after a space.
    "trec": LabelTask("trec", "test", ("abbreviation", "description", "entity", "person", "location", "number"),
                      "Classify what kind of answer the question asks for."),
    "ag_news": LabelTask("ag_news", "test", ("world", "sports", "business", "technology"),
                         "Classify the topic of the news article."),
}
GENERATION_TASKS = ("self_instruct", "gsm8k")
LIBRARY = (*LABEL_TASKS, *GENERATION_TASKS)
GSM8K_INSTRUCTION = "Solve the math word problem. Show the steps, then the final number after ####."

FULL = {"rows": 128, "eval_rows": 200, "dev_rows": 64, "diagnose_rows": 80, "library_epochs": 1.0, "library_lr": 2e-3,
        "library_max_length": 128, "k": 16, "compose_evaluations": 25, "compose_l1": 0.05, "compose_loss": "raw",
        "compose_prefix": "shared",
        "icl_tokens": 1024, "setfit_iterations": 5}
QUICK = {"rows": 8, "eval_rows": 12, "dev_rows": 6, "diagnose_rows": 6, "library_epochs": 1.0, "library_lr": 2e-3,
         "library_max_length": 64, "k": 2, "compose_evaluations": 10, "compose_l1": 0.05, "compose_loss": "raw",
         "compose_prefix": "shared",
         "icl_tokens": 200, "setfit_iterations": 1}


# --- data ---------------------------------------------------------------------------------------
def label_rows(task: str, table_: datasets.Dataset) -> list[dict[str, str]]:
    """``prompt``/``completion`` rows of a label-word task (what ``ak.train`` reads)."""
    spec = LABEL_TASKS[task]
    template = spec.template
    return [{"prompt": template.render(t), "completion": " " + spec.words[y]}
            for t, y in zip(table_["text"][:], table_["label"][:])]


def library_rows(task: str, rows: int) -> list[dict[str, str]]:
    """The first ``rows`` training rows of ``task`` in the shared prompt format (a fixed draw, seed 0)."""
    if task in LABEL_TASKS:
        train, _ = akdata.local_dataset(LABEL_TASKS[task].dataset, "train")
        return label_rows(task, akdata.subset(train, rows, seed=0))
    if task == "self_instruct":
        folder = akdata.data_dir() / "self_instruct"
        parts = [akdata.load_instructions(folder / f) for f in ("seed_tasks.jsonl", "user_oriented_instructions.jsonl")]
        table_ = datasets.concatenate_datasets(parts).shuffle(seed=0).select(range(min(rows, sum(map(len, parts)))))
        return [{"prompt": PromptTemplate(instruction=r["instruction"], chat=False).render(r["input"]),
                 "completion": " " + r["output"]} for r in table_]
    if task == "gsm8k":
        table_ = akdata.load_table(akdata.data_dir() / "gsm8k" / "train.jsonl")
        table_ = table_.shuffle(seed=0).select(range(min(rows, len(table_))))
        template = PromptTemplate(instruction=GSM8K_INSTRUCTION, chat=False)
        return [{"prompt": template.render(r["question"]), "completion": " " + r["answer"]} for r in table_]
    raise ak.InvalidOptionError(f"Unknown library task {task!r}; choose from {', '.join(LIBRARY)}.")


def train_tokens(tokenizer: Any, rows: list[dict[str, str]], max_length: int) -> int:
    """Tokens ``ak.train`` feeds per epoch: prompt + completion + EOS, cut to ``max_length``."""
    eos = tokenizer.eos_token or ""
    ids = tokenizer([r["prompt"] + r["completion"] + eos for r in rows])["input_ids"]
    return sum(min(len(i), max_length) for i in ids)


def task_split(task: str, settings: dict[str, Any]) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]:
    """T's example pool, its dev rows and the fixed evaluation rows (all seed 0).

    The dev rows are carved from the training split (``dev_rows``, stratified) and the examples
    are drawn from the rest, so choosing raw or calibrated scores on the dev rows never looks at
    the evaluation rows nor at the examples a method was fitted to.
    """
    spec = LABEL_TASKS[task]
    train, _ = akdata.local_dataset(spec.dataset, "train")
    pool, dev = akdata.stratified_split(train, settings["dev_rows"], seed=0)
    evaluation, _ = akdata.local_dataset(spec.dataset, spec.eval_split)
    return pool, dev, akdata.subset(evaluation, settings["eval_rows"], seed=0)


# --- the library --------------------------------------------------------------------------------
def library_key(model_name: str, task: str, settings: dict[str, Any]) -> str:
    """The cache folder name of ``task``'s adapter: what changes it changes the name."""
    what = {"model": model_name, "task": task, "rows": settings["rows"], "epochs": settings["library_epochs"],
            "lr": settings["library_lr"], "max_length": settings["library_max_length"], "format": 1,
            "label_task": dataclasses.asdict(LABEL_TASKS[task]) if task in LABEL_TASKS else None}
    return f"{task}-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]}"


def build_library(model: Any, tokenizer: Any, model_name: str, settings: dict[str, Any], cache: Path) -> dict[str, Any]:
    """Train (or reload from ``cache``) one adapter per library task; loaded on ``model`` under the task's name."""
    out = {}
    for task in LIBRARY:
        folder = cache / library_key(model_name, task, settings)
        info_file = folder / "library.json"
        if info_file.is_file():
            ak.load(model, str(folder), name=task)
            out[task] = {**json.loads(info_file.read_text()), "cached": True}
            logger.info("library: reused %s from %s", task, folder)
            continue
        rows = library_rows(task, settings["rows"])
        ak.attach(model, "lora", name=task)
        started = time.perf_counter()
        metrics = ak.train(model, tokenizer, rows, name=task, learning_rate=settings["library_lr"],
                           num_epochs=settings["library_epochs"], batch_size=8,
                           max_length=settings["library_max_length"], seed=0, eval_strategy="no",
                           output_dir=str(cache / "checkpoints" / task), recipe={"benchmark": "library", "task": task})
        seconds = time.perf_counter() - started
        info = {"task": task, "rows": len(rows), "train_seconds": round(seconds, 1),
                "train_loss": round(float(metrics["train_loss"]), 4),
                "train_tokens": int(train_tokens(tokenizer, rows, settings["library_max_length"]) * settings["library_epochs"]),
                "folder": str(folder)}
        ak.save(model, str(folder), name=task)
        (folder / "library.json").write_text(json.dumps(info, indent=2) + "\n")
        out[task] = {**info, "cached": False}
        logger.info("library: trained %s in %.0f s (loss %.3f)", task, seconds, info["train_loss"])
    return out


# --- the methods --------------------------------------------------------------------------------
def evaluate(model: Any, tokenizer: Any, task: str, rows: datasets.Dataset, adapter: str | None,
             examples: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Label-word accuracy of ``adapter`` (None: the bare base) on ``rows``, calibrated and raw (one pass)."""
    spec = LABEL_TASKS[task]
    ak.use(model, adapter)
    result = ak.evaluate_label_words(model, tokenizer, rows, list(spec.words), template=spec.template,
                                     examples=examples or (), calibration="contextual")
    keep = ("accuracy", "macro_f1", "class_shares", "raw_accuracy", "raw_macro_f1", "raw_class_shares", "seconds")
    return {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v] if isinstance(v, list) else v)
            for k, v in result.items() if k in keep}


def scored(model: Any, tokenizer: Any, task: str, dev: datasets.Dataset, evaluation: datasets.Dataset,
           adapter: str | None, examples: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Evaluate on the dev rows and the evaluation rows, each scored calibrated and raw.

    ``accuracy`` is the scoring this run's dev rows prefer (calibrated on a tie), ``scoring`` says
    which, from ``dev_calibrated`` and ``dev_raw``; both are kept (``calibrated_accuracy``,
    ``raw_accuracy``). A seeded method's summary chooses from its dev rows pooled over its seeds
    (:func:`method_scoring`).
    """
    on_dev = evaluate(model, tokenizer, task, dev, adapter, examples)
    result = evaluate(model, tokenizer, task, evaluation, adapter, examples)
    raw = on_dev["raw_accuracy"] > on_dev["accuracy"]
    chosen = {"accuracy": result["raw_accuracy"], "macro_f1": result["raw_macro_f1"],
              "class_shares": result["raw_class_shares"]} if raw else {}
    return {**result, "calibrated_accuracy": result["accuracy"], "calibrated_macro_f1": result["macro_f1"], **chosen,
            "scoring": "raw" if raw else "calibrated", "dev_calibrated": on_dev["accuracy"],
            "dev_raw": on_dev["raw_accuracy"], "dev_seconds": on_dev["seconds"]}


def fitting_examples(tokenizer: Any, task: str, shots: datasets.Dataset, seed: int, budget: int) -> list[tuple[str, str]]:
    """The balanced, shuffled demonstrations, as many as fit in ``budget`` tokens (a prefix of them)."""
    spec = LABEL_TASKS[task]
    examples = balanced_examples(shots["text"][:], shots["label"][:], list(spec.words), seed=seed)
    n = len(examples)
    while n and len(tokenizer(spec.template.render("", examples[:n]))["input_ids"]) > budget:
        n -= 1
    return examples[:n]


def _left_padded(rows: list[list[int]], pad: int, key: str = "", after: int = 0) -> dict[str, torch.Tensor]:
    """Rows left-padded, with positions counted from ``after`` (the length of a cached prefix they follow)."""
    width = max(map(len, rows))
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {f"{key}input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            f"{key}attention_mask": torch.cat([torch.ones(len(rows), after, dtype=mask.dtype), mask], 1),
            f"{key}position_ids": after + (mask.cumsum(-1) - 1).clamp(min=0)}


def shared_length(sequences: list[list[int]]) -> int:
    """How many leading token ids all ``sequences`` share, leaving each at least one of its own."""
    limit = min(map(len, sequences)) - 1
    shared = 0
    while shared < limit and len({ids[shared] for ids in sequences}) == 1:
        shared += 1
    return shared


def label_word_batches(tokenizer: Any, task: str, shots: datasets.Dataset, size: int = 16, *,
                       calibrated: bool = False, shared_prefix: bool = False) -> list[dict[str, torch.Tensor]]:
    """The examples as batches for :func:`label_word_loss`, rows of similar length together.

    Left-padded with explicit positions, so every row's answer is read at the last position and
    the forward computes the vocabulary logits there only (``logits_to_keep=1``). ``calibrated``
    adds the content-free prompts to every batch (``cf_*``), so the loss is taken on the
    contextually calibrated scores, as the evaluation scores them. ``shared_prefix``: the
    leading tokens every prompt shares (the instruction line) go once per batch
    (``prefix_ids``), the loss encodes them once and every row reads their KV cache; the same
    loss (causal attention: a row's tokens see the same prefix), fewer tokens per forward.
    """
    spec = LABEL_TASKS[task]
    prompts = tokenizer([spec.template.render(t) for t in shots["text"][:]])["input_ids"]
    free = tokenizer([spec.template.render(t) for t in CONTENT_FREE])["input_ids"]
    labels = shots["label"][:]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    words = torch.tensor([tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in spec.words])
    # Whole prompts tokenized, then split at their common token prefix: no boundary can tokenize differently.
    cut = shared_length(prompts + (free if calibrated else [])) if shared_prefix else 0
    shared = {"prefix_ids": torch.tensor([prompts[0][:cut]])} if cut else {}
    content_free = _left_padded([ids[cut:] for ids in free], pad, "cf_", cut)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = []
    for start in range(0, len(order), size):
        picked = order[start:start + size]
        batches.append({
            **_left_padded([prompts[i][cut:] for i in picked], pad, after=cut),  # input_ids first: compose counts rows by it
            **shared,
            "label": torch.tensor([labels[i] for i in picked]),
            "label_word_ids": words.expand(len(picked), -1),
            **(content_free if calibrated else {}),
        })
    return batches


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens :func:`label_word_loss` runs through the model for ``batch`` (a shared prefix once)."""
    cut = batch["prefix_ids"].shape[1] if "prefix_ids" in batch else 0
    masks = [batch[k][:, cut:] for k in ("attention_mask", "cf_attention_mask") if k in batch]
    return cut + int(sum(m.sum() for m in masks))


def label_word_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the label words only (first token of each), at each prompt's end.

    With content-free rows in the batch, on the calibrated scores: ``log softmax(raw) - log prior``,
    the prior being the mean label-word distribution of the content-free prompts (as
    :func:`adapterkit.prompting.contextual_calibration`), renormalised.
    """
    cache: dict[str, Any] = {}
    if "prefix_ids" in batch:
        out = model(input_ids=batch["prefix_ids"], use_cache=True, logits_to_keep=1)
        cache = {transformers_compat.cache_argument(model): transformers_compat.output_cache(out)}

    def word_logits(key: str) -> torch.Tensor:
        rows = batch[f"{key}input_ids"]
        options: dict[str, Any] = {}
        for argument, prefix in cache.items():
            # A copy per use: the forward appends the rows' keys and values to the cache it gets.
            expanded = copy.deepcopy(prefix)
            expanded.batch_repeat_interleave(len(rows))
            options = {argument: expanded, "use_cache": True}
        logits = model(input_ids=rows, attention_mask=batch[f"{key}attention_mask"],
                       position_ids=batch[f"{key}position_ids"], logits_to_keep=1, **options).logits[:, -1].float()
        return logits[:, batch["label_word_ids"][0]]

    scores = word_logits("")
    if "cf_input_ids" in batch:
        scores, _ = contextual_calibration(scores, word_logits("cf_"))
    return F.cross_entropy(scores, batch["label"])


def run_compose(model: Any, tokenizer: Any, task: str, shots: datasets.Dataset, seed: int,
                settings: dict[str, Any], *, fold: bool = True) -> tuple[str, dict[str, Any]]:
    """``ak.compose`` from the library minus ``task``; the composed adapter's name and its search record.

    The batches are tokenized before the clock starts: they do not depend on the weights, so a
    practitioner tokenizes them once (and the other methods' clocks do not count it either).
    """
    candidates = [t for t in LIBRARY if t != task]
    batches = label_word_batches(tokenizer, task, shots, calibrated=settings["compose_loss"] == "calibrated",
                                 shared_prefix=settings.get("compose_prefix") == "shared")
    name = f"composed-{task}-{seed}{'' if fold else '-unfolded'}"
    started = time.perf_counter()
    ak.compose(model, candidates, batches, name=name, loss_fn=label_word_loss, l1=settings["compose_l1"],
               max_evaluations=settings["compose_evaluations"], seed=seed, keep_candidates=True, fold=fold)
    seconds = time.perf_counter() - started
    recipe = ak.get_adapter_record(model, name).meta["merge"]
    search = recipe["search"]
    tokens = sum(map(batch_tokens, batches))
    return name, {
        "weights": {k: round(v, 4) for k, v in recipe["weights"].items()}, "adapt_seconds": round(seconds, 1),
        "evaluations": search["evaluations"], "loss": round(search["loss"], 4), "base_loss": round(search["base_loss"], 4),
        "curve": [round(v, 4) for v in search["curve"]], "evaluation": search["evaluation"],
        "generations": [{**g, "score": round(g["score"], 4), "weights": {k: round(v, 4) for k, v in g["weights"].items()}}
                        for g in search["generations"]],
        "example_tokens": tokens, "forward_tokens": tokens * search["evaluations"],
        "forward_rows": len(shots) * search["evaluations"],
    }


def fewshot_recipe_defaults() -> dict[str, Any]:
    """The training defaults of ``recipes/fewshot_causal_lm.py`` (read from its Options, so they follow it)."""
    options = load_recipe("fewshot_causal_lm").Options()
    keys = ("strategy", "adapter", "learning_rate", "num_epochs", "batch_size", "max_length")
    return {k: getattr(options, k) for k in keys}


def run_fewshot_lora(model: Any, tokenizer: Any, task: str, shots: datasets.Dataset, seed: int,
                     recipe: dict[str, Any], output_dir: Path) -> tuple[str, dict[str, Any]]:
    """Few-shot LoRA on the examples at the recipe's defaults; the adapter's name and its costs."""
    name = f"fewshot-{task}-{seed}"
    rows = label_rows(task, shots)
    ak.attach(model, recipe["strategy"], name=name, **recipe["adapter"])
    started = time.perf_counter()
    metrics = ak.train(model, tokenizer, rows, name=name, learning_rate=recipe["learning_rate"],
                       num_epochs=recipe["num_epochs"], batch_size=recipe["batch_size"],
                       max_length=recipe["max_length"], seed=seed, eval_strategy="no", output_dir=str(output_dir))
    seconds = time.perf_counter() - started
    tokens = int(train_tokens(tokenizer, rows, recipe["max_length"]) * recipe["num_epochs"])
    return name, {"adapt_seconds": round(seconds, 1), "train_loss": round(float(metrics["train_loss"]), 4),
                  "train_tokens": tokens, "train_rows": int(len(rows) * recipe["num_epochs"])}


# --- SetFit, in its own process (its package may live in a folder outside the venv) -----------
def setfit_side(settings: dict[str, Any]) -> dict[str, Any]:
    """SetFit on each seed's examples of one task, scored on the same evaluation rows."""
    if settings.get("setfit_path"):
        sys.path.append(settings["setfit_path"])
    torch.set_num_threads(settings["threads"])
    # Imported here: an optional heavy dependency that only this side needs (and that may live on setfit_path).
    import setfit

    body = akmodels.resolve_model(settings["setfit_body"]).path
    task = settings["task"]
    train, _, evaluation = task_split(task, settings)
    out = {"setfit_version": setfit.__version__, "body": settings["setfit_body"], "runs": []}
    for seed in settings["seeds"]:
        shots = akdata.few_shot(train, settings["k"], seed=seed)
        model = setfit.SetFitModel.from_pretrained(body)
        # Checkpoints would land in ./checkpoints (setfit's default); none are needed.
        args = setfit.TrainingArguments(num_iterations=settings["setfit_iterations"], num_epochs=1, batch_size=16,
                                        seed=seed, report_to="none", save_strategy="no",
                                        output_dir=tempfile.mkdtemp(prefix="library-setfit-"))
        trainer = setfit.Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(
            {"text": shots["text"][:], "label": shots["label"][:]}))
        started = time.perf_counter()
        trainer.train()
        adapt = time.perf_counter() - started
        started = time.perf_counter()
        preds = [int(p) for p in model.predict(evaluation["text"][:])]
        labels = evaluation["label"][:]
        out["runs"].append({"seed": seed, "accuracy": round(sum(p == y for p, y in zip(preds, labels)) / len(labels), 4),
                            "adapt_seconds": round(adapt, 1), "eval_seconds": round(time.perf_counter() - started, 1),
                            "pairs": 2 * settings["setfit_iterations"] * len(shots)})
    return out


def run_setfit(task: str, settings: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """SetFit's section for ``task``, or why it was skipped."""
    if settings.get("skip_setfit"):
        return {"skipped": settings["skip_setfit"]}
    side = {**settings, "task": task, "seeds": seeds}
    try:
        return run_side("benchmarks.library", "setfit", side)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1]
        logger.warning("SetFit on %s failed: %s", task, reason)
        return {"skipped": f"SetFit failed: {reason}"}


# --- one task, left out -------------------------------------------------------------------------
def summary(runs: list[dict[str, Any]], key: str = "accuracy") -> dict[str, Any]:
    """Mean, min and max of ``key`` over the runs, as ``accuracy_mean`` etc."""
    values = [r[key] for r in runs]
    return {"accuracy_mean": round(statistics.mean(values), 4), "accuracy_min": min(values), "accuracy_max": max(values)}


def method_scoring(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The scoring a method reports: the one its dev rows, pooled over its seeds, prefer (calibrated on a tie).

    One run's 64 dev rows are too few to choose by (a two-row difference would decide); every run
    of a method has the same number of dev rows, so the pooled accuracy is the mean of the runs'.
    """
    calibrated = statistics.mean(r["dev_calibrated"] for r in runs)
    raw = statistics.mean(r["dev_raw"] for r in runs)
    return {"scoring": "raw" if raw > calibrated else "calibrated", "dev_calibrated_mean": round(calibrated, 4),
            "dev_raw_mean": round(raw, 4)}


def start_task(model: Any, tokenizer: Any, task: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``task``'s seed-free part: zero-shot, and the diagnostics (each library adapter alone on it)."""
    _, dev, evaluation = task_split(task, settings)
    result: dict[str, Any] = {"eval_rows": len(evaluation), "dev_rows": len(dev), "k_per_class": settings["k"],
                              "label_words": list(LABEL_TASKS[task].words),
                              "instruction": LABEL_TASKS[task].template.instruction,
                              "zero_shot": scored(model, tokenizer, task, dev, evaluation, None)}
    if settings["diagnose_rows"]:
        diagnose = akdata.subset(evaluation, settings["diagnose_rows"], seed=0)
        result["diagnostics"] = {
            "rows": len(diagnose), "zero_shot": both_scorings(evaluate(model, tokenizer, task, diagnose, None)),
            "single_adapter": {c: both_scorings(evaluate(model, tokenizer, task, diagnose, c)) for c in LIBRARY},
        }
    for method in ("in_context", "fewshot_lora", "compose"):
        result[method] = {"runs": []}
    skip = settings["skip_setfit"] or ("not in --methods" if "setfit" not in settings["methods"] else None)
    result["setfit"] = {"skipped": skip} if skip else {"runs": []}
    return result


def both_scorings(result: dict[str, Any]) -> dict[str, float]:
    return {"calibrated": result["accuracy"], "raw": result["raw_accuracy"]}


def run_seed(model: Any, tokenizer: Any, task: str, result: dict[str, Any], seed: int, settings: dict[str, Any],
             recipe: dict[str, Any], scratch: Path) -> None:
    """Every seeded method on ``task`` with seed ``seed``'s examples; composition from the other adapters."""
    train, dev, evaluation = task_split(task, settings)
    shots = akdata.few_shot(train, settings["k"], seed=seed)
    methods = settings["methods"]
    if "in_context" in methods:
        examples = fitting_examples(tokenizer, task, shots, seed, settings["icl_tokens"])
        icl = scored(model, tokenizer, task, dev, evaluation, None, examples)
        result["in_context"]["runs"].append({"seed": seed, "examples": len(examples), **icl})
    if "fewshot_lora" in methods:
        name, cost = run_fewshot_lora(model, tokenizer, task, shots, seed, recipe, scratch / f"fewshot-{task}-{seed}")
        result["fewshot_lora"]["runs"].append({"seed": seed, **cost, **scored(model, tokenizer, task, dev, evaluation, name)})
        ak.detach(model, name)
    if "compose" in methods:
        name, cost = run_compose(model, tokenizer, task, shots, seed, settings)
        result["compose"]["runs"].append({"seed": seed, **cost, **scored(model, tokenizer, task, dev, evaluation, name)})
        ak.detach(model, name)
        if settings.get("fold_check") and seed == settings["seeds"][0] and task == settings["tasks"][0]:
            # The same search through the adapter, and with the prefix in every row: what folding and the
            # shared prefix save (wall seconds, tokens), and that they find the same weights.
            checks = {"compose_unfolded_check": ({"fold": False}, {}),
                      "compose_unshared_prefix_check": ({}, {"compose_prefix": "none"})}
            for key, (options, changed) in checks.items():
                name, cost = run_compose(model, tokenizer, task, shots, seed, {**settings, **changed}, **options)
                result[key] = {"seed": seed, **cost}
                ak.detach(model, name)
    if "setfit" in methods and "runs" in result["setfit"]:
        side = run_setfit(task, settings, [seed])
        if "skipped" in side:
            result["setfit"] = side
        else:
            result["setfit"]["runs"] += side.pop("runs")
            result["setfit"].update(side)
    done = {m: result[m]["runs"][-1]["accuracy"] for m in METHODS[1:] if result[m].get("runs")}
    logger.info("%s seed %d: zero-shot %.3f, %s", task, seed, result["zero_shot"]["accuracy"], done)
    finish_task(result)


def finish_task(result: dict[str, Any]) -> None:
    """Summaries over the seeds run so far, the compute ratios and the targets (where measured)."""
    for method in METHODS[1:]:
        runs = result[method].get("runs")
        if runs and "dev_raw" in runs[0]:
            result[method].update(method_scoring(runs))
            result[method].update(summary(runs, f"{result[method]['scoring']}_accuracy"))
        elif runs:
            result[method].update(summary(runs))
    if not result["compose"]["runs"]:
        return
    result["compose_minus_zero_shot"] = round(result["compose"]["accuracy_mean"] - result["zero_shot"]["accuracy"], 4)
    # The same difference with one scoring for both, whichever the dev rows chose.
    for scoring in ("calibrated", "raw"):
        key = f"{scoring}_accuracy"
        mean = statistics.mean(r[key] for r in result["compose"]["runs"])
        result[f"compose_minus_zero_shot_{scoring}"] = round(mean - result["zero_shot"][key], 4)
    result["met"] = {"compose_beats_zero_shot_by_5_points": result["compose_minus_zero_shot"]
                     >= TARGETS["compose_minus_zero_shot"]}
    if result["fewshot_lora"]["runs"]:
        result["compute"] = compute_ratios(result)
        result["met"]["compose_at_a_tenth_of_fewshot_lora_compute"] = (
            result["compute"]["compose_vs_lora_forward_equivalents"] <= TARGETS["compose_compute_fraction_of_fewshot_lora"])


def compute_ratios(result: dict[str, Any]) -> dict[str, float]:
    """Composition's cost as a fraction of few-shot LoRA's: forward-equivalent tokens and wall seconds."""
    lora = result["fewshot_lora"]["runs"]
    comp = result["compose"]["runs"]
    lora_fwd = statistics.mean(3 * r["train_tokens"] for r in lora)  # forward + backward ~ 3 forwards
    comp_fwd = statistics.mean(r["forward_tokens"] for r in comp)
    return {
        "fewshot_lora_forward_equivalents": round(lora_fwd), "compose_forward_tokens": round(comp_fwd),
        "compose_vs_lora_forward_equivalents": round(comp_fwd / lora_fwd, 3),
        "compose_vs_lora_wall_seconds": round(statistics.mean(r["adapt_seconds"] for r in comp)
                                              / max(statistics.mean(r["adapt_seconds"] for r in lora), 1e-9), 3),
    }


# --- report -------------------------------------------------------------------------------------


def rows_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per task and method."""
    out = []
    for task, r in result["tasks"].items():
        for method in METHODS:
            section = r[method]
            if "skipped" in section:
                out.append({"task": task, "method": method, "note": f"skipped: {section['skipped'][:60]}"})
                continue
            if "runs" not in section:
                out.append({"task": task, "method": method, "accuracy": section["accuracy"],
                            "calibrated": section.get("calibrated_accuracy"), "raw": section.get("raw_accuracy"),
                            "scoring": f"{section['scoring']} (dev {section['dev_calibrated']:.3f} / {section['dev_raw']:.3f})"
                            if "scoring" in section else None, "eval_s": section["seconds"]})
                continue
            runs = section["runs"]
            if not runs:
                continue
            dev = f" (dev {section['dev_calibrated_mean']:.3f} / {section['dev_raw_mean']:.3f})" if "scoring" in section else ""
            row = {"task": task, "method": method, "accuracy": section["accuracy_mean"],
                   "range": f"{section['accuracy_min']:.3f}-{section['accuracy_max']:.3f} ({len(runs)} seeds)",
                   "calibrated": mean_of(runs, "calibrated_accuracy"), "raw": raw_mean(section),
                   "scoring": f"{section['scoring']}{dev}" if "scoring" in section else None,
                   "adapt_s": statistics.mean(x.get("adapt_seconds", 0.0) for x in runs),
                   "eval_s": statistics.mean(x.get("eval_seconds", x.get("seconds", 0.0)) for x in runs)}
            if method == "fewshot_lora":
                row["tokens"] = f"{statistics.mean(x['train_tokens'] for x in runs):,.0f} fwd+bwd"
            elif method == "compose":
                row["tokens"] = f"{statistics.mean(x['forward_tokens'] for x in runs):,.0f} fwd"
            elif method == "in_context":
                row["note"] = f"{min(x['examples'] for x in runs)}-{max(x['examples'] for x in runs)} examples in context"
            out.append(row)
    return out


def mean_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return round(statistics.mean(values), 4) if values else None


def calibrated_mean(section: dict[str, Any]) -> float | None:
    """Mean calibrated accuracy of a method's section (None where it has no calibrated scores)."""
    return mean_of(section["runs"], "calibrated_accuracy") if "runs" in section else section.get("calibrated_accuracy")


def raw_mean(section: dict[str, Any]) -> float | None:
    """Mean uncalibrated accuracy of a method's section (None where it has no raw scores)."""
    runs = section.get("runs")
    if runs is None:
        return section.get("raw_accuracy")
    values = [r["raw_accuracy"] for r in runs if "raw_accuracy" in r]
    return statistics.mean(values) if values else None


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy per task and method (mean, min-max over seeds); adaptation seconds per method."""
    import matplotlib  # optional: only the PNG needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, r in result["tasks"].items() if "met" in r]  # those with at least one seed done
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        means, low, high = [], [], []
        for task in tasks:
            s = result["tasks"][task][method]
            mean = s.get("accuracy_mean", s.get("accuracy", 0.0))
            means.append(mean)
            low.append(mean - s.get("accuracy_min", mean))
            high.append(s.get("accuracy_max", mean) - mean)
        xs = [t + (i - len(METHODS) / 2 + 0.5) * width for t in range(len(tasks))]
        left.bar(xs, means, width, yerr=[low, high], capsize=3, label=method.replace("_", " "))
        for scoring, marker, values in (
                ("raw scores", "x", [raw_mean(result["tasks"][task][method]) for task in tasks]),
                ("calibrated scores", "_", [calibrated_mean(result["tasks"][task][method]) for task in tasks])):
            left.scatter([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
                         marker=marker, color="black", zorder=3, label=scoring if i == 0 else None)
    left.set(xticks=range(len(tasks)), xticklabels=tasks, ylabel="accuracy (scoring chosen on dev rows)",
             title=f"leave-one-task-out, k={result['settings']['k']} per class, {result['settings']['model']}")
    left.legend(fontsize=8)
    for i, method in enumerate(("fewshot_lora", "compose", "setfit")):
        values = [statistics.mean(x["adapt_seconds"] for x in result["tasks"][t][method].get("runs") or [{"adapt_seconds": 0}])
                  for t in tasks]
        right.bar([t + (i - 1) * 0.27 for t in range(len(tasks))], values, 0.27, label=method.replace("_", " "))
    right.set(xticks=range(len(tasks)), xticklabels=tasks, ylabel="adaptation wall seconds (1 thread)",
              title="what adapting costs")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quick_model(folder: Path) -> str:
    """A tiny random Llama with a word-level tokenizer over the label words, for ``--quick``."""
    words = sorted({w for spec in LABEL_TASKS.values() for w in spec.words})
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "<s>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                      bos_token_id=3, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                         bos_token="<s>").save_pretrained(folder)
    return str(folder)


def setfit_availability(path: str | None) -> str | None:
    """None when SetFit can run in a side process, else why not."""
    probe = [sys.executable, "-c", "import setfit"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (path, str(ROOT)) if p)}
    proc = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        return f"setfit is not importable{f' from {path}' if path else ''}: {proc.stderr.strip().splitlines()[-1]}"
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(LABEL_TASKS), choices=list(LABEL_TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", type=int, help="training rows per library adapter")
    parser.add_argument("--eval-rows", type=int, help="evaluation rows per task (the same for every method)")
    parser.add_argument("--dev-rows", type=int, help="rows held out of the training split that choose each run's scoring")
    parser.add_argument("--diagnose-rows", type=int, help="rows for the single-adapter diagnostics (0: skip them)")
    parser.add_argument("--compose-evaluations", type=int)
    parser.add_argument("--compose-loss", choices=["raw", "calibrated"],
                        help="label-word cross-entropy on the raw scores (LoraHub's) or the calibrated ones")
    parser.add_argument("--compose-prefix", choices=["shared", "none"],
                        help="encode the prompts' shared instruction prefix once per batch in the composition loss "
                             "(default) or in every row (the same loss, more tokens)")
    parser.add_argument("--model", default=None, help="default smollm2-135m (--quick: a tiny random Llama)")
    parser.add_argument("--cache", default=None, help="library adapters (default runs/library-adapters)")
    parser.add_argument("--setfit-path", default="/tmp/library-setfit" if Path("/tmp/library-setfit").is_dir() else None,
                        help="a folder setfit was installed into (pip --target), put on the side's path")
    parser.add_argument("--no-setfit", action="store_true")
    parser.add_argument("--methods", nargs="+", default=list(METHODS[1:]), choices=list(METHODS[1:]),
                        help="the seeded methods to run (zero-shot always runs)")
    parser.add_argument("--add-to", metavar="JSON",
                        help="add the --methods' runs to a result written before with the same data settings "
                             "(a long benchmark run in parts); written back to it unless --out says otherwise")
    parser.add_argument("--fold-check", action="store_true",
                        help="for the first seed and task, also run composition through the adapter (fold=False), "
                             "and with the prefix in every row, and time them")
    parser.add_argument("--quick", action="store_true", help="the code path on a tiny model, in seconds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="default benchmarks/results/library.json (--quick: under results/tmp)")
    parser.add_argument("--report", metavar="JSON", help="only print and plot a result written before (a run stopped early)")
    args = parser.parse_args(argv)
    if args.report:
        path = Path(args.report)
        result = json.loads(path.read_text())
        for task_result in result["tasks"].values():
            finish_task(task_result)  # the summaries as this code computes them
        report(result, path)
        write_result(path.parent, path.stem, result)  # with the summary report() adds
        return result
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    for key in ("rows", "eval_rows", "dev_rows", "diagnose_rows", "compose_evaluations", "compose_loss", "compose_prefix"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    scratch = Path(tempfile.mkdtemp(prefix="library-bench-"))
    cache = Path(args.cache or (scratch / "library" if args.quick else ROOT / "runs" / "library-adapters"))
    # The tiny base lives in the cache too, so a cached library is found again under the same path.
    model_name = args.model or (quick_model(cache / "tiny-base") if args.quick else "smollm2-135m")
    default_out = "benchmarks/results/tmp/library-quick.json" if args.quick else "benchmarks/results/library.json"
    out = Path(args.out or args.add_to or default_out)
    settings.update({"model": model_name, "threads": args.threads, "setfit_body": "minilm-l6",
                     "setfit_path": args.setfit_path, "tasks": args.tasks, "seeds": args.seeds, "cache": str(cache),
                     "methods": args.methods, "fold_check": args.fold_check})
    settings["skip_setfit"] = "--no-setfit" if args.no_setfit else setfit_availability(args.setfit_path)
    recipe = fewshot_recipe_defaults()
    if args.quick:
        recipe["num_epochs"] = 1.0
    model, tokenizer = ak.load_base(model_name, task="causal-lm")
    result: dict[str, Any] = {"environment": environment(), "targets": TARGETS, "settings": settings,
                              "fewshot_recipe_defaults": recipe, "tasks": {}}
    if args.add_to:
        result, settings = continued(Path(args.add_to), result)
    started = time.perf_counter()
    result["library"] = build_library(model, tokenizer, model_name, settings, cache)
    result["library_seconds"] = round(time.perf_counter() - started, 1)
    write_result(out.parent, out.stem, result)  # each section as it lands: a long run keeps what it measured
    for task in args.tasks:
        if task not in result["tasks"]:
            result["tasks"][task] = start_task(model, tokenizer, task, settings)
            write_result(out.parent, out.stem, result)
    # Seeds outside, tasks inside: a run stopped early still has every task at the seeds it finished.
    for seed in args.seeds:
        for task in args.tasks:
            run_seed(model, tokenizer, task, result["tasks"][task], seed, settings, recipe, scratch)
            write_result(out.parent, out.stem, result)
    result["environment"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_result(out.parent, out.stem, result)
    report(result, out)
    return result


def dev_pool(result: dict[str, Any], method: str, key: str) -> list[float]:
    """``key`` of every run of ``method`` (zero-shot: its one measurement per task) over the tasks."""
    sections = [r[method] for r in result["tasks"].values()]
    return [run[key] for s in sections for run in s.get("runs", [s]) if key in run]


#: the settings that decide the examples, the rows and the library: a run added to a result must share them
DATA_SETTINGS = ("model", "rows", "eval_rows", "dev_rows", "diagnose_rows", "k", "library_epochs", "library_lr",
                 "library_max_length", "icl_tokens", "setfit_iterations")


def continued(path: Path, new: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The result at ``path`` with this run's methods and environment recorded, and the settings to run with."""
    result = json.loads(path.read_text())
    old, settings = result["settings"], new["settings"]
    differ = {k: (old.get(k), settings.get(k)) for k in DATA_SETTINGS if old.get(k) != settings.get(k)}
    if differ:
        raise ak.InvalidOptionError(f"--add-to {path}: its data settings differ from this run's {differ}; "
                                    "pass the same ones (or write a new result).")
    if result["fewshot_recipe_defaults"] != new["fewshot_recipe_defaults"]:
        raise ak.InvalidOptionError(f"--add-to {path}: the few-shot recipe's defaults changed since it was written.")
    for task in settings["tasks"]:
        for method in settings["methods"]:
            section = result["tasks"].get(task, {}).get(method, {})
            done = {r["seed"] for r in section.get("runs", [])} & set(settings["seeds"])
            if done:
                raise ak.InvalidOptionError(f"--add-to {path}: {task} {method} already has seeds {sorted(done)}.")
    result.setdefault("added_runs", []).append({"environment": new["environment"], "settings": settings})
    merged = {**old, "methods": sorted(set(old["methods"]) | set(settings["methods"]), key=METHODS.index),
              "seeds": sorted(set(old["seeds"]) | set(settings["seeds"])),
              "tasks": [*old["tasks"], *(t for t in settings["tasks"] if t not in old["tasks"])]}
    # This run's own choices (what it runs, compose's options), on the shared data settings.
    run_settings = {**settings, **{k: old[k] for k in DATA_SETTINGS}}
    result["settings"] = {**merged, **{k: v for k, v in settings.items() if k.startswith("compose")}}
    return result, run_settings


def report(result: dict[str, Any], out: Path) -> str:
    """Print the table, the weights and the targets; write ``<out>.md`` and ``<out>.png`` beside the JSON."""
    result["met"] = {task: r["met"] for task, r in result["tasks"].items() if "met" in r}
    # A run stopped early (or --report on a partial file) says which seeds each task really has.
    result["seeds_completed"] = {task: [run["seed"] for run in r["compose"]["runs"]] for task, r in result["tasks"].items()}
    lines = [table(rows_of(result), ["task", "method", "accuracy", "range", "calibrated", "raw", "scoring", "adapt_s",
                                     "eval_s", "tokens", "note"]),
             "\naccuracy: with the scoring (calibrated or raw) the method's dev rows (held out of the training split, "
             "pooled over its seeds) prefer; calibrated and raw: every run scored each way; scoring: the choice "
             "(dev accuracy calibrated / raw)."]
    for task, r in result["tasks"].items():
        if "met" not in r:
            continue
        runs = r["compose"]["runs"]
        lines.append(
            f"\n{task}: compose - zero-shot = {r['compose_minus_zero_shot']:+.3f} (mean of {len(runs)} seeds, each with "
            f"its dev-chosen scoring; both calibrated: {r.get('compose_minus_zero_shot_calibrated', float('nan')):+.3f}, "
            f"both raw: {r.get('compose_minus_zero_shot_raw', float('nan')):+.3f}); met {r['met']}")
        lines.append(f"- compute vs few-shot LoRA: {r.get('compute')}")
        for run in runs:
            curve = run.get("curve") or []
            # The best objective after each CMA-ES generation: flat means more evaluations buy nothing.
            step = max(1, (len(curve) - 1) // 3) if curve else 1
            lines.append(f"- seed {run['seed']}: weights {run['weights']}; loss {run['loss']} (base {run['base_loss']}); "
                         f"best objective at evaluations 1, {', '.join(str(i + 1) for i in range(step, len(curve), step))}: "
                         f"{[curve[0], *curve[step::step]]}; evaluated {run.get('evaluation', '?')}")
        diag = r.get("diagnostics")
        if diag:
            lines.append(f"- on {diag['rows']} of the rows, zero-shot {diag['zero_shot']}; each library adapter alone "
                         f"(the left-out task's own adapter is the oracle): {diag['single_adapter']}")
        for key, what in (("compose_unfolded_check", "through the adapter (fold=False)"),
                          ("compose_unshared_prefix_check", "with the instruction prefix in every row")):
            if r.get(key):
                check, first = r[key], runs[0]
                lines.append(f"- the seed-{check['seed']} search {what}: {check['adapt_seconds']} s and "
                             f"{check['forward_tokens']:,} tokens vs {first['adapt_seconds']} s and "
                             f"{first['forward_tokens']:,}; weights {check['weights']}, loss {check['loss']}")
    lines.append("\nDev rows pooled over every task and seed, accuracy calibrated / raw: " + "; ".join(
        f"{method} {statistics.mean(d) if (d := dev_pool(result, method, 'dev_calibrated')) else float('nan'):.3f} / "
        f"{statistics.mean(d) if (d := dev_pool(result, method, 'dev_raw')) else float('nan'):.3f}"
        for method in METHODS if method != "setfit"))
    text = "\n".join(lines)
    print(text)
    out.with_suffix(".md").write_text(f"# Adapter library, leave-one-task-out ({result['settings']['model']})\n\n{text}\n")
    plot(result, out.with_suffix(".png"))
    return text


if __name__ == "__main__":
    if "--side" in sys.argv:
        side, side_settings = side_arguments()
        print(json.dumps(setfit_side(side_settings)))
    else:
        main()
