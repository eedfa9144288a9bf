"""ak.compose: LoraHub-style composition recovers a known mixture of synthetic adapters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
from adapterkit.compose import compose
from adapterkit.state import get_store
from tests.tiny import TINY, make_batch

pytest.importorskip("cma")


@pytest.fixture(autouse=True)
def _one_thread():
    # Hundreds of forwards of a 16-wide model: handing each tiny matmul to threads costs more
    # than the matmul (100x on a busy 2-core machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _base(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TINY["llama"]().eval()


def _candidates(model, names=("a", "b", "c"), scale=0.08):
    """Random LoRA adapters; at the default scale their updates are about the size of the
    base's weights, as trained ones are (much larger ones make the loss surface rugged)."""
    for i, name in enumerate(names):
        ak.attach(model, "lora", name=name, r=2)
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for p in ak.trainable_parameters(model, name).values():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def _mixture_logits(model, weights: dict[str, float], batch) -> torch.Tensor:
    """What a base with ``sum w_i B_i A_i s_i`` written into its weights outputs."""
    reference = _base()
    with torch.no_grad():
        for path, layer in get_store(model).extra["lora_layers"]:
            target = reference.get_submodule(path)
            for name, w in weights.items():
                target.weight += w * (layer.lora_B[name].weight @ layer.lora_A[name].weight) * layer.scaling[name]
        return reference(**batch).logits


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    batch = make_batch("llama", batch_size=8, seed=seed)
    batch.pop("labels")
    return batch


def _mse(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.mse_loss(logits, batch["target"])


def test_composition_recovers_a_known_mixture() -> None:
    model = _candidates(_base())
    truth = {"a": 0.8, "b": -0.5, "c": 0.0}
    examples = [{**b, "target": _mixture_logits(model, truth, b)} for b in (_batch(0), _batch(1))]
    compose(model, ["a", "b", "c"], examples, loss_fn=_mse, l1=0.0, max_evaluations=400, name="mix")
    recipe = ak.get_adapter_record(model, "mix").meta["merge"]
    for name, w in truth.items():
        assert recipe["weights"][name] == pytest.approx(w, abs=0.05), recipe["weights"]
    search = recipe["search"]
    assert search["loss"] < 0.01 * search["base_loss"]
    assert search["examples"] == 16 and len(search["examples_sha256"]) == 64
    assert ak.get_active_adapter(model) == "mix" and search["evaluations"] <= 400


def test_the_model_loss_on_labelled_examples_drops_and_l1_shrinks_unused_weights() -> None:
    model = _candidates(_base(), scale=0.3)  # large enough to change the argmax tokens
    batch = _batch(2)
    with torch.no_grad():
        labels = _mixture_logits(model, {"a": 1.0}, batch).argmax(-1)
    labels[batch["attention_mask"] == 0] = -100
    compose(model, ["a", "b", "c"], {**batch, "labels": labels}, l1=0.01, max_evaluations=150, name="task")
    search = ak.get_adapter_record(model, "task").meta["merge"]["search"]
    weights = ak.get_adapter_record(model, "task").meta["merge"]["weights"]
    assert search["loss"] < search["base_loss"]
    assert abs(weights["a"]) > max(abs(weights["b"]), abs(weights["c"]))


def test_sources_are_loaded_foreign_bases_skipped_and_the_result_saves(tmp_path) -> None:
    donor = _candidates(_base(), names=("a", "b"))
    for name in ("a", "b"):
        ak.save(donor, tmp_path / name, name=name)
    foreign = _candidates(_base(seed=1), names=("x",))
    ak.save(foreign, tmp_path / "x", name="x")
    truth = {"a": 0.6, "b": 0.4}
    examples = {**_batch(), "target": _mixture_logits(donor, truth, _batch())}

    model = _base()
    compose(model, [str(tmp_path / n) for n in ("a", "b", "x")], examples, loss_fn=_mse, l1=0.0, max_evaluations=200)
    assert ak.list_adapters(model) == ["composed"]  # the candidates it loaded are gone again
    recipe = ak.get_adapter_record(model, "composed").meta["merge"]
    assert [c["source"] for c in recipe["components"]] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert [s["candidate"] for s in recipe["search"]["skipped"]] == [str(tmp_path / "x")]
    assert recipe["weights"]["a"] == pytest.approx(0.6, abs=0.05)

    expected = model(**_batch()).logits.detach()
    folder = ak.save(model, tmp_path / "composed")
    fresh = ak.load(_base(), str(folder))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**_batch()).logits, expected)


