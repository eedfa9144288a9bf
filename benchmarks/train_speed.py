"""Training speed, memory and accuracy: adapterkit beside plain peft + transformers' Trainer.

SST-2 rows, batch 16, max length 64, 1 epoch by default. Sides:

- ``peft_naive:<strategy>``: peft (or plain freezing) + Trainer, ``padding="max_length"``;
- ``peft_dynamic:<strategy>``: the same with dynamic padding (``DataCollatorWithPadding``);
- ``peft_savvy:<strategy>``: the savvy peer, the reference: dynamic padding and length-grouped
  batches (``train_sampling_strategy="group_by_length"``, transformers' documented flags),
  everything else as the other baselines. The two above are the naive baselines, kept for
  comparison with earlier results;
- ``adapterkit:<strategy>[:<targets>]``: ``ak.attach`` + ``ak.train`` with its defaults
  (length-grouped batches; head-only on cached features; bulk CPU dropout masks);
- ``adapterkit:<strategy>:<targets>:stock_dropout``: the same with ``fast_dropout=False`` (torch's
  own dropout masks), the ablation that isolates that speed-up.

Each side runs in its own process (``benchmarks.common.run_side``); it counts the tokens the
backbone really processed (padding included) and the real ones, and evaluates on the dev set.
``seconds`` is adapterkit's whole ``train()`` call (tokenization and Trainer set-up included) but
only the baselines' ``trainer.train()``; ``loop_seconds`` is Trainer's own ``train_runtime`` on
every side, the like-for-like measure of the training loop.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from adapterkit.evaluate import evaluate_classifier
from adapterkit.registry import get_strategy
from benchmarks.common import peak_rss_mb


def _data(settings: dict[str, Any]):
    from adapterkit import data as akdata

    train, labels = akdata.local_dataset("sst2", "train")
    dev, _ = akdata.local_dataset("sst2", "dev")
    train = akdata.subset(train, settings["train_rows"], seed=0)
    dev = akdata.subset(dev, settings.get("dev_rows"), seed=0)
    return train, dev, labels


class TokenCounter:
    """Counts tokens entering the backbone: all of them (padding too) and the real ones."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.processed = 0
        self.real = 0
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is not None:
            self.processed += ids.numel()
            self.real += int(mask.sum()) if mask is not None else ids.numel()


def _backbone(model):
    from adapterkit.targets import backbone_name

    return model.get_submodule(backbone_name(model))


def run_baseline(kind: str, strategy: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Plain peft + Trainer, written the way a user would without adapterkit."""
    import peft
    import transformers

    from adapterkit.models import resolve_model

    train, dev, labels = _data(settings)
    path = resolve_model(settings["model"]).path
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), pad_token_id=tokenizer.pad_token_id, **settings.get("load_kwargs", {})
    )
    loaded_rss = peak_rss_mb()
    if strategy == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                           target_modules=settings.get("baseline_targets")))
    elif strategy == "head":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(("classifier", "score")) or ".pooler." in name
    max_length = settings["max_length"]
    if kind not in ("naive", "dynamic", "savvy"):
        raise ValueError(f"unknown baseline peft_{kind}: use peft_naive, peft_dynamic or peft_savvy")
    padding = "max_length" if kind == "naive" else False
    tok = train.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length, padding=padding),
                    batched=True, remove_columns=["text"])
    counter = TokenCounter(_backbone(model.get_base_model() if hasattr(model, "get_base_model") else model))
    args = transformers.TrainingArguments(
        output_dir=settings["tmp"], per_device_train_batch_size=settings["batch_size"], num_train_epochs=settings["epochs"],
        learning_rate=get_strategy(strategy).default_learning_rate, warmup_steps=0.06, weight_decay=0.01,
        seed=settings.get("seed", 0), report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if kind == "savvy" else "random",
    )
    collator = transformers.default_data_collator if kind == "naive" else transformers.DataCollatorWithPadding(tokenizer)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=tok, data_collator=collator)
    started = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - started
    counter.handle.remove()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"seconds": seconds, "loop_seconds": out.metrics["train_runtime"], "processed_tokens": counter.processed,
            "real_tokens": counter.real,
            "accuracy": evaluate_classifier(model, tokenizer, dev, batch_size=64, max_length=max_length)["accuracy"], "trainable_params": trainable,
            "peak_rss_after_load_mb": round(loaded_rss, 1)}


def run_adapterkit(strategy: str, targets: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    import adapterkit as ak

    train, dev, labels = _data(settings)
    model, tokenizer = ak.load_base(settings["model"], task="classification", label_names=labels, bits=settings.get("bits"))
    loaded_rss = peak_rss_mb()
    options = {"target_modules": targets.split(",")} if targets else {}
    ak.attach(model, strategy, **options)
    counter = TokenCounter(_backbone(model))
    started = time.perf_counter()
    metrics = ak.train(model, tokenizer, train, learning_rate=get_strategy(strategy).default_learning_rate, num_epochs=settings["epochs"],
                       batch_size=settings["batch_size"], max_length=settings["max_length"], seed=settings.get("seed", 0),
                       output_dir=settings["tmp"], show_progress=False, logging_steps=10_000,
                       **settings.get("train_options", {}))
    seconds = time.perf_counter() - started
    counter.handle.remove()
    summary = ak.summary(model)
    return {"seconds": seconds, "loop_seconds": metrics["train_runtime"], "processed_tokens": counter.processed,
            "real_tokens": counter.real,
            "accuracy": evaluate_classifier(model, tokenizer, dev, batch_size=64, max_length=settings["max_length"])["accuracy"],
            "trainable_params": summary.adapters[0].parameters, "cached_features": metrics.get("cached_features"),
            "feature_cache_seconds": metrics.get("feature_cache_seconds"),
            "peak_rss_after_load_mb": round(loaded_rss, 1), "bits": settings.get("bits")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", required=True)
    parser.add_argument("--settings", required=True)
    args = parser.parse_args()
    settings = json.loads(args.settings)
    load_before = os.getloadavg()
    torch.manual_seed(settings.get("seed", 0))
    parts = args.side.split(":")
    kind, strategy, targets, flags = parts[0], parts[1], parts[2] if len(parts) > 2 else "", parts[3:]
    if flags not in ([], ["stock_dropout"]):
        raise ValueError(f"unknown side flags {flags} in {args.side!r}: the only flag is stock_dropout")
    if flags:
        settings["train_options"] = {**settings.get("train_options", {}), "fast_dropout": False}
    if kind == "adapterkit":
        result = run_adapterkit(strategy, targets or None, settings)
    else:
        result = run_baseline(kind.replace("peft_", ""), strategy, settings)
    result.update(side=args.side, strategy=strategy, seed=settings.get("seed", 0), model=settings["model"], torch_threads=torch.get_num_threads(),
                  peak_rss_mb=round(peak_rss_mb(), 1),
                  real_tokens_per_s=result["real_tokens"] / result["seconds"],
                  loop_real_tokens_per_s=result["real_tokens"] / result["loop_seconds"],
                  padding_fraction=1 - result["real_tokens"] / max(result["processed_tokens"], 1),
                  # The machine is shared: the 1-minute load average around the side says how much.
                  load_average_before=round(load_before[0], 2), load_average_after=round(os.getloadavg()[0], 2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
