"""The contract every strategy must satisfy, built-in or plugin.

``check_strategy`` runs a strategy through attach, training, switching and detach on a
model and raises AssertionError with a specific message where it breaks the contract.
Plugin authors call it from their own tests:

    from adapterkit.testing import check_strategy
    check_strategy(lambda: MyModel(config), "my_method", batch, r=4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import adapterkit as ak
from adapterkit.registry import default_registry


def _outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return out.logits.detach().clone()


def check_strategy(
    make_model: Callable[[], nn.Module],
    strategy: str,
    batch: dict[str, torch.Tensor],
    *,
    steps: int = 5,
    lr: float = 1e-2,
    **options: Any,
) -> dict[str, float]:
    """Check the strategy contract on a fresh model from ``make_model``.

    Checks that only the adapter's parameters require and receive gradients, that a few
    optimizer steps lower the loss on ``batch``, that frozen weights stay bit-identical,
    that outputs are unchanged at initialisation where the strategy promises it, that
    switching to a second adapter and back restores outputs, and that detaching every
    adapter restores the original modules and outputs.

    Returns:
        ``{"loss_before": ..., "loss_after": ...}``.
    """
    impl = default_registry.get(strategy)
    torch.manual_seed(0)
    model = make_model()
    module_types = {n: type(m) for n, m in model.named_modules()}
    reference = _outputs(model, batch)

    ak.attach(model, strategy, name="first", **options)
    trainable = ak.trainable_parameters(model, "first")
    assert trainable, f"{strategy}: the adapter has no parameters"
    requires = {id(p) for p in model.parameters() if p.requires_grad}
    assert requires == {id(p) for p in trainable.values()}, (
        f"{strategy}: trainable parameters of the model differ from the adapter's "
        f"({len(requires)} require grad, the adapter has {len(trainable)})"
    )
    if getattr(impl, "identity_at_init", True):
        torch.testing.assert_close(_outputs(model, batch), reference, msg=f"{strategy}: attach changed the outputs")

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        if not losses:
            stray = [n for n, p in model.named_parameters() if p.grad is not None and id(p) not in requires]
            assert not stray, f"{strategy}: frozen parameters received gradients: {stray[:3]}"
            dead = [k for k, p in trainable.items() if p.grad is None]
            assert not dead, f"{strategy}: adapter parameters received no gradient: {dead[:3]}"
        optimizer.step()
        losses.append(loss.item())
    final = model(**batch).loss.item()
    assert final < losses[0], f"{strategy}: loss did not decrease ({losses[0]:.4f} -> {final:.4f})"
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"{strategy}: frozen weight {n} changed"

    trained = _outputs(model, batch)
    if impl.shares_base:
        ak.attach(model, strategy, name="second", **options)
        ak.use(model, "second")
        with ak.use(model, "first"):
            torch.testing.assert_close(_outputs(model, batch), trained, msg=f"{strategy}: switching back changed outputs")
        assert ak.get_active_adapter(model) == "second", f"{strategy}: use() as a context did not restore"
        ak.use(model, None)
        torch.testing.assert_close(_outputs(model, batch), reference, msg=f"{strategy}: the bare base changed")
        ak.detach(model, "second")
        ak.detach(model, "first")
        assert ak.list_adapters(model) == []
        torch.testing.assert_close(_outputs(model, batch), reference, msg=f"{strategy}: detach did not restore outputs")
        after = {n: type(m) for n, m in model.named_modules()}
        assert after == module_types, f"{strategy}: detach left modules changed: {set(after.items()) ^ set(module_types.items())}"
    return {"loss_before": losses[0], "loss_after": final}
