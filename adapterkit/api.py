"""The public verbs: attach, use, detach and the queries about a model's adapters.

Nothing here branches on a strategy's name: each strategy's own file says what it adds,
how it switches and what it saves.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

import adapterkit.artifacts as artifacts
import adapterkit.heads as heads
import adapterkit.hub as hub
import adapterkit.routing as routing
from adapterkit.config import AdapterConfig
from adapterkit.errors import (
    AdapterExistsError,
    AdapterKitError,
    AdapterMismatchError,
    AdapterNotFoundError,
    IncompatibleModelError,
    InvalidOptionError,
)
from adapterkit.fingerprint import fingerprint
from adapterkit.model_info import label_names, task_of
from adapterkit.quantized import keep_4bit_trainable, quantization_of
from adapterkit.registry import default_registry
from adapterkit.sources import resolve_source
from adapterkit.state import AdapterRecord, freeze_all_but, get_store, require_store, unwrap
from adapterkit.strategy import Strategy
from adapterkit.targets import label_head_paths, parameter_bytes

logger = logging.getLogger(__name__)

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


def _strategy(name: str) -> Strategy:
    return default_registry.get(name)()


def attach(model: nn.Module, strategy: str | AdapterConfig, *, name: str = "default", **options: Any) -> nn.Module:
    """Add a freshly initialised adapter to ``model`` and make it the active, trainable one.

    Args:
        model: any transformers ``PreTrainedModel`` (full precision or bitsandbytes 4/8-bit).
        strategy: a registered strategy name (``"lora"``, ``"prefix"``, ``"head"``, ``"full"``,
            plugins) or a strategy config object such as ``adapterkit.LoraConfig(r=8)``.
        name: the adapter's name on this model.
        **options: the strategy's options, checked against its config.

    Returns:
        The same model, adapted in place (peft's layers where peft backs the strategy).

    Raises:
        UnknownStrategyError: no such strategy.
        InvalidOptionError: an unknown option or bad value (all problems listed at once).
        IncompatibleModelError: the strategy cannot apply to this model.
        AdapterExistsError: an adapter of that name is already loaded.

    Example:
        >>> model = adapterkit.attach(model, "lora", r=8)
    """
    if isinstance(strategy, AdapterConfig):
        if options:
            raise InvalidOptionError(
                f"Pass options either in the config object or as keywords, not both (got {sorted(options)})."
            )
        config = strategy
        impl = _strategy(config.strategy)
        problems = config.validate()
        if problems:
            raise InvalidOptionError(f"Invalid options for strategy '{config.strategy}': " + "; ".join(problems))
    else:
        impl = _strategy(strategy)
        config = impl.config_cls.from_options(options)
    base = unwrap(model)
    attach_config(base, impl, config, name)
    return model


def attach_config(base: nn.Module, impl: Strategy, config: AdapterConfig, name: str, meta: dict | None = None) -> None:
    """Attach a validated config (shared by :func:`attach` and :func:`adapterkit.load`)."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == "base":
        raise InvalidOptionError(
            f"Adapter name {name!r} is invalid: use letters, digits, '_' and '-', starting with a letter or digit "
            "('base' is reserved for the base model)."
        )
    store = get_store(base, create=True)
    if name in store.records:
        raise AdapterExistsError(
            f"An adapter named '{name}' is already loaded on this model ({store.records[name].strategy}). "
            "Pick another name, or adapterkit.detach(model, name) first."
        )
    others = [r for r in store.records.values() if not _strategy(r.strategy).shares_base]
    if store.records and (not impl.shares_base or others):
        alone = impl.name if not impl.shares_base else others[0].strategy
        raise IncompatibleModelError(
            f"A '{alone}' adapter changes the base weights themselves, so it cannot share a base with other "
            f"adapters (loaded: {', '.join(sorted(store.records))}). Load a fresh base for it."
        )
    quantization = quantization_of(base)
    if quantization and not impl.supports_quantized:
        raise IncompatibleModelError(
            f"The '{impl.name}' strategy cannot train a {quantization} quantized base: its 4/8-bit weights take no "
            "gradient updates. Use 'lora' (QLoRA on a 4-bit base), 'prefix' or 'head', or load the base without bits=."
        )
    impl.check_model(base, config)
    record_meta = {"task": task_of(base), "label_names": label_names(base), "quantization": quantization}
    record_meta.update(meta or {})
    # Taken before training: a `full` adapter changes the very weights the fingerprint reads.
    if "base_fingerprint" not in record_meta:
        record_meta["base_fingerprint"] = fingerprint(base)
    # Built on the base's own modules: with a head adapter that trains blocks as the default,
    # LoRA would otherwise wrap that adapter's copy of a block instead of the base's. Routed
    # forwards in other threads are unaffected; unrouted ones see the base until this returns.
    heads.install(base, store, None)
    try:
        impl.attach(base, config, name)
    except BaseException:
        heads.install(base, store, store.active)
        raise
    if impl.trains_label_head:
        heads.copy_heads(base, store, name, label_head_paths(base))
    store.records[name] = AdapterRecord(name=name, strategy=impl.name, config=config, meta=record_meta)
    activate(base, name)
    freeze_all_but(base, list(trainable_parameters(base, name).values()))
    if quantization and quantization.startswith("bnb-4bit"):
        keep_4bit_trainable(base)


def trainable_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Everything adapter ``name`` trains: the strategy's tensors and its own label head."""
    base = unwrap(model)
    store = require_store(base)
    record = store.record(name)
    impl = _strategy(record.strategy)
    params = dict(impl.parameters(base, name))
    if impl.trains_label_head:
        params.update(heads.parameters(store, name))
    return params


def activate(base: nn.Module, name: str | None) -> None:
    """Make ``name`` the default adapter of an unwrapped model for good (None: the bare base)."""
    store = require_store(base)
    if name is not None:
        store.record(name)  # an unknown name fails before anything changes
    store.set_default(name, lambda n: _apply_default(base, store, n))


def _apply_default(base: nn.Module, store, name: str | None) -> None:
    target = store.record(name).strategy if name is not None else None
    for strategy in {r.strategy for r in store.records.values()}:
        _strategy(strategy).activate(base, name if strategy == target else None)
    heads.install(base, store, name)
    store.active = name
    labels = store.records[name].meta.get("label_names") if name is not None else None
    if labels and getattr(base.config, "id2label", None) != dict(enumerate(labels)):
        base.config.id2label = dict(enumerate(labels))
        base.config.label2id = {label: i for i, label in enumerate(labels)}


class _Switch:
    """Returned by :func:`use`. The default already switched; ``with`` makes the switch the
    calling thread's / task's own instead (the default goes back at once) until the block ends."""

    def __init__(self, model: nn.Module, store, name: str | None, switch, statement_token) -> None:
        self.model = model
        self.store = store
        self.name = name
        self.switch = switch
        self.statement_token = statement_token
        self.token = None

    def __enter__(self) -> nn.Module:
        base = unwrap(self.model)
        self.store.take_back(self.switch, lambda n: _apply_default(base, self.store, n))
        if self.statement_token is not None:  # what use() did to an enclosing block is undone too
            routing.pop(self.statement_token)
            self.statement_token = None
        self.token = routing.push(self.store, routing.Route(name=self.name))
        return self.model

    def __exit__(self, *exc: object) -> None:
        if self.token is not None:
            routing.pop(self.token)
            self.token = None


def use(model: nn.Module, name: str | None) -> _Switch:
    """Make adapter ``name`` the active one (``None`` for the bare base); no weights are copied.

    As a statement it sets the model's default adapter. As a context manager the choice is
    the calling thread's or asyncio task's own: forwards inside the block use ``name`` while
    other threads keep theirs, and nothing changes for anyone else.

    Example:
        >>> adapterkit.use(model, "sentiment")
        >>> with adapterkit.use(model, "topics"):
        ...     logits = model(**batch).logits
    """
    base = unwrap(model)
    store = require_store(base)
    if name is not None:
        store.record(name)
    switch = store.switch_default(name, lambda n: _apply_default(base, store, n))
    token = None
    if routing.current(store) is not None:
        # Inside a `with use(...)` or mixed batch: a statement switches that block too, until it ends.
        token = routing.push(store, routing.Route(name=name))
    return _Switch(model, store, name, switch, token)


def detach(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` and free its memory; the base's own modules come back."""
    base = unwrap(model)
    store = require_store(base)
    record = store.record(name)
    impl = _strategy(record.strategy)
    with store.lock:
        was_active = store.active == name
        if was_active:
            activate(base, None)
        heads.install(base, store, None)  # strategies remove their layers from the base's own modules
        try:
            impl.detach(base, name)
        except BaseException:
            # A strategy that cannot detach (it changed the base) refuses: put everything back.
            if was_active:
                activate(base, name)
            heads.install(base, store, store.active)
            raise
        _forget(base, store, name)
        if store.records:
            heads.install(base, store, store.active)
    return model


def _forget(base: nn.Module, store, name: str) -> None:
    """Drop adapter ``name``'s record and head copies; the store goes with the last adapter."""
    store.heads.pop(name, None)
    del store.records[name]
    if not store.records:
        heads.install(base, store, None)
        heads.release(store)
        del base.__dict__["_adapterkit"]


def _discard(model: nn.Module, name: str, previous: str | None) -> None:
    """Undo a just-attached adapter ``name`` whose weights were never loaded (a failed load).

    Unlike :func:`detach` this works for every strategy: a ``full`` adapter whose load failed
    before any weight was copied left the base untouched, so only its record goes.
    """
    base = unwrap(model)
    store = get_store(base)
    if store is None or name not in store.records:
        return
    impl = _strategy(store.records[name].strategy)
    if impl.shares_base:
        detach(base, name)
    else:
        _forget(base, store, name)
    store = get_store(base)
    if store is not None:
        activate(base, previous if previous in store.records else None)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters loaded on ``model``, sorted."""
    store = get_store(unwrap(model))
    return sorted(store.records) if store else []


def get_active_adapter(model: nn.Module) -> str | None:
    """Name of the adapter the calling context's forwards use (None: the bare base)."""
    store = get_store(unwrap(model))
    return routing.effective_name(store) if store else None


def get_adapter_record(model: nn.Module, name: str) -> AdapterRecord:
    """The record (strategy, config, metadata) of adapter ``name``."""
    return require_store(unwrap(model)).record(name)


@dataclasses.dataclass
class AdapterSummary:
    """One adapter's line in :class:`ModelSummary`."""

    name: str
    strategy: str
    options: dict[str, Any]
    parameters: int
    bytes: int
    active: bool


@dataclasses.dataclass
class ModelSummary:
    """What :func:`summary` reports; ``str()`` renders a table."""

    model_class: str
    total_parameters: int
    trainable_parameters: int
    quantization: str | None
    adapters: list[AdapterSummary]

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_parameters / max(self.total_parameters, 1)

    def __str__(self) -> str:
        lines = [
            f"{self.model_class}  quantization: {self.quantization or 'none'}",
            f"trainable parameters: {self.trainable_parameters:,} / {self.total_parameters:,} "
            f"({100 * self.trainable_fraction:.3f}%)",
        ]
        if self.adapters:
            lines.append(f"{'adapter':<16}{'strategy':<10}{'params':>12}{'bytes':>14}  options")
            for a in self.adapters:
                mark = "*" if a.active else " "
                opts = ", ".join(f"{k}={v}" for k, v in a.options.items())
                lines.append(f"{mark}{a.name:<15}{a.strategy:<10}{a.parameters:>12,}{a.bytes:>14,}  {opts}")
        return "\n".join(lines)


def _numel(p: nn.Parameter) -> int:
    # bitsandbytes packs two 4-bit values per byte; count the logical weights.
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        n = 1
        for d in state.shape:
            n *= int(d)
        return n
    return p.numel()


def summary(model: nn.Module) -> ModelSummary:
    """Trainable / total parameters, adapter sizes, strategies and options, quantization.

    Example:
        >>> print(adapterkit.summary(model))
    """
    base = unwrap(model)
    seen: dict[int, nn.Parameter] = {id(p): p for p in base.parameters()}
    store = get_store(base)
    adapters = []
    active = routing.effective_name(store) if store else None
    if store:
        for name in sorted(store.records):
            params = trainable_parameters(base, name)
            for p in params.values():
                seen.setdefault(id(p), p)
            record = store.records[name]
            tensors = {k: p.detach() for k, p in params.items()}
            adapters.append(
                AdapterSummary(
                    name=name,
                    strategy=record.strategy,
                    options=record.config.to_dict(),
                    parameters=sum(t.numel() for t in tensors.values()),
                    bytes=parameter_bytes(tensors),
                    active=active == name,
                )
            )
    total = sum(_numel(p) for p in seen.values())
    if active is not None:
        # What the active adapter trains, whether or not its tensors take gradients right now
        # (a loaded adapter is frozen until train(); use() flips no requires_grad).
        trainable = sum(p.numel() for p in trainable_parameters(base, active).values())
    else:
        trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
    return ModelSummary(type(base).__name__, total, trainable, quantization_of(base), adapters)


def load(
    model: nn.Module,
    source: str | os.PathLike,
    *,
    name: str | None = None,
    revision: str | None = None,
    ignore_mismatch: bool = False,
    token: str | None = None,
    allow_nonfinite: bool = False,
    timeout: float | None = None,
) -> nn.Module:
    """Load a saved adapter from a local folder or a Hub repo id and make it active.

    The adapter must fit the base (architecture, shapes, weight fingerprint) and its files
    must be the bytes that were saved; a mismatch is refused with both bases named unless
    ``ignore_mismatch=True``. Every tensor is checked before any is copied, so a failed load
    leaves the model as it was. Heads and label names are restored. Plain peft folders (LoRA,
    prefix) load too, with a warning that their base cannot be verified.

    Args:
        model: the base model (it may already carry other adapters).
        source: a folder written by :func:`save` or peft, or a Hub repo id.
        name: the name to load it under (default: its saved name, else ``"default"``).
        revision: Hub branch, tag or commit.
        ignore_mismatch: load even if the adapter was trained on another base.
        token: Hub token for private repos.
        allow_nonfinite: load tensors holding NaN/inf with a warning instead of refusing them.
        timeout: seconds the Hub may go without progress (default ``$ADAPTERKIT_HUB_TIMEOUT`` or 30).

    Returns:
        The same model, like :func:`attach`.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidOptionError(f"source must be a folder path or a Hub repo id, got {type(source).__name__} {source!r:.60}.")
    where = os.fspath(source)
    artifacts.recover(Path(where).expanduser())  # a save killed between its renames may have left it beside its path
    found = resolve_source(source, what="adapter", error=AdapterNotFoundError)
    if found.kind == "file":
        raise AdapterNotFoundError(f"{where} is a file; pass the adapter folder that holds it.")
    if found.kind == "folder":
        saved = artifacts.read_folder(found.path, allow_nonfinite=allow_nonfinite)
    else:
        folder = hub.download(found.repo_id, revision=revision, token=token, timeout=timeout)
        # The download checked every file against the manifest: not hashed a second time.
        saved = artifacts.read_folder(folder, allow_nonfinite=allow_nonfinite, manifest_checked=True)
    _load_saved(unwrap(model), saved, name=name, ignore_mismatch=ignore_mismatch, where=str(where))
    return model


def _load_saved(base: nn.Module, saved: artifacts.SavedAdapter, *, name: str | None, ignore_mismatch: bool,
                where: str) -> str:
    """Attach a read and checked adapter and copy its weights in, all or nothing."""
    artifacts.check_fits(base, saved, ignore_mismatch=ignore_mismatch, where=where)
    name = name or saved.name or "default"
    previous = get_active_adapter(base)
    before = _ModelState(base)
    try:
        attach_config(base, saved.strategy, saved.config, name, meta=saved.meta(where))
    except Exception as err:
        if isinstance(err, AdapterKitError) or not isinstance(err, ValueError):
            raise
        raise AdapterMismatchError(f"The adapter in {where} cannot be attached to this model: {err}") from err
    try:
        artifacts.copy_weights(base, name, saved)
    except BaseException:
        try:
            _discard(base, name, previous)
            before.restore()
        except Exception:  # the load's own error is the one to report
            logger.exception("Cleaning up after the failed load of %s failed too", where)
        raise
    freeze_all_but(base, [])  # a loaded adapter is for inference until train() says otherwise
    activate(base, name)
    return name


class _ModelState:
    """What a failed load must put back besides the adapter record: trainability and label names."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base
        self.grad = [(p, p.requires_grad) for p in base.parameters()]
        config = getattr(base, "config", None)
        self.labels = {k: getattr(config, k, None) for k in ("id2label", "label2id")} if config is not None else {}

    def restore(self) -> None:
        for p, flag in self.grad:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for key, value in self.labels.items():
            setattr(self.base.config, key, value)
