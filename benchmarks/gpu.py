"""GPU check: QLoRA 4-bit vs bf16 LoRA training (memory, speed) and the adapter pool on a GPU.

``bash benchmarks/gpu_check.sh`` runs it on a lent GPU machine (one command, a few minutes);
``python -m benchmarks.gpu [--device cuda] [--steps 30] [--out benchmarks/results/gpu.json]``
runs it anywhere; ``--quick`` is a seconds-long CPU smoke run of the same code (the tests run it).

The model is a Llama with smollm2-135m's shapes (30 layers x 576, 9 query / 3 KV heads,
intermediate 1,536, vocab 49,152, tied embeddings) and random weights, with a word-level
tokenizer: the packaged checkpoint cannot travel to a lent machine, and speed and memory depend
on the shapes alone. No accuracy is measured here.

- train: LoRA r=8 on every linear layer, batches of 16 rows x 256 tokens of random words, loss on
  every token, the same rows and steps for each side: ``ak.train`` on a bf16 base (``bf16=True``),
  ``ak.train`` on a 4-bit NF4 base (bf16 compute: QLoRA), and peft + transformers' Trainer on
  the bf16 base with its stock flags (``bf16=True``; fixed-length rows, so padding and length
  grouping do not matter). Tokens/s over Trainer's loop, and the peak GPU memory;
- pool: ``AdapterPool.load`` time (r=8, all linear layers) and a mixed batch (64 rows x 8 tokens,
  last-position logits) over 1 / 8 / 64 adapters as a fraction of the base-only batch, with
  CUDA synchronisation around every timing.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers as tf

from benchmarks.common import RESULTS, environment, save_json, table

SMOLLM2_SHAPES = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                  "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
                  "tie_word_embeddings": True}
QUICK_SHAPES = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                "tie_word_embeddings": True}
FULL = {"steps": 30, "batch_size": 16, "tokens": 256, "rank": 8, "adapters": 64, "load_repeat": 11, "repeat": 5}
QUICK = {"steps": 2, "batch_size": 2, "tokens": 16, "rank": 4, "adapters": 4, "load_repeat": 2, "repeat": 2}


def make_base(folder: Path, shapes: dict[str, int], seed: int = 0) -> Path:
    """A random Llama with ``shapes`` and a word-level tokenizer (``w0`` ... ``wN``) saved in ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    config = tf.LlamaConfig(**shapes, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, shapes["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                               eos_token="</s>").save_pretrained(folder)
    return folder


def _rows(count: int, words: int, vocab: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    # one word is one token; the EOS the task appends makes it `words` tokens
    return [{"text": " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(words - 1))} for _ in range(count)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None


def _load(folder: Path, device: str, bits: int | None):
    import adapterkit as ak

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kwargs: dict[str, Any] = {"device_map": {"": device}} if device.startswith("cuda") else {}
    if bits is None:
        kwargs["dtype"] = dtype
    else:
        kwargs["compute_dtype"] = dtype
    return ak.load_base(str(folder), task="causal-lm", bits=bits, **kwargs)


def train_side(side: str, folder: Path, rows: list[dict[str, str]], device: str, s: dict[str, Any],
               out: Path) -> dict[str, Any]:
    """One training side: ``ak-bf16``, ``ak-qlora-nf4`` or ``peft-trainer-bf16``."""
    import adapterkit as ak

    bf16 = device.startswith("cuda")
    _reset_peak(device)
    model, tokenizer = _load(folder, device, 4 if side == "ak-qlora-nf4" else None)
    common = {"per_device_train_batch_size": s["batch_size"], "max_steps": s["steps"], "learning_rate": 2e-4,
              "bf16": bf16, "logging_steps": max(1, s["steps"] // 3), "save_strategy": "no", "report_to": [],
              "use_cpu": not device.startswith("cuda"), "seed": 0}
    if side.startswith("ak-"):
        ak.attach(model, "lora", r=s["rank"])
        metrics = ak.train(model, tokenizer, rows, max_length=s["tokens"], output_dir=str(out / side),
                           eval_strategy="no", **{k: v for k, v in common.items()
                                                  if k not in ("per_device_train_batch_size", "max_steps")},
                           batch_size=s["batch_size"], max_steps=s["steps"])
        runtime, loss = metrics["train_runtime"], metrics["train_loss"]
    else:
        import datasets
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=s["rank"], lora_alpha=2 * s["rank"],
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
        table_ = datasets.Dataset.from_list(rows).map(
            lambda b: tokenizer([t + tokenizer.eos_token for t in b["text"]], truncation=True,
                                max_length=s["tokens"]), batched=True, remove_columns=["text"])
        trainer = tf.Trainer(model=model, args=tf.TrainingArguments(output_dir=str(out / side), **common),
                             train_dataset=table_,
                             data_collator=tf.DataCollatorForLanguageModeling(tokenizer, mlm=False))
        result = trainer.train()
        runtime, loss = result.metrics["train_runtime"], result.metrics["train_loss"]
    _sync(device)
    tokens = s["steps"] * s["batch_size"] * s["tokens"]
    row = {"side": side, "steps": s["steps"], "tokens": tokens, "train_runtime_s": round(runtime, 2),
           "tokens_per_s": round(tokens / runtime, 1), "peak_memory_mib": _peak_mib(device),
           "train_loss": round(float(loss), 4)}
    del model
    return row


def _timed_ms(fn, device: str, repeat: int) -> float:
    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeat):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def pool_section(folder: Path, device: str, s: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Pool load time and mixed-batch throughput on ``device``."""
    from adapterkit.serve.pool import AdapterPool
    from benchmarks.pool import _adapters

    folders = _adapters(str(folder), tmp / "adapters", s["adapters"], s["rank"])
    model, _ = _load(folder, device, None)
    model.eval()
    pool = AdapterPool(model, slots=s["adapters"] + 2, max_rank=16)
    loads = []
    for i in range(s["load_repeat"]):
        _sync(device)
        started = time.perf_counter()
        pool.load(folders[0], name=f"t{i}")
        _sync(device)
        loads.append((time.perf_counter() - started) * 1e3)
        pool.unload(f"t{i}")
    names = [f"m{i}" for i in range(len(folders))]
    for name, f in zip(names, folders):
        pool.load(f, name=name)
    ids = torch.randint(3, model.config.vocab_size, (64, 8), device=device)
    rows = []
    with torch.inference_mode():
        base_ms = _timed_ms(lambda: model(input_ids=ids, logits_to_keep=1), device, s["repeat"])
        for k in sorted({1, min(8, len(names)), len(names)}):
            route = [names[i % k] for i in range(ids.shape[0])]

            def pooled():
                with pool.route(route):
                    model(input_ids=ids, logits_to_keep=1)

            ms = _timed_ms(pooled, device, s["repeat"])
            rows.append({"distinct_adapters": k, "base_ms": round(base_ms, 2), "pool_ms": round(ms, 2),
                         "pool_fraction_of_base": round(base_ms / ms, 3)})
    pool.close()
    return {"load_ms": round(statistics.median(loads), 2), "mixed": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sides", nargs="+", default=["ak-bf16", "ak-qlora-nf4", "peft-trainer-bf16"])
    parser.add_argument("--no-pool", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps, CPU: the code path only")
    parser.add_argument("--out", default=None, help=f"JSON result (default: {RESULTS / 'gpu.json'}; --quick: none)")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.steps:
        settings["steps"] = args.steps
    shapes = QUICK_SHAPES if args.quick else SMOLLM2_SHAPES
    tmp = Path(tempfile.mkdtemp(prefix="ak-gpu-bench-"))
    try:
        folder = make_base(tmp / "base", shapes)
        rows = _rows(settings["steps"] * settings["batch_size"], settings["tokens"], shapes["vocab_size"])
        training = [train_side(side, folder, rows, args.device, settings, tmp) for side in args.sides]
        pool = None if args.no_pool else pool_section(folder, args.device, settings, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    result = {"benchmark": "gpu", "device": device_name, "environment": environment(), "settings": settings,
              "shapes": shapes, "training": training, "pool": pool}
    print(f"{device_name}: LoRA r={settings['rank']} on a Llama of smollm2-135m's shapes"
          f"{' (quick: tiny shapes)' if args.quick else ''}")
    print(table(training, ["side", "steps", "tokens_per_s", "train_runtime_s", "peak_memory_mib", "train_loss"]))
    if pool:
        print(f"pool load: {pool['load_ms']} ms")
        print(table(pool["mixed"], ["distinct_adapters", "base_ms", "pool_ms", "pool_fraction_of_base"]))
    save_json(args.out, "gpu", result, quick=args.quick)
    return result


if __name__ == "__main__":
    main()
