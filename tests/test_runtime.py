"""Mixed batches: each row through its own LoRA adapter, identical to running them one by one."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit import routing
from adapterkit.state import get_store
from tests.test_artifacts import fresh, logits, trained
from tests.tiny import make_batch


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_mixed_batch_equals_one_adapter_at_a_time(arch):
    model = fresh(arch)
    names = ["a", "b", "c"]
    for i, name in enumerate(names):
        trained(arch, "lora", name=name, model=model, seed=i)
    batch = make_batch(arch, batch_size=4)
    rows = ["a", "b", None, "c"]
    expected = []
    for i, name in enumerate(rows):
        ak.use(model, name)
        expected.append(logits(model, batch)[i])
    ak.use(model, "a")
    store = get_store(model)
    with ak.mixed_batch(model, rows):
        mixed = logits(model, batch)
        plans = routing.current(store).plans
    assert plans and all(plan is not None for plan in plans.values())  # the gathered path, not peft's loop
    assert routing.current(store) is None
    torch.testing.assert_close(mixed, torch.stack(expected), rtol=1e-5, atol=1e-5)
    # the hooks are gone afterwards
    torch.testing.assert_close(logits(model, batch), logits(model, batch))
    assert ak.get_active_adapter(model) == "a"


def test_mixed_batch_generates():
    model = fresh("gpt2")
    trained("gpt2", "lora", name="a", model=model)
    trained("gpt2", "lora", name="b", model=model, seed=1)
    ids = make_batch("gpt2", batch_size=2)["input_ids"]
    singles = []
    for i, name in enumerate(["a", "b"]):
        ak.use(model, name)
        singles.append(model.generate(ids[i : i + 1], max_new_tokens=4, do_sample=False, pad_token_id=0)[0])
    with ak.mixed_batch(model, ["a", "b"]):
        both = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(both, torch.stack(singles))


def test_mixed_batch_refuses_other_strategies():
    model = fresh("bert")
    trained("bert", "lora", name="a", model=model)
    trained("bert", "head", name="h", model=model)
    with pytest.raises(ak.IncompatibleModelError, match="'head' adapter"):
        with ak.mixed_batch(model, ["a", "h"]):
            pass


def test_mixed_batch_with_different_ranks_falls_back_to_peft():
    model = fresh("llama")
    trained("llama", "lora", name="a", model=model)
    ak.attach(model, "lora", name="wide", r=8)
    with torch.no_grad():
        for p in ak.trainable_parameters(model, "wide").values():
            p.normal_(std=0.05)
    batch = make_batch("llama", batch_size=2)
    expected = []
    for i, name in enumerate(["a", "wide"]):
        ak.use(model, name)
        expected.append(logits(model, batch)[i])
    with ak.mixed_batch(model, ["a", "wide"]):
        mixed = logits(model, batch)
        plans = routing.current(get_store(model)).plans
    assert plans and all(plan is None for plan in plans.values())  # peft's own path
    torch.testing.assert_close(mixed, torch.stack(expected), rtol=1e-5, atol=1e-5)
