"""``AdapterPool``: many LoRA adapters on one base, chosen per call and per batch row.

>>> pool = AdapterPool(model, slots=32, max_rank=16)
>>> pool.load("me/sst2-lora", name="sst2")
>>> with pool.route(["sst2", "topics", None]):      # one adapter per row, None = the base
...     logits = model(**batch).logits

The pool owns a fixed number of slots in every pooled layer (see ``slots.py``). Loading reads
the adapter folder once (``adapterkit.artifacts.read_folder``: every check a load makes), then
copies each tensor into a free slot: no module is built and peft is not involved. When the
slots are full, the least recently used adapter that is neither pinned nor in use by a running
forward leaves its slot; its tensors stay on the CPU (up to ``cpu_slots`` adapters), so coming
back is a copy, and beyond that a file read.

An adapter's identity is the hash of its files (``SavedAdapter.digest``): loading the same
bytes under the same name again copies nothing, changed files replace the old weights. A route
holds its adapters' slots until it ends, so neither eviction nor a reload under the same name
changes weights under a running forward: the new version goes to another slot.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adapterkit.artifacts as artifacts
import adapterkit.compat.torch as torch_compat
import adapterkit.hub as hub
import adapterkit.routing as routing
from adapterkit.errors import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterNotFoundError,
    IncompatibleModelError,
    InvalidOptionError,
    PoolFullError,
    did_you_mean,
)
from adapterkit.fingerprint import fingerprint
from adapterkit.heads import PEFT_PREFIX
import adapterkit.serve.slots as pooled
from adapterkit.sources import resolve_source
from adapterkit.state import get_store, unwrap
from adapterkit.strategies.lora import resolve_targets
from adapterkit.targets import is_linear, label_head_paths

logger = logging.getLogger(__name__)

_LORA_KEYS = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    # peft saves DoRA's magnitude without the ".weight" of its module; accept both.
    (".lora_magnitude_vector.weight", "m"),
    (".lora_magnitude_vector", "m"),
)


@dataclasses.dataclass
class _Payload:
    """One adapter's tensors as the pool copies them into a slot (kept on the CPU while evicted)."""

    #: per pooled layer: A (r x in), B (out x r), DoRA scale g (out) or None
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    #: per label-head linear layer: weight, bias
    heads: dict[str, tuple[torch.Tensor, torch.Tensor | None]]


@dataclasses.dataclass(eq=False)
class _Entry:
    """One adapter known to the pool, wherever its tensors are."""

    name: str
    source: str
    folder: Path
    digest: str
    rank: int
    scale: float
    dora: bool
    has_head: bool
    label_names: list[str] | None
    #: the load's checks, repeated when the adapter is read from its folder again
    options: dict[str, bool]
    slot: int | None = None
    cpu: _Payload | None = None
    pinned: bool = False


class _Route:
    """Returned by :meth:`AdapterPool.route`; the route holds from ``__enter__`` to ``__exit__``."""

    def __init__(self, pool: AdapterPool, names: Any, load_missing: bool) -> None:
        self.pool, self.names, self.load_missing = pool, names, load_missing
        self.token: Any = None
        self.held: list[int] = []

    def __enter__(self) -> nn.Module:
        route, self.held = self.pool._acquire(self.names, self.load_missing)
        self.token = routing.push(self.pool, route)
        return self.pool.model

    def __exit__(self, *exc: object) -> None:
        routing.pop(self.token)
        self.pool._release(self.held)
        self.held = []


