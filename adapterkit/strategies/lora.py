"""LoRA: low-rank updates on the backbone's linear layers (DoRA and rsLoRA as options).

Trains A (r x in) and B (out x r) per adapted layer; the layer computes
``W x + (alpha / r) * B A x`` (Hu et al. 2021, https://arxiv.org/abs/2106.09685; DoRA adds a
learned magnitude, https://arxiv.org/abs/2402.09353). The maths is peft's: adapterkit injects
peft's LoRA layers in place, so many LoRA adapters (and adapters of other strategies) share
one base, and writes peft's own files so plain peft, vLLM or LoRAX load them. On a 4/8-bit
base peft dispatches to its bitsandbytes layers: that is QLoRA.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adapterkit.heads as heads
import adapterkit.routing as routing
from adapterkit.compat import peft as peft_compat
from adapterkit.config import AdapterConfig
from adapterkit.errors import IncompatibleModelError
from adapterkit.registry import register_strategy
from adapterkit.state import get_store
from adapterkit.strategy import Strategy
from adapterkit.io import write_safetensors
from adapterkit.model_info import base_model_id
from adapterkit.targets import linear_layer_names


@dataclasses.dataclass(kw_only=True)
class LoraConfig(AdapterConfig):
    """Options of the ``lora`` strategy (peft's names).

    Attributes:
        r: rank of the update.
        lora_alpha: scale numerator; ``None`` means ``2 * r``.
        lora_dropout: dropout on the LoRA path.
        target_modules: ``None`` or ``"all-linear"`` for every linear layer of the backbone,
            ``"attention"`` for those inside attention blocks, or module names / suffixes.
        use_dora: weight-decomposed LoRA (learned magnitude per output).
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """

    strategy = "lora"

    r: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_dora: bool = False
    use_rslora: bool = False

    def validate(self) -> list[str]:
        problems = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            problems.append(f"r must be a positive integer, got {self.r!r}")
        if self.lora_alpha is not None and not (isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0):
            problems.append(f"lora_alpha must be a positive number or None, got {self.lora_alpha!r}")
        elif self.lora_alpha is None and not problems:
            # Recorded as the value in effect, so summaries, cards and `info` show 16, not None.
            self.lora_alpha = 2 * self.r
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        tm = self.target_modules
        if not (tm is None or isinstance(tm, str) or (isinstance(tm, (list, tuple)) and tm and all(isinstance(t, str) for t in tm))):
            problems.append(f"target_modules must be None, 'all-linear', 'attention' or a non-empty list of names, got {tm!r}")
        if isinstance(tm, tuple):
            self.target_modules = list(tm)
        return problems


def resolve_targets(model: nn.Module, target_modules: list[str] | str | None) -> list[str]:
    """Full paths of the layers to adapt, discovered from the model.

    Raises:
        IncompatibleModelError: nothing matches, with the candidate names.
    """
    if target_modules in (None, "all-linear"):
        names = linear_layer_names(model, scope="all")
    elif target_modules == "attention":
        names = linear_layer_names(model, scope="attention")
    else:
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        candidates = linear_layer_names(model, scope="all")
        names = [n for n in candidates if any(n == t or n.endswith("." + t) for t in wanted)]
        unmatched = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in candidates)]
        if unmatched:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise IncompatibleModelError(
                f"target_modules {unmatched} match no linear layer of {type(model).__name__}. "
                f"Linear layers of its backbone end in: {', '.join(suffixes)}."
            )
    if not names:
        raise IncompatibleModelError(
            f"LoRA found no linear layer to adapt in {type(model).__name__} (target_modules={target_modules!r})."
        )
    return names


def _compact(model: nn.Module, names: list[str]) -> list[str]:
    """The shortest target list peft matches to exactly ``names`` (suffixes when unambiguous)."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    matched = {n for n, _ in model.named_modules() if any(n.endswith("." + s) or n == s for s in suffixes)}
    return suffixes if matched == set(names) else sorted(names)


# peft is imported inside the functions that use it: it pulls in bitsandbytes and takes about
# 4 s, which `import adapterkit` (the CLI's --help, a server's start) should not pay up front.
def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _extend_existing_layers(
    model: nn.Module, peft_cfg, name: str, targets: list[str], layers: list[tuple[str, nn.Module]]
) -> bool:
    """Add adapter ``name`` straight to the LoRA layers already in place, if they are exactly its targets.

    peft's injection matches every target pattern against every module of the model, and the model
    grows by a dozen modules per layer with each adapter loaded: on SmolLM2 with a few adapters that
    walk is most of a load (about 0.6 s of 0.7 s). When a second adapter targets the same layers,
    each layer's own ``update_layer`` (what peft calls for an existing LoRA layer) does the same work
    without the walk. Anything unusual (other targets, patterns, other adapter types) takes peft's path.
    """
    from peft.tuners.lora import LoraConfig as PeftLoraConfig
    from peft.tuners.lora import LoraLayer

    configs = getattr(model, "peft_config", None)
    if not layers or not isinstance(configs, dict) or name in configs:
        return False
    if not all(isinstance(c, PeftLoraConfig) for c in configs.values()):
        return False
    if peft_cfg.rank_pattern or peft_cfg.alpha_pattern or getattr(peft_cfg, "layers_to_transform", None) is not None:
        return False
    if any(type(layer).__name__.startswith("AdaLora") or not isinstance(layer, LoraLayer) for _, layer in layers):
        return False
    if {path for path, _ in layers} != set(targets):
        return False
    for path, layer in layers:
        layer.update_layer(name, peft_cfg.r, lora_alpha=peft_cfg.lora_alpha, target_name=path, config=peft_cfg)
        # peft leaves an added adapter frozen; attach() decides what trains.
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr, None)
            if container is not None and name in container:
                container[name].requires_grad_(False)
    configs[name] = peft_cfg
    return True


