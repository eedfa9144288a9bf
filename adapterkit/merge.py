"""Merging LoRA adapters loaded on one model into a new LoRA adapter.

``merge(model, {"sst2": 0.6, "imdb": 0.4}, method="cat", name="mix")`` reads the components'
LoRA matrices layer by layer, combines them the way peft's ``LoraModel.add_weighted_adapter``
defines each ``combination_type`` (the pruning and sign-election maths is peft's own
``peft.utils.merge_utils``), and attaches the result as an ordinary adapterkit LoRA adapter:
it has a record, trains, routes, mixes in a batch, saves and publishes like any other.

adapterkit injects peft's layers into the base instead of wrapping it in a ``PeftModel``, so
there is no ``LoraModel`` whose ``add_weighted_adapter`` could be called; the combination is
done here on the same per-layer tensors. Methods (peft's names):

- ``cat``: the exact weighted sum of the components' updates, ``sum_i w_i * s_i * B_i A_i``;
  the rank is the sum of the ranks.
- ``svd``: that exact sum truncated to rank ``r`` (default: the largest component rank).
- ``linear``: ``A = sum_i sqrt(w_i s_i) A_i`` and ``B = sum_i sqrt(w_i s_i) B_i`` (the sign on A);
  cheap, same rank, but cross terms make it an approximation. Components need equal ranks.
- ``ties``, ``dare_linear`` (alias ``dare``), ``dare_ties``, ``magnitude_prune``: peft's
  pruned / sign-elected task arithmetic on A and B with the same square-root weights (equal
  ranks); ``<method>_svd`` applies them to the full updates and truncates like ``svd``.

Label heads (classifiers) are averaged with the normalised weights when their shapes agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import warnings
from typing import Any

import torch
from torch import nn

import adapterkit.api as api
import adapterkit.heads as heads
from adapterkit.errors import AdapterNotFoundError, IncompatibleModelError, InvalidOptionError, did_you_mean
from adapterkit.fingerprint import check_fit
from adapterkit.registry import default_registry
from adapterkit.state import freeze_all_but, require_store, unwrap
from adapterkit.strategies.lora import LoraConfig

logger = logging.getLogger(__name__)

#: methods that combine A and B separately (peft: every component must have the same rank)
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: methods that combine the full updates B A and factor the result again by SVD
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("cat", *FACTOR_METHODS, *SVD_METHODS)
ALIASES = {"dare": "dare_linear", "dare_svd": "dare_linear_svd"}
#: weighted averages: their weights must sum to 1
AVERAGING = ("cat", "linear", "svd")
#: methods that prune, so take a density
PRUNING = tuple(m for m in METHODS if m not in AVERAGING)
#: methods whose pruning draws random numbers
RANDOM = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
DEFAULT_DENSITY = 0.5


@dataclasses.dataclass
class _Component:
    name: str
    weight: float
    config: LoraConfig
    meta: dict[str, Any]


def merge(
    model: nn.Module,
    weights: dict[str, float],
    *,
    name: str = "merged",
    method: str = "cat",
    density: float | None = None,
    r: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Make a new LoRA adapter ``name`` from LoRA adapters loaded on ``model`` and make it active.

    Args:
        model: a model carrying the LoRA adapters to merge.
        weights: adapter name -> weight. For ``cat``, ``linear`` and ``svd`` (averages) the
            weights must sum to 1 (negative ones subtract an adapter); for the pruning methods
            they scale each task vector, as in task arithmetic.
        name: the new adapter's name.
        method: ``cat`` (exact), ``svd``, ``linear``, ``ties``, ``dare`` (``dare_linear``),
            ``dare_ties``, ``magnitude_prune`` or a pruning method with ``_svd``; see the module doc.
        density: share of values the pruning methods keep, in (0, 1] (default 0.5); only for them.
        r: rank of an SVD method's result (default: the largest component rank); only for them.
        seed: seeds DARE's random pruning, so one call always gives the same adapter.

    Returns:
        The same model, carrying the merged adapter (active, frozen like a loaded adapter).
        Its record's ``meta["merge"]`` names the method, weights and components.

    Raises:
        AdapterNotFoundError: a component is not loaded.
        InvalidOptionError: bad weights, method, density or rank (every problem listed).
        IncompatibleModelError: a component is not LoRA, uses DoRA, or the components adapt
            different layers, have different ranks where the method needs one, or heads that
            cannot be averaged.

    Example:
        >>> ak.merge(model, {"sst2": 0.5, "imdb": 0.5}, method="cat", name="reviews")
    """
    base = unwrap(model)
    store = require_store(base)
    method = ALIASES.get(method, method)
    components = _components(store, weights, method, density, r, averaging=True)
    density = density if density is not None or method not in PRUNING else DEFAULT_DENSITY
    layers = _shared_layers(store, components)
    new_r, tensors = _combine(layers, components, method, density, r, seed)
    head_state = _average_heads(store, components)
    first = components[0].config
    config = LoraConfig(r=new_r, lora_alpha=new_r, lora_dropout=first.lora_dropout, target_modules=first.target_modules)
    config.validate()
    meta = _merged_meta(base, components, method, density, r, seed)
    undo = Checkpoint(base)
    api.attach_config(base, default_registry.get("lora")(), config, name, meta=meta)
    try:
        _write(store, name, layers, tensors, head_state)
    except BaseException:
        undo.restore(f"the merge of '{name}'")
        raise
    freeze_all_but(base, [])  # like a loaded adapter: for inference until train() says otherwise
    api.activate(base, name)
    logger.info("Merged %s into LoRA adapter '%s' (%s, r=%d)", {c.name: c.weight for c in components}, name, method, new_r)
    return model


