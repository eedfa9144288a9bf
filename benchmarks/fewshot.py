"""Few-shot LoRA on smollm2-135m at its frozen defaults, beside zero-shot and in-context, on SST-2 and TREC.

``python -m benchmarks.fewshot [--tasks sst2 trec] [--seeds 0 1 2] [--rows N] [--k 16]
[--methods zero-shot in-context lora] [--out benchmarks/results/fewshot.json]`` prints a table
and writes the JSON and a PNG beside it.

Every method sees the same prompt (the task's few-shot config: instruction, text and answer
prefixes, label words), the same evaluation rows (SST-2 dev, TREC test; ``--rows`` takes a
stratified subset) and, per seed, the same k examples per class (``adapterkit.data.few_shot``
with that seed, as ``recipes/fewshot_causal_lm.py`` and ``benchmarks/prompting.py`` draw them):

- zero-shot: no examples, no training (one run: nothing is drawn);
- in-context: the k examples per class as demonstrations (balanced, alternating by class), their
  KV cache reused for every row;
- lora: LoRA trained on the k examples per class with the config's settings, the loss on the
  label word only (``ak.train`` on prompt/completion rows), then label-word scoring; with the
  config's ``ensemble: N``, N adapters on the same examples (seeds ``seed + 1000 * i``, as the
  recipe's ``--ensemble``) and the mean of their label-word probabilities.

Zero-shot and in-context are scored with contextual calibration (the prompting recipe's default),
LoRA with the config's ``calibration`` (TREC's is none: on held-out rows the trained adapter's raw
scores were better); the other one's accuracy (``raw_accuracy`` or the calibrated ``accuracy``) is
recorded beside it from the same forward passes.

The defaults were chosen by a search on rows held out of the TRAINING data, never the evaluation
split: ``--split heldout`` evaluates there (the rows of ``held_out_rows``: none of seeds 0-2's
examples), and ``--set key=value`` changes one setting of the config (``learning_rate=3e-4``,
``text_prefix="Review: "``, ``target_modules=[q_proj,v_proj]``...), so every search run is one
command; ``--log`` appends each run as a JSON line (``benchmarks/results/fewshot-search.jsonl``,
summarized in ``fewshot-search.md``); ``--save-scores DIR`` keeps every run's per-row scores (raw
and the calibration prior, per ensemble member) so that ensembles can be scored afterwards.
``--keep-other-methods`` reruns one method of a task (e.g. ``--methods lora`` after a change of
its training settings) and keeps the task's other methods from ``--out``, provided they were
measured with the same prompt, label words, k, rows and seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml

import adapterkit as ak
import adapterkit.data as akdata
import adapterkit.metrics as akmetrics
from adapterkit.prompting import LabelWordScores, PromptTemplate, balanced_examples, score_texts
from benchmarks.common import ROOT, environment, table, write_result

TARGETS = {"sst2_lora_accuracy_mean": 0.85}
METHODS = ("zero-shot", "in-context", "lora")
#: The seeds whose examples the held-out rows never contain.
SEARCH_SEEDS = (0, 1, 2)
#: Settings a run takes, with the recipe's dataclass defaults where the config says nothing.
SETTING_DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m", "instruction": "Classify the sentiment of the following text.", "text_prefix": "Text: ",
    "answer_prefix": "Answer:", "label_words": None, "k": 16, "calibration": "contextual", "learning_rate": None,
    "num_epochs": 5.0, "batch_size": 8, "max_length": 256, "ensemble": 1, "adapter": {},
}


def config_path(task: str) -> Path:
    return ROOT / "recipes" / "configs" / f"{task}_smollm2_fewshot.yaml"


def settings_for(task: str, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The task's few-shot config (the frozen defaults) as run settings, with ``changes`` applied.

    ``changes`` keys are settings or adapter options (``r``, ``lora_alpha``, ``target_modules``,
    ``lora_dropout``), which go under ``adapter``.
    """
    config = yaml.safe_load(config_path(task).read_text())
    settings = {key: config.get(key, default) for key, default in SETTING_DEFAULTS.items()}
    settings["adapter"] = dict(settings["adapter"] or {})
    for key, value in (changes or {}).items():
        if key in SETTING_DEFAULTS:
            settings[key] = value
        else:
            settings["adapter"][key] = value
    return settings