BASE_ROW = "__base__"  # peft's name for rows that use no adapter


def _peft_names(rows) -> list[str]:
    return [n if n is not None else BASE_ROW for n in rows]


def _row_plan(layer: nn.Module, rows: tuple[str | None, ...]):
    """What a per-row forward of ``layer`` needs, prepared once per route; None: use peft's path.

    peft's own mixed-batch path loops over the adapters of every layer (a select, two matmuls
    and a scatter per adapter), which for 8 adapters costs more than the base layer itself;
    gathering each row's A and B takes two batched matmuls. Layers where the gather does not
    apply (DoRA, LoRA bias, adapters of different ranks, embeddings, merged weights) keep peft's.
    """
    lora_a, lora_b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
        return None
    if getattr(layer, "merged_adapters", None) or getattr(layer, "lora_embedding_A", None):
        return None
    present = sorted({n for n in rows if n is not None and n in lora_a})
    if any(getattr(layer, "use_dora", {}).get(n) for n in present):
        return None
    if any(getattr(layer, "lora_bias", {}).get(n) for n in present):
        return None
    if len({layer.r[n] for n in present}) > 1:
        return None
    if not all(isinstance(lora_a[n], nn.Linear) and isinstance(lora_b[n], nn.Linear) for n in present):
        return None
    if not present:
        return {"present": present}
    return {
        "present": present,
        # Rows without an adapter on this layer get a zero update.
        "zero_a": lora_a[present[0]].weight.new_zeros(lora_a[present[0]].weight.shape),
        "zero_b": lora_b[present[0]].weight.new_zeros(lora_b[present[0]].weight.shape),
        "scale": lora_a[present[0]].weight.new_tensor([float(layer.scaling[n]) if n in lora_a else 0.0 for n in rows]).view(
            -1, 1, 1
        ),
    }


class _ActiveAdapter:
    """``_active_adapter`` of a routed peft layer: the context's choice, else the layer's own."""

    def __get__(self, layer: nn.Module | None, owner: type) -> Any:
        if layer is None:
            return self
        own = layer.__dict__.get(peft_compat.ACTIVE_ADAPTER_ATTR, [])
        route = routing.route_of(layer)
        if route is None or route.rows is not None:  # a per-row forward names its adapters itself
            return own
        return [route.name] if route.name is not None else []

    def __set__(self, layer: nn.Module, value: Any) -> None:
        layer.__dict__[peft_compat.ACTIVE_ADAPTER_ATTR] = value