def reweight(model: nn.Module, name: str, weights: dict[str, float]) -> None:
    """Give merged adapter ``name`` new component weights, in place (its components must be loaded).

    The weights are used as given, with no sum check: task-arithmetic weights such as the ones
    :func:`adapterkit.compose` searches (LoraHub's, in about [-1.5, 1.5]). Every component of
    the merge needs a weight; the method, density, rank and seed stay those of the merge.
    """
    base = unwrap(model)
    store = require_store(base)
    recipe = store.record(name).meta.get("merge")
    if not recipe:
        raise InvalidOptionError(f"Adapter '{name}' was not made by adapterkit.merge; there are no weights to change.")
    parts = [c["name"] for c in recipe["components"]]
    if not isinstance(weights, dict) or sorted(weights) != sorted(parts):
        raise InvalidOptionError(
            f"'{name}' merges {parts}: pass one weight for each of them, got {sorted(weights) if isinstance(weights, dict) else weights!r}."
        )
    method = recipe["method"]
    ordered = {n: weights[n] for n in parts}
    components = _components(store, ordered, method, recipe.get("density"), recipe.get("r"), averaging=False)
    layers = _shared_layers(store, components)
    _, tensors = _combine(layers, components, method, recipe.get("density"), recipe.get("r"), recipe.get("seed", 0))
    _write(store, name, layers, tensors, _average_heads(store, components))
    recipe["weights"] = {c.name: c.weight for c in components}
    for entry, c in zip(recipe["components"], components):
        entry["weight"] = c.weight


class Checkpoint:
    """What a failed merge or composition puts back: the adapters it added, the default adapter,
    which parameters train, the label names."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base
        self.names = set(api.list_adapters(base))
        self.active = api.get_active_adapter(base)
        self.grads = [(p, p.requires_grad) for p in base.parameters()]
        config = getattr(base, "config", None)
        self.labels = {k: getattr(config, k, None) for k in ("id2label", "label2id")} if config is not None else {}

    def restore(self, what: str) -> None:
        """Undo; a failure here is logged, so the caller's own error is the one reported."""
        try:
            for extra in [n for n in api.list_adapters(self.base) if n not in self.names]:
                api.detach(self.base, extra)
            if api.list_adapters(self.base):
                api.activate(self.base, self.active)
            for p, flag in self.grads:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
            for key, value in self.labels.items():
                setattr(self.base.config, key, value)
        except Exception:
            logger.exception("Cleaning up after %s failed too", what)


