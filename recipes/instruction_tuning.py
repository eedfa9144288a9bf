"""Instruction tuning of a causal LM on instruction/response pairs (self-instruct's seed tasks).

Each row becomes the model's chat prompt (the instruction and its input as the user turn)
and the response as the completion; the loss covers the response only. A few rows are held
out for evaluation loss and a greedy generation sample in the report.

    python recipes/instruction_tuning.py
    python recipes/instruction_tuning.py --num-epochs 1 --max-train-rows 64
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

import adapterkit as ak
from adapterkit import data as akdata
from adapterkit.options import parse_options, recipe_main, report_results, run_script
from adapterkit.prompting import generate


@dataclasses.dataclass
class Options:
    """Instruction tuning with an adapter; reports eval loss and generation samples."""

    model: str = "smollm2-135m"
    strategy: str = "lora"
    adapter: dict = dataclasses.field(default_factory=dict)
    bits: int | None = None
    instructions: str | None = None     # a JSONL file; default: self_instruct/seed_tasks.jsonl
    eval_rows: int = 16
    max_train_rows: int | None = None
    samples: int = 3                    # held-out instructions to generate answers for
    max_new_tokens: int = 48
    learning_rate: float | None = None
    num_epochs: float = 2.0
    batch_size: int = 8
    max_length: int = 384
    seed: int = 0
    max_steps: int = -1
    output_dir: str = "runs/instruction-tuning"
    name: str = "default"
    publish: str | None = None
    results_json: str | None = None


def to_prompt(tokenizer: Any, instruction: str, input_text: str) -> str:
    """The user turn in the model's chat format (plain text when it has no chat template)."""
    user = instruction + (f"\n\n{input_text}" if input_text else "")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return f"Instruction: {user}\nResponse:"


@recipe_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse_options(Options, argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    table = akdata.load_instructions(opts.instructions).shuffle(seed=opts.seed)
    if len(table) <= opts.eval_rows:
        raise ak.DataError(
            f"{len(table)} instructions cannot spare {opts.eval_rows} for evaluation; lower "
            f"{akdata.option_hint('eval_rows')}."
        )
    held_out = table.select(range(opts.eval_rows))
    train = table.select(range(opts.eval_rows, len(table) if opts.max_train_rows is None else min(len(table), opts.eval_rows + opts.max_train_rows)))

    model, tokenizer = ak.load_base(opts.model, task="causal-lm", bits=opts.bits)
    ak.attach(model, opts.strategy, name=opts.name, **opts.adapter)

    def rows(ds):
        return [{"prompt": to_prompt(tokenizer, r["instruction"], r["input"]), "completion": r["output"]} for r in ds]

    metrics = ak.train(
        model, tokenizer, rows(train), rows(held_out), learning_rate=opts.learning_rate, num_epochs=opts.num_epochs,
        batch_size=opts.batch_size, max_length=opts.max_length, seed=opts.seed, max_steps=opts.max_steps,
        output_dir=f"{opts.output_dir}/checkpoints", recipe={"recipe": "instruction_tuning", **dataclasses.asdict(opts)},
    )
    if not metrics.trainer.is_world_process_zero():  # torchrun: print, generate, save and publish once
        return metrics
    print(ak.summary(model))
    sample_rows = held_out.select(range(min(opts.samples, len(held_out))))
    answers = generate(model, tokenizer, [r["prompt"] for r in rows(sample_rows)], max_new_tokens=opts.max_new_tokens)
    folder = ak.save(model, f"{opts.output_dir}/adapter", name=opts.name)
    results = {
        "model": opts.model, "strategy": opts.strategy,
        "instructions": opts.instructions or "self_instruct/seed_tasks.jsonl (bundled)",
        "train_rows": len(train), "eval_rows": len(held_out),
        "eval_loss": round(metrics["eval_loss"], 4), "eval_perplexity": round(metrics["eval_perplexity"], 2),
        "train_seconds": round(metrics["train_seconds"], 1), "adapter": str(folder),
    }
    if opts.publish:
        results["commit_url"] = ak.publish(folder, opts.publish)
    results["samples"] = [{"instruction": r["instruction"], "generated": a} for r, a in zip(sample_rows, answers)]
    report_results(results, opts.results_json)
    for row, answer in zip(sample_rows, answers):
        print(f"\n### {row['instruction']}\n{row['input']}\n--- generated:\n{answer.strip()}\n--- reference:\n{row['output']}")
    return results


if __name__ == "__main__":
    sys.exit(run_script(main))
