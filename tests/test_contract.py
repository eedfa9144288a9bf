"""The strategy contract over the whole matrix: every registered strategy (plugins included) x
every tiny architecture, and the contract's own ability to catch a broken strategy."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.registry import default_registry
from adapterkit.testing import check_strategy
from tests.test_registry import PLUGINS, _install_distribution
from tests.tiny import TINY, make_batch

# Pairs a strategy does not support: the contract checks they are refused with
# IncompatibleModelError and leave the model untouched. BitFit trains biases, and Llama and T5
# have none.
UNSUPPORTED: set[tuple[str, str]] = {("bitfit", "llama"), ("bitfit", "llama_cls"), ("bitfit", "t5")}
# Pairs the contract catches breaking today; strict, so a fix turns them into failures to remove here.
KNOWN_BROKEN: dict[tuple[str, str], str] = {}
OPTIONS = {"lora": {"r": 4}, "prefix": {"num_virtual_tokens": 4}}
LR = {"full": 1e-3}


@contextlib.contextmanager
def bitfit_installed():
    """The BitFit plugin as a real installed distribution (dist-info on sys.path), as pip leaves it."""
    root = Path(tempfile.mkdtemp(prefix="adapterkit-plugin-"))
    _install_distribution(
        root,
        "adapterkit_bitfit",
        """
        [adapterkit.strategies]
        bitfit = adapterkit_bitfit:BitFitStrategy
        """,
    )
    sys.path[:0] = [str(root), str(PLUGINS)]
    default_registry.refresh()
    try:
        yield
    finally:
        for entry in (str(root), str(PLUGINS)):
            sys.path.remove(entry)
        sys.modules.pop("adapterkit_bitfit", None)
        default_registry._strategies.pop("bitfit", None)
        default_registry.refresh()
        shutil.rmtree(root, ignore_errors=True)


with bitfit_installed():
    STRATEGIES = ak.list_strategies()


@pytest.fixture(scope="module", autouse=True)
def contract_env():
    """The plugin installed and one torch thread (two cores are shared) for this module only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with bitfit_installed():
            yield
    finally:
        torch.set_num_threads(threads)


def test_matrix_includes_the_plugin_and_every_builtin():
    assert {"bitfit", "full", "head", "lora", "prefix"} <= set(STRATEGIES)
    assert {"bert", "gpt2", "llama", "llama_cls", "t5"} <= set(TINY)


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_contract(strategy: str, arch: str, request) -> None:
    if (strategy, arch) in KNOWN_BROKEN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_BROKEN[strategy, arch], raises=AssertionError, strict=True))
    result = check_strategy(
        TINY[arch],
        strategy,
        make_batch(arch),
        lr=LR.get(strategy, 1e-2),
        incompatible=(strategy, arch) in UNSUPPORTED,
        **OPTIONS.get(strategy, {}),
    )
    if (strategy, arch) not in UNSUPPORTED:
        assert result["loss_after"] < result["loss_before"]


# Broken strategies: each breaks one step, and the contract must name that step.


@contextlib.contextmanager
def registered(name: str, **hooks):
    """A LoRA variant registered under ``name`` with some hooks replaced (removed afterwards)."""
    config_cls = dataclasses.make_dataclass(f"{name}_config", [], bases=(ak.LoraConfig,), kw_only=True)
    config_cls.strategy = name
    cls = type(f"{name}_strategy", (ak.get_strategy("lora"),), {"config_cls": config_cls, **hooks})
    ak.register_strategy(name)(cls)
    try:
        yield
    finally:
        default_registry._strategies.pop(name, None)


def _no_copy(self, model: nn.Module, name: str, tensors) -> None:
    self.check_state_dict(model, name, tensors)


def _no_switch(self, model: nn.Module, name: str | None) -> None:
    return None


def _no_detach(self, model: nn.Module, name: str) -> None:
    return None


@pytest.mark.parametrize(
    "hooks,step",
    [
        ({"load_state_dict": _no_copy}, "save/load"),
        ({"activate": _no_switch}, "swap"),
        ({"detach": _no_detach}, "detach"),
    ],
    ids=["load-copies-nothing", "activate-ignored", "detach-keeps-layers"],
)
def test_contract_names_the_step_a_broken_strategy_fails(hooks, step):
    with registered("broken_lora", **hooks):
        with pytest.raises(AssertionError, match=rf"\[broken_lora\] contract step '{step}' failed"):
            check_strategy(TINY["bert"], "broken_lora", make_batch("bert"), r=4)


def test_the_same_lora_variant_unbroken_passes():
    with registered("plain_lora"):
        result = check_strategy(TINY["bert"], "plain_lora", make_batch("bert"), r=4)
    assert result["loss_after"] < result["loss_before"]


def test_a_supported_pair_declared_incompatible_fails():
    with pytest.raises(AssertionError, match=r"\[lora\] contract step 'refuse incompatible model'.*attach accepted it"):
        check_strategy(TINY["bert"], "lora", make_batch("bert"), incompatible=True, r=4)


def test_a_refused_pair_not_declared_fails_with_the_hint():
    with pytest.raises(AssertionError, match=r"\[bitfit\] contract step 'attach'.*pass incompatible=True"):
        check_strategy(TINY["llama"], "bitfit", make_batch("llama"))


def test_a_factory_that_builds_other_weights_each_time_fails_at_save_load():
    calls = []

    def drifting():
        calls.append(1)
        torch.manual_seed(len(calls))
        return TINY["bert"]()

    with pytest.raises(AssertionError, match=r"contract step 'save/load'.*make_model\(\) built different weights"):
        check_strategy(drifting, "head", make_batch("bert"))
