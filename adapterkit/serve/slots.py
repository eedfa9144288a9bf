"""The pool's layers: preallocated stacked adapter buffers on the model's own modules.

Each pooled linear layer of the backbone keeps its own class, weights and forward (a 4/8-bit
base layer stays quantized) and gains, in its ``__dict__``, a :class:`LoraSlots`: ``A``
(slots x max_rank x in) and ``B`` (slots x out x max_rank, stored transposed), zero-padded for
smaller ranks, plus a DoRA scale per slot once a DoRA adapter arrives. Each linear layer of the label head
(classifier, score, pooler) gains a :class:`HeadSlots`: one full weight (and bias) per slot.
The last slot of every buffer is the base's: zeros for LoRA, the base's own head weights.

The layer follows routes through :mod:`adapterkit.routing` (a subclass per layer class, made
once, as peft's layers do for ``ak.use``), and reads the calling context's :class:`RoutePlan`:

- no route: the bare base layer, one context-variable read;
- one adapter for the whole batch: two plain matmuls on that slot;
- one adapter per row: the rows grouped by adapter (``index_select``), each adapter's slot
  gathered once, two batched matmuls, and the updates added back to their rows.

The maths is peft's: ``W x + s B A x`` with ``s = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA),
and for DoRA ``W x + (g - 1) (W x) + g s B A x`` with ``g = m / ||W + s B A||`` per output,
computed once when the adapter is copied in.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import adapterkit.routing as routing
from adapterkit.errors import IncompatibleModelError
from adapterkit.quantized import dequantize_linear

#: key of the pool's plan in a :class:`routing.Route`'s ``plans``
PLAN_KEY = "adapterkit.pool"
#: attribute, in a pooled module's ``__dict__``, holding its slots
SLOTS_ATTR = "_adapterkit_pool_slots"
LORA_KIND = "pool_lora"
HEAD_KIND = "pool_head"


@dataclasses.dataclass
class RouteTensors:
    """A mixed route's index tensors on one device: the rows grouped by adapter.

    Each adapter's rows form one group, padded to the largest group with repeats of its first
    row, so one batched matmul per layer covers every adapter: weights are gathered once per
    adapter (not per row), activations once per row.
    """

    #: per row, its slot (head layers gather a full weight per row)
    index: torch.Tensor
    #: the distinct adapters' slots, k of them
    used: torch.Tensor
    #: their first ``rank`` rank rows in a buffer viewed as (slots * max_rank) x features
    ranks: torch.Tensor
    #: their scaling, k x 1 x 1
    scale: torch.Tensor
    #: k * per row indices: each group's rows, padded
    gather: torch.Tensor
    #: positions in ``gather`` that are not padding (None: there is none)
    valid: torch.Tensor | None
    #: the row each valid position adds its update to
    targets: torch.Tensor
    #: rows per group, padding included
    per: int


@dataclasses.dataclass(eq=False)
class RoutePlan:
    """What every pooled layer needs for one route, prepared once when the route starts."""

    #: the slot of each row, or of the whole batch (one entry) for a single-adapter route
    slots: tuple[int, ...]
    #: the slot every row uses, when there is one (the base slot included)
    single: int | None
    #: largest rank among the routed adapters (0: every row is the base)
    rank: int
    #: scaling of each entry of ``slots``
    scales: tuple[float, ...]
    #: some routed adapter is a DoRA adapter
    dora: bool
    #: some routed adapter has its own label head
    heads: bool
    #: the pool's max_rank (rank rows per slot in the buffers)
    max_rank: int
    #: the base's slot (zeros; the base's own head)
    base_slot: int
    _tensors: dict = dataclasses.field(default_factory=dict, repr=False)

    def tensors(self, device: torch.device, dtype: torch.dtype) -> RouteTensors:
        """This route's :class:`RouteTensors` on ``device``, made once per route."""
        key = (device, dtype)
        found = self._tensors.get(key)
        if found is None:
            groups: dict[int, list[int]] = {}
            scales: dict[int, float] = {}
            for row, (slot, scale) in enumerate(zip(self.slots, self.scales)):
                if slot != self.base_slot:
                    groups.setdefault(slot, []).append(row)
                    scales[slot] = scale
            per = max((len(rows) for rows in groups.values()), default=1)
            gather, valid, targets = [], [], []
            for g, rows in enumerate(groups.values()):
                gather += rows + rows[:1] * (per - len(rows))
                valid += range(g * per, g * per + len(rows))
                targets += rows
            used = torch.tensor(list(groups), dtype=torch.long, device=device)

            def tensor(values: list[int]) -> torch.Tensor:
                return torch.tensor(values, dtype=torch.long, device=device)

            found = self._tensors[key] = RouteTensors(
                index=tensor(list(self.slots)),
                used=used,
                ranks=(used[:, None] * self.max_rank + torch.arange(self.rank, device=device)).flatten(),
                scale=torch.tensor([scales[s] for s in groups], dtype=dtype, device=device).view(-1, 1, 1),
                gather=tensor(gather),
                valid=None if len(valid) == len(gather) else tensor(valid),
                targets=tensor(targets),
                per=per,
            )
        return found


