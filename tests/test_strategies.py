"""Strategy behaviour beyond the contract (the strategy x architecture contract matrix is in test_contract.py)."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from tests.tiny import TINY, make_batch


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
