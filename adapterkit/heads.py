"""Per-adapter module copies: label heads, and the head/top layers the ``head`` strategy trains.

An adapter that trains the label head (the classifier, ``score``, ``lm_head``) owns a copy
of it; the ``head`` strategy owns copies of whatever it trains. The base keeps its own modules
at those paths. This file is the one home of that: making the copies, putting the default
adapter's copies in the model, routing a forward to the calling context's adapter (per row
in a mixed batch), their tensors in saved files (full model paths, or peft's
``modules_to_save`` naming), and checking and loading them back.

The copies live in the model's :class:`adapterkit.state.AdapterStore` (``heads``: per adapter,
module by path; ``base_heads``: the base's own module at every such path).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adapterkit.routing as routing
from adapterkit.errors import AdapterFormatError, AdapterMismatchError
from adapterkit.quantized import trainable_copy
from adapterkit.targets import head_paths, is_vocab_head

logger = logging.getLogger(__name__)

#: The prefix peft gives every key of a saved adapter (``modules_to_save`` heads included).
PEFT_PREFIX = "base_model.model."
#: attribute, in a routed head's ``__dict__``, holding its path in the model
PATH_ATTR = "_adapterkit_head_path"


# --- copies in the model ----------------------------------------------------------------------
def copy_heads(model: nn.Module, store: Any, name: str, paths: list[str]) -> dict[str, nn.Module]:
    """Give adapter ``name`` its own copy of the modules at ``paths``.

    The copy starts from the base's current weights; a tied output embedding becomes an
    untied copy, so training it never touches the frozen input embeddings, and a quantized
    module a dequantized one.
    """
    copies = store.heads.setdefault(name, {})
    for path in paths:
        if path not in store.base_heads:
            store.base_heads[path] = model.get_submodule(path)
            _route(store.base_heads[path], store, path)
        source = store.base_heads[path]
        # The memo shares the store (routed modules point at it) instead of copying the model.
        copies[path] = trainable_copy(source, memo={id(store): store})
        _route(copies[path], store, path)
    return copies


def head_for(store: Any, name: str | None, path: str) -> nn.Module:
    """The module adapter ``name`` (None: the base) uses at head ``path``."""
    own = store.heads.get(name) if name is not None else None
    return own.get(path, store.base_heads[path]) if own else store.base_heads[path]


def install(model: nn.Module, store: Any, name: str | None) -> None:
    """Register adapter ``name``'s head modules in the model (the base's where it has none)."""
    own = store.heads.get(name, {}) if name is not None else {}
    for path, base_module in store.base_heads.items():
        module = own.get(path, base_module)
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        current = getattr(parent, attr)
        if current is module:
            continue
        _follow(module, current)
        setattr(parent, attr, module)


def release(store: Any) -> None:
    """Give the base's head modules back their own classes (the last adapter is gone)."""
    for module in store.base_heads.values():
        routing.unroute(module, PATH_ATTR)


def _follow(module: nn.Module, current: nn.Module) -> None:
    """Move ``module`` to where ``current`` lives and match its train/eval mode."""
    ref = next(current.parameters(), None)
    mine = next(module.parameters(), None)
    if ref is not None and mine is not None and mine.device != ref.device:
        module.to(ref.device)
    module.train(current.training)


# --- routing a forward to the context's adapter ----------------------------------------------
def _namespace(cls: type) -> dict[str, Any]:
    def forward(self, *args, **kwargs):
        route = routing.route_of(self)
        if route is None:
            return cls.forward(self, *args, **kwargs)
        store = self.__dict__[routing.STORE_ATTR]
        where = self.__dict__[PATH_ATTR]
        if route.rows is None:
            target = head_for(store, route.name, where)
            if target is self:
                return cls.forward(self, *args, **kwargs)
            return routing.own_forward(target)(*args, **kwargs)
        return _per_row(route, store, where, args, kwargs)

    return {"forward": forward}


routing.register_kind("head", _namespace)


def _route(module: nn.Module, store: Any, path: str) -> None:
    module.__dict__[PATH_ATTR] = path
    routing.reroute(module, store, "head")


def _per_row(route: routing.Route, store: Any, path: str, args: tuple, kwargs: dict):
    x, rest = args[0], args[1:]
    rows = route.rows
    route.check_rows(x.shape[0], f" at '{path}'")
    groups: dict[int, tuple[nn.Module, list[int]]] = {}
    for i, name in enumerate(rows):
        head = head_for(store, name, path)
        groups.setdefault(id(head), (head, []))[1].append(i)
    if len(groups) == 1:
        (head, _), = groups.values()
        return routing.own_forward(head)(*args, **kwargs)
    out = None
    for head, idx in groups.values():
        index = torch.tensor(idx, dtype=torch.long, device=x.device)
        part = routing.own_forward(head)(x[index], *rest, **kwargs)
        if out is None:
            out = part.new_empty((len(rows), *part.shape[1:]))
        out[index] = part.to(out.dtype)
    return out


# --- tensors -----------------------------------------------------------------------------------
def parameters(store: Any, name: str) -> dict[str, nn.Parameter]:
    """Adapter ``name``'s head parameters by full model path."""
    return {
        f"{path}.{pname}": p
        for path, module in store.heads.get(name, {}).items()
        for pname, p in module.named_parameters()
    }


