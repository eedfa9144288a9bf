"""ak.merge: merged LoRA weights against hand computations, and the result as an ordinary adapter."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import adapterkit as ak
from adapterkit.merge import merge, reweight
from adapterkit.state import get_store
from tests.tiny import TINY, make_batch


def _base(arch: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights every time: a "fresh base" for save/load
    return TINY[arch]().eval()


def _with_adapters(arch: str = "llama", ranks=(4, 4), **options) -> torch.nn.Module:
    model = _base(arch)
    for i, r in enumerate(ranks):
        name = "ab"[i] if i < 2 else f"c{i}"
        ak.attach(model, "lora", name=name, r=r, **options)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in ak.trainable_parameters(model, name).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _inputs(arch: str = "llama") -> dict[str, torch.Tensor]:
    return {k: v for k, v in make_batch(arch).items() if k != "labels"}


def _layers(model):
    return get_store(model).extra["lora_layers"]


def _delta(layer, name: str) -> torch.Tensor:
    """B A times the layer's scaling, computed here rather than by peft."""
    return layer.lora_B[name].weight.detach() @ layer.lora_A[name].weight.detach() * layer.scaling[name]


def _logits(model, name, batch):
    with torch.no_grad(), ak.use(model, name):
        return model(**batch).logits


# --- exact weights ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D keeps its weight transposed
def test_cat_is_the_exact_weighted_sum_of_updates(arch: str) -> None:
    model = _with_adapters(arch, ranks=(4, 2))
    merge(model, {"a": 0.7, "b": 0.3}, method="cat", name="m")
    record = ak.get_adapter_record(model, "m")
    assert record.strategy == "lora" and record.config.r == 6 and record.config.lora_alpha == 6
    for _, layer in _layers(model):
        torch.testing.assert_close(_delta(layer, "m"), 0.7 * _delta(layer, "a") + 0.3 * _delta(layer, "b"))

    # The merged adapter's forward equals the base with the summed update written into its weights.
    reference = _base(arch)
    with torch.no_grad():
        for path, layer in _layers(model):
            target = reference.get_submodule(path)
            delta = 0.7 * _delta(layer, "a") + 0.3 * _delta(layer, "b")
            target.weight += delta.T if type(target).__name__ == "Conv1D" else delta
        expected = reference(**_inputs(arch)).logits
    torch.testing.assert_close(_logits(model, "m", _inputs(arch)), expected, rtol=1e-4, atol=1e-5)


def test_linear_splits_each_weight_between_a_and_b() -> None:
    # peft's `linear`: A = sum sign(w s) sqrt|w s| A_i, B = sum sqrt|w s| B_i, merged scaling 1.
    model = _with_adapters()
    merge(model, {"a": 1.25, "b": -0.25}, method="linear", name="m")
    assert ak.get_adapter_record(model, "m").config.r == 4
    for _, layer in _layers(model):
        assert layer.scaling["m"] == 1.0
        sa, sb = 1.25 * layer.scaling["a"], -0.25 * layer.scaling["b"]
        a = math.sqrt(sa) * layer.lora_A["a"].weight - math.sqrt(-sb) * layer.lora_A["b"].weight
        b = math.sqrt(sa) * layer.lora_B["a"].weight + math.sqrt(-sb) * layer.lora_B["b"].weight
        torch.testing.assert_close(layer.lora_A["m"].weight, a)
        torch.testing.assert_close(layer.lora_B["m"].weight, b)


def test_linear_of_one_adapter_reproduces_it() -> None:
    model = _with_adapters()
    merge(model, {"a": 1.0}, method="linear", name="m")
    torch.testing.assert_close(_logits(model, "m", _inputs()), _logits(model, "a", _inputs()), rtol=1e-4, atol=1e-5)


