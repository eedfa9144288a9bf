"""Composing shared LoRA adapters for a task nobody trained, from a few labelled examples.

LoraHub (Huang et al. 2023, https://arxiv.org/abs/2307.13269): the new adapter is a weighted
merge of existing ones, and the weights are searched without gradients through the base,
by a gradient-free optimizer (CMA-ES, from the ``cma`` package) on the few-shot loss plus an
L1 penalty that keeps weights small. Every evaluation is one forward over the examples, so
composing costs a few dozen forwards, not a training run.

Each evaluation folds the candidate's update ``sum_i w_i s_i B_i A_i`` into the adapted base
weights and runs the bare base, so it costs a bare-base forward, not one through a rank-sum
LoRA adapter; the base weights are copied back from a saved copy afterwards, bit for bit (the
price: one copy of the adapted weights in memory). ``fold=False`` evaluates through the
adapter instead (the same loss up to float rounding).

Candidates are adapters already loaded on the model or sources (folders, Hub ids) that are
loaded for the search; only those trained on this very base (the fingerprint in their
sidecar) take part, the others are skipped and named in the result's record.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

import adapterkit.api as api
from adapterkit.merge import Checkpoint, merge, reweight
from adapterkit.errors import AdapterMismatchError, AdapterNotFoundError, InvalidOptionError
from adapterkit.fingerprint import check_fit, fingerprint
from adapterkit.model_info import base_model_id
from adapterkit.state import get_store, unwrap

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def _model_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**batch).loss


def compose(
    model: nn.Module,
    candidates: list[str],
    examples: Batch | Iterable[Batch],
    *,
    name: str = "composed",
    loss_fn: LossFn | None = None,
    l1: float = 0.05,
    max_evaluations: int = 60,
    bounds: tuple[float, float] = (-1.5, 1.5),
    method: str = "cat",
    seed: int = 0,
    keep_candidates: bool = False,
    fold: bool = True,
) -> nn.Module:
    """Merge ``candidates`` with weights learnt from ``examples``; the result is active on ``model``.

    Args:
        model: the base model (it may already carry the candidates).
        candidates: names of LoRA adapters loaded on ``model``, or folders / Hub ids to load.
            At least two must fit this base; the others are skipped.
        examples: a tokenized batch (``input_ids``, ``attention_mask``, ``labels``...) or a list
            of them: the few labelled examples the weights are fitted to.
        name: the composed adapter's name.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default the model's own loss
            (``model(**batch).loss``), so labels are required.
        l1: weight of the penalty ``l1 * mean(|w|)`` added to the loss.
        max_evaluations: how many weight vectors the optimizer may try (each one forward pass
            over the examples).
        bounds: the range of each weight.
        method: how the weighted candidates are merged (see :func:`adapterkit.merge`); ``cat``
            is exactly the weighted sum of their updates.
        seed: seeds the optimizer, so a call is reproducible.
        keep_candidates: keep the candidates this call loaded (default: detach them; the
            composed adapter has its own tensors).
        fold: evaluate each weight vector with its update added into the base weights (a
            bare-base forward; needs a copy of the adapted base weights in memory, and no other
            thread may use the model meanwhile). Adapters that cannot be folded (quantized
            or shared base weights, DoRA, embedding LoRA, label heads) are evaluated through
            the adapter, and the record says why. False: always through the adapter.

    Returns:
        The same model, carrying ``name``. Its record's ``meta["merge"]`` names the candidates,
        the weights found and, under ``"search"``, the examples used, the loss reached (and the
        base's, with every weight 0), the evaluations, the best objective after each one
        (``"curve"``) and the best point after each generation (``"generations"``: the search is
        deterministic, so a smaller ``max_evaluations`` would have stopped there), how the
        evaluations were computed (``"evaluation"``) and the skipped candidates.

    Raises:
        InvalidOptionError: bad options, no examples, or fewer than two candidates fit.
        AdapterNotFoundError: a candidate is neither loaded nor a source that exists.
    """
    batches = _batches(examples)
    _check_options(candidates, l1, max_evaluations, bounds)
    cma = _import_cma()
    base = unwrap(model)
    loss_fn = loss_fn or _model_loss
    undo = Checkpoint(base)
    loaded: list[str] = []
    try:
        names, skipped = _gather(base, candidates, loaded)
        if len(names) < 2:
            raise InvalidOptionError(
                f"compose needs at least two candidates trained on this base; {len(names)} fit "
                f"({', '.join(names) or 'none'}); skipped as trained on another base: "
                f"{', '.join(s['candidate'] for s in skipped) or 'none'}. Add candidates, or use adapterkit.merge."
            )
        merge(base, {n: 1 / len(names) for n in names}, name=name, method=method)
        was_training = base.training
        base.eval()
        try:
            search = _search(cma, base, name, names, batches, loss_fn, l1, max_evaluations, bounds, seed, fold)
        finally:
            base.train(was_training)
    except BaseException:
        undo.restore(f"the composition of '{name}'")
        raise
    recipe = api.get_adapter_record(base, name).meta["merge"]
    recipe["search"] = {**search, "skipped": skipped, "examples_sha256": _digest(batches)}
    if not keep_candidates:
        for extra in loaded:
            api.detach(base, extra)
    api.activate(base, name)
    logger.info("Composed '%s' from %s: loss %.4f (base %.4f)", name, recipe["weights"], search["loss"], search["base_loss"])
    return model


def _batches(examples: Any) -> list[Batch]:
    batches = [examples] if isinstance(examples, Mapping) else list(examples) if isinstance(examples, Iterable) else None
    if not batches or not all(isinstance(b, Mapping) and b for b in batches):
        raise InvalidOptionError(
            "examples must be a tokenized batch (a dict of tensors with labels) or a non-empty list of them, "
            f"got {type(examples).__name__}."
        )
    return batches


def _check_options(candidates: Any, l1: Any, max_evaluations: Any, bounds: Any) -> None:
    problems = []
    if isinstance(candidates, str) or not isinstance(candidates, (list, tuple)) or not all(isinstance(c, str) for c in candidates):
        problems.append(f"candidates must be a list of adapter names or sources, got {candidates!r:.80}")
    elif len(set(candidates)) != len(candidates):
        problems.append(f"candidates lists some twice: {sorted(c for c in set(candidates) if candidates.count(c) > 1)}")
    if isinstance(l1, bool) or not isinstance(l1, (int, float)) or not l1 >= 0:
        problems.append(f"l1 must be a number >= 0, got {l1!r}")
    if isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int) or max_evaluations < 2:
        problems.append(f"max_evaluations must be an integer >= 2, got {max_evaluations!r}")
    ok = isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)
    if not ok or not bounds[0] < 0 < bounds[1]:
        problems.append(f"bounds must be (low, high) with low < 0 < high, got {bounds!r}")
    if problems:
        raise InvalidOptionError("Cannot compose: " + "; ".join(problems) + ".")


def _import_cma():
    # Imported on use: an optional dependency that only composition needs.
    try:
        import cma
    except ImportError as err:
        raise ImportError(
            "adapterkit.compose searches the weights with CMA-ES from the 'cma' package: pip install 'adapterkit[compose]'."
        ) from err
    return cma


def _gather(base: nn.Module, candidates: list[str], loaded: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The names of the candidates that fit this base (loading sources); the skipped ones, with why."""
    names, skipped = [], []
    here = fingerprint(base)
    for candidate in candidates:
        store = get_store(base)
        if store is not None and candidate in store.records:
            saved = store.records[candidate].meta.get("base_fingerprint")
            problem = check_fit(saved, here, None, base_model_id(base)) if saved is not None else None
            if problem:
                skipped.append({"candidate": candidate, "reason": problem})
                logger.warning("compose: skipping '%s': %s", candidate, problem)
            else:
                names.append(candidate)
            continue
        name = _free_name(base, candidate)
        try:
            api.load(base, candidate, name=name)
        except AdapterMismatchError as err:
            skipped.append({"candidate": candidate, "reason": str(err)})
            logger.warning("compose: skipping %s: %s", candidate, err)
            continue
        except AdapterNotFoundError as err:
            raise AdapterNotFoundError(
                f"Candidate {candidate!r} is neither an adapter loaded on this model nor a folder or Hub repo: {err}"
            ) from err
        loaded.append(name)
        names.append(name)
    return names, skipped


def _free_name(base: nn.Module, source: str) -> str:
    stem = "".join(ch if ch.isalnum() or ch in "_-" else "-" for ch in os.path.basename(source.rstrip("/\\")) or "candidate")
    stem = stem.lstrip("-_") or "candidate"
    taken = set(api.list_adapters(base))
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}-{i}", i + 1
    return name