def _state(model):
    return ak.list_adapters(model), ak.get_active_adapter(model), [p.requires_grad for p in model.parameters()]


def test_refusals_and_failures_leave_the_model_as_it_was(tmp_path) -> None:
    model = _candidates(_base())
    ak.use(model, "b")
    before = _state(model)
    examples = {**_batch(), "target": torch.zeros(8, 8, 64)}
    with pytest.raises(ak.InvalidOptionError, match="at least two"):
        compose(model, ["a"], examples, loss_fn=_mse)
    with pytest.raises(ak.InvalidOptionError, match="examples"):
        compose(model, ["a", "b"], [], loss_fn=_mse)
    with pytest.raises(ak.InvalidOptionError, match="l1"):
        compose(model, ["a", "b"], examples, loss_fn=_mse, l1=-1)
    with pytest.raises(ak.AdapterNotFoundError, match="nope"):
        compose(model, ["a", str(tmp_path / "nope")], examples, loss_fn=_mse)

    def broken(m, batch):
        raise RuntimeError("out of memory")

    ak.save(model, tmp_path / "c-saved", name="c")
    with pytest.raises(RuntimeError, match="out of memory"):
        compose(model, ["a", str(tmp_path / "c-saved")], examples, loss_fn=broken)
    assert _state(model) == before


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_folded_evaluations_give_the_adapter_path_s_losses_and_leave_the_base_bit_identical() -> None:
    """Folding the update into the base weights changes the cost of an evaluation, not its loss."""
    records, bases = {}, {}
    for fold in (True, False):
        model = _candidates(_base(), scale=0.3)
        batch = _batch(3)
        with torch.no_grad():
            labels = _mixture_logits(model, {"a": 0.7, "c": -0.4}, batch).argmax(-1)
        labels[batch["attention_mask"] == 0] = -100
        before = _base_weights(model)
        compose(model, ["a", "b", "c"], {**batch, "labels": labels}, max_evaluations=40, name="mix", fold=fold)
        after = _base_weights(model)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        records[fold] = ak.get_adapter_record(model, "mix").meta["merge"]
        # The loss the search reports for its best weights, recomputed through the composed adapter.
        with torch.no_grad():
            loss = model(**batch, labels=labels).loss.item()
        assert records[fold]["search"]["loss"] == pytest.approx(loss, rel=1e-5)
        bases[fold] = model
    folded, plain = records[True]["search"], records[False]["search"]
    assert folded["evaluation"] == "folded into the base weights"
    assert plain["evaluation"] == "through the adapter (fold=False)"
    # Same seed, same losses up to float rounding (1e-5 relative), so CMA-ES takes the same path.
    assert len(folded["curve"]) == folded["evaluations"] == plain["evaluations"]
    torch.testing.assert_close(torch.tensor(folded["curve"]), torch.tensor(plain["curve"]), rtol=1e-5, atol=1e-6)
    for name in ("a", "b", "c"):
        assert records[True]["weights"][name] == pytest.approx(records[False]["weights"][name], abs=1e-4)


def test_a_failing_folded_search_puts_the_base_weights_back() -> None:
    model = _candidates(_base())
    before = _base_weights(model)
    calls = []

    def fails_late(m, batch):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory")
        return _mse(m, batch)

    with pytest.raises(RuntimeError, match="out of memory"):
        compose(model, ["a", "b"], {**_batch(), "target": torch.zeros(8, 8, 64)}, loss_fn=fails_late)
    after = _base_weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert ak.list_adapters(model) == ["a", "b", "c"]