def _ties_by_hand(tensors: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES as peft defines it: keep each tensor's top-density entries by magnitude, elect each
    entry's sign from the kept values' sum, average the weighted kept values that agree."""
    flat = [t.flatten().tolist() for t in tensors]
    k = int(density * len(flat[0]))
    kept = []
    for values in flat:
        top = set(sorted(range(len(values)), key=lambda i: -abs(values[i]))[:k])
        kept.append([v if i in top else 0.0 for i, v in enumerate(values)])
    out = []
    for j in range(len(flat[0])):
        sign = 1.0 if sum(t[j] for t in kept) >= 0 else -1.0
        agree = [(w, t[j]) for w, t in zip(weights, kept) if t[j] != 0 and math.copysign(1.0, t[j]) == sign]
        out.append(sum(w * v for w, v in agree) / max(len(agree), 1))
    return torch.tensor(out).view_as(tensors[0])


def test_ties_matches_a_hand_computation() -> None:
    model = _with_adapters()
    merge(model, {"a": 0.8, "b": 0.5}, method="ties", density=0.5, name="m")
    for _, layer in _layers(model):
        sa, sb = 0.8 * layer.scaling["a"], 0.5 * layer.scaling["b"]
        for attr in ("lora_A", "lora_B"):
            mats = getattr(layer, attr)
            hand = _ties_by_hand([mats["a"].weight.detach(), mats["b"].weight.detach()], [math.sqrt(sa), math.sqrt(sb)], 0.5)
            torch.testing.assert_close(mats["m"].weight.detach(), hand)


def test_dare_drops_and_rescales_and_is_seeded() -> None:
    model = _with_adapters()
    merge(model, {"a": 0.5}, method="dare", density=0.5, name="m", seed=3)
    merge(model, {"a": 0.5}, method="dare", density=0.5, name="m2", seed=3)
    merge(model, {"a": 0.5}, method="dare", density=0.5, name="m3", seed=4)
    kept = total = 0
    for _, layer in _layers(model):
        w = math.sqrt(0.5 * layer.scaling["a"])
        merged, source = layer.lora_A["m"].weight.detach(), layer.lora_A["a"].weight.detach()
        # Every entry is dropped, or kept and rescaled by 1 / density.
        is_kept = merged != 0
        torch.testing.assert_close(merged[is_kept], (source * w / 0.5)[is_kept])
        kept += int(is_kept.sum())
        total += merged.numel()
        torch.testing.assert_close(layer.lora_A["m2"].weight, layer.lora_A["m"].weight)
    assert 0.4 < kept / total < 0.6
    assert any(not torch.equal(layer.lora_A["m3"].weight, layer.lora_A["m"].weight) for _, layer in _layers(model))
    assert ak.get_adapter_record(model, "m").meta["merge"]["seed"] == 3


def test_svd_keeps_the_best_low_rank_part() -> None:
    model = _with_adapters(ranks=(4, 2))
    merge(model, {"a": 0.5, "b": 0.5}, method="svd", name="full", r=6)
    merge(model, {"a": 0.5, "b": 0.5}, method="svd", name="low", r=2)
    for _, layer in _layers(model):
        exact = 0.5 * _delta(layer, "a") + 0.5 * _delta(layer, "b")
        torch.testing.assert_close(_delta(layer, "full"), exact, rtol=1e-4, atol=1e-5)
        singular = torch.linalg.svdvals(exact)
        # Eckart-Young: the rank-2 error is the norm of the dropped singular values.
        err = torch.linalg.matrix_norm(_delta(layer, "low") - exact)
        torch.testing.assert_close(err, singular[2:].norm(), rtol=1e-3, atol=1e-5)


def test_label_heads_are_averaged() -> None:
    model = _with_adapters("bert")
    store = get_store(model)
    merge(model, {"a": 0.25, "b": 0.75}, method="cat", name="m")
    for key, value in ak.trainable_parameters(model, "m").items():
        if key.startswith("classifier") or ".pooler." in key:
            a = ak.trainable_parameters(model, "a")[key]
            b = ak.trainable_parameters(model, "b")[key]
            torch.testing.assert_close(value, 0.25 * a + 0.75 * b)
    assert sorted(store.heads["m"]) == sorted(store.heads["a"])


def test_reweight_rewrites_a_merge_in_place() -> None:
    model = _with_adapters()
    merge(model, {"a": 0.5, "b": 0.5}, method="cat", name="m")
    merge(model, {"a": 0.9, "b": 0.1}, method="cat", name="direct")
    reweight(model, "m", {"a": 0.9, "b": 0.1})
    torch.testing.assert_close(_logits(model, "m", _inputs()), _logits(model, "direct", _inputs()))
    assert ak.get_adapter_record(model, "m").meta["merge"]["weights"] == {"a": 0.9, "b": 0.1}
    reweight(model, "m", {"a": 1.5, "b": -1.0})  # task-arithmetic weights: no sum check
    with pytest.raises(ak.InvalidOptionError, match="one weight for each"):
        reweight(model, "m", {"a": 1.0})
    with pytest.raises(ak.InvalidOptionError, match="not made by adapterkit.merge"):
        reweight(model, "a", {"a": 1.0})


# --- an ordinary adapter ---------------------------------------------------------------------------
def test_merged_adapter_saves_loads_on_a_fresh_base_and_records_its_parts(tmp_path) -> None:
    model = _with_adapters("bert")
    merge(model, {"a": 0.6, "b": 0.4}, method="ties", density=0.7, name="mix")
    assert ak.get_active_adapter(model) == "mix"
    expected = _logits(model, "mix", _inputs("bert"))
    folder = ak.save(model, tmp_path / "mix", name="mix")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4

    fresh = ak.load(_base("bert"), str(folder))
    torch.testing.assert_close(_logits(fresh, "mix", _inputs("bert")), expected)
    recipe = ak.get_adapter_record(model, "mix").meta["merge"]
    assert recipe["method"] == "ties" and recipe["weights"] == {"a": 0.6, "b": 0.4} and recipe["density"] == 0.7
    assert [c["name"] for c in recipe["components"]] == ["a", "b"]
    assert all(len(c["weights_sha256"]) == 64 for c in recipe["components"])
    # the sidecar and the card say what it is made of, and a loaded copy keeps it
    sidecar = json.loads((folder / "adapterkit.json").read_text())
    assert sidecar["merge"] == json.loads(json.dumps(recipe))
    card = (folder / "README.md").read_text()
    assert "## Merged from" in card and "Method: `ties` (density 0.7)" in card and "| a | 0.6 |" in card
    assert "- merged" in card
    assert ak.get_adapter_record(fresh, "mix").meta["merge"] == sidecar["merge"]
    assert ak.get_adapter_record(fresh, "mix").meta["content_hash"] == ak.artifacts.content_hash(folder)
    plain = _with_adapters("bert")
    plain_folder = ak.save(plain, tmp_path / "plain", name="a")
    assert "merge" not in json.loads((plain_folder / "adapterkit.json").read_text())


def test_merged_adapter_routes_like_any_lora_adapter() -> None:
    model = _with_adapters()
    merge(model, {"a": 0.5, "b": 0.5}, method="cat", name="m")
    batch = _inputs()
    single = {n: _logits(model, n, batch) for n in ("a", "m", None)}
    rows = ["m", "a", None, "m"]
    with torch.no_grad(), ak.mixed_batch(model, rows):
        mixed = model(**batch).logits
    for i, n in enumerate(rows):
        torch.testing.assert_close(mixed[i], single[n][i], rtol=1e-4, atol=1e-5)
    # It trains like any adapter: its own tensors, not its components'.
    params = ak.trainable_parameters(model, "m")
    assert params and not set(map(id, params.values())) & set(map(id, ak.trainable_parameters(model, "a").values()))
    summary = {a.name: a for a in ak.summary(model).adapters}
    assert summary["m"].options["r"] == 8


# --- refusals leave the model as it was -----------------------------------------------------------
def _state(model):
    return (
        ak.list_adapters(model),
        ak.get_active_adapter(model),
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _same(before, after) -> None:
    assert before[:3] == after[:3]
    assert before[3].keys() == after[3].keys()
    assert all(torch.equal(before[3][k], after[3][k]) for k in before[3])


@pytest.mark.parametrize(
    "weights, options, error, words",
    [
        ({"a": 0.5, "zz": 0.5}, {}, ak.AdapterNotFoundError, "zz"),
        ({"a": 0.6, "b": 0.6}, {"method": "linear"}, ak.InvalidOptionError, "sum to 1"),
        ({"a": 0.5, "b": float("nan")}, {}, ak.InvalidOptionError, "finite"),
        ({}, {}, ak.InvalidOptionError, "non-empty"),
        ({"a": 0.5, "b": 0.5}, {"method": "lineer"}, ak.InvalidOptionError, "linear"),
        ({"a": 0.5, "b": 0.5}, {"method": "cat", "density": 0.5}, ak.InvalidOptionError, "density"),
        ({"a": 0.5, "b": 0.5}, {"method": "ties", "density": 1.5}, ak.InvalidOptionError, "(0, 1]"),
        ({"a": 0.5, "b": 0.5}, {"method": "linear", "r": 2}, ak.InvalidOptionError, "SVD"),
        ({"a": 0.5, "b": 0.5}, {"name": "a"}, ak.AdapterExistsError, "already loaded"),
        ({"a": 0.5, "c2": 0.5}, {"method": "ties"}, ak.IncompatibleModelError, "one rank"),
    ],
)
def test_bad_requests_are_refused_clearly(weights, options, error, words) -> None:
    model = _with_adapters(ranks=(4, 4, 2))
    before = _state(model)
    with pytest.raises(error, match=words.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        merge(model, weights, **options)
    _same(before, _state(model))


def test_non_lora_and_different_targets_are_refused() -> None:
    model = _base()
    ak.attach(model, "lora", name="a", r=4)
    ak.attach(model, "lora", name="b", r=4, target_modules=["q_proj", "v_proj"])
    ak.attach(model, "prefix", name="p", num_virtual_tokens=2)
    before = _state(model)
    with pytest.raises(ak.IncompatibleModelError, match="different layers"):
        merge(model, {"a": 0.5, "b": 0.5})
    with pytest.raises(ak.IncompatibleModelError, match="'prefix' adapter"):
        merge(model, {"a": 0.5, "p": 0.5})
    _same(before, _state(model))


def test_adapters_of_different_bases_are_refused(tmp_path) -> None:
    torch.manual_seed(1)
    other = TINY["llama"]().eval()
    ak.attach(other, "lora", name="x", r=4)
    ak.save(other, tmp_path / "x", name="x")
    model = _with_adapters(ranks=(4,))
    ak.load(model, str(tmp_path / "x"), ignore_mismatch=True)
    with pytest.raises(ak.IncompatibleModelError, match="different bases"):
        merge(model, {"a": 0.5, "x": 0.5})
    assert ak.list_adapters(model) == ["a", "x"]


def test_a_merge_failing_midway_leaves_the_model_as_it_was(monkeypatch) -> None:
    model = _with_adapters("bert")
    ak.use(model, "b")
    before = _state(model)
    labels = copy.deepcopy(model.config.id2label)

    def broken(plan):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("adapterkit.heads.load_plan", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge(model, {"a": 0.5, "b": 0.5}, name="m")
    _same(before, _state(model))
    assert model.config.id2label == labels