def template_of(settings: dict[str, Any]) -> PromptTemplate:
    """The plain prompt (no chat template) the adapter is trained and every method evaluated on."""
    return PromptTemplate(instruction=settings["instruction"], text_prefix=settings["text_prefix"],
                          answer_prefix=settings["answer_prefix"], chat=False)


def held_out_rows(task: str, rows: int, *, k: int = 16) -> Any:
    """``rows`` training rows (stratified, fixed) that none of the search seeds' k-shot samples contain."""
    train, _ = akdata.local_dataset(task, "train")
    used = {text for seed in SEARCH_SEEDS for text in akdata.few_shot(train, k, seed=seed)["text"][:]}
    rest = train.filter(lambda row: row["text"] not in used)
    return akdata.subset(rest, rows, seed=0)


def evaluation_rows(task: str, rows: int | None, split: str, seed: int = 0) -> Any:
    """The rows every method is scored on: the task's evaluation split, or rows held out of training."""
    if split == "heldout":
        return held_out_rows(task, rows or 200)
    evaluation, _ = akdata.local_dataset(task, "dev" if task == "sst2" else "test")
    return akdata.subset(evaluation, rows, seed=seed)


def label_metrics(scores: torch.Tensor, labels: list[int]) -> dict[str, Any]:
    """Accuracy, macro-F1 and the share of each predicted class of (rows, label words) scores."""
    metrics = akmetrics.label_metrics(scores.argmax(-1).tolist(), labels, scores.shape[-1])
    shares = [round(share, 4) for share in metrics.pop("class_shares")]
    return {key: round(value, 4) for key, value in metrics.items()} | {"class_shares": shares}


