"""train(): fine-tune the active adapter with transformers' Trainer.

Built on Trainer so that ``torchrun`` / ``accelerate launch`` (DDP, FSDP, DeepSpeed) scale the
same call out; whatever is written or logged once per run is left to Trainer, which knows the
main process. adapterkit adds: the task shapes (:mod:`adapterkit.training.tasks`), dynamic padding
with length-grouped batches (padding is wasted compute), per-strategy learning rates,
adapter-only checkpoints that resume, the 4-bit CPU fix, the feature cache for frozen backbones,
and metrics recorded in the adapter's sidecar.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import transformers  # a lazy module: Trainer itself loads on first use, not on import adapterkit
from torch import nn

from adapterkit.api import activate, trainable_parameters
from adapterkit.artifacts import restore_weights, save
from adapterkit.compat import transformers as transformers_compat
from adapterkit.errors import DataError, InvalidOptionError, did_you_mean
from adapterkit.metrics import quality_metrics
from adapterkit.quantized import keep_4bit_trainable, quantization_of
from adapterkit.registry import default_registry
from adapterkit.state import freeze_all_but, require_store, unwrap
from adapterkit.training.dropout import bulk_dropout, step_seeder, use_bulk_dropout
from adapterkit.training.features import cached_backbone
from adapterkit.training.settings import TrainSettings, position_limit, resolved_max_length, training_arguments
from adapterkit.training.tasks import as_dataset, check_data

logger = logging.getLogger(__name__)


class TrainResult(dict):
    """The metrics :func:`train` returns (a plain ``dict`` of them), plus the Trainer that ran.

    ``result.trainer`` is the ``transformers.Trainer`` (``result.trainer.is_world_process_zero()``
    tells a distributed recipe which process saves). It is not part of the mapping: equality,
    ``json.dumps`` and ``dict(result)`` see the metrics only, and copies or pickles of a result
    are plain metric dicts without it.
    """

    def __init__(self, metrics: dict[str, Any], trainer: Any = None) -> None:
        super().__init__(metrics)
        self.trainer = trainer

    def __reduce__(self):
        return dict, (dict(self),)


def train(
    model: nn.Module,
    tokenizer: Any,
    train_data: Any,
    eval_data: Any = None,
    *,
    name: str | None = None,
    recipe: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    **settings: Any,
) -> TrainResult:
    """Train the active adapter (or ``name``) with transformers' Trainer.

    Args:
        model: a model with an adapter attached or loaded.
        tokenizer: its tokenizer.
        train_data: rows of one task shape (:mod:`adapterkit.training.tasks`): ``text``+``label``
            (classification; with ``text_pair``, pair classification), ``prompt``+``completion`` or
            ``text`` (causal LM), ``prompt``+``completion`` (seq2seq: the prompt is the encoder's
            input, the completion the decoder's target), or a shape of :func:`register_task`.
        eval_data: the same shape, evaluated each epoch and at the end.
        name: the adapter to train (default: the active one).
        recipe: settings to record in the adapter's sidecar.
        callbacks: ``transformers.TrainerCallback`` objects (early stopping, logging, ...).
        **settings: see :class:`TrainSettings` (``learning_rate``, ``num_epochs``, ``batch_size``,
            ``max_length``, ``seed``, ``output_dir``, ``resume_from_checkpoint``, any other
            ``TrainingArguments`` field, or ``args=TrainingArguments(...)``).

    Returns:
        A :class:`TrainResult`: the metrics ``train_loss``, ``train_runtime`` (Trainer's loop),
        ``train_seconds`` (wall time of training, the feature cache included), and ``eval_*``
        (accuracy and macro-F1 for classification, loss and perplexity for language modelling),
        with the Trainer as ``.trainer``. The metrics proper (losses, accuracy, F1, perplexity; no
        timings or epoch counts) are also recorded on the adapter.

    Raises:
        InvalidOptionError: a setting is unknown or out of range (all listed at once).
        DataError: rows no training step could use: empty or non-string texts, empty or
            out-of-range labels, a single class, evaluation labels the training data lacks.
        Both are raised before any Trainer is built or any weight changes.
    """
    cfg = TrainSettings(**settings)
    base = unwrap(model)
    name = _adapter_name(require_store(base), name)
    record = require_store(base).record(name)
    limit = position_limit(base.config)
    _check_settings(cfg, limit, tokenizer)
    max_length = resolved_max_length(cfg, limit)
    task = record.meta.get("task") or "causal-lm"
    num_labels = len(record.meta.get("label_names") or []) or getattr(base.config, "num_labels", None)
    train_ds, eval_ds = as_dataset(train_data, "train_data"), as_dataset(eval_data, "eval_data")
    shape = check_data(train_ds, eval_ds, task=task, num_labels=num_labels)
    lengths = dict(max_length=max_length, max_target_length=cfg.max_target_length or max_length)
    for ds, what in ((train_ds, "train_data"), (eval_ds, "eval_data")):
        if ds is not None:
            shape.check_lengths(ds, tokenizer, policy=cfg.length_policy, what=what, **lengths)
    strategy = default_registry.get(record.strategy)()
    use_cache = _use_cache(cfg, shape, strategy, base, name, record.strategy)
    bulk = use_bulk_dropout(cfg.fast_dropout, base, checkpointing=cfg.gradient_checkpointing
                            or bool(getattr(base, "is_gradient_checkpointing", False)))
    lr = cfg.learning_rate or (cfg.args.learning_rate if cfg.args is not None else strategy.default_learning_rate)
    output_dir = cfg.output_dir or (cfg.args.output_dir if cfg.args is not None else None)
    args = training_arguments(cfg, output_dir=output_dir or tempfile.mkdtemp(prefix="adapterkit-train-"),
                              learning_rate=lr, evaluate=eval_ds is not None)

    activate(base, name)
    transformers.set_seed(args.seed)
    train_tok = shape.tokenize(train_ds, tokenizer, num_labels=num_labels, what="train_data", **lengths)
    eval_tok = None if eval_ds is None else shape.tokenize(eval_ds, tokenizer, num_labels=num_labels,
                                                          what="eval_data", **lengths)
    params = trainable_parameters(base, name)
    freeze_all_but(base, list(params.values()))
    if quantization_of(base):
        keep_4bit_trainable(base)
    # Trainer refuses a quantized model unless it knows adapters are attached; they are, injected
    # in place rather than through a PeftModel wrapper. Unset after training.
    mark = quantization_of(base) is not None and not transformers_compat.is_marked_peft_loaded(base)
    if mark:
        transformers_compat.mark_peft_loaded(base)
    try:
        last_eval = _last_evaluation_class()()
        trainer = _trainer_class()(
            model=model, args=args, train_dataset=train_tok,
            eval_dataset=eval_tok if args.eval_strategy != "no" else None,
            data_collator=shape.collator(tokenizer, base), processing_class=tokenizer,
            compute_metrics=shape.compute_metrics, callbacks=[*(callbacks or []), last_eval],
        )
        trainer.adapter_name = name
        logger.info("Training adapter '%s' (%s, %s rows): %d trainable parameters, lr %g, %s epochs", name,
                    record.strategy, shape.name, sum(p.numel() for p in params.values()), lr, args.num_train_epochs)
        metrics = _run(trainer, base, cfg, train_tok, eval_tok, last_eval, use_cache, bulk)
    finally:
        if mark:
            transformers_compat.unmark_peft_loaded(base)
    metrics.update(shape.summarize(metrics))
    record.meta.setdefault("metrics", {}).update(quality_metrics(metrics))
    record.meta["recipe"] = {**(recipe or {}), "train_settings": cfg.record(learning_rate=lr, max_length=max_length)}
    return TrainResult(metrics, trainer)


def _adapter_name(store: Any, name: str | None) -> str:
    name = name or store.active
    if name is None:
        raise InvalidOptionError(f"No adapter is active; pass name= (loaded: {', '.join(sorted(store.records))}).")
    if name not in store.records:
        raise InvalidOptionError(
            f"No adapter named {name!r} on this model.{did_you_mean(name, store.records)} "
            f"Loaded: {', '.join(sorted(store.records))}."
        )
    return name


def _check_settings(cfg: TrainSettings, limit: int | None, tokenizer: Any) -> None:
    problems = cfg.problems(limit)
    if tokenizer is None or not callable(tokenizer):
        problems.append(f"the tokenizer must be the model's tokenizer (from adapterkit.load_base), got {tokenizer!r}")
    if problems:
        raise InvalidOptionError("Invalid training settings:\n  - " + "\n  - ".join(problems))


def _use_cache(cfg: TrainSettings, shape: Any, strategy: Any, base: nn.Module, name: str, strategy_name: str) -> bool:
    """Whether to train on cached backbone outputs: asked for, or automatic when nothing in the backbone trains."""
    if cfg.cache_features is False:
        return False
    frozen = strategy.backbone_frozen(base, name)
    if cfg.cache_features and not frozen:
        raise InvalidOptionError(
            f"cache_features=True runs the backbone once and trains only the head, but adapter '{name}' "
            f"({strategy_name}) trains backbone layers too. Leave cache_features unset (automatic) or False."
        )
    if cfg.cache_features and not shape.cacheable:
        raise InvalidOptionError(
            f"cache_features=True cannot serve {shape.name!r} rows: the backbone's outputs depend on more than "
            "the token ids there. Leave cache_features unset (automatic) or False."
        )
    return frozen and shape.cacheable


def _run(trainer: Any, base: nn.Module, cfg: TrainSettings, train_tok, eval_tok, last_eval: Any,
         use_cache: bool, bulk: bool) -> dict[str, Any]:
    """Run Trainer (on cached backbone features when asked) and collect the metrics."""
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    cache_seconds = 0.0
    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if bulk:
                seeder = step_seeder(stack.enter_context(bulk_dropout(base, seed=trainer.args.seed)))
                trainer.add_callback(seeder)
                stack.callback(trainer.remove_callback, seeder)
            if use_cache:
                tokenized = [d for d in (train_tok, eval_tok) if d is not None]
                stack.enter_context(cached_backbone(base, tokenized, batch_size=trainer.args.per_device_eval_batch_size))
                cache_seconds = time.perf_counter() - started
            result = trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
            train_seconds = time.perf_counter() - started
            if eval_tok is None:
                evaluated = {}
            elif last_eval.step == trainer.state.global_step:
                # Trainer just evaluated the final weights (end of the last epoch): running the dev set
                # again would double the evaluation cost for the same numbers.
                evaluated = last_eval.metrics
            else:
                evaluated = trainer.evaluate(eval_tok)
    finally:
        if cfg.gradient_checkpointing:
            base.gradient_checkpointing_disable()
        base.eval()
    metrics: dict[str, Any] = {
        "train_loss": float(result.training_loss),
        "train_runtime": float(result.metrics.get("train_runtime", 0.0)),
        "train_samples": len(train_tok),
        "cached_features": bool(use_cache),
        # The one backbone pass that caching costs is outside Trainer's train_runtime.
        "feature_cache_seconds": round(cache_seconds, 3),
        "train_seconds": round(train_seconds, 3),
    }
    metrics.update({k: float(v) for k, v in evaluated.items() if isinstance(v, (int, float))})
    return metrics


def _save_checkpoint(trainer: Any, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    save(trainer.model, Path(output_dir) / "adapter", name=trainer.adapter_name)


def _load_checkpoint(trainer: Any, checkpoint: str, model: nn.Module) -> None:
    folder = Path(checkpoint) / "adapter"
    if not folder.is_dir():
        raise DataError(f"{checkpoint} is not an adapterkit checkpoint (no adapter/ folder).")
    restore_weights(model, trainer.adapter_name, folder)


# Built on first use, not at import: subclassing Trainer loads it (seconds), and `import adapterkit` need not.
@functools.cache
def _trainer_class() -> type:
    class AdapterTrainer(transformers_compat.checkpoint_trainer_class(_save_checkpoint, _load_checkpoint)):
        """Trainer whose checkpoints hold the adapter only, and resume from it."""

        adapter_name: str = "default"

    return AdapterTrainer


@functools.cache
def _last_evaluation_class() -> type:
    class LastEvaluation(transformers.TrainerCallback):
        """Remembers Trainer's latest evaluation and the step it ran at."""

        step: int | None = None
        metrics: dict[str, float] = {}

        def on_evaluate(self, args, state, control, metrics=None, **kwargs) -> None:
            self.step = state.global_step
            self.metrics = dict(metrics or {})

    return LastEvaluation