class _FoldedBase:
    """Adapter ``name``'s update written into the base weights it adapts, and taken out again.

    ``apply`` sets every adapted weight to ``W + delta`` from a copy of ``W`` taken once, and
    ``restore`` copies ``W`` back, so the base ends bit-identical (adding and subtracting the
    update would not, in floating point). ``reason`` says why folding is off, or is None.
    """

    def __init__(self, base: nn.Module, name: str) -> None:
        self.name = name
        self.layers = [m for m in base.modules() if name in (getattr(m, "lora_A", None) or {})]
        self.reason = _unfoldable(base, name, self.layers)
        self.saved = [] if self.reason else [m.get_base_layer().weight.detach().clone() for m in self.layers]

    def apply(self) -> None:
        with torch.no_grad():
            for layer, original in zip(self.layers, self.saved):
                weight = layer.get_base_layer().weight
                weight.copy_(original).add_(layer.get_delta_weight(self.name).to(weight.dtype))

    def restore(self) -> None:
        with torch.no_grad():
            for layer, original in zip(self.layers, self.saved):
                layer.get_base_layer().weight.copy_(original)


def _unfoldable(base: nn.Module, name: str, layers: list[nn.Module]) -> str | None:
    """Why adapter ``name``'s update cannot be folded into the base weights exactly (None: it can)."""
    store = get_store(base)
    if store is not None and store.heads.get(name):
        return "the adapter has label heads of its own"
    if not layers:
        return "no LoRA layer carries the adapter"
    # A weight shared with another parameter (tied embeddings) would change there too.
    counts: dict[int, int] = {}
    for _, p in base.named_parameters(remove_duplicate=False):
        counts[p.data_ptr()] = counts.get(p.data_ptr(), 0) + 1
    for layer in layers:
        inner = layer.get_base_layer()
        weight = getattr(inner, "weight", None)
        if not isinstance(inner, nn.Linear) or not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            return f"{type(inner).__name__} base layers (quantized or not linear) cannot take the update"
        if getattr(layer, "use_dora", {}).get(name) or getattr(layer, "merged_adapters", None):
            return "DoRA or an adapter already merged into the base"
        if counts.get(weight.data_ptr(), 0) > 1:
            return "an adapted base weight is shared with another parameter (tied weights)"
    return None


