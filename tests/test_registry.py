"""The registry: names, wildcards, errors, decorator, and entry-point plugins."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import adapterkit as ak
from adapterkit.registry import Registry, default_registry
from adapterkit.testing import check_strategy
from tests.tiny import TINY, make_batch

PLUGINS = Path(__file__).parent / "plugins"


def test_builtins_listed_sorted_with_wildcards():
    assert {"full", "head", "lora", "prefix"} <= set(ak.list_strategies())
    assert ak.list_strategies() == sorted(ak.list_strategies())
    assert ak.list_strategies("lo*") == ["lora"]
    assert ak.list_strategies("p?efix") == ["prefix"]


def test_unknown_strategy_suggests_closest_and_lists_available():
    with pytest.raises(ak.UnknownStrategyError) as info:
        ak.attach(TINY["bert"](), "lroa")
    message = str(info.value)
    assert "Unknown adapter strategy 'lroa'. Did you mean 'lora'?" in message
    assert "Available: full, head, lora, prefix" in message
    assert isinstance(info.value, LookupError)


def test_unknown_option_names_valid_ones_and_all_problems_at_once():
    with pytest.raises(ak.InvalidOptionError) as info:
        ak.attach(TINY["bert"](), "lora", rank=8, lora_dropout=2.0)
    message = str(info.value)
    assert "unknown option 'rank'" in message
    assert "Valid options: lora_alpha, lora_dropout, r, target_modules, use_dora, use_rslora" in message
    with pytest.raises(ak.InvalidOptionError) as info:
        ak.attach(TINY["bert"](), "lora", r=0, lora_dropout=2.0)
    assert "r must be a positive integer" in str(info.value) and "lora_dropout must be in [0, 1)" in str(info.value)


def test_config_object_is_equivalent_to_options():
    model = ak.attach(TINY["bert"](), ak.LoraConfig(r=2, target_modules=["query", "value"]))
    record = ak.get_adapter_record(model, "default")
    assert record.strategy == "lora" and record.config.r == 2
    with pytest.raises(ak.InvalidOptionError, match="not both"):
        ak.attach(TINY["bert"](), ak.LoraConfig(r=2), r=4)


def test_target_modules_that_match_nothing_list_candidates():
    with pytest.raises(ak.IncompatibleModelError, match=r"match no linear layer.*end in: .*query.*value"):
        ak.attach(TINY["bert"](), "lora", target_modules=["q_proj"])


def test_decorator_registers_and_refuses_taken_names():
    registry = Registry(entry_point_group=None)

    @ak.register_strategy("mine", registry=registry)
    class Mine(ak.Strategy):
        pass

    assert registry.list() == ["mine"] and registry.get("mine") is Mine
    with pytest.raises(ak.InvalidOptionError, match="already registered"):
        ak.register_strategy("mine", registry=registry)(Mine)
    ak.register_strategy("mine", registry=registry, override=True)(Mine)
    with pytest.raises(ak.InvalidOptionError, match="invalid"):
        ak.register_strategy("Bad-Name", registry=registry)(Mine)
    with pytest.raises(ak.InvalidOptionError, match="built-in strategy and cannot be shadowed"):
        ak.register_strategy("lora")(Mine)


def _install_distribution(root: Path, name: str, entry_points: str) -> None:
    """A real installed distribution (dist-info on sys.path), as pip would leave it."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture
def plugin_env(tmp_path, monkeypatch):
    _install_distribution(
        tmp_path,
        "adapterkit_bitfit",
        """
        [adapterkit.strategies]
        bitfit = adapterkit_bitfit:BitFitStrategy
        """,
    )
    _install_distribution(
        tmp_path,
        "adapterkit_broken",
        """
        [adapterkit.strategies]
        broken = adapterkit_does_not_exist:Strategy
        lora = adapterkit_bitfit:BitFitStrategy
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGINS))
    default_registry.refresh()
    yield
    monkeypatch.undo()
    sys.modules.pop("adapterkit_bitfit", None)
    default_registry._strategies.pop("bitfit", None)
    default_registry.refresh()


def test_plugin_is_discovered_lazily_and_attaches_like_a_builtin(plugin_env):
    assert "bitfit" in ak.list_strategies()
    assert "adapterkit_bitfit" not in sys.modules  # names only until requested
    result = check_strategy(TINY["bert"], "bitfit", make_batch("bert"), lr=1e-2)
    assert result["loss_after"] < result["loss_before"]
    assert "adapterkit_bitfit" in sys.modules
    assert ak.get_strategy("lora").__module__ == "adapterkit.strategies.lora"  # cannot shadow a built-in


def test_broken_plugin_names_itself(plugin_env):
    with pytest.raises(ak.StrategyImportError, match="'broken'.*adapterkit_broken.*ADAPTERKIT_DISABLE_PLUGINS"):
        ak.get_strategy("broken")


def test_kill_switch_hides_plugins(plugin_env, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_DISABLE_PLUGINS", "1")
    assert "bitfit" not in ak.list_strategies()
