"""The contract every strategy must satisfy, built-in or plugin.

``check_strategy`` runs one strategy through the whole life of an adapter on a model and
raises AssertionError naming the step of the contract that broke and why:

1. ``attach``: only the adapter's parameters train; outputs unchanged where promised
   (``identity_at_init``); or, for a pair declared incompatible, a clean refusal.
2. ``train``: gradients reach every adapter parameter and nothing else; the loss falls;
   frozen weights stay bit-identical.
3. ``save/load``: the saved folder loaded into a fresh base from the factory gives the
   same outputs (within ``rtol``/``atol``).
4. ``swap`` (``shares_base``): two adapters on one base each give their own outputs under
   ``use``; the bare base (``use(model, None)``) gives the base's.
   Without ``shares_base``, a second adapter is refused and the first one stays intact.
5. ``threads`` (``shares_base``): ``with use(...)`` in concurrent threads, each its own adapter.
6. ``detach``: the base's outputs, parameters and modules come back; a strategy that
   cannot detach (it changed the base) refuses with IncompatibleModelError and keeps its adapter.

Plugin authors call it from their own tests:

    from adapterkit.testing import check_strategy
    check_strategy(lambda: MyModel(config), "my_method", batch, r=4)
    check_strategy(lambda: NoBiasModel(config), "bitfit", batch, incompatible=True)
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adapterkit as ak

#: Default tolerance of the save/load comparison: saved tensors are the trained ones, so only
#: float rounding in a re-run forward may differ.
RTOL = 1e-5
ATOL = 1e-6
_THREAD_ROUNDS = 5


class _Contract:
    """Assertion helpers that prefix every message with the strategy and the step."""

    def __init__(self, strategy: str, rtol: float, atol: float) -> None:
        self.strategy = strategy
        self.step = "attach"
        self.rtol, self.atol = rtol, atol

    def fail(self, why: str) -> AssertionError:
        return AssertionError(f"[{self.strategy}] contract step '{self.step}' failed: {why}")

    def check(self, ok: bool, why: str) -> None:
        if not ok:
            raise self.fail(why)

    def close(self, actual: torch.Tensor, expected: torch.Tensor, why: str) -> None:
        rtol, atol = self.rtol, self.atol
        if actual.shape != expected.shape:
            raise self.fail(f"{why} (output shape {tuple(actual.shape)}, expected {tuple(expected.shape)})")
        if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
            worst = (actual - expected).abs().max().item()
            raise self.fail(f"{why} (largest difference {worst:.3g}, tolerance rtol={rtol:g}, atol={atol:g})")


def _outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return out.logits.detach().clone()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _module_types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


def _train(
    model: nn.Module, name: str, batch: dict[str, torch.Tensor], steps: int, lr: float, after_first_backward=None
) -> list[float]:
    """AdamW on adapter ``name``'s parameters; ``after_first_backward()`` may inspect the gradients."""
    params = list(ak.trainable_parameters(model, name).values())
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        if not losses and after_first_backward is not None:
            after_first_backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _base_restored(c: _Contract, model: nn.Module, batch, reference, params, modules, what: str) -> None:
    c.check(ak.list_adapters(model) == [], f"{what} left adapters on the model: {ak.list_adapters(model)}")
    after = _module_types(model)
    changed = sorted(set(after.items()) ^ set(modules.items()), key=str)
    c.check(not changed, f"{what} left modules changed, e.g. {changed[:3]}")
    now = dict(model.named_parameters())
    c.check(
        set(now) == set(params),
        f"{what} left parameters added {sorted(set(now) - set(params))[:3]} / "
        f"removed {sorted(set(params) - set(now))[:3]}",
    )
    moved = [n for n, p in now.items() if not torch.equal(p.detach(), params[n])]
    c.check(not moved, f"{what} left base weights changed, e.g. {moved[:3]}")
    c.close(_outputs(model, batch), reference, f"{what} did not restore the base's outputs")