# --- checks -------------------------------------------------------------------------------------
def _components(store: Any, weights: Any, method: str, density: Any, r: Any, *, averaging: bool) -> list[_Component]:
    """The components in the caller's order, after checking every argument (one error, all problems)."""
    if not isinstance(weights, dict) or not weights:
        raise InvalidOptionError(
            f"weights must be a non-empty dict of adapter name -> weight, e.g. {{'a': 0.5, 'b': 0.5}}; got {weights!r:.80}."
        )
    loaded = sorted(store.records)
    missing = [n for n in weights if n not in store.records]
    if missing:
        hint = did_you_mean(str(missing[0]), loaded)
        raise AdapterNotFoundError(
            f"Cannot merge {missing}: no such adapter is loaded.{hint} Loaded: {', '.join(loaded)}. "
            "Load them first with adapterkit.load()."
        )
    problems = []
    if method not in METHODS:
        choices = sorted([*METHODS, *ALIASES])
        problems.append(f"method {method!r} is unknown{did_you_mean(str(method), choices)} (choose from {', '.join(choices)})")
    bad = {n: w for n, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)}
    if bad:
        problems.append(f"weights must be finite numbers, got {bad}")
    elif averaging and method in AVERAGING and abs(sum(weights.values()) - 1) > 1e-6:
        problems.append(
            f"method {method!r} averages the adapters, so its weights must sum to 1 (these sum to "
            f"{sum(weights.values()):.6g}); rescale them, or use a task-arithmetic method such as 'ties' or 'dare'"
        )
    if density is not None:
        if method not in PRUNING:
            problems.append(f"density applies to the pruning methods ({', '.join(PRUNING)}), not {method!r}")
        elif isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            problems.append(f"density must be a number in (0, 1], got {density!r}")
    if r is not None:
        if method not in SVD_METHODS:
            problems.append(f"r sets an SVD method's rank ({', '.join(SVD_METHODS)}), not {method!r}'s")
        elif isinstance(r, bool) or not isinstance(r, int) or r < 1:
            problems.append(f"r must be a positive integer, got {r!r}")
    if problems:
        raise InvalidOptionError("Cannot merge: " + "; ".join(problems) + ".")
    components = []
    for n, w in weights.items():
        record = store.records[n]
        if record.strategy != "lora":
            raise IncompatibleModelError(
                f"Adapter '{n}' is a '{record.strategy}' adapter; only LoRA adapters can be merged "
                "(their updates are low-rank matrices that add up)."
            )
        if record.config.use_dora:
            raise IncompatibleModelError(
                f"Adapter '{n}' uses DoRA: its learned magnitudes do not combine like LoRA updates, so it cannot be merged."
            )
        components.append(_Component(n, float(w), record.config, record.meta))
    for key, what in (("task", "tasks"), ("label_names", "label names")):
        values = {c.name: c.meta.get(key) for c in components if c.meta.get(key) is not None}
        if len({repr(v) for v in values.values()}) > 1:
            raise IncompatibleModelError(
                f"Cannot merge adapters trained for different {what}: {values}. Merge adapters of one task."
            )
    bases = [c for c in components if c.meta.get("base_fingerprint") is not None]
    for c in bases[1:]:
        problem = check_fit(c.meta["base_fingerprint"], bases[0].meta["base_fingerprint"], None, None)
        if problem:
            raise IncompatibleModelError(
                f"Adapters '{bases[0].name}' and '{c.name}' were trained on different bases ({problem.split(':')[0]}); "
                "their updates do not add up. Merge adapters of one base."
            )
    return components


