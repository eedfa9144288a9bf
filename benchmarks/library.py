"""An adapter library on smollm2-135m, and leave-one-task-out composition from it (issue 11, part 4).

``python -m benchmarks.library [--tasks sst2 trec ag_news] [--seeds 0 1 2] [--rows 128]
[--eval-rows 200] [--methods ...] [--compose-loss raw|calibrated] [--quick]
[--out benchmarks/results/library.json]`` prints a table and writes the JSON, a markdown table
and a PNG beside it; ``--report JSON`` redoes the table and PNG of a run stopped early.

1. The library: one LoRA task adapter per task of ``shared/data``, trained on ``--rows`` rows for
   one epoch: SST-2, TREC and AG News as label-word tasks, self-instruct and GSM8K as generation
   tasks. Every task is written in one prompt format (an instruction line, ``Text: ...``,
   ``Answer:`` and the answer), so the adapters learn compatible things and can be composed.
   The adapters are saved under ``--cache`` (default ``runs/library-adapters/``, not in git),
   one folder per task and settings, and reused when present.
2. Leave-one-task-out, for each label-word task T: ``ak.compose`` searches the weights of the
   OTHER tasks' adapters (CMA-ES on the few-shot label-word loss + L1) from k examples per class
   of T, beside, on the same examples (per seed) and the same evaluation rows:
   zero-shot (same prompt, contextual calibration as the library does); in-context (as many of the
   examples as fit in ``--icl-tokens``, classes alternating); few-shot LoRA trained on them (the
   defaults of ``recipes/fewshot_causal_lm.py``, read from its ``Options``); and SetFit
   (minilm-l6 body) when the ``setfit`` package can be imported (``--setfit-path`` adds a folder
   it was installed into; otherwise it is recorded as skipped, with why).
   Diagnostics (seed-free): each candidate adapter alone on T, and T's own library adapter (the
   one left out; what a trained adapter reaches), on ``--diagnose-rows`` of the same rows.
3. Compute: wall seconds of each method's adaptation and evaluation; the tokens each training-
   based method processes: few-shot LoRA forward+backward tokens (rows x epochs), composition
   forward tokens (evaluations x the examples' tokens). Forward-equivalents count a training
   token as 3 forwards (backward ~ 2x forward, the usual 6N vs 2N FLOP rule).

``--quick`` runs the whole code path in seconds on a tiny random Llama (built in a temporary
folder, unless ``--model`` names one) with a few rows: the numbers mean nothing, the shape does.
``--threads`` (default 1): on the shared 2-core machine one thread measures the code, not the load.
"""

from __future__ import annotations

import argparse
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

FULL = {"rows": 128, "eval_rows": 200, "diagnose_rows": 80, "library_epochs": 1.0, "library_lr": 2e-3,
        "library_max_length": 128, "k": 16, "compose_evaluations": 25, "compose_l1": 0.05, "compose_loss": "raw",
        "icl_tokens": 1024, "setfit_iterations": 5}
QUICK = {"rows": 8, "eval_rows": 12, "diagnose_rows": 6, "library_epochs": 1.0, "library_lr": 2e-3,
         "library_max_length": 64, "k": 2, "compose_evaluations": 10, "compose_l1": 0.05, "compose_loss": "raw",
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


def task_split(task: str, settings: dict[str, Any]) -> tuple[datasets.Dataset, datasets.Dataset]:
    """T's training split (the examples are drawn from it) and the fixed evaluation rows (seed 0)."""
    spec = LABEL_TASKS[task]
    train, _ = akdata.local_dataset(spec.dataset, "train")
    evaluation, _ = akdata.local_dataset(spec.dataset, spec.eval_split)
    return train, akdata.subset(evaluation, settings["eval_rows"], seed=0)


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
    """Calibrated label-word accuracy of ``adapter`` (None: the bare base) on ``rows``."""
    spec = LABEL_TASKS[task]
    ak.use(model, adapter)
    result = ak.evaluate_label_words(model, tokenizer, rows, list(spec.words), template=spec.template,
                                     examples=examples or (), calibration="contextual")
    keep = ("accuracy", "macro_f1", "class_shares", "raw_accuracy", "seconds")
    return {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v] if isinstance(v, list) else v)
            for k, v in result.items() if k in keep}


