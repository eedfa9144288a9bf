"""The strategy x architecture matrix: every registered strategy on every tiny model."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.testing import check_strategy
from tests.tiny import TINY, make_batch

# Pairs a strategy does not support; they must be refused with IncompatibleModelError.
UNSUPPORTED: set[tuple[str, str]] = set()
OPTIONS = {"lora": {"r": 4}, "prefix": {"num_virtual_tokens": 4}, "head": {}, "full": {}}
LR = {"full": 1e-3}


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("strategy", ak.list_strategies())
def test_strategy_contract(strategy: str, arch: str) -> None:
    batch = make_batch(arch)
    options = OPTIONS.get(strategy, {})
    if (strategy, arch) in UNSUPPORTED:
        with pytest.raises(ak.IncompatibleModelError):
            ak.attach(TINY[arch](), strategy, **options)
        return
    result = check_strategy(TINY[arch], strategy, batch, lr=LR.get(strategy, 1e-2), **options)
    assert result["loss_after"] < result["loss_before"]


@pytest.mark.parametrize("arch", sorted(TINY))
def test_fresh_lora_leaves_outputs_unchanged(arch: str) -> None:
    torch.manual_seed(0)
    model = TINY[arch]().eval()
    batch = {k: v for k, v in make_batch(arch).items() if k != "labels"}
    with torch.no_grad():
        before = model(**batch).logits
        ak.attach(model, "lora", r=4, use_dora=True)
        after = model(**batch).logits
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_generate_matches_greedy_full_forward(arch):
    """generate() with a prefix adapter (cached prefix, shifted positions) equals re-running the prompt."""
    torch.manual_seed(0)
    model = TINY[arch]().eval()
    ak.attach(model, "prefix", num_virtual_tokens=3)
    for p in ak.trainable_parameters(model, "default").values():
        torch.nn.init.normal_(p, std=1.0)
    ids = make_batch(arch, batch_size=1)["input_ids"]
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    current = ids
    for _ in range(5):
        with torch.no_grad():
            step = model(input_ids=current).logits[:, -1].argmax(-1, keepdim=True)
        current = torch.cat([current, step], 1)
    assert generated.tolist() == current.tolist()