def _shared_layers(store: Any, components: list[_Component]) -> list[tuple[str, nn.Module]]:
    """The LoRA layers every component adapts; the components must adapt exactly the same ones."""
    layers = store.extra.get("lora_layers") or []
    holds = {c.name: {path for path, layer in layers if c.name in layer.lora_A} for c in components}
    first = components[0].name
    for c in components[1:]:
        if holds[c.name] != holds[first]:
            only = sorted(holds[first] ^ holds[c.name])
            raise IncompatibleModelError(
                f"Adapters '{first}' and '{c.name}' adapt different layers ({len(holds[first])} and "
                f"{len(holds[c.name])} layers; not shared: {', '.join(only[:4])}{' ...' if len(only) > 4 else ''}). "
                "Only adapters with the same target_modules can be merged."
            )
    return [(path, layer) for path, layer in layers if path in holds[first]]


# --- the combination ----------------------------------------------------------------------------
def _combine(
    layers: list[tuple[str, nn.Module]], components: list[_Component], method: str, density: float | None,
    r: int | None, seed: int,
) -> tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The merged rank and, per layer path, its (A, B) in float32."""
    from peft.utils import merge_utils  # peft takes seconds to import (see strategies/lora.py)

    ranks = {c.name: c.config.r for c in components}
    if method in FACTOR_METHODS and len(set(ranks.values())) > 1:
        raise IncompatibleModelError(
            f"Method {method!r} combines the LoRA matrices entry by entry, so the adapters need one rank; "
            f"got {ranks}. Use method='cat' (exact) or 'svd' for adapters of different ranks."
        )
    if method == "cat":
        new_r = sum(ranks.values())
    elif method in SVD_METHODS:
        new_r = r or max(ranks.values())
    else:
        new_r = next(iter(ranks.values()))
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    # DARE draws its masks from torch's global generator: seeded, and the caller's state kept.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for path, layer in layers:
            a = [layer.lora_A[c.name].weight.detach().float() for c in components]
            b = [layer.lora_B[c.name].weight.detach().float() for c in components]
            scaled = [c.weight * float(layer.scaling[c.name]) for c in components]
            if method == "cat":
                out[path] = (torch.cat([w * x for w, x in zip(scaled, a)], 0), torch.cat(b, 1))
            elif method in FACTOR_METHODS:
                # The weight goes half on A and half on B, its sign on A: B A scales by w s.
                wa = torch.tensor([math.copysign(math.sqrt(abs(w)), w) for w in scaled])
                wb = torch.tensor([math.sqrt(abs(w)) for w in scaled])
                out[path] = (_apply(merge_utils, method, a, wa, density), _apply(merge_utils, method, b, wb, density))
            elif method == "svd":
                # The sum is B' A' with the blocks stacked: factor that small product, not the full matrix.
                out[path] = _factor_product(torch.cat(b, 1), torch.cat([w * x for w, x in zip(scaled, a)], 0), new_r)
            else:
                deltas = [y @ x for x, y in zip(a, b)]
                delta = _apply(merge_utils, method.removesuffix("_svd"), deltas, torch.tensor(scaled), density)
                out[path] = _factor(delta, new_r)
    return new_r, out


def _apply(merge_utils: Any, method: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None):
    if method in ("linear", "svd"):
        return merge_utils.task_arithmetic(tensors, weights)
    with warnings.catch_warnings():
        # density=1 keeps every value, as the caller asked; peft warns that it prunes nothing.
        warnings.filterwarnings("ignore", message=".*no pruning will be performed.*")
        if method in ("ties", "dare_ties"):
            return getattr(merge_utils, method)(tensors, weights, density, "total")
        return getattr(merge_utils, method)(tensors, weights, density)


def _factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank ``rank`` with B A the best rank-``rank`` approximation of ``delta``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    a = delta.new_zeros(rank, delta.shape[1])
    b = delta.new_zeros(delta.shape[0], rank)
    a[:k] = vh[:k]
    b[:, :k] = u[:, :k] * s[:k]
    return a, b


def _factor_product(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_factor` of ``b @ a`` (out x k times k x in, k small) through QR of both factors:
    ``b a = Qb (Rb Ra^T) Qa^T``, so only a k x k matrix is decomposed."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    small_a, small_b = _factor(rb @ ra.T, rank)
    return small_a @ qa.T, qb @ small_b


def _average_heads(store: Any, components: list[_Component]) -> dict[str, dict[str, torch.Tensor]]:
    """Per head path, the components' head tensors averaged with the normalised weights."""
    owned = {c.name: heads.state_dict(store, c.name) for c in components}
    if not any(owned.values()):
        return {}
    total = sum(c.weight for c in components)
    keys = {c.name: {k: tuple(v.shape) for k, v in owned[c.name].items()} for c in components}
    first = components[0].name
    for c in components[1:]:
        if keys[c.name] != keys[first]:
            raise IncompatibleModelError(
                f"The label heads of '{first}' and '{c.name}' differ ({_shapes(keys[first])} vs "
                f"{_shapes(keys[c.name])}), so they cannot be averaged. Merge adapters of one task and label set."
            )
    if abs(total) < 1e-8:
        raise InvalidOptionError(
            "The weights sum to 0, so the label heads cannot be averaged; pass weights with a non-zero sum."
        )
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for key in owned[first]:
        value = sum(c.weight / total * owned[c.name][key].float() for c in components)
        path = next(p for p in store.heads[first] if key.startswith(p + "."))
        merged.setdefault(path, {})[key[len(path) + 1:]] = value
    return merged