def _routed_namespace(cls: type) -> dict[str, Any]:
    def forward(self, x, *args, **kwargs):
        route = routing.route_of(self)
        if route is None or route.rows is None or "adapter_names" in kwargs:
            return cls.forward(self, x, *args, **kwargs)
        return per_row_forward(self, cls, route, x, *args, **kwargs)

    return {peft_compat.ACTIVE_ADAPTER_ATTR: _ActiveAdapter(), "forward": forward}


routing.register_kind("lora", _routed_namespace)


def per_row_forward(layer: nn.Module, cls: type, route: routing.Route, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``layer``'s forward for a route with one LoRA adapter per batch row."""
    rows = route.rows
    key = id(layer)
    if key not in route.plans:
        route.plans[key] = _row_plan(layer, rows)
    plan = route.plans[key]
    if x.dim() >= 2:
        route.check_rows(x.shape[0])
    if plan is None or x.dim() != 3 or (
        layer.training
        and any(getattr(layer.lora_dropout[n], "p", 0) > 0 for n in plan["present"] if n in layer.lora_dropout)
    ):
        return cls.forward(layer, x, *args, adapter_names=_peft_names(rows), **kwargs)
    present = plan["present"]
    result = layer.get_base_layer()(x, *args, **kwargs)
    if not present:
        return result
    lora_a, lora_b = layer.lora_A, layer.lora_B
    a = torch.stack([lora_a[n].weight if n in lora_a else plan["zero_a"] for n in rows])
    b = torch.stack([lora_b[n].weight if n in lora_b else plan["zero_b"] for n in rows])
    xa = torch.bmm(x.to(a.dtype), a.transpose(1, 2))
    delta = torch.bmm(xa, b.transpose(1, 2)) * plan["scale"]
    return result + delta.to(result.dtype)


@register_strategy("lora")
class LoraStrategy(Strategy):
    """LoRA through peft, injected in place; files in peft's format."""

    config_cls = LoraConfig
    merges_into_weights = True
    default_learning_rate = 2e-3
    peft_type = "LORA"

    def check_mixed_batch(self, config: AdapterConfig) -> None:
        if getattr(config, "use_dora", False):
            raise IncompatibleModelError("This adapter uses DoRA, which peft cannot run in a mixed batch; run it alone with adapterkit.use().")

    def check_model(self, model: nn.Module, config: LoraConfig) -> None:
        resolve_targets(model, config.target_modules)

    def peft_config(self, model: nn.Module, config: LoraConfig, names: list[str] | None = None):
        """The equivalent ``peft.LoraConfig`` for this model (``names``: its resolved targets, if known)."""
        import peft

        names = names if names is not None else resolve_targets(model, config.target_modules)
        conv1d = any(type(model.get_submodule(n)).__name__ == "Conv1D" for n in names)
        return peft.LoraConfig(
            r=config.r,
            lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.r,
            lora_dropout=config.lora_dropout,
            target_modules=_compact(model, names),
            use_dora=config.use_dora,
            use_rslora=config.use_rslora,
            # GPT-2's Conv1D stores weights transposed (in x out).
            fan_in_fan_out=conv1d,
            inference_mode=False,
        )

    def attach(self, model: nn.Module, config: LoraConfig, name: str) -> None:
        import peft

        names = resolve_targets(model, config.target_modules)
        peft_cfg = self.peft_config(model, config, names)
        store = get_store(model)
        had_configs = hasattr(model, "peft_config")
        try:
            with warnings.catch_warnings():
                # peft warns about Conv1D fan_in_fan_out, which we set on purpose.
                warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
                # Several adapters on one base is the point; peft warns about it.
                warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
                if _extend_existing_layers(model, peft_cfg, name, names, store.extra.get("lora_layers") or []):
                    store.extra["lora_peft_config"][name] = peft_cfg
                    return
                peft.inject_adapter_in_model(peft_cfg, model, adapter_name=name)
        except BaseException:
            self._undo_partial(model, name, had_configs)
            raise
        store.extra.setdefault("lora_peft_config", {})[name] = peft_cfg
        store.extra["lora_layers"] = _lora_layers(model)
        for _, layer in store.extra["lora_layers"]:
            peft_compat.enable_adapter_layer(layer)
            routing.reroute(layer, store, "lora")

    def _undo_partial(self, model: nn.Module, name: str, had_configs: bool) -> None:
        """Take out what a failed injection of ``name`` put in (it stops at the layer that failed):
        the layers it wrapped go back to their base layers, the ones it extended lose ``name``."""
        store = get_store(model)
        store.extra["lora_layers"] = _lora_layers(model)
        self.detach(model, name)
        configs = getattr(model, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(name, None)
            if not configs and not had_configs:
                del model.peft_config

    def activate(self, model: nn.Module, name: str | None) -> None:
        # Not peft's set_adapter: it also flips requires_grad and slows with each adapter loaded.
        active = [name] if name is not None else []
        peft_compat.set_active_adapters(get_store(model).extra.get("lora_layers", []), active)

    def detach(self, model: nn.Module, name: str) -> None:
        store = get_store(model)
        for path, layer in store.extra.get("lora_layers", []):
            layer.delete_adapter(name)
            if not layer.lora_A and not getattr(layer, "lora_embedding_A", None):
                parent_path, _, attr = path.rpartition(".")
                parent = model.get_submodule(parent_path) if parent_path else model
                setattr(parent, attr, layer.get_base_layer())
        store.extra.get("lora_peft_config", {}).pop(name, None)
        store.extra["lora_layers"] = _lora_layers(model)
        if not store.extra["lora_layers"] and hasattr(model, "peft_config"):
            del model.peft_config

    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        params: dict[str, nn.Parameter] = {}
        for path, layer in get_store(model).extra.get("lora_layers", []):
            for attr in layer.adapter_layer_names:
                container = getattr(layer, attr, None)
                if container is None or name not in container:
                    continue
                item = container[name]
                if isinstance(item, nn.Parameter):
                    params[f"{heads.PEFT_PREFIX}{path}.{attr}"] = item
                    continue
                for pname, p in item.named_parameters():
                    key = f"{heads.PEFT_PREFIX}{path}.{attr}.{pname}"
                    # peft saves DoRA's magnitude without the ".weight" of its module.
                    if attr == "lora_magnitude_vector" and key.endswith(".weight"):
                        key = key[: -len(".weight")]
                    params[key] = p
        return params

    def write_files(self, model: nn.Module, name: str, folder: Path, head: dict[str, torch.Tensor]) -> None:
        # peft's own files: the label head rides along as modules_to_save, under peft's key prefix.
        peft_cfg = get_store(model).extra["lora_peft_config"][name]
        peft_cfg = dataclasses.replace(peft_cfg)
        peft_cfg.inference_mode = True
        peft_cfg.base_model_name_or_path = base_model_id(model)
        peft_cfg.modules_to_save = heads.modules_to_save(get_store(model), name)
        if isinstance(peft_cfg.target_modules, (set, frozenset)):
            # A set's order differs between processes; sorted, one adapter always has the same bytes.
            peft_cfg.target_modules = sorted(peft_cfg.target_modules)
        peft_cfg.save_pretrained(str(folder))
        tensors = dict(self.state_dict(model, name))
        tensors.update({heads.PEFT_PREFIX + k: v for k, v in head.items()})
        write_safetensors(folder / "adapter_model.safetensors", tensors, metadata={"format": "pt"})

    def config_from_files(self, folder: Path) -> LoraConfig | None:
        path = folder / "adapter_config.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("peft_type") != "LORA":
            return None
        target = data.get("target_modules")
        if isinstance(target, list):
            target = sorted(target)
        return LoraConfig(
            r=int(data.get("r", 8)),
            lora_alpha=data.get("lora_alpha"),
            lora_dropout=float(data.get("lora_dropout", 0.0)),
            target_modules=target,
            use_dora=bool(data.get("use_dora", False)),
            use_rslora=bool(data.get("use_rslora", False)),
        )