def state_dict(store: Any, name: str, *, peft_names: bool = False) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s head tensors by full model path (``peft_names``: with peft's key prefix)."""
    prefix = PEFT_PREFIX if peft_names else ""
    return {
        f"{prefix}{path}.{key}": value.detach()
        for path, module in store.heads.get(name, {}).items()
        for key, value in module.state_dict().items()
    }


def modules_to_save(store: Any, name: str) -> list[str] | None:
    """peft's ``modules_to_save`` for adapter ``name``'s heads (their last path component)."""
    return sorted({path.rsplit(".", 1)[-1] for path in store.heads.get(name, {})}) or None


def check_label_rows(base: nn.Module, tensors: dict[str, torch.Tensor], label_names: Any, path: Path) -> None:
    """A classifier's output rows in a saved file must match the label names its sidecar records."""
    if not isinstance(label_names, list):
        return
    for head in head_paths(base):
        if is_vocab_head(base, head):
            continue
        module = base.get_submodule(head)
        linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            continue
        out = f"{head}.{linears[-1]}" if linears[-1] else head
        for leaf in ("weight", "bias"):
            for key in (f"{out}.{leaf}", f"{PEFT_PREFIX}{out}.{leaf}"):
                value = tensors.get(key)
                if value is not None and value.dim() >= 1 and value.shape[0] != len(label_names):
                    raise AdapterFormatError(
                        f"Head tensor '{key}' in {path} has {value.shape[0]} output rows but the sidecar names "
                        f"{len(label_names)} labels ({', '.join(label_names[:6])}). The adapter is inconsistent: "
                        "save it again."
                    )


Plan = list[tuple[nn.Module, str, torch.Tensor]]


def plan_load(
    heads: dict[str, nn.Module], tensors: dict[str, torch.Tensor], own: set[str], path: Path, *, strict: bool
) -> Plan:
    """(module, parameter name, value) for every head tensor in ``tensors`` (keys not in ``own``,
    with or without peft's prefix), after checking them all; :func:`load_plan` copies them.

    A head module the file has tensors for must be complete (a missing bias is refused, not
    kept from the base). ``strict`` (adapterkit's own files) also refuses a head with no
    tensors at all; plain peft files without ``modules_to_save`` keep the base's head.
    """
    rest = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items() if k not in own}
    plan: Plan = []
    loaded: set[str] = set()
    empty = []
    for hpath, module in sorted(heads.items()):
        mine = {k[len(hpath) + 1 :]: v for k, v in rest.items() if k.startswith(hpath + ".")}
        if not mine:
            empty.append(hpath)
            continue
        params = dict(module.named_parameters())
        missing = sorted(set(params) - set(mine))
        if missing:
            raise AdapterMismatchError(
                f"{path} has an incomplete head '{hpath}': no tensor for {', '.join(f'{hpath}.{m}' for m in missing)}. "
                "adapterkit does not fill head weights from the base: save the adapter again."
            )
        for pname, value in sorted(mine.items()):
            if pname not in params:
                continue  # reported below as a tensor with no place
            owner, _, leaf = pname.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            param = params[pname]
            resizable = (
                isinstance(target, nn.Linear) and leaf in ("weight", "bias") and param.shape[1:] == value.shape[1:]
            )
            if param.shape != value.shape and not resizable:
                raise AdapterMismatchError(
                    f"Head tensor '{hpath}.{pname}' in {path} has shape {tuple(value.shape)}, the model's "
                    f"{tuple(param.shape)}."
                )
            plan.append((target, leaf, value))
            loaded.add(f"{hpath}.{pname}")
    unknown = sorted(set(rest) - loaded)
    if unknown:
        raise AdapterMismatchError(f"{path} has tensors this model has no place for: {unknown[:3]}.")
    resized = {(id(m), leaf): v.shape[0] for m, leaf, v in plan if isinstance(m, nn.Linear)}
    for m, leaf, v in plan:
        other = "bias" if leaf == "weight" else "weight"
        if isinstance(m, nn.Linear) and (id(m), other) in resized and resized[(id(m), other)] != v.shape[0]:
            raise AdapterMismatchError(
                f"{path}: the weight and bias of head layer {leaf!r} disagree on the number of outputs."
            )
    if empty and strict:
        raise AdapterMismatchError(
            f"{path} has no tensors for the task head {', '.join(empty)} that this adapter trains. The file is "
            "incomplete: save the adapter again."
        )
    if empty:
        logger.warning(
            "%s carries no weights for the task head %s; it keeps the base's head. Plain peft adapters need "
            "modules_to_save for a trained classifier.",
            path,
            empty,
        )
    return plan


def load_plan(plan: Plan) -> None:
    """Copy a checked :func:`plan_load` into the head modules, resizing a classifier to the saved
    class count (e.g. a 6-way head on a 2-way base)."""
    for module, leaf, value in plan:
        _resize_linear(module, leaf, value)
        param = getattr(module, leaf)
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))


def _resize_linear(module: nn.Module, key: str, value: torch.Tensor) -> None:
    if not isinstance(module, nn.Linear) or key not in ("weight", "bias"):
        return
    current = getattr(module, key)
    if current is None or current.shape == value.shape or current.shape[1:] != value.shape[1:]:
        return
    setattr(module, key, nn.Parameter(torch.empty_like(value, device=current.device, dtype=current.dtype)))
    module.out_features = value.shape[0]
