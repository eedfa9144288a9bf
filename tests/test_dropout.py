"""Bulk CPU dropout masks (adapterkit.training.dropout): the same dropout, faster masks."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

import adapterkit as ak
from adapterkit.compat import transformers as transformers_compat
from adapterkit.errors import InvalidOptionError
from adapterkit.training.dropout import (ATTENTION, BulkDropout, MaskSource, bulk_dropout, dropout_attention,
                                         has_cpu_dropout, torch_masks_vectorized)
from tests.tiny import VOCAB, make_batch, save_tiny

#: p below 1/131072 rounds to a threshold that keeps every element: the masks are then all ones
#: (times 1 / (1 - p)), which lets the bulk paths be compared exactly with the stock ones.
KEEP_ALL = 1e-7


def dropout_bert(p: float = 0.1) -> tf.BertForSequenceClassification:
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        hidden_dropout_prob=p, attention_probs_dropout_prob=p, num_labels=3, max_position_embeddings=64))


def test_masks_drop_at_the_rate_asked_and_scale_the_survivors():
    mask = MaskSource(0).scaled_mask(torch.Size([1000, 2000]), 0.1, torch.float32)
    assert mask.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    # 2M draws: the kept share's standard deviation is 0.0002; 0.002 is ten of them.
    assert (mask > 0).float().mean().item() == pytest.approx(0.9, abs=0.002)
    assert mask.mean().item() == pytest.approx(1.0, abs=0.003)


def test_masks_are_independent_between_calls_and_reproducible_by_seed():
    a, b = MaskSource(0), MaskSource(0)
    first, second = a.scaled_mask(torch.Size([2_000_000]), 0.5, torch.float32), a.scaled_mask(torch.Size([2_000_000]), 0.5, torch.float32)
    assert torch.equal(first, b.scaled_mask(torch.Size([2_000_000]), 0.5, torch.float32))
    # Independent halves agree on half the elements (sd 0.00035).
    assert ((first > 0) == (second > 0)).float().mean().item() == pytest.approx(0.5, abs=0.004)
    other = MaskSource(1).scaled_mask(torch.Size([2_000_000]), 0.5, torch.float32)
    assert ((first > 0) == (other > 0)).float().mean().item() == pytest.approx(0.5, abs=0.004)
    # Neighbours are uncorrelated too (a generator with short-range structure would show here).
    kept = (first > 0).float()
    assert ((kept[1:] == kept[:-1]).float().mean().item()) == pytest.approx(0.5, abs=0.004)


def test_bulk_dropout_is_the_identity_in_eval_mode_and_exact_when_nothing_drops():
    x = torch.randn(4, 5, 6, requires_grad=True)
    layer = BulkDropout(0.3, MaskSource(0)).eval()
    assert torch.equal(layer(x), x)
    keep_all = BulkDropout(KEEP_ALL, MaskSource(0)).train()
    out = keep_all(x)
    torch.testing.assert_close(out, x / (1 - KEEP_ALL), rtol=0, atol=0)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / (1 - KEEP_ALL)), rtol=0, atol=0)


def test_dropped_elements_get_no_gradient():
    x = torch.randn(64, 64, requires_grad=True)
    out = BulkDropout(0.5, MaskSource(3)).train()(x)
    out.sum().backward()
    dropped = out == 0
    assert 0.4 < dropped.float().mean().item() < 0.6
    assert torch.all(x.grad[dropped] == 0)
    torch.testing.assert_close(x.grad[~dropped], torch.full_like(x.grad[~dropped], 2.0))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_math_path_matches_sdpa(causal):
    class Attention(nn.Module):
        is_causal = causal

        def __init__(self):
            super().__init__()
            self.dropout = BulkDropout(KEEP_ALL, MaskSource(0))
            self.num_key_value_groups = 2

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 5, 8, generator=g) for h in (4, 2, 2))  # grouped-query: 4 heads, 2 kv heads
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, ..., -2:] = False  # padding in the second row
    module = Attention().train()
    for attention_mask in (None, mask):
        ours, _ = dropout_attention(module, q, k, v, attention_mask, dropout=KEEP_ALL)
        stock, _ = transformers_compat.sdpa_attention(module, q, k, v, attention_mask, dropout=0.0)
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)


def test_model_training_steps_match_stock_dropout_when_nothing_drops():
    """Identical losses for a few steps with and without the speed-up (tolerance 1e-5): every
    dropout module and the attention route are swapped, and the math around them is unchanged."""
    batch = make_batch("bert")

    def losses(bulk: bool) -> list[float]:
        model = dropout_bert(KEEP_ALL).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = []
        with bulk_dropout(model, seed=0) if bulk else torch.enable_grad():
            for _ in range(3):
                loss = model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                out.append(loss.item())
        return out

    assert losses(True) == pytest.approx(losses(False), rel=1e-5)


def test_dropout_really_drops_inside_the_model_and_everything_is_restored():
    model = dropout_bert(0.5).train()
    batch = make_batch("bert")
    originals = [m for m in model.modules() if type(m) is nn.Dropout]
    assert has_cpu_dropout(model) and transformers_compat.attn_implementation(model.config) == "sdpa"
    with bulk_dropout(model, seed=0):
        assert len(originals) == 8  # embeddings, 3 per layer, classifier
        assert sum(isinstance(m, BulkDropout) for m in model.modules()) == 8
        assert transformers_compat.attn_implementation(model.config) == ATTENTION
        first, second = model(**batch).logits, model(**batch).logits
        assert not torch.allclose(first, second)  # different masks each call
        model.eval()
        torch.testing.assert_close(model(**batch).logits, model(**batch).logits)
        model.train()
    assert [m for m in model.modules() if type(m) is nn.Dropout] == originals
    assert not any(isinstance(m, BulkDropout) for m in model.modules())
    assert transformers_compat.attn_implementation(model.config) == "sdpa"
    assert all(m.training for m in originals)


def test_everything_is_restored_when_the_block_fails():
    model = dropout_bert()
    with pytest.raises(RuntimeError, match="boom"):
        with bulk_dropout(model, seed=0):
            raise RuntimeError("boom")
    assert not any(isinstance(m, BulkDropout) for m in model.modules())
    assert transformers_compat.attn_implementation(model.config) == "sdpa"


def test_models_without_dropout_are_left_alone():
    assert not has_cpu_dropout(dropout_bert(0.0))


def test_train_uses_bulk_masks_where_torch_masks_are_serial_and_honours_the_setting(tmp_path, monkeypatch):
    folder = save_tiny("bert", tmp_path / "m", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    base, tok = ak.load_base(folder, task="classification")
    ak.attach(base, "lora")
    seen = []
    real = BulkDropout.forward

    def spy(self, x):
        seen.append(self.training)
        return real(self, x)

    monkeypatch.setattr(BulkDropout, "forward", spy)
    rows = [{"text": f"w{3 + i % 20} w{5 + i % 7}", "label": i % 3} for i in range(16)]
    ak.train(base, tok, rows, num_epochs=1, batch_size=8, show_progress=False, output_dir=str(tmp_path / "out"))
    assert bool(seen) == (not torch_masks_vectorized())  # the default: bulk masks where torch's are serial
    seen.clear()
    ak.train(base, tok, rows, num_epochs=1, batch_size=8, show_progress=False, output_dir=str(tmp_path / "out1"),
             fast_dropout=True)
    assert seen and all(seen)
    assert not any(isinstance(m, BulkDropout) for m in base.modules())
    assert base.config._attn_implementation == "sdpa"
    seen.clear()
    ak.train(base, tok, rows, num_epochs=1, batch_size=8, show_progress=False, output_dir=str(tmp_path / "out2"),
             fast_dropout=False)
    assert not seen
    with pytest.raises(InvalidOptionError, match="fast_dropout"):
        ak.train(base, tok, rows, fast_dropout="yes")
    with pytest.raises(InvalidOptionError, match="fast_dropout=True cannot be combined with gradient checkpointing"):
        ak.train(base, tok, rows, fast_dropout=True, gradient_checkpointing=True)
    seen.clear()  # automatic: off under checkpointing, whose recomputed forwards must see the same masks
    ak.train(base, tok, rows, num_epochs=1, batch_size=8, show_progress=False, output_dir=str(tmp_path / "out3"),
             gradient_checkpointing=True)
    assert not seen


@pytest.mark.parametrize("fast", [True, False])
def test_a_resumed_run_draws_the_masks_of_the_uninterrupted_one(tmp_path, fast):
    folder = save_tiny("bert", tmp_path / "m", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    rows = [{"text": f"w{3 + i % 20} w{5 + i % 7} w{9 + i % 5}", "label": i % 3} for i in range(32)]
    common = dict(num_epochs=2, batch_size=8, save_strategy="steps", save_steps=3, seed=3, show_progress=False,
                  learning_rate=1e-2)

    def trained(output_dir, **options):
        base, tok = ak.load_base(folder, task="classification")
        torch.manual_seed(0)  # the same LoRA initialisation every time
        ak.attach(base, "lora")
        ak.train(base, tok, rows, output_dir=str(tmp_path / output_dir), **common, **options)
        return {k: v.detach().clone() for k, v in ak.trainable_parameters(base, "default").items()}

    class Interrupt(tf.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 3

    reference = trained("full", fast_dropout=fast)
    trained("cut", callbacks=[Interrupt()], fast_dropout=fast)
    resumed = trained("cut", resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"), fast_dropout=fast)
    for key, value in resumed.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6)
    if fast:  # the bulk masks were in play: torch's own masks (same seed) train to other weights
        stock = trained("stock", fast_dropout=False)
        assert any(not torch.allclose(value, reference[key]) for key, value in stock.items())
