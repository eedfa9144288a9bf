"""train(): the Trainer-based loop on tiny models; resume; bad input before any training."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer, TrainerCallback

import adapterkit as ak
from tests.tiny import TINY, save_tiny


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(save_tiny("bert", tmp_path_factory.mktemp("tok")))


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    """Two classes with disjoint vocabularies: learnable by every strategy in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        low, high = (6, 22) if label else (22, 40)
        words = [f"w{rng.randrange(low, high)}" for _ in range(rng.randrange(3, 12))]
        rows.append({"text": " ".join(words), "label": label})
    return rows


def fresh_bert():
    torch.manual_seed(0)
    return TINY["bert"]()


SETTINGS = dict(num_epochs=4, batch_size=8, max_length=32, show_progress=False, logging_steps=1000)


def eval_loss(model, tok, rows) -> float:
    enc = tok([r["text"] for r in rows], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**enc, labels=torch.tensor([r["label"] for r in rows])).loss.item()


@pytest.mark.parametrize("strategy", ["lora", "head", "full", "prefix"])
def test_train_lowers_eval_loss_and_records_metrics(bert_tok, strategy, tmp_path):
    model = ak.attach(fresh_bert(), strategy)
    lr = {"full": 3e-4, "lora": 1e-2, "head": 1e-2, "prefix": 3e-2}[strategy]
    train_rows, eval_rows = toy_rows(96), toy_rows(48, seed=1)
    before = eval_loss(model, bert_tok, eval_rows)
    metrics = ak.train(model, bert_tok, train_rows, eval_rows, learning_rate=lr, **SETTINGS)
    assert metrics["eval_loss"] < before
    assert metrics["eval_loss"] == pytest.approx(eval_loss(model, bert_tok, eval_rows), rel=1e-4)
    assert 0.0 <= metrics["eval_macro_f1"] <= 1.0 and 0.0 <= metrics["eval_accuracy"] <= 1.0
    folder = ak.save(model, tmp_path / "a")
    import json

    sidecar = json.loads((folder / "adapterkit.json").read_text())
    assert sidecar["metrics"]["eval_accuracy"] == metrics["eval_accuracy"]
    assert sidecar["recipe"]["train_settings"]["learning_rate"] == lr


def test_interrupted_training_resumes_to_the_same_result(bert_tok, tmp_path):
    common = dict(SETTINGS, num_epochs=2, save_strategy="steps", save_steps=6, seed=3, eval_strategy="no")
    data = toy_rows(48)
    full = ak.attach(fresh_bert(), "lora")
    ak.train(full, bert_tok, data, output_dir=str(tmp_path / "full"), **common)
    reference = {k: v.detach().clone() for k, v in ak.trainable_parameters(full, "default").items()}

    class Interrupt(TrainerCallback):  # the process dies right after step 6 was checkpointed
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 6

    first = ak.attach(fresh_bert(), "lora")
    ak.train(first, bert_tok, data, output_dir=str(tmp_path / "cut"), callbacks=[Interrupt()], **common)
    resumed = ak.attach(fresh_bert(), "lora")
    ak.train(resumed, bert_tok, data, output_dir=str(tmp_path / "cut"),
             resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-6"), **common)
    for key, value in ak.trainable_parameters(resumed, "default").items():
        torch.testing.assert_close(value.detach(), reference[key], rtol=1e-5, atol=1e-6)


def test_causal_lm_completion_loss(tmp_path):
    tok = AutoTokenizer.from_pretrained(save_tiny("llama", tmp_path / "llama"))
    torch.manual_seed(0)
    model = ak.attach(TINY["llama"](), "lora")
    rows = [{"prompt": "w3 w4 w5 ->", "completion": " w9"}, {"prompt": "w6 w7 ->", "completion": " w10"}] * 8
    metrics = ak.train(model, tok, rows, rows, num_epochs=3, learning_rate=1e-2, batch_size=4, show_progress=False)
    assert metrics["eval_loss"] < metrics["train_loss"] * 2 and "eval_perplexity" in metrics


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"sentence": "w3", "label": 0}], "needs columns 'text' and 'label'"),
        ([{"text": "w3", "label": 7}], "labels outside 0..2"),
        ([], "train_data is empty"),
    ],
)
def test_bad_data_fails_before_training(bert_tok, rows, message):
    model = ak.attach(fresh_bert(), "lora")
    with pytest.raises(ak.DataError, match=message):
        ak.train(model, bert_tok, rows, **SETTINGS)