def _search(cma: Any, base: nn.Module, name: str, names: list[str], batches: list[Batch], loss_fn: LossFn,
            l1: float, max_evaluations: int, bounds: tuple[float, float], seed: int, fold: bool) -> dict[str, Any]:
    """CMA-ES over the weights from all-zero (the bare base), LoraHub's start; the best point found."""
    rows = sum(_rows(b) for b in batches)
    folded = _FoldedBase(base, name) if fold else None
    how = "folded into the base weights" if fold else "through the adapter (fold=False)"
    if folded is not None and folded.reason:
        logger.info("compose: evaluating through the adapter, not folded: %s", folded.reason)
        how, folded = f"through the adapter ({folded.reason})", None

    def few_shot_loss(weights: list[float]) -> float:
        reweight(base, name, dict(zip(names, weights)))
        total = 0.0
        try:
            if folded is not None:
                folded.apply()
            with torch.no_grad(), api.use(base, None if folded is not None else name):
                for batch in batches:
                    total += float(loss_fn(base, batch)) * _rows(batch)
        finally:
            if folded is not None:
                folded.restore()
        return total / rows

    zero = [0.0] * len(names)
    base_loss = few_shot_loss(zero)
    best, best_loss, best_value = zero, base_loss, base_loss
    # sigma: a quarter of the range, so the first generation already spans most of it.
    options = {"bounds": list(bounds), "seed": seed + 1, "verbose": -9}
    es = cma.CMAEvolutionStrategy(zero, (bounds[1] - bounds[0]) / 4, options)
    used, curve, generations = 1, [base_loss], []
    while not es.stop() and used + es.popsize <= max_evaluations:
        points = [list(map(float, p)) for p in es.ask()]
        values = []
        for p in points:
            loss = few_shot_loss(p)
            value = loss + l1 * sum(abs(w) for w in p) / len(p)
            values.append(value if math.isfinite(value) else float("inf"))
            if values[-1] < best_value:
                best, best_loss, best_value = p, loss, values[-1]
            curve.append(best_value)
        es.tell(points, values)
        used += len(points)
        generations.append({"evaluations": used, "score": best_value, "weights": dict(zip(names, best))})
    reweight(base, name, dict(zip(names, best)))
    return {
        "optimizer": f"CMA-ES (cma {getattr(cma, '__version__', '?')})",
        "objective": "mean loss + l1 * mean(|w|)",
        "l1": l1,
        "bounds": list(bounds),
        "seed": seed,
        "evaluations": used,
        "examples": rows,
        "loss": best_loss,
        "base_loss": base_loss,
        "score": best_value,
        "curve": curve,
        "generations": generations,
        "evaluation": how,
    }


def _rows(batch: Batch) -> int:
    first = next(iter(batch.values()))
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def _digest(batches: list[Batch]) -> str:
    """sha256 of the examples' tensors: says which examples a composed adapter was fitted to."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                digest.update(value.detach().cpu().flatten().view(torch.uint8).numpy().tobytes())
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest()