class AdapterPool:
    """Preallocated LoRA slots on one base model, with LRU eviction, pinning and per-row routing.

    Args:
        model: a base from :func:`adapterkit.load_base` (full precision or bitsandbytes 4/8-bit)
            carrying no adapters. Place it on its device before making the pool.
        slots: adapters held at once in the pooled layers.
        max_rank: largest LoRA rank the slots take (smaller ranks are zero-padded).
        target_modules: the layers to pool, as ``LoraConfig.target_modules`` names them
            (default: every linear layer of the backbone). The label head's linear layers are
            always pooled, for adapters that carry their own classifier.
        cpu_slots: evicted adapters kept on the CPU (default: as many as ``slots``; 0: none).
        dtype: dtype of the slots (default: the layer's float dtype, or its compute dtype).

    Raises:
        IncompatibleModelError: the model already carries adapters or belongs to another pool.
        InvalidOptionError: a bad ``slots``, ``max_rank`` or ``cpu_slots``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        slots: int = 32,
        max_rank: int = 16,
        target_modules: list[str] | str | None = None,
        cpu_slots: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        problems = [
            f"{label} must be a positive integer, got {value!r}"
            for label, value in (("slots", slots), ("max_rank", max_rank))
            if not isinstance(value, int) or isinstance(value, bool) or value < 1
        ]
        if cpu_slots is not None and (not isinstance(cpu_slots, int) or isinstance(cpu_slots, bool) or cpu_slots < 0):
            problems.append(f"cpu_slots must be a non-negative integer or None, got {cpu_slots!r}")
        if problems:
            raise InvalidOptionError("Invalid AdapterPool options: " + "; ".join(problems) + ".")
        base = unwrap(model)
        _refuse_adapted(base)
        self.model = model
        self._base = base
        #: identifies this pool in context-local routes
        self.key = routing.new_key()
        self.slots = slots
        self.max_rank = max_rank
        self.cpu_slots = slots if cpu_slots is None else cpu_slots
        self._lock = threading.RLock()
        self._lora: dict[str, tuple[nn.Module, pooled.LoraSlots]] = {}
        self._heads: dict[str, tuple[nn.Module, pooled.HeadSlots]] = {}
        with torch.inference_mode(False):  # the slots are written by loads, in or out of inference mode
            self._make_slots(base, resolve_targets(base, target_modules), dtype)
        # Taken once: a serving base does not change, and walking its modules costs each load
        # ~10 ms (half of a 20 ms load budget).
        self._fingerprint = fingerprint(base)
        self._entries: dict[str, _Entry] = {}
        self._in_slots: collections.OrderedDict[str, None] = collections.OrderedDict()  # oldest first
        self._on_cpu: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._free = list(range(slots - 1, -1, -1))
        self._users = [0] * slots
        self._retired: set[int] = set()
        self._stats = dict.fromkeys(("hits", "misses", "cpu_hits", "evictions", "loads"), 0)
        self._load_seconds = 0.0

    def _make_slots(self, base: nn.Module, targets: list[str], dtype: torch.dtype | None) -> None:
        slots, max_rank = self.slots, self.max_rank
        for path in targets:
            module = base.get_submodule(path)
            self._lora[path] = (module, pooled.LoraSlots(module, slots, max_rank, dtype))
        for head in label_head_paths(base):
            for sub, module in base.get_submodule(head).named_modules():
                if is_linear(module):
                    self._heads[f"{head}.{sub}" if sub else head] = (module, pooled.HeadSlots(module, slots))
        for module, state in [*self._lora.values(), *self._heads.values()]:
            kind = pooled.LORA_KIND if isinstance(state, pooled.LoraSlots) else pooled.HEAD_KIND
            pooled.install(module, self, kind, state)

    # --- queries --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        """Names of the adapters the pool holds (in slots, on the CPU or known by folder), sorted."""
        return sorted(self._entries)

    def info(self, name: str) -> dict[str, Any]:
        """Where adapter ``name`` came from and where its tensors are now."""
        entry = self._entry(name)
        return {
            "name": entry.name, "source": entry.source, "digest": entry.digest, "rank": entry.rank,
            "scale": entry.scale, "dora": entry.dora, "has_head": entry.has_head, "label_names": entry.label_names,
            "slot": entry.slot, "on_cpu": entry.cpu is not None, "pinned": entry.pinned,
        }

    def stats(self) -> dict[str, Any]:
        """Counters: hits (already in a slot), misses (brought in: from the CPU tier, ``cpu_hits``,
        or from the folder), evictions, loads (folder reads) and load seconds; and occupancy."""
        with self._lock:
            return {
                **self._stats,
                "load_seconds": round(self._load_seconds, 6),
                "adapters": len(self._entries),
                "in_slots": len(self._in_slots),
                "on_cpu": len(self._on_cpu),
                "pinned": sum(e.pinned for e in self._entries.values()),
                "slots": self.slots,
                "cpu_slots": self.cpu_slots,
                "layers": len(self._lora),
                "head_layers": len(self._heads),
            }

    # --- loading ----------------------------------------------------------------------------
    def load(
        self,
        source: str | os.PathLike,
        *,
        name: str | None = None,
        revision: str | None = None,
        token: str | None = None,
        ignore_mismatch: bool = False,
        allow_nonfinite: bool = False,
        timeout: float | None = None,
    ) -> str:
        """Load a saved LoRA/DoRA adapter (a folder or a Hub repo id) into a slot; returns its name.

        The checks are :func:`adapterkit.load`'s (files against their manifest, base fingerprint,
        label rows). Loading the same bytes under the same name again is a hit and copies nothing;
        changed files replace the old weights (a running forward keeps the old ones).

        Args:
            name: the name to route by (default: the name it was saved under, else ``source``).
            revision, token, timeout: for Hub repo ids, as in :func:`adapterkit.load`.
            ignore_mismatch: load even if the adapter was trained on another base.
            allow_nonfinite: load tensors holding NaN/inf with a warning instead of refusing them.

        Raises:
            IncompatibleModelError: not a LoRA adapter, a layer the pool did not wrap, a rank above
                ``max_rank``.
            PoolFullError: every slot holds a pinned adapter or one in use by a running route.
        """
        if not isinstance(source, (str, os.PathLike)):
            raise InvalidOptionError(
                f"source must be a folder path or a Hub repo id, got {type(source).__name__} {source!r:.60}."
            )
        where = os.fspath(source)
        artifacts.recover(Path(where).expanduser())  # a save killed between its renames may have left it aside
        found = resolve_source(source, what="adapter", error=AdapterNotFoundError)
        if found.kind == "file":
            raise AdapterNotFoundError(f"{where} is a file; pass the adapter folder that holds it.")
        folder = found.path if found.kind == "folder" else hub.download(
            found.repo_id, revision=revision, token=token, timeout=timeout
        )
        if name is None:
            name = (artifacts.read_sidecar(folder) or {}).get("name") or where
        if not isinstance(name, str) or not name:
            raise InvalidOptionError(f"The adapter name must be a non-empty string, got {name!r}.")
        options = {"ignore_mismatch": ignore_mismatch, "allow_nonfinite": allow_nonfinite}
        started = time.perf_counter()
        # One read of the files: hashed for identity and the manifest, parsed from the same bytes.
        saved = artifacts.read_folder(folder, allow_nonfinite=allow_nonfinite)
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.digest == saved.digest and entry.options == options:
                self._bring_in(entry)
                return name
        entry, payload = self._read(saved, name, where, options)
        with self._lock:
            self._place(entry, payload)
            self._stats["misses"] += 1
            self._stats["loads"] += 1
            self._load_seconds += time.perf_counter() - started
        logger.info("Loaded adapter '%s' from %s into slot %s", name, where, entry.slot)
        return name

    def unload(self, name: str) -> None:
        """Forget adapter ``name``; its slot is free once the routes using it end."""
        with self._lock:
            self._forget(self._entry(name))

    def pin(self, name: str) -> None:
        """Keep adapter ``name`` in its slot (it is brought in if it was evicted) until :meth:`unpin`."""
        with self._lock:
            entry = self._entry(name)
            self._bring_in(entry)
            entry.pinned = True

    def unpin(self, name: str) -> None:
        """Let adapter ``name`` be evicted again when the slots are full."""
        with self._lock:
            self._entry(name).pinned = False

    def label_names(self, name: str) -> list[str] | None:
        """The label names adapter ``name`` was saved with (classification adapters), if any."""
        return self._entry(name).label_names

    # --- routing ----------------------------------------------------------------------------
    def route(self, names: str | Sequence[str | None] | None, *, load_missing: bool = False) -> _Route:
        """Route the forwards of the calling thread / asyncio task inside a ``with`` block.

        ``names`` is one adapter for the whole batch (a name, or None for the bare base) or one
        per batch row. The route holds its adapters' slots until the block ends.

        Args:
            load_missing: load names the pool does not hold, taking each name as its source
                (a folder or a Hub repo id); otherwise they are an error.

        Raises:
            AdapterNotFoundError: a name the pool does not hold (and ``load_missing`` is off).
            PoolFullError: the route names more adapters than there are free or evictable slots.
        """
        return _Route(self, names, load_missing)

    def _acquire(self, names: Any, load_missing: bool) -> tuple[routing.Route, list[int]]:
        """The route for ``names`` and the slots it holds (each counted as in use)."""
        if names is None or isinstance(names, str):
            rows, wanted = None, [names]
        elif isinstance(names, Sequence) and names and all(n is None or isinstance(n, str) for n in names):
            rows = wanted = tuple(names)
        else:
            raise InvalidOptionError(
                "pool.route takes an adapter name, None (the base), or a non-empty list with one name (or None) "
                f"per batch row; got {names!r:.80}."
            )
        distinct = list(dict.fromkeys(n for n in wanted if n is not None))
        if load_missing:
            for n in distinct:
                if n not in self._entries:
                    self.load(n, name=n)
        if len(distinct) > self.slots:
            raise PoolFullError(
                f"The route names {len(distinct)} adapters but the pool has {self.slots} slots. Create the pool "
                f"with slots>={len(distinct)}, or split the batch."
            )
        held: list[int] = []
        with self._lock:
            unknown = [n for n in distinct if n not in self._entries]
            if unknown:
                known = sorted(self._entries)
                raise AdapterNotFoundError(
                    f"The pool holds no adapter named {', '.join(repr(n) for n in unknown)}."
                    f"{did_you_mean(unknown[0], known)} Held: {', '.join(known) or '(none)'}. Load it with "
                    "pool.load(source, name=...), or route with load_missing=True to load names as sources."
                )
            try:
                for n in distinct:
                    entry = self._entries[n]
                    self._bring_in(entry)
                    self._users[entry.slot] += 1
                    held.append(entry.slot)
            except BaseException:
                self._release(held)
                raise
            entries = [None if n is None else self._entries[n] for n in wanted]
        slot_list = tuple(self.slots if e is None else e.slot for e in entries)
        single = slot_list[0] if len(set(slot_list)) == 1 else None
        scales = tuple(0.0 if e is None else e.scale for e in entries)
        used = [e for e in entries if e is not None]
        plan = pooled.RoutePlan(
            slots=(single,) if single is not None else slot_list,
            single=single,
            rank=max((e.rank for e in used), default=0),
            scales=scales[:1] if single is not None else scales,
            dora=any(e.dora for e in used),
            heads=any(e.has_head for e in used),
            max_rank=self.max_rank,
            base_slot=self.slots,
        )
        route = routing.Route(name=names if rows is None else None, rows=rows, plans={pooled.PLAN_KEY: plan})
        return route, held

    def _release(self, held: list[int]) -> None:
        with self._lock:
            for slot in held:
                self._users[slot] -= 1
                if not self._users[slot] and slot in self._retired:
                    self._retired.discard(slot)
                    self._free.append(slot)

    # --- slots (the caller holds the lock) ---------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            known = sorted(self._entries)
            raise AdapterNotFoundError(
                f"The pool holds no adapter named {name!r}.{did_you_mean(name, known)} "
                f"Held: {', '.join(known) or '(none)'}."
            )
        return entry

    def _bring_in(self, entry: _Entry) -> None:
        """Make sure ``entry`` sits in a slot: a hit, or a copy from the CPU tier or its folder."""
        if entry.slot is not None:
            self._stats["hits"] += 1
            self._in_slots.move_to_end(entry.name)
            return
        self._stats["misses"] += 1
        if entry.cpu is not None:
            payload = entry.cpu
            slot = self._take_slot()
            self._stats["cpu_hits"] += 1
            self._on_cpu.pop(entry.name, None)
            entry.cpu = None
            self._write(slot, payload)
            entry.slot = slot
            self._in_slots[entry.name] = None
            return
        # Evicted past the CPU tier: read its folder again (under the lock, so the files read are
        # the ones this entry stands for; a changed folder replaces it, as a load would).
        started = time.perf_counter()
        saved = artifacts.read_folder(entry.folder, allow_nonfinite=entry.options["allow_nonfinite"])
        fresh, payload = self._read(saved, entry.name, entry.source, entry.options)
        if fresh.digest != entry.digest:
            logger.warning("The files of adapter '%s' in %s changed since it was loaded; serving the new ones.",
                           entry.name, entry.folder)
        fresh.pinned = entry.pinned
        self._place(fresh, payload)
        self._stats["loads"] += 1
        self._load_seconds += time.perf_counter() - started
        entry.__dict__.update(fresh.__dict__)
        self._entries[entry.name] = entry

    def _place(self, entry: _Entry, payload: _Payload) -> None:
        """Register ``entry`` and copy ``payload`` into a slot, replacing an older adapter of its name."""
        old = self._entries.get(entry.name)
        slot = None
        if old is not None and old.slot is not None and not self._users[old.slot]:
            slot = old.slot  # nothing reads it: the new version takes the old one's slot
            old.slot = None
            self._in_slots.pop(old.name, None)
        if slot is None:
            slot = self._take_slot()
        if old is not None:
            self._forget(old)
        self._write(slot, payload)
        entry.slot = slot
        self._entries[entry.name] = entry
        self._in_slots[entry.name] = None

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for name in self._in_slots:  # least recently used first
            entry = self._entries[name]
            if not entry.pinned and not self._users[entry.slot]:
                return self._evict(entry)
        pinned = sorted(n for n in self._in_slots if self._entries[n].pinned)
        busy = sorted(n for n in self._in_slots if self._users[self._entries[n].slot])
        raise PoolFullError(
            f"All {self.slots} slots hold adapters that are pinned ({', '.join(pinned) or 'none'}) or in use by "
            f"running forwards ({', '.join(busy) or 'none'}). Create the pool with more slots, unpin adapters, or "
            "retry when the running routes end."
        )

    def _evict(self, entry: _Entry) -> int:
        slot = entry.slot
        if self.cpu_slots:
            entry.cpu = self._read_slot(slot, entry)
            self._on_cpu[entry.name] = None
            while len(self._on_cpu) > self.cpu_slots:
                oldest, _ = self._on_cpu.popitem(last=False)
                self._entries[oldest].cpu = None
        entry.slot = None
        del self._in_slots[entry.name]
        self._stats["evictions"] += 1
        logger.debug("Evicted adapter '%s' from slot %d", entry.name, slot)
        return slot

    def _forget(self, entry: _Entry) -> None:
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]
        self._on_cpu.pop(entry.name, None)
        entry.cpu = None
        if entry.slot is not None:
            self._in_slots.pop(entry.name, None)
            if self._users[entry.slot]:
                self._retired.add(entry.slot)  # freed when the routes that read it end
            else:
                self._free.append(entry.slot)
            entry.slot = None

    def _write(self, slot: int, payload: _Payload) -> None:
        copies: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for path, (_, state) in self._lora.items():
            state.write(slot, *(payload.lora.get(path) or (None, None, None)), copies=copies)
        torch_compat.copy_all(*copies)
        for path, (_, state) in self._heads.items():
            state.write(slot, *(payload.heads.get(path) or (None, None)))

    def _read_slot(self, slot: int, entry: _Entry) -> _Payload:
        lora = {path: t for path, (_, s) in self._lora.items() if (t := s.read(slot, entry.rank)) is not None}
        heads = {path: t for path, (_, s) in self._heads.items() if (t := s.read(slot)) is not None}
        return _Payload(lora, heads)

    # --- reading an adapter ----------------------------------------------------------------
    def _read(self, saved: artifacts.SavedAdapter, name: str, where: str, options: dict[str, bool]) -> tuple[_Entry, _Payload]:
        """Check the adapter read from a folder against this pool (no lock needed): its entry and tensors."""
        strategy = saved.strategy.name
        if strategy != "lora":
            raise IncompatibleModelError(
                f"{where} is a '{strategy}' adapter; an AdapterPool serves LoRA and DoRA adapters only ('{strategy}' "
                "adapters change more than the output of linear layers). Serve it with ak.load(model, source) on a "
                "base of its own and switch with ak.use(model, name)."
            )
        artifacts.check_fits(self._base, saved, ignore_mismatch=options["ignore_mismatch"], where=where,
                             base_fingerprint=self._fingerprint)
        config = saved.config
        rank = config.r
        if rank > self.max_rank:
            raise IncompatibleModelError(
                f"{where} has rank r={rank}, above this pool's max_rank={self.max_rank}. Create the pool with "
                f"AdapterPool(model, max_rank={rank}) or more."
            )
        alpha = config.lora_alpha if config.lora_alpha is not None else 2 * rank
        scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        payload = self._payload(saved.tensors, rank, scale, where)
        dora = any(g is not None for _, _, g in payload.lora.values())
        entry = _Entry(
            name=name, source=where, folder=saved.folder, digest=saved.digest, rank=rank, scale=scale, dora=dora,
            has_head=bool(payload.heads), label_names=(saved.sidecar or {}).get("label_names"), options=dict(options),
        )
        return entry, payload

    def _payload(self, tensors: dict[str, torch.Tensor], rank: int, scale: float, where: str) -> _Payload:
        groups: dict[str, dict[str, torch.Tensor]] = {}
        head_parts: dict[str, dict[str, torch.Tensor]] = {}
        unknown = []
        for key, value in tensors.items():
            rel = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            part = next(((rel[: -len(s)], p) for s, p in _LORA_KEYS if rel.endswith(s)), None)
            if part is not None:
                groups.setdefault(part[0], {})[part[1]] = value
                continue
            path, _, leaf = rel.rpartition(".")
            if path in self._heads and leaf in ("weight", "bias"):
                head_parts.setdefault(path, {})[leaf] = value
            else:
                unknown.append(key)
        if unknown:
            raise IncompatibleModelError(
                f"{where} has tensors an AdapterPool has no place for: {', '.join(sorted(unknown)[:3])}"
                f"{', ...' if len(unknown) > 3 else ''} (the pool serves LoRA on linear layers and label heads made "
                "of linear layers; LoRA on embeddings, LoRA biases and other head modules are not pooled). Serve it "
                "with ak.load(model, source) and ak.use(model, name)."
            )
        outside = sorted(p for p in groups if p not in self._lora)
        if outside:
            suffixes = sorted({p.rsplit(".", 1)[-1] for p in groups})
            raise IncompatibleModelError(
                f"{where} adapts {len(outside)} layer(s) this pool did not wrap ({', '.join(outside[:3])}"
                f"{', ...' if len(outside) > 3 else ''}). Create the pool with target_modules=None (every linear "
                f"layer of the backbone) or a list that includes {suffixes}."
            )
        lora = {}
        for path, parts in sorted(groups.items()):
            module, state = self._lora[path]
            a, b, m = parts.get("A"), parts.get("B"), parts.get("m")
            if a is None or b is None:
                raise AdapterFormatError(
                    f"{where} has an incomplete LoRA layer '{path}': no lora_{'A' if a is None else 'B'} tensor. "
                    "Save or download the adapter again."
                )
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
                raise IncompatibleModelError(
                    f"{where}: layer '{path}' has LoRA tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}, not rank "
                    f"{rank} as its config says (per-layer ranks, rank_pattern, are not pooled). Serve it with ak.load."
                )
            if a.shape[1] != state.in_features or b.shape[0] != state.out_features:
                raise AdapterMismatchError(
                    f"{where}: layer '{path}' has LoRA tensors for {a.shape[1]} inputs and {b.shape[0]} outputs; this "
                    f"base's layer has {state.in_features} and {state.out_features}. It was trained on another base."
                )
            lora[path] = (a, b, None if m is None else _dora_scale(module, a, b, m, scale))
        heads = {}
        for path, parts in sorted(head_parts.items()):
            state = self._heads[path][1]
            weight, bias = parts.get("weight"), parts.get("bias")
            if weight is None or (bias is None) != (state.b is None):
                raise AdapterMismatchError(
                    f"{where} has an incomplete head layer '{path}': tensors {sorted(parts)}, the model's layer has "
                    f"{'weight and bias' if state.b is not None else 'a weight only'}. Save the adapter again."
                )
            if weight.dim() != 2 or weight.shape[1] != state.in_features or (
                bias is not None and bias.shape != weight.shape[:1]
            ):
                raise AdapterMismatchError(
                    f"{where}: head layer '{path}' has a weight of shape {tuple(weight.shape)}; this base's takes "
                    f"{state.in_features} inputs."
                )
            heads[path] = (weight, bias)
        return _Payload(lora, heads)

    # --- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Give the pooled layers back their own classes and free every slot (no route may be running)."""
        with self._lock:
            if any(self._users):
                raise InvalidOptionError("Cannot close the pool while routes are running: end them first.")
            for module, _ in [*self._lora.values(), *self._heads.values()]:
                pooled.uninstall(module)
            self._lora.clear()
            self._heads.clear()
            self._entries.clear()
            self._in_slots.clear()
            self._on_cpu.clear()
            self._free = []