def test_unknown_setting_is_named(bert_tok):
    model = ak.attach(fresh_bert(), "lora")
    with pytest.raises(ak.InvalidOptionError, match="'learning_rte'.*Did you mean 'learning_rate'"):
        ak.train(model, bert_tok, toy_rows(8), learning_rte=1e-3)


def test_head_training_on_cached_features_matches_full_forward(bert_tok):
    """The cached-feature path trains the same head as running the frozen backbone every step."""
    results = {}
    for cache in (False, True):
        model = ak.attach(fresh_bert(), "head")
        metrics = ak.train(model, bert_tok, toy_rows(64), toy_rows(32, seed=1), learning_rate=1e-2,
                           cache_features=cache, group_by_length=False, **{**SETTINGS, "num_epochs": 2})
        assert metrics["cached_features"] is cache
        results[cache] = (metrics["eval_loss"], {k: v.detach().clone() for k, v in ak.trainable_parameters(model, "default").items()})
        assert type(model.bert).__name__ == "BertModel"  # the backbone is back
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-4)
    for key, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_cached_backbone_returns_the_backbone_states_for_either_padding_side(side):
    from adapterkit.training.features import CachedBackbone, compute_features

    backbone = fresh_bert().bert.eval()
    rows = [[2, 7, 8, 9, 3], [2, 5, 3], [2, 4, 4, 4, 4, 4, 3]]
    cache = compute_features(backbone, [{"input_ids": rows}])
    width = max(map(len, rows))
    pad = [[0] * (width - len(r)) for r in rows]
    ids = torch.tensor([r + p if side == "right" else p + r for r, p in zip(rows, pad)])
    mask = torch.tensor([[1] * len(r) + [0] * len(p) if side == "right" else [0] * len(p) + [1] * len(r)
                         for r, p in zip(rows, pad)])
    hidden = CachedBackbone(cache, None, 0)(ids, mask).last_hidden_state
    assert hidden.shape == (3, width, backbone.config.hidden_size)
    for i, row in enumerate(rows):
        with torch.no_grad():
            expected = backbone(input_ids=torch.tensor([row])).last_hidden_state[0]
        torch.testing.assert_close(hidden[i][mask[i].bool()], expected, rtol=1e-4, atol=1e-5)
        assert not hidden[i][~mask[i].bool()].any()


def test_the_default_fused_adamw_trains_like_the_for_loop_one(bert_tok, tmp_path):
    """Trainer's default optimizer (fused AdamW on torch >= 2.8) against ``adamw_torch``: the same
    weights after 8 steps within float rounding (rtol 1e-4)."""
    data = toy_rows(32)
    weights = {}
    for optim in (None, "adamw_torch"):
        model = ak.attach(fresh_bert(), "lora")
        extra = {"optim": optim} if optim else {}
        ak.train(model, bert_tok, data, output_dir=str(tmp_path / str(optim)), **{**SETTINGS, "num_epochs": 2}, **extra)
        weights[optim] = {k: v.detach().clone() for k, v in ak.trainable_parameters(model, "default").items()}
    assert any(not torch.equal(weights[None][k], torch.zeros_like(v)) for k, v in weights[None].items())
    for key, value in weights[None].items():
        torch.testing.assert_close(value, weights["adamw_torch"][key], rtol=1e-4, atol=1e-6)