def combine(members: list[LabelWordScores]) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibrated, raw) scores of an ensemble: the mean of its members' label-word probabilities (log).

    Calibrated: each member's contextually calibrated distribution (its own prior divided out),
    renormalized, then averaged; raw: the average of the members' raw label-word distributions.
    """
    calibrated = torch.stack([m.calibrated.log_softmax(-1).exp() for m in members]).mean(0).log()
    raw = torch.stack([m.raw.log_softmax(-1).exp() for m in members]).mean(0).log()
    return calibrated, raw


def score(members: list[LabelWordScores], labels: list[int], *, calibrate: bool = True) -> dict[str, Any]:
    """Label-word accuracy of one model's (or an ensemble's) scores; ``accuracy`` follows ``calibrate``.

    The scores are always computed with contextual calibration, so ``raw_accuracy`` (uncalibrated)
    and ``calibrated_accuracy`` both come from the same forward passes.
    """
    calibrated, raw = combine(members)
    cal, unc = label_metrics(calibrated, labels), label_metrics(raw, labels)
    picked = cal if calibrate else unc
    return {"accuracy": picked["accuracy"], "macro_f1": picked["macro_f1"],
            "calibrated_accuracy": cal["accuracy"], "raw_accuracy": unc["accuracy"],
            "class_shares": picked["class_shares"], "calibration": "contextual" if calibrate else None,
            "eval_rows": len(labels)}


def scores_of(model: Any, tokenizer: Any, rows: Any, settings: dict[str, Any], words: list[str],
              examples: list[tuple[str, str]] = ()) -> LabelWordScores:
    """Raw and contextually calibrated label-word scores of every row (the recipe's evaluation)."""
    return score_texts(model, tokenizer, rows["text"][:], words, template=template_of(settings), examples=examples,
                       calibration="contextual")


def save_scores(path: Path | None, members: list[LabelWordScores], labels: list[int]) -> None:
    """Every member's raw scores and prior, for ensembles computed later without re-running (``--save-scores``)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"raw": [m.raw for m in members], "prior": [m.prior for m in members],
                    "labels": torch.tensor(labels)}, path)


def run(task: str, method: str, seed: int, rows: Any, settings: dict[str, Any], output_dir: str,
        save: Path | None = None) -> dict[str, Any]:
    """One method on one seed's examples, scored on ``rows``; LoRA trains fresh adapters on a fresh base.

    LoRA with ``ensemble: N`` trains N adapters on the same examples (member ``i`` seeded
    ``seed + 1000 * i``, so member 0 is the single run) and averages their label-word probabilities;
    each member's own accuracy is kept in ``member_accuracy``.
    """
    train, labels = akdata.local_dataset(task, "train")
    words = list(settings["label_words"] or [name.lower() for name in labels])
    shots = akdata.few_shot(train, settings["k"], seed=seed)
    truth = rows["label"][:]
    out: dict[str, Any] = {"task": task, "method": method, "seed": seed, "k_per_class": settings["k"],
                           "load_average": [round(x, 2) for x in os.getloadavg()]}
    if method in ("zero-shot", "in-context"):
        model, tokenizer = ak.load_base(settings["model"], task="causal-lm")
        examples = [] if method == "zero-shot" else balanced_examples(shots["text"][:], shots["label"][:], words,
                                                                      seed=seed)
        started = time.perf_counter()
        members = [scores_of(model, tokenizer, rows, settings, words, examples)]
        save_scores(save, members, truth)
        return {**out, **score(members, truth), "eval_seconds": round(time.perf_counter() - started, 1)}
    template = template_of(settings)
    pairs = zip(shots["text"][:], shots["label"][:])
    data = [{"prompt": template.render(t), "completion": " " + words[y]} for t, y in pairs]
    members, train_seconds, eval_seconds, losses = [], 0.0, 0.0, []
    for member in range(int(settings["ensemble"])):
        model, tokenizer = ak.load_base(settings["model"], task="causal-lm")
        member_seed = seed + 1000 * member
        # As the recipe does: LoRA's random initial weights come from the global RNG, seeded here, so a run does
        # not depend on what used it earlier in the process (the first search and first evaluation run predate this).
        transformers.set_seed(member_seed)
        ak.attach(model, "lora", **settings["adapter"])
        started = time.perf_counter()
        metrics = ak.train(model, tokenizer, data, learning_rate=settings["learning_rate"],
                           num_epochs=settings["num_epochs"], batch_size=settings["batch_size"],
                           max_length=settings["max_length"], seed=member_seed, output_dir=output_dir,
                           eval_strategy="no", show_progress=False)
        train_seconds += time.perf_counter() - started
        losses.append(round(metrics["train_loss"], 4))
        started = time.perf_counter()
        members.append(scores_of(model, tokenizer, rows, settings, words))
        eval_seconds += time.perf_counter() - started
    save_scores(save, members, truth)
    calibrate = str(settings["calibration"]).lower() not in ("none", "false", "")
    out.update(train_seconds=round(train_seconds, 1), train_loss=losses[0] if len(losses) == 1 else losses)
    if len(members) > 1:
        out["member_accuracy"] = [score([m], truth, calibrate=calibrate)["accuracy"] for m in members]
    return {**out, **score(members, truth, calibrate=calibrate), "eval_seconds": round(eval_seconds, 1)}


#: What every method of a task shares; a method kept from an earlier run must have had the same.
SHARED = ("model", "instruction", "text_prefix", "answer_prefix", "label_words", "k")


def keep_other_methods(section: dict[str, Any], earlier: dict[str, Any] | None, methods: list[str],
                       commit: str | None) -> None:
    """Copy the methods not in ``methods`` (and their runs) from the task's ``earlier`` section into ``section``.

    Only a section measured on the same split, rows and seeds with the same prompt, label words and
    k qualifies (the same examples and rows for every method); each kept summary notes when and at
    which commit it was measured.
    """
    if earlier is None:
        raise SystemExit("--keep-other-methods: --out has no section for this task to keep methods from")
    same = {key: earlier.get(key) == section[key] for key in ("split", "eval_rows", "seeds")}
    same.update({key: earlier["settings"].get(key) == section["settings"][key] for key in SHARED})
    if not all(same.values()):
        differ = [key for key, equal in same.items() if not equal]
        raise SystemExit(f"--keep-other-methods: the earlier section differs in {differ}; rerun every method")
    for method, summary in earlier["methods"].items():
        if method not in methods:
            # The section's own commit where it has one; older sections only have their report's (the last writer's).
            kept_from = summary.get("kept_from") or {"section_started": earlier.get("started"),
                                                     "commit": earlier.get("commit"), "report_commit": commit}
            section["methods"][method] = {**summary, "kept_from": kept_from}
            section["runs"] += [r for r in earlier["runs"] if r["method"] == method]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, min and max accuracy over seeds (and the raw accuracy's mean, the smallest class share)."""
    accs = [r["accuracy"] for r in runs]
    out = {"seeds": [r["seed"] for r in runs], "accuracy": accs, "accuracy_mean": round(statistics.mean(accs), 4),
           "accuracy_min": min(accs), "accuracy_max": max(accs),
           "raw_accuracy_mean": round(statistics.mean(r["raw_accuracy"] for r in runs), 4),
           "calibrated_accuracy_mean": round(statistics.mean(r["calibrated_accuracy"] for r in runs), 4),
           "macro_f1_mean": round(statistics.mean(r["macro_f1"] for r in runs), 4),
           "min_class_share": min(min(r["class_shares"]) for r in runs),
           "eval_seconds_mean": round(statistics.mean(r["eval_seconds"] for r in runs), 1)}
    if "train_seconds" in runs[0]:
        out["train_seconds_mean"] = round(statistics.mean(r["train_seconds"] for r in runs), 1)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy per task and method: mean over seeds, the bar's whisker the min-max range."""
    import matplotlib  # optional: only the PNG needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods = result["tasks"][task]["methods"]
        names = list(methods)
        means = [methods[m]["accuracy_mean"] for m in names]
        low = [methods[m]["accuracy_mean"] - methods[m]["accuracy_min"] for m in names]
        high = [methods[m]["accuracy_max"] - methods[m]["accuracy_mean"] for m in names]
        colors = ["tab:orange" if m == "lora" else "tab:gray" for m in names]
        ax.bar(names, means, yerr=[low, high], capsize=4, color=colors)
        for i, v in enumerate(means):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        if task == "sst2":
            ax.axhline(TARGETS["sst2_lora_accuracy_mean"], color="gray", linewidth=0.8, label="target (LoRA mean)")
            ax.legend(loc="lower right", fontsize=8)
        section = result["tasks"][task]
        title = f"{task}: {section['eval_rows']} rows, k={section['settings']['k']}/class, seeds {section['seeds']}"
        ax.set(title=title, ylabel="accuracy", ylim=(0, 1))
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle("smollm2-135m few-shot (mean, min-max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_changes(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, each value read as YAML (``3e-4``, ``[q_proj, v_proj]``, ``"Review: "``)."""
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes key=value, got {item!r}")
        changes[key] = _number(yaml.safe_load(value)) if value else ""
    return changes


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``2e-3`` (no dot) as a string; a setting's number is meant."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "trec"], choices=["sst2", "trec"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", type=int, default=None, help="evaluation rows per task (default: all)")
    parser.add_argument("--k", type=int, default=None, help="examples per class (default: the config's)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--split", default="eval", choices=["eval", "heldout"],
                        help="eval: SST-2 dev / TREC test; heldout: rows held out of training (for the search)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="change a setting of the config")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", default=None, help="append each run as a JSON line to this file")
    parser.add_argument("--out", default="benchmarks/results/fewshot.json")
    parser.add_argument("--output-dir", default=str(ROOT / "runs" / "fewshot-benchmark"),
                        help="Trainer's scratch folder")
    parser.add_argument("--keep-other-tasks", action="store_true",
                        help="keep the sections of tasks this run does not run from an existing --out file")
    parser.add_argument("--keep-other-methods", action="store_true",
                        help="keep the methods this run does not run from the task's section in --out (only when the "
                             "prompt, label words, k, rows and seeds are the same)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--save-scores", default=None, metavar="DIR",
                        help="save each run's per-row label-word scores here (TASK-METHOD-sSEED-LABEL.pt)")
    parser.add_argument("--label", default="run", help="the run's name in --save-scores file names")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    changes = parse_changes(args.set)
    if args.k is not None:
        changes["k"] = args.k
    out = Path(args.out)
    result: dict[str, Any] = {"environment": environment(), "targets": TARGETS,
                              "settings": {**vars(args), "changes": changes}, "tasks": {}}
    keeping = args.keep_other_tasks or args.keep_other_methods
    earlier = json.loads(out.read_text()) if keeping and out.is_file() else {}
    if args.keep_other_tasks:  # tasks run separately (a long run per task) share one report
        kept = earlier.get("tasks", {}).items()
        result["tasks"] = {task: section for task, section in kept if task not in args.tasks}
    summary_rows = []
    for task in args.tasks:
        settings = settings_for(task, changes)
        rows = evaluation_rows(task, args.rows, args.split)
        section = result["tasks"][task] = {"settings": settings, "split": args.split, "eval_rows": len(rows),
                                           "seeds": args.seeds, "commit": result["environment"].get("commit"),
                                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                           "methods": {}, "runs": []}
        if args.keep_other_methods:
            keep_other_methods(section, earlier.get("tasks", {}).get(task), args.methods,
                               earlier.get("environment", {}).get("commit"))
        for method in args.methods:
            runs = []
            for seed in ([args.seeds[0]] if method == "zero-shot" else args.seeds):  # zero-shot draws nothing
                save = Path(args.save_scores) / f"{task}-{method}-s{seed}-{args.label}.pt" if args.save_scores else None
                record = run(task, method, seed, rows, settings, output_dir=args.output_dir, save=save)
                runs.append(record)
                section["runs"].append(record)
                print(json.dumps(record), flush=True)
                if args.log:
                    with open(args.log, "a") as log:
                        log.write(json.dumps({"split": args.split, "changes": changes, **record}) + "\n")
                write_result(out.parent, out.stem, result)  # each run as it lands: a long run keeps what it measured
            section["methods"][method] = summarize(runs)
            accs = [r["accuracy"] for r in runs]
            summary_rows.append({"task": task, "method": method, "rows": len(rows), **section["methods"][method],
                                 "range": f"{min(accs):.3f}-{max(accs):.3f}"})
    if "sst2" in result["tasks"] and "lora" in result["tasks"]["sst2"]["methods"]:
        mean = result["tasks"]["sst2"]["methods"]["lora"]["accuracy_mean"]
        result["met"] = {"sst2_lora_accuracy_mean": mean >= TARGETS["sst2_lora_accuracy_mean"]}
    result["environment_end"] = {"load_average": [round(x, 2) for x in os.getloadavg()],
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(table(summary_rows, ["task", "method", "rows", "accuracy_mean", "range", "calibrated_accuracy_mean",
                               "raw_accuracy_mean", "macro_f1_mean",
                               "min_class_share", "train_seconds_mean", "eval_seconds_mean"]))
    write_result(out.parent, out.stem, result)
    if not args.no_plot:
        plot(result, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
