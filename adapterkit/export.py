"""Merged export: one adapter folded into its base, written as a plain transformers checkpoint.

Any engine loads the result (vLLM, TGI, llama.cpp converters, plain ``from_pretrained``) with no
adapter support at all. LoRA (and DoRA) updates are added into the base weights; the label
head and any block an adapter trains are its own copies; a ``full`` adapter is the model. A
base trained in 4/8-bit is merged into the dequantized weights the adapter was trained
against, never into re-rounded ones, and written in the precision asked for.

``quantize="nf4" | "fp4" | "int8"`` re-quantizes the merged weights with bitsandbytes after the
merge (the checkpoint then carries its ``quantization_config``, so ``from_pretrained`` loads it
quantized); the report measures the quantized export, so its price in fidelity is visible.

Every export writes ``export_report.json`` beside the checkpoint: how closely the written
checkpoint, loaded back with ``from_pretrained``, reproduces the unmerged adapter on the
texts given (top-1 agreement, mean KL divergence, largest logit difference, and the accuracy
of both on labelled rows).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adapterkit.heads as heads
import adapterkit.hub as hub
import adapterkit.io as io
from adapterkit.api import load, use
from adapterkit.artifacts import read_sidecar
from adapterkit.base_model import load_base
from adapterkit.errors import AdapterExistsError, IncompatibleModelError, InvalidOptionError
from adapterkit.quantized import bnb_config, dequantize_linear, is_bnb, quantization_of
from adapterkit.sources import resolve_source
from adapterkit.registry import default_registry
from adapterkit.state import get_store, require_store, unwrap

logger = logging.getLogger(__name__)

REPORT = "export_report.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: re-quantization of an export: name -> (bits, 4-bit quant type)
QUANTIZE = {"nf4": (4, "nf4"), "fp4": (4, "fp4"), "int8": (8, None)}
_DEFAULT_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "A great movie, I would watch it again.",
    "What is the capital of France?",
    "This was a complete waste of time.",
)


@dataclass
class ExportReport:
    """What :func:`export` wrote and how faithful it is to the unmerged adapter."""

    folder: str = ""
    adapter: str = ""
    strategy: str = ""
    dtype: str = "float32"
    base_quantization: str | None = None
    #: bitsandbytes quantization of the written checkpoint (None: plain ``dtype`` weights)
    quantization: str | None = None
    #: report rows (texts); the comparisons below are over their tokens (classification: the rows)
    rows: int = 0
    #: share of positions (classification: rows) where both pick the same top class / token
    top1_agreement: float = math.nan
    #: mean KL(unmerged || merged) of the output distributions, in nats
    mean_kl: float = math.nan
    max_abs_logit_diff: float = math.nan
    #: accuracy of the unmerged adapter and of the export on labelled rows (None without labels)
    unmerged_accuracy: float | None = None
    merged_accuracy: float | None = None
    files: list[str] = field(default_factory=list)

    @property
    def accuracy_delta(self) -> float | None:
        """Merged minus unmerged accuracy (None without labels)."""
        if self.unmerged_accuracy is None or self.merged_accuracy is None:
            return None
        return self.merged_accuracy - self.unmerged_accuracy

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_delta": self.accuracy_delta}


def export(
    model: nn.Module | str | os.PathLike,
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    name: str | None = None,
    merge: bool = True,
    dtype: str = "float32",
    texts: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    max_length: int = 128,
    quantize: str | None = None,
) -> ExportReport:
    """Write adapter ``name`` (default: the active one) merged into its base as a plain checkpoint.

    Args:
        model: a model carrying the adapter (a 4/8-bit base too: merged into its dequantized weights),
            or a saved adapter (folder or Hub id): its recorded base is loaded as it was trained
            (same quantization) and the adapter onto it.
        out: the folder to write (new or empty, or an earlier export); written atomically.
        tokenizer: saved beside the weights, and used for the fidelity report.
        name: which adapter; the active one when omitted.
        merge: must be True (an unmerged adapter is what :func:`adapterkit.save` writes).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for the written weights.
        texts / labels: rows for the fidelity report (labels: class ids, classifiers only);
            a few fixed sentences when omitted.
        max_length: tokens per report row.
        quantize: ``"nf4"``, ``"fp4"`` (4-bit) or ``"int8"``: re-quantize the merged weights with
            bitsandbytes (after merging in full precision; ``dtype`` is then the dtype of the
            layers left unquantized, such as embeddings and norms).

    Returns:
        The :class:`ExportReport`, also written as ``export_report.json``.

    Raises:
        IncompatibleModelError: the adapter's strategy cannot be folded into weights (prefix).
        AdapterExistsError: ``out`` holds files that are not an earlier export.
    """
    if not merge:
        raise InvalidOptionError("export(merge=False) would write the adapter as it is: use adapterkit.save() for that.")
    if dtype not in DTYPES:
        raise InvalidOptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if quantize is not None and quantize not in QUANTIZE:
        raise InvalidOptionError(f"quantize must be one of {', '.join(QUANTIZE)} or None, got {quantize!r}.")
    if labels is not None and (texts is None or len(labels) != len(texts)):
        raise InvalidOptionError("labels need texts of the same length (one class id per text).")
    if isinstance(model, (str, os.PathLike)):
        model, own_tokenizer = _load_saved_adapter(model)
        tokenizer = tokenizer if tokenizer is not None else own_tokenizer
    if tokenizer is None:
        raise InvalidOptionError("export needs tokenizer= to write the tokenizer and measure the export's fidelity.")
    base = unwrap(model)
    store = require_store(base)
    name = name or store.active
    if name is None:
        raise InvalidOptionError(f"No adapter is active; pass name= (loaded: {', '.join(sorted(store.records))}).")
    record = store.record(name)
    impl = default_registry.get(record.strategy)()
    if not impl.merges_into_weights:
        raise IncompatibleModelError(
            f"A '{record.strategy}' adapter cannot be merged into the base's weights (it adds inputs or state "
            "the base does not have). Serve it with adapterkit.load()/use() or export another strategy's adapter."
        )
    merged = merged_model(base, name, dtype=DTYPES[dtype])
    out = Path(out)
    with io.writing_folder(out, prepare=_check_destination) as tmp:
        if quantize is None:
            merged.save_pretrained(tmp, safe_serialization=True)
        else:
            _save_quantized(merged, tmp, quantize, DTYPES[dtype])
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        reloaded = type(merged).from_pretrained(tmp, dtype=torch.float32)
        report = _fidelity(base, name, reloaded, tokenizer, texts, labels, max_length)
        report.folder, report.adapter, report.strategy, report.dtype = str(out), name, record.strategy, dtype
        report.base_quantization = record.meta.get("quantization")
        report.quantization = quantization_of(reloaded)
        report.files = sorted([*(p.name for p in tmp.iterdir()), REPORT])
        (tmp / REPORT).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    logger.info("Exported adapter '%s' merged into its base to %s (top-1 agreement %.4f, mean KL %.2e)",
                name, out, report.top1_agreement, report.mean_kl)
    return report


def _save_quantized(merged: nn.Module, folder: Path, quantize: str, dtype: torch.dtype) -> None:
    """Quantize the merged model with bitsandbytes (from its full-precision weights) and save it."""
    bits, quant_type = QUANTIZE[quantize]
    # The full-precision copy goes inside the folder being written, so a crash leaves it to the
    # same cleanup as the rest of an unfinished export.
    plain = folder / ".merged-full-precision"
    merged.save_pretrained(plain, safe_serialization=True)
    try:
        config = bnb_config(bits, quant_type=quant_type or "nf4", compute_dtype=dtype)
        quantized = type(merged).from_pretrained(plain, quantization_config=config, dtype=dtype)
        quantized.save_pretrained(folder, safe_serialization=True)
    finally:
        shutil.rmtree(plain, ignore_errors=True)


def _load_saved_adapter(source: str | os.PathLike) -> tuple[nn.Module, Any]:
    """The base a saved adapter records, loaded as it was trained, with the adapter on it."""
    found = resolve_source(source, what="adapter", error=InvalidOptionError)
    if found.kind == "file":
        raise InvalidOptionError(f"{source} is a file; pass the adapter folder that holds it.")
    folder = found.path if found.kind == "folder" else hub.download(found.repo_id)
    sidecar = read_sidecar(Path(folder)) or {}
    base_id = (sidecar.get("base_model") or {}).get("id")
    if not base_id:
        raise InvalidOptionError(f"{source} does not record its base model: load the base yourself and pass the model.")
    quantization = sidecar.get("quantization") or ""
    bits = 4 if quantization.startswith("bnb-4bit") else 8 if quantization.startswith("bnb-8bit") else None
    kwargs = {"quant_type": quantization.rsplit("-", 1)[-1]} if bits == 4 else {}
    model, tokenizer = load_base(base_id, task=sidecar.get("task"), bits=bits,
                                 label_names=sidecar.get("label_names"), **kwargs)
    load(model, str(folder))
    return model, tokenizer


def merged_model(base: nn.Module, name: str, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A new plain transformers model (no adapters, no quantization) whose weights are ``base``
    with adapter ``name`` folded in."""
    store = get_store(base)
    config = copy.deepcopy(base.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    plain = type(base)(config)
    keys = list(plain.state_dict())
    values = {key: _merged_value(base, store, name, key) for key in keys}
    tied = _tied_pairs(plain)
    if any(not torch.equal(values[a], values[b]) for a, b in tied):
        # The adapter trained its own copy of a tied output embedding: the export keeps both.
        config.tie_word_embeddings = False
        plain = type(base)(config)
    missing, unexpected = plain.load_state_dict(values, strict=False)
    if missing or unexpected:
        raise IncompatibleModelError(f"The merged weights do not fit {type(base).__name__}: missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]}.")
    plain.to(dtype)
    plain.eval()
    return plain


def _merged_value(base: nn.Module, store: Any, name: str, key: str) -> torch.Tensor:
    path, _, leaf = key.rpartition(".")
    module = _module_for(base, store, name, path)
    inner = getattr(module, "base_layer", None)
    if isinstance(inner, nn.Module):  # a peft tuner layer: its base layer, plus the adapter's update
        if leaf == "weight":
            return _merged_weight(module, name).detach().clone()
        module = inner
    if is_bnb(module):
        module = dequantize_linear(module)
    value = getattr(module, leaf, None)
    if not isinstance(value, torch.Tensor):
        raise IncompatibleModelError(f"The base has no tensor '{key}' to export (found {type(value).__name__}).")
    return value.detach().float().clone() if value.is_floating_point() else value.detach().clone()


def _module_for(base: nn.Module, store: Any, name: str, path: str) -> nn.Module:
    """The module adapter ``name`` uses at ``path``: its own head copy where it has one."""
    module, prefix = base, ""
    for part in path.split(".") if path else []:
        prefix = f"{prefix}.{part}" if prefix else part
        module = getattr(module, part)
        if store is not None and prefix in store.base_heads:
            module = heads.head_for(store, name, prefix)
    return module


def _merged_weight(layer: nn.Module, name: str) -> torch.Tensor:
    """The base weight of a peft LoRA layer (dequantized) with adapter ``name``'s update added."""
    base_layer = layer.get_base_layer()
    weight = (dequantize_linear(base_layer) if is_bnb(base_layer) else base_layer).weight.detach().float()
    if name not in getattr(layer, "lora_A", {}):
        return weight
    delta = layer.get_delta_weight(name).detach().float()  # in the base weight's layout, scaling included
    if not layer.use_dora.get(name, False):
        return weight + delta
    # DoRA: m / ||W + dW|| (per output, norm over inputs) times (W + dW), as peft's forward computes it.
    transposed = bool(getattr(layer, "fan_in_fan_out", False))
    combined = (weight + delta).T if transposed else weight + delta
    magnitude = layer.lora_magnitude_vector[name].weight.detach().float()
    scaled = (magnitude / torch.linalg.norm(combined, dim=1)).unsqueeze(1) * combined
    return scaled.T if transposed else scaled


def _tied_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Pairs of state-dict keys that name one shared tensor (tied embeddings)."""
    by_tensor: dict[int, str] = {}
    pairs = []
    for key, value in model.state_dict(keep_vars=True).items():
        first = by_tensor.setdefault(id(value), key)
        if first != key:
            pairs.append((first, key))
    return pairs


def _check_destination(path: Path) -> None:
    if os.path.islink(path) or (path.exists() and not path.is_dir()):
        raise AdapterExistsError(f"Cannot export to {path}: it is a file or a link, not a folder. Pick another path.")
    if path.is_dir() and any(path.iterdir()) and not (path / REPORT).is_file():
        raise AdapterExistsError(
            f"Cannot export to {path}: the folder holds files that are not an earlier export. export replaces "
            "only its own exports and never deletes your files: pick a new or empty folder."
        )


def _fidelity(base: nn.Module, name: str, merged: nn.Module, tokenizer: Any, texts: Sequence[str] | None,
              labels: Sequence[int] | None, max_length: int) -> ExportReport:
    """Compare the unmerged adapter with the reloaded export on ``texts``."""
    texts = list(texts) if texts is not None else list(_DEFAULT_TEXTS)
    was_training = base.training
    base.eval()
    agree = total = 0
    kl_sum, max_diff = 0.0, 0.0
    correct = {"unmerged": 0, "merged": 0}
    try:
        with torch.no_grad(), use(base, name):
            for start in range(0, len(texts), 16):
                batch = tokenizer(texts[start : start + 16], return_tensors="pt", padding=True, truncation=True,
                                  max_length=max_length)
                device = next(base.parameters()).device
                ours = base(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
                theirs = merged(**batch).logits.float()
                mask = batch["attention_mask"].bool() if ours.dim() == 3 else torch.ones(ours.shape[0], dtype=torch.bool)
                p, q = ours[mask], theirs[mask]
                agree += int((p.argmax(-1) == q.argmax(-1)).sum())
                total += int(mask.sum())
                kl = torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="none")
                kl_sum += float(kl.sum(-1).clamp_min(0).sum())
                max_diff = max(max_diff, float((p - q).abs().max()))
                if labels is not None and ours.dim() == 2:
                    gold = torch.tensor(list(labels[start : start + 16]))
                    correct["unmerged"] += int((ours.argmax(-1) == gold).sum())
                    correct["merged"] += int((theirs.argmax(-1) == gold).sum())
    finally:
        base.train(was_training)
    labelled = labels is not None and len(texts) > 0 and ours.dim() == 2
    return ExportReport(
        adapter=name, rows=len(texts),
        top1_agreement=agree / total if total else math.nan, mean_kl=kl_sum / total if total else math.nan,
        max_abs_logit_diff=max_diff,
        unmerged_accuracy=correct["unmerged"] / len(texts) if labelled else None,
        merged_accuracy=correct["merged"] / len(texts) if labelled else None,
    )