def fitting_examples(tokenizer: Any, task: str, shots: datasets.Dataset, seed: int, budget: int) -> list[tuple[str, str]]:
    """The balanced, shuffled demonstrations, as many as fit in ``budget`` tokens (a prefix of them)."""
    spec = LABEL_TASKS[task]
    examples = balanced_examples(shots["text"][:], shots["label"][:], list(spec.words), seed=seed)
    n = len(examples)
    while n and len(tokenizer(spec.template.render("", examples[:n]))["input_ids"]) > budget:
        n -= 1
    return examples[:n]


def _left_padded(rows: list[list[int]], pad: int, prefix: str = "") -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {f"{prefix}input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            f"{prefix}attention_mask": mask, f"{prefix}position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def label_word_batches(tokenizer: Any, task: str, shots: datasets.Dataset, size: int = 16, *,
                       calibrated: bool = False) -> list[dict[str, torch.Tensor]]:
    """The examples as batches for :func:`label_word_loss`, rows of similar length together.

    Left-padded with explicit positions, so every row's answer is read at the last position and
    the forward computes the vocabulary logits there only (``logits_to_keep=1``). ``calibrated``
    adds the content-free prompts to every batch (``cf_*``), so the loss is taken on the
    contextually calibrated scores, as the evaluation scores them.
    """
    spec = LABEL_TASKS[task]
    prompts = tokenizer([spec.template.render(t) for t in shots["text"][:]])["input_ids"]
    labels = shots["label"][:]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    words = torch.tensor([tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in spec.words])
    content_free = _left_padded(tokenizer([spec.template.render(t) for t in CONTENT_FREE])["input_ids"], pad, "cf_")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = []
    for start in range(0, len(order), size):
        picked = order[start:start + size]
        batches.append({
            **_left_padded([prompts[i] for i in picked], pad),
            "label": torch.tensor([labels[i] for i in picked]),
            "label_word_ids": words.expand(len(picked), -1),
            **(content_free if calibrated else {}),
        })
    return batches


def label_word_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the label words only (first token of each), at each prompt's end.

    With content-free rows in the batch, on the calibrated scores: ``log softmax(raw) - log prior``,
    the prior being the mean label-word distribution of the content-free prompts (as
    :func:`adapterkit.prompting.contextual_calibration`), renormalised.
    """
    def word_logits(prefix: str) -> torch.Tensor:
        logits = model(input_ids=batch[f"{prefix}input_ids"], attention_mask=batch[f"{prefix}attention_mask"],
                       position_ids=batch[f"{prefix}position_ids"], logits_to_keep=1).logits[:, -1].float()
        return logits[:, batch["label_word_ids"][0]]

    scores = word_logits("")
    if "cf_input_ids" in batch:
        scores, _ = contextual_calibration(scores, word_logits("cf_"))
    return F.cross_entropy(scores, batch["label"])


def run_compose(model: Any, tokenizer: Any, task: str, shots: datasets.Dataset, seed: int,
                settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``ak.compose`` from the library minus ``task``; the composed adapter's name and its search record."""
    candidates = [t for t in LIBRARY if t != task]
    batches = label_word_batches(tokenizer, task, shots, calibrated=settings["compose_loss"] == "calibrated")
    name = f"composed-{task}-{seed}"
    started = time.perf_counter()
    ak.compose(model, candidates, batches, name=name, loss_fn=label_word_loss, l1=settings["compose_l1"],
               max_evaluations=settings["compose_evaluations"], seed=seed, keep_candidates=True)
    seconds = time.perf_counter() - started
    recipe = ak.get_adapter_record(model, name).meta["merge"]
    search = recipe["search"]
    tokens = int(sum(b["attention_mask"].sum() + b.get("cf_attention_mask", torch.zeros(1)).sum() for b in batches))
    return name, {
        "weights": {k: round(v, 4) for k, v in recipe["weights"].items()}, "adapt_seconds": round(seconds, 1),
        "evaluations": search["evaluations"], "loss": round(search["loss"], 4), "base_loss": round(search["base_loss"], 4),
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
    train, evaluation = task_split(task, settings)
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
    values = [r[key] for r in runs]
    return {f"{key}_mean": round(statistics.mean(values), 4), f"{key}_min": min(values), f"{key}_max": max(values)}


def start_task(model: Any, tokenizer: Any, task: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``task``'s seed-free part: zero-shot, and the diagnostics (each library adapter alone on it)."""
    _, evaluation = task_split(task, settings)
    result: dict[str, Any] = {"eval_rows": len(evaluation), "k_per_class": settings["k"],
                              "label_words": list(LABEL_TASKS[task].words),
                              "instruction": LABEL_TASKS[task].template.instruction,
                              "zero_shot": evaluate(model, tokenizer, task, evaluation, None)}
    if settings["diagnose_rows"]:
        diagnose = akdata.subset(evaluation, settings["diagnose_rows"], seed=0)
        result["diagnostics"] = {
            "rows": len(diagnose), "zero_shot": evaluate(model, tokenizer, task, diagnose, None)["accuracy"],
            "single_adapter": {c: evaluate(model, tokenizer, task, diagnose, c)["accuracy"] for c in LIBRARY},
        }
    for method in ("in_context", "fewshot_lora", "compose"):
        result[method] = {"runs": []}
    skip = settings["skip_setfit"] or ("not in --methods" if "setfit" not in settings["methods"] else None)
    result["setfit"] = {"skipped": skip} if skip else {"runs": []}
    return result


def run_seed(model: Any, tokenizer: Any, task: str, result: dict[str, Any], seed: int, settings: dict[str, Any],
             recipe: dict[str, Any], scratch: Path) -> None:
    """Every seeded method on ``task`` with seed ``seed``'s examples; composition from the other adapters."""
    train, evaluation = task_split(task, settings)
    shots = akdata.few_shot(train, settings["k"], seed=seed)
    methods = settings["methods"]
    if "in_context" in methods:
        examples = fitting_examples(tokenizer, task, shots, seed, settings["icl_tokens"])
        icl = evaluate(model, tokenizer, task, evaluation, None, examples)
        result["in_context"]["runs"].append({"seed": seed, "examples": len(examples), **icl})
    if "fewshot_lora" in methods:
        name, cost = run_fewshot_lora(model, tokenizer, task, shots, seed, recipe, scratch / f"fewshot-{task}-{seed}")
        result["fewshot_lora"]["runs"].append({"seed": seed, **cost, **evaluate(model, tokenizer, task, evaluation, name)})
        ak.detach(model, name)
    if "compose" in methods:
        name, cost = run_compose(model, tokenizer, task, shots, seed, settings)
        result["compose"]["runs"].append({"seed": seed, **cost, **evaluate(model, tokenizer, task, evaluation, name)})
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
        if result[method].get("runs"):
            result[method].update(summary(result[method]["runs"]))
    if not result["compose"]["runs"]:
        return
    result["compose_minus_zero_shot"] = round(result["compose"]["accuracy_mean"] - result["zero_shot"]["accuracy"], 4)
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
                            "raw_accuracy": section.get("raw_accuracy"), "eval_s": section["seconds"]})
                continue
            runs = section["runs"]
            if not runs:
                continue
            row = {"task": task, "method": method, "accuracy": section["accuracy_mean"],
                   "range": f"{section['accuracy_min']:.3f}-{section['accuracy_max']:.3f} ({len(runs)} seeds)",
                   "raw_accuracy": raw_mean(section),
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
        raws = [raw_mean(result["tasks"][task][method]) for task in tasks]
        left.scatter([x for x, r in zip(xs, raws) if r is not None], [r for r in raws if r is not None], marker="x",
                     color="black", zorder=3, label="raw scores (uncalibrated)" if i == 0 else None)
    left.set(xticks=range(len(tasks)), xticklabels=tasks, ylabel="accuracy (calibrated label words)",
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
    parser.add_argument("--diagnose-rows", type=int, help="rows for the single-adapter diagnostics (0: skip them)")
    parser.add_argument("--compose-evaluations", type=int)
    parser.add_argument("--compose-loss", choices=["raw", "calibrated"],
                        help="label-word cross-entropy on the raw scores (LoraHub's) or the calibrated ones")
    parser.add_argument("--model", default=None, help="default smollm2-135m (--quick: a tiny random Llama)")
    parser.add_argument("--cache", default=None, help="library adapters (default runs/library-adapters)")
    parser.add_argument("--setfit-path", default="/tmp/library-setfit" if Path("/tmp/library-setfit").is_dir() else None,
                        help="a folder setfit was installed into (pip --target), put on the side's path")
    parser.add_argument("--no-setfit", action="store_true")
    parser.add_argument("--methods", nargs="+", default=list(METHODS[1:]), choices=list(METHODS[1:]),
                        help="the seeded methods to run (zero-shot always runs)")
    parser.add_argument("--quick", action="store_true", help="the code path on a tiny model, in seconds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="default benchmarks/results/library.json (--quick: under results/tmp)")
    parser.add_argument("--report", metavar="JSON", help="only print and plot a result written before (a run stopped early)")
    args = parser.parse_args(argv)
    if args.report:
        path = Path(args.report)
        result = json.loads(path.read_text())
        report(result, path)
        write_result(path.parent, path.stem, result)  # with the summary report() adds
        return result
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    for key in ("rows", "eval_rows", "diagnose_rows", "compose_evaluations", "compose_loss"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    scratch = Path(tempfile.mkdtemp(prefix="library-bench-"))
    cache = Path(args.cache or (scratch / "library" if args.quick else ROOT / "runs" / "library-adapters"))
    # The tiny base lives in the cache too, so a cached library is found again under the same path.
    model_name = args.model or (quick_model(cache / "tiny-base") if args.quick else "smollm2-135m")
    out = Path(args.out or ("benchmarks/results/tmp/library-quick.json" if args.quick else "benchmarks/results/library.json"))
    settings.update({"model": model_name, "threads": args.threads, "setfit_body": "minilm-l6",
                     "setfit_path": args.setfit_path, "tasks": args.tasks, "seeds": args.seeds, "cache": str(cache),
                     "methods": args.methods})
    settings["skip_setfit"] = "--no-setfit" if args.no_setfit else setfit_availability(args.setfit_path)
    recipe = fewshot_recipe_defaults()
    if args.quick:
        recipe["num_epochs"] = 1.0
    model, tokenizer = ak.load_base(model_name, task="causal-lm")
    result: dict[str, Any] = {"environment": environment(), "targets": TARGETS, "settings": settings,
                              "fewshot_recipe_defaults": recipe, "tasks": {}}
    started = time.perf_counter()
    result["library"] = build_library(model, tokenizer, model_name, settings, cache)
    result["library_seconds"] = round(time.perf_counter() - started, 1)
    write_result(out.parent, out.stem, result)  # each section as it lands: a long run keeps what it measured
    for task in args.tasks:
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


def report(result: dict[str, Any], out: Path) -> str:
    """Print the table, the weights and the targets; write ``<out>.md`` and ``<out>.png`` beside the JSON."""
    result["met"] = {task: r["met"] for task, r in result["tasks"].items() if "met" in r}
    # A run stopped early (or --report on a partial file) says which seeds each task really has.
    result["seeds_completed"] = {task: [run["seed"] for run in r["compose"]["runs"]] for task, r in result["tasks"].items()}
    lines = [table(rows_of(result), ["task", "method", "accuracy", "range", "raw_accuracy", "adapt_s", "eval_s",
                                     "tokens", "note"])]
    for task, r in result["tasks"].items():
        if "met" not in r:
            continue
        weights = [run["weights"] for run in r["compose"]["runs"]]
        # Calibration is the library's default for every method; the raw scores are reported beside it.
        raw = raw_mean(r["compose"]) - r["zero_shot"]["accuracy"]
        lines.append(f"\n{task}: compose - zero-shot = {r['compose_minus_zero_shot']:+.3f} (compose's raw scores: "
                     f"{raw:+.3f}); compose weights per seed "
                     f"{weights}; compute vs few-shot LoRA {r.get('compute')}; met {r['met']}")
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