def features(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a linear layer (``nn.Linear``, bitsandbytes' linears, GPT-2's ``Conv1D``)."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def buffer_dtype(module: nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the slots of ``module``: ``dtype``, else its float weights', else its compute dtype."""
    if dtype is not None:
        return dtype
    weight = module.weight
    if weight.is_floating_point() and type(weight).__name__ not in ("Params4bit", "Int8Params"):
        return weight.dtype
    return getattr(module, "compute_dtype", None) or torch.float32


def dense_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as a float (out x in) matrix: transposed for Conv1D, dequantized for bnb."""
    if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
        return dequantize_linear(module).weight.detach()
    if type(module).__name__ == "Conv1D":
        return module.weight.detach().T
    return module.weight.detach()


class LoraSlots:
    """One pooled linear layer's stacked LoRA buffers; the last slot is the base (zeros).

    ``B`` is kept transposed, slots x max_rank x out, so that the first r ranks of a slot are one
    contiguous block: gathering the rows' slots for a rank below ``max_rank`` copies whole blocks.
    """

    def __init__(self, module: nn.Module, count: int, max_rank: int, dtype: torch.dtype | None) -> None:
        self.in_features, self.out_features = features(module)
        self.dtype = buffer_dtype(module, dtype)
        self.device = module.weight.device
        self.A = torch.zeros(count + 1, max_rank, self.in_features, dtype=self.dtype, device=self.device)
        self.B = torch.zeros(count + 1, max_rank, self.out_features, dtype=self.dtype, device=self.device)
        #: per-slot DoRA scale g (ones where no DoRA adapter sits), made when the first one arrives
        self.mag: torch.Tensor | None = None
        #: rank written to each slot since it was last cleared (what a smaller rank must zero)
        self.written = [0] * (count + 1)

    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, g: torch.Tensor | None,
              copies: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
        """Put one adapter's A (r x in), B (out x r) and DoRA scale (or nothing: a zero update) in ``slot``.

        A and B go into ``copies`` (destinations, sources): the caller copies every layer's in one
        call (:func:`adapterkit.compat.torch.copy_all`); zeroing and the DoRA scale happen here.
        """
        rank = 0 if a is None else a.shape[0]
        with torch.no_grad():
            if rank:
                copies[0].extend((self.A[slot, :rank], self.B[slot, :rank]))
                copies[1].extend((a, b.T))
            if self.written[slot] > rank:
                self.A[slot, rank:].zero_()
                self.B[slot, rank:].zero_()
            if g is not None and self.mag is None:
                with torch.inference_mode(False):  # written again by later loads, in or out of inference mode
                    self.mag = torch.ones(self.A.shape[0], self.out_features, dtype=self.dtype, device=self.device)
            if self.mag is not None:
                if g is None:
                    self.mag[slot].fill_(1.0)
                else:
                    self.mag[slot].copy_(g)
        self.written[slot] = rank

    def read(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Copies of what :meth:`write` put in ``slot`` (on the CPU), or None for a zero update."""
        if not self.written[slot]:
            return None
        a = self.A[slot, :rank].to("cpu", copy=True)
        b = self.B[slot, :rank].T.to("cpu", copy=True)
        g = self.mag[slot].to("cpu", copy=True) if self.mag is not None else None
        return a, b, g

    def forward(self, x: torch.Tensor, result: torch.Tensor, plan: RoutePlan, route: routing.Route,
                bias: torch.Tensor | None) -> torch.Tensor:
        """``result`` (the base layer's output for ``x``) plus the routed adapters' updates."""
        rank = plan.rank
        x = x.to(self.dtype)
        if route.rows is not None:
            route.check_rows(x.shape[0])
        # The add is fused into the second matmul (in place where no autograd can need the base
        # output), and the scaling goes into it or onto x A (r wide): no extra pass over the update.
        in_place = not torch.is_grad_enabled() and result.dtype == self.dtype and result.is_contiguous()
        if plan.single is not None:
            slot = plan.single
            xa = F.linear(x, self.A[slot, :rank]).reshape(-1, rank)
            b = self.B[slot, :rank]
            g = self.mag[slot] if plan.dora and self.mag is not None else None
            if g is None and result.dtype == self.dtype:
                flat = result.view(-1, self.out_features) if in_place else result.reshape(-1, self.out_features)
                add = flat.addmm_ if in_place else flat.addmm
                return add(xa, b, alpha=plan.scales[0]).view(result.shape)
            delta = (xa @ b).view(result.shape) * plan.scales[0]
            if g is None:
                return result + delta.to(result.dtype)
            base = result if bias is None else result - bias
            return result + ((g - 1) * base + g * delta).to(result.dtype)
        t = plan.tensors(self.device, self.dtype)
        k, rows = t.used.shape[0], x.shape[0]
        a = self.A.view(-1, self.in_features).index_select(0, t.ranks).view(k, rank, self.in_features)
        b = self.B.view(-1, self.out_features).index_select(0, t.ranks).view(k, rank, self.out_features)
        x3 = x.reshape(rows, -1, self.in_features)
        seq = x3.shape[1]
        grouped = x3.index_select(0, t.gather).view(k, t.per * seq, self.in_features)
        delta = torch.bmm(torch.bmm(grouped, a.transpose(1, 2)) * t.scale, b)
        result3 = result.reshape(rows, seq, self.out_features)
        if plan.dora and self.mag is not None:
            g = self.mag.index_select(0, t.used).unsqueeze(1)
            base = result3.index_select(0, t.gather).view(k, t.per * seq, self.out_features)
            base = base if bias is None else base - bias
            delta = (g - 1) * base + g * delta
        delta = delta.view(k * t.per, seq, self.out_features)
        if t.valid is not None:
            delta = delta.index_select(0, t.valid)
        if in_place:
            return result3.index_add_(0, t.targets, delta).view(result.shape)
        return result3.index_add(0, t.targets, delta.to(result.dtype)).view(result.shape)


class HeadSlots:
    """One label-head linear layer's weights per slot; the last slot is the base's own."""

    def __init__(self, module: nn.Module, count: int) -> None:
        weight = dense_weight(module)
        self.out_features, self.in_features = weight.shape
        self.W = weight.new_empty((count + 1, *weight.shape))
        self.W[count] = weight
        bias = module.bias
        self.b = None if bias is None else bias.detach().new_empty((count + 1, bias.shape[0]))
        if self.b is not None:
            self.b[count] = bias.detach()
        self.base = count
        #: slots holding an adapter's own head (others hold the base's weights)
        self.own: set[int] = set()
        #: slots whose head has another number of outputs than the base's (another label count)
        self.odd: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def write(self, slot: int, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        """Copy one adapter's head weights into ``slot`` (None: the base's head)."""
        self.odd.pop(slot, None)
        self.own.discard(slot)
        with torch.no_grad():
            if weight is None:
                self.W[slot].copy_(self.W[self.base])
                if self.b is not None:
                    self.b[slot].copy_(self.b[self.base])
                return
            if weight.shape[0] != self.out_features:
                self.odd[slot] = (
                    weight.to(self.W.device, self.W.dtype, copy=True),
                    None if bias is None else bias.to(self.W.device, self.W.dtype, copy=True),
                )
            else:
                self.W[slot].copy_(weight)
                if self.b is not None:
                    self.b[slot].copy_(bias)
        self.own.add(slot)

    def read(self, slot: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Copies of the adapter's own head weights in ``slot`` (on the CPU), or None."""
        if slot not in self.own:
            return None
        weight, bias = self.odd.get(slot) or (self.W[slot], None if self.b is None else self.b[slot])
        return weight.to("cpu", copy=True), None if bias is None else bias.to("cpu", copy=True)

    def _weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.odd.get(slot) or (self.W[slot], None if self.b is None else self.b[slot])

    def forward(self, x: torch.Tensor, plan: RoutePlan, route: routing.Route, own_forward) -> torch.Tensor:
        """The routed rows' heads applied to ``x`` (rows of the base, or without a head, take the base's)."""
        if route.rows is not None:
            route.check_rows(x.shape[0])
        if plan.single is not None:
            if plan.single not in self.own:
                return own_forward(x)
            return F.linear(x.to(self.W.dtype), *self._weights(plan.single))
        used = set(plan.slots)
        if not used & self.own:
            return own_forward(x)
        x = x.to(self.W.dtype)
        if not used & set(self.odd):
            index = plan.tensors(self.W.device, self.W.dtype).index
            rows = x.reshape(x.shape[0], -1, x.shape[-1])
            out = torch.bmm(rows, self.W.index_select(0, index).transpose(1, 2))
            if self.b is not None:
                out = out + self.b.index_select(0, index).unsqueeze(1)
            return out.reshape(*x.shape[:-1], self.out_features)
        # Heads of other label counts: one matmul per adapter, and the rows must agree on the width.
        widths = {self._weights(s)[0].shape[0] for s in used}
        if len(widths) > 1:
            raise_width_mismatch(widths)
        out = None
        for slot in used:
            idx = torch.tensor([i for i, s in enumerate(plan.slots) if s == slot], device=x.device)
            part = F.linear(x[idx], *self._weights(slot))
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[idx] = part
        return out


def raise_width_mismatch(widths: set[int]) -> None:
    """Refuse a mixed batch whose rows' label heads have different numbers of outputs."""
    raise IncompatibleModelError(
        f"The rows of this mixed batch route to label heads with different numbers of outputs "
        f"({', '.join(map(str, sorted(widths)))}), which cannot share one logits tensor. Route adapters with "
        "the same label count together, and the others in a separate call."
    )


# --- following routes ------------------------------------------------------------------------
def _plan(module: nn.Module) -> tuple[routing.Route, RoutePlan] | tuple[None, None]:
    route = routing.route_of(module)
    plan = route.plans.get(PLAN_KEY) if route is not None else None
    return (route, plan) if plan is not None else (None, None)


def _lora_namespace(cls: type) -> dict[str, Any]:
    def forward(self, x, *args, **kwargs):
        result = cls.forward(self, x, *args, **kwargs)
        route, plan = _plan(self)
        if plan is None or not plan.rank:
            return result
        return self.__dict__[SLOTS_ATTR].forward(x, result, plan, route, getattr(self, "bias", None))

    return {"forward": forward}


def _head_namespace(cls: type) -> dict[str, Any]:
    def forward(self, x, *args, **kwargs):
        route, plan = _plan(self)
        if plan is None or not plan.heads:
            return cls.forward(self, x, *args, **kwargs)
        return self.__dict__[SLOTS_ATTR].forward(x, plan, route, lambda v: cls.forward(self, v, *args, **kwargs))

    return {"forward": forward}


routing.register_kind(LORA_KIND, _lora_namespace)
routing.register_kind(HEAD_KIND, _head_namespace)


def install(module: nn.Module, pool: Any, kind: str, slots: LoraSlots | HeadSlots) -> None:
    """Make ``module`` a pooled layer of ``pool`` reading ``slots``."""
    module.__dict__[SLOTS_ATTR] = slots
    routing.reroute(module, pool, kind)


def uninstall(module: nn.Module) -> None:
    """Give ``module`` back its own class and drop its slots."""
    routing.unroute(module, SLOTS_ATTR)


def is_pooled(module: nn.Module) -> bool:
    """Whether ``module`` already belongs to a pool."""
    return SLOTS_ATTR in module.__dict__