def _refuse_adapted(base: nn.Module) -> None:
    """The pool serves adapters on a bare base: refuse one that already carries some."""
    store = get_store(base)
    if store is not None and store.records:
        raise IncompatibleModelError(
            f"This model carries adapterkit adapters ({', '.join(sorted(store.records))}); an AdapterPool serves "
            "adapters on a bare base. Load a fresh base with ak.load_base, or ak.detach those adapters first."
        )
    for path, module in base.named_modules():
        if pooled.is_pooled(module):
            raise IncompatibleModelError(
                f"This model already belongs to an AdapterPool (layer '{path}'). Use that pool, or pool.close() it first."
            )
        if isinstance(getattr(module, "base_layer", None), nn.Module):
            raise IncompatibleModelError(
                f"This model carries peft adapter layers (at '{path}'); an AdapterPool serves adapters on a bare base. "
                "Load a fresh base with ak.load_base."
            )


def _dora_scale(module: nn.Module, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor, scale: float) -> torch.Tensor:
    """DoRA's per-output scale ``m / ||W + s B A||`` (row norms), computed once at load as peft does per forward."""
    with torch.no_grad():
        weight = pooled.dense_weight(module).float()
        merged = weight + scale * (b.float() @ a.float()).to(weight.device)
        return magnitude.float().to(weight.device) / torch.linalg.norm(merged, dim=1)