def _check_refused(
    c: _Contract, make_model: Callable[[], nn.Module], batch: dict[str, torch.Tensor], options: dict[str, Any]
) -> dict[str, float]:
    c.step = "refuse incompatible model"
    torch.manual_seed(0)
    model = make_model()
    reference = _outputs(model, batch)
    params, modules = _snapshot(model), _module_types(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        ak.attach(model, c.strategy, name="first", **options)
    except ak.IncompatibleModelError as err:
        c.check(len(str(err)) > 20, f"the refusal says too little to act on: {str(err)!r}")
    except Exception as err:
        raise c.fail(
            f"expected IncompatibleModelError for {type(model).__name__}, got {type(err).__name__}: {err}"
        ) from err
    else:
        raise c.fail(f"{type(model).__name__} was declared incompatible, but attach accepted it")
    _base_restored(c, model, batch, reference, params, modules, "the refused attach")
    flipped = [n for n, p in model.named_parameters() if p.requires_grad != grads[n]]
    c.check(not flipped, f"the refused attach changed requires_grad of {flipped[:3]}")
    return {}


def _check_threads(c: _Contract, model: nn.Module, batch, expected: dict[str | None, torch.Tensor]) -> None:
    c.step = "threads"
    barrier = threading.Barrier(len(expected))
    problems: list[str] = []

    def worker(name: str | None) -> None:
        try:
            barrier.wait(timeout=60)
            for _ in range(_THREAD_ROUNDS):
                with ak.use(model, name):
                    got = _outputs(model, batch)
                if not torch.allclose(got, expected[name], rtol=c.rtol, atol=c.atol):
                    problems.append(f"a thread inside `with use(model, {name!r})` got another adapter's outputs")
                    return
        except BaseException as err:  # noqa: BLE001 - reported by the contract below
            problems.append(f"a thread using {name!r} raised {type(err).__name__}: {err}")

    threads = [threading.Thread(target=worker, args=(name,), daemon=True) for name in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    c.check(not any(t.is_alive() for t in threads), "a thread hung inside `with use(...)`")
    c.check(not problems, "; ".join(sorted(set(problems))))


def check_strategy(
    make_model: Callable[[], nn.Module],
    strategy: str,
    batch: dict[str, torch.Tensor],
    *,
    steps: int = 5,
    lr: float = 1e-2,
    incompatible: bool = False,
    rtol: float = RTOL,
    atol: float = ATOL,
    folder: str | os.PathLike | None = None,
    **options: Any,
) -> dict[str, float]:
    """Run the full strategy contract (see the module docstring) and fail at the first broken step.

    Every model comes from ``make_model()`` called after ``torch.manual_seed(0)``, so the
    factory must build the same weights each time under a fixed seed (a fresh base must match
    the one the adapter was trained on). The strategy's declared class attributes decide
    which steps apply: ``identity_at_init`` (outputs unchanged by attach) and ``shares_base``
    (swap, threads and detach; without it a second adapter must be refused and detach either
    restores the base or refuses with IncompatibleModelError).

    Args:
        make_model: builds the base model (a transformers model with a loss when ``batch`` has labels).
        strategy: the registered strategy name.
        batch: model inputs with labels; training on it must lower the loss.
        steps: optimizer steps of the training step.
        lr: AdamW learning rate.
        incompatible: the pair is unsupported: check only that attach refuses it with
            IncompatibleModelError and leaves the model untouched.
        rtol: relative tolerance of every output comparison.
        atol: absolute tolerance of every output comparison.
        folder: where to save the adapter (default: a temporary folder, removed afterwards).
        **options: the strategy's options, passed to ``attach``.

    Returns:
        ``{"loss_before": ..., "loss_after": ...}``; ``{}`` for a refused pair.

    Raises:
        AssertionError: naming the contract step that failed and why.
    """
    c = _Contract(strategy, rtol, atol)
    impl = ak.get_strategy(strategy)
    try:
        if incompatible:
            return _check_refused(c, make_model, batch, options)
        return _check_supported(c, impl, make_model, batch, steps, lr, folder, options)
    except AssertionError:
        raise
    except Exception as err:
        # An error inside adapterkit (e.g. a save that cannot be loaded back) breaks the step it happened in.
        raise c.fail(f"{type(err).__name__}: {err}") from err


def _check_supported(
    c: _Contract,
    impl: type[ak.Strategy],
    make_model: Callable[[], nn.Module],
    batch: dict[str, torch.Tensor],
    steps: int,
    lr: float,
    folder: str | os.PathLike | None,
    options: dict[str, Any],
) -> dict[str, float]:
    strategy = c.strategy
    torch.manual_seed(0)
    model = make_model()
    modules, base_params = _module_types(model), _snapshot(model)
    reference = _outputs(model, batch)

    try:
        ak.attach(model, strategy, name="first", **options)
    except ak.IncompatibleModelError as err:
        raise c.fail(
            f"attach refused {type(model).__name__} ({err}); if this pair is unsupported, pass incompatible=True"
        ) from err
    trainable = ak.trainable_parameters(model, "first")
    c.check(bool(trainable), "the adapter has no parameters")
    requires = {id(p) for p in model.parameters() if p.requires_grad}
    c.check(
        requires == {id(p) for p in trainable.values()},
        f"trainable parameters of the model differ from the adapter's ({len(requires)} require grad, "
        f"the adapter has {len(trainable)})",
    )
    if impl.identity_at_init:
        c.close(
            _outputs(model, batch), reference, "attach changed the outputs, but the strategy declares identity_at_init"
        )

    c.step = "train"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    def check_gradients() -> None:
        stray = [n for n, p in model.named_parameters() if p.grad is not None and id(p) not in requires]
        c.check(not stray, f"frozen parameters received gradients: {stray[:3]}")
        dead = [k for k, p in trainable.items() if p.grad is None]
        c.check(not dead, f"adapter parameters received no gradient: {dead[:3]}")

    losses = _train(model, "first", batch, steps, lr, check_gradients)
    final = model(**batch).loss.item()
    c.check(final < losses[0], f"loss did not decrease in {steps} steps at lr={lr:g} ({losses[0]:.4f} -> {final:.4f})")
    changed = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p.detach(), frozen[n])]
    c.check(not changed, f"frozen weights changed: {changed[:3]}")
    trained = _outputs(model, batch)

    c.step = "save/load"
    with tempfile.TemporaryDirectory(prefix="adapterkit-contract-") as tmp:
        target = Path(folder) if folder is not None else Path(tmp) / "first"
        saved = ak.save(model, target, name="first")
        torch.manual_seed(0)
        other = make_model()
        c.close(
            _outputs(other, batch),
            reference,
            "make_model() built different weights under torch.manual_seed(0); "
            "the fresh base must match the one the adapter was trained on",
        )
        ak.load(other, str(saved))
    active = ak.get_active_adapter(other)
    c.check(active == "first", f"the loaded adapter is not the active one (active: {active!r})")
    c.close(_outputs(other, batch), trained, "the adapter loaded into a fresh base gives other outputs")
    del other

    c.step = "swap"
    if not impl.shares_base:
        try:
            ak.attach(model, strategy, name="second", **options)
        except ak.IncompatibleModelError:
            pass
        else:
            raise c.fail("a second adapter was accepted on a base the strategy changes (shares_base is False)")
        c.check(ak.list_adapters(model) == ["first"], f"the refused attach left adapters {ak.list_adapters(model)}")
        c.close(_outputs(model, batch), trained, "the refused second attach changed the first adapter's outputs")

        c.step = "detach"
        try:
            ak.detach(model, "first")
        except ak.IncompatibleModelError:
            # It changed the base: refusing is the contract, and nothing may be half-removed.
            c.check(ak.list_adapters(model) == ["first"], "a refused detach removed the adapter anyway")
            c.close(_outputs(model, batch), trained, "a refused detach changed the outputs")
        else:
            _base_restored(c, model, batch, reference, base_params, modules, "detach")
        return {"loss_before": losses[0], "loss_after": final}

    ak.attach(model, strategy, name="second", **options)
    # Fewer, smaller steps than 'first', so the two adapters end up apart even when they start
    # from the same weights (a head copies the base's head).
    _train(model, "second", batch, max(1, steps // 2), lr / 2)
    second = _outputs(model, batch)
    c.check(
        not torch.allclose(second, trained),
        "adapters 'first' and 'second' give the same outputs after training, so swapping proves nothing "
        "(use a batch on which training changes the outputs)",
    )
    expected = {"first": trained, "second": second, None: reference}
    ak.use(model, "first")
    c.close(_outputs(model, batch), trained, "use('first') after training 'second' does not give 'first''s outputs")
    ak.use(model, "second")
    c.close(_outputs(model, batch), second, "use('second') does not give 'second''s outputs")
    with ak.use(model, "first"):
        c.close(_outputs(model, batch), trained, "inside `with use('first')` the outputs are not 'first''s")
    c.check(ak.get_active_adapter(model) == "second", "`with use(...)` did not restore the active adapter on exit")
    c.close(_outputs(model, batch), second, "leaving `with use('first')` did not give back 'second''s outputs")
    ak.use(model, None)
    c.close(_outputs(model, batch), reference, "use(model, None) does not give the bare base's outputs")

    _check_threads(c, model, batch, expected)

    c.step = "detach"
    ak.detach(model, "second")
    c.check(ak.list_adapters(model) == ["first"], f"detach('second') left {ak.list_adapters(model)}")
    ak.use(model, "first")
    c.close(_outputs(model, batch), trained, "detaching 'second' changed 'first''s outputs")
    ak.detach(model, "first")
    _base_restored(c, model, batch, reference, base_params, modules, "detaching every adapter")
    return {"loss_before": losses[0], "loss_after": final}