def _shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in sorted(shapes.items())) or "no head"


# --- writing the result -------------------------------------------------------------------------
def _write(store: Any, name: str, layers, tensors, head_state) -> None:
    with torch.no_grad():
        for path, layer in layers:
            a, b = tensors[path]
            for target, value in ((layer.lora_A[name].weight, a), (layer.lora_B[name].weight, b)):
                target.copy_(value.to(device=target.device, dtype=target.dtype))
        plan: heads.Plan = []
        for path, values in head_state.items():
            module = store.heads[name][path]
            for key, value in values.items():
                owner, _, leaf = key.rpartition(".")
                plan.append((module.get_submodule(owner) if owner else module, leaf, value))
        # load_plan also resizes a classifier the components resized on load (6 labels on a 2-label base).
        heads.load_plan(plan)


def _merged_meta(base: nn.Module, components: list[_Component], method: str, density: float | None,
                 r: int | None, seed: int) -> dict[str, Any]:
    """The record metadata of the merged adapter: what it was made from, for its sidecar and card."""
    first = components[0].meta
    recipe: dict[str, Any] = {"method": method, "weights": {c.name: c.weight for c in components}}
    if density is not None:
        recipe["density"] = density
    if r is not None:
        recipe["r"] = r
    if method in RANDOM:
        recipe["seed"] = seed
    recipe["components"] = [_describe(base, c) for c in components]
    meta = {"merge": recipe}
    for key in ("task", "label_names", "base_fingerprint", "quantization"):
        if first.get(key) is not None:
            meta[key] = first[key]
    return meta


def _describe(base: nn.Module, c: _Component) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": c.name, "weight": c.weight, "source": c.meta.get("source")}
    if c.meta.get("content_hash"):
        entry["content_hash"] = c.meta["content_hash"]
    # The component's tensors as merged: identifies it even where it came from no saved folder.
    digest = hashlib.sha256()
    for key, p in sorted(api.trainable_parameters(base, c.name).items()):
        digest.update(key.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
    entry["weights_sha256"] = digest.hexdigest()
    return entry
