"""load_base: a base model and its tokenizer, for a task, optionally 4/8-bit quantized."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import transformers
from torch import nn

from adapterkit.errors import InvalidOptionError, ModelNotAvailableError
from adapterkit.models import hub_error_hint, resolve_model
from adapterkit.quantized import bnb_config, prepare_for_kbit_training

logger = logging.getLogger(__name__)

TASKS = ("classification", "causal-lm", "seq2seq")


def infer_task(config: Any) -> str:
    """The task a checkpoint is made for, from its config.

    ``*ForSequenceClassification`` -> classification; encoder-decoder -> seq2seq; a decoder
    (``*ForCausalLM``/``*LMHeadModel`` or ``is_decoder``) -> causal-lm; a bare encoder such as
    a sentence-embedding BERT -> classification, the only task it can serve directly.
    """
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "classification"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) or getattr(config, "is_decoder", False):
        return "causal-lm"
    return "classification"


def _auto_class(task: str):
    return {
        "classification": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
    }[task]


def load_base(
    name_or_path: str | os.PathLike,
    *,
    task: str | None = None,
    bits: int | None = None,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = False,
    revision: str | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Load a base model and tokenizer from an embedded alias, a local folder or a Hub id.

    Args:
        name_or_path: ``"minilm-l6"``/``"smollm2-135m"`` (packaged, offline), a folder, or a Hub id.
        task: ``"classification"``, ``"causal-lm"`` or ``"seq2seq"``; inferred when omitted.
        bits: None for full precision, 8 or 4 for bitsandbytes quantization.
        num_labels: classes for classification (default: from label_names, else 2).
        label_names: class names, stored as ``id2label`` and saved with adapters.
        quant_type: 4-bit data type, ``"nf4"`` (default) or ``"fp4"``.
        double_quant: quantize the 4-bit scales too.
        compute_dtype: dtype of 4-bit matmuls (bf16 on CUDA, fp32 on CPU by default).
        gradient_checkpointing: for quantized training (slower on CPU, saves memory on GPU).
        revision: Hub revision of the base.
        **kwargs: passed to ``from_pretrained`` (``torch_dtype``, ``device_map``, ...).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        InvalidOptionError: bad task or bits.
        ModelNotAvailableError: the model is not installed, a path that does not exist, not a model folder, or
            the Hub cannot serve it (the message names the cause: offline, unreachable, gated, no such repo ...).
    """
    if task is not None and task not in TASKS:
        raise InvalidOptionError(f"task must be one of {', '.join(TASKS)} or None (inferred), got {task!r}.")
    if bits not in (None, 4, 8):
        raise InvalidOptionError(f"bits must be None (full precision), 8 or 4, got {bits!r}.")
    resolved = resolve_model(name_or_path)
    source = str(resolved.path)
    try:
        config = transformers.AutoConfig.from_pretrained(source, revision=revision)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, revision=revision)
    except OSError as err:
        raise hub_error_hint(name_or_path, err) from err
    task = task or infer_task(config)
    if task == "classification":
        if label_names is not None:
            num_labels = num_labels or len(label_names)
            if num_labels != len(label_names):
                raise InvalidOptionError(f"num_labels={num_labels} but {len(label_names)} label_names were given.")
        has_head = any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))
        if num_labels is None and has_head:
            # A trained classifier loads as it is: its own head and label names.
            num_labels = config.num_labels
            saved = getattr(config, "id2label", None) or {}
            if label_names is None and len(saved) == num_labels:
                label_names = [str(saved[i]) for i in sorted(saved, key=int)]
        num_labels = num_labels or 2
        label_names = label_names or [f"LABEL_{i}" for i in range(num_labels)]
        if has_head and getattr(config, "num_labels", num_labels) != num_labels:
            # A classifier for another label set: keep the body, start a new head.
            logger.info("%s has a %d-way head; starting a new %d-way one.", name_or_path, config.num_labels, num_labels)
            kwargs.setdefault("ignore_mismatched_sizes", True)
        kwargs.update(
            num_labels=num_labels,
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
    if tokenizer.pad_token is None:
        # Decoders ship without a pad token; eos is the standard stand-in for batching.
        tokenizer.pad_token = tokenizer.eos_token
    if task == "classification" and getattr(config, "pad_token_id", None) is None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    if bits is not None:
        kwargs["quantization_config"] = bnb_config(
            bits, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype
        )
    logger.info("Loading %s (%s) for %s%s", resolved.model_id, source, task, f", {bits}-bit" if bits else "")
    try:
        model = _auto_class(task).from_pretrained(source, revision=revision, **kwargs)
    except OSError as err:
        raise hub_error_hint(name_or_path, err) from err
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ModelNotAvailableError(
                f"{resolved.model_id} ({config.model_type}) has no {task} head in transformers. "
                f"Pick another task (one of {', '.join(TASKS)}) or another model."
            ) from err
        raise
    if bits is not None:
        model = prepare_for_kbit_training(model, gradient_checkpointing=gradient_checkpointing)
    model.__dict__["_adapterkit_base_id"] = resolved.model_id
    return model, tokenizer
