"""ak.train on an encoder-decoder (T5): the encoder reads the prompt, the decoder learns the completion.

Every case runs the real path (``ak.train`` with Trainer, or the tokenization it uses) on the tiny
T5 of tests/tiny.py with a word-level tokenizer ("w3".."w63" are ids 3..63, "</s>" is 2).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer, TrainerCallback

import adapterkit as ak
from tests.tiny import TINY, save_tiny

QUIET = dict(show_progress=False, logging_steps=1000, eval_strategy="no")
EOS = 2
# A learnable mapping: each prompt has its own target, the targets differ in length.
PAIRS = [
    {"prompt": "w3 w4 w5", "completion": "w40 w41"},
    {"prompt": "w6 w7", "completion": "w50"},
    {"prompt": "w8 w9 w10 w11", "completion": "w44 w45 w46"},
    {"prompt": "w12", "completion": "w55 w56"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(save_tiny("t5", tmp_path_factory.mktemp("t5tok")))


def t5_with_lora():
    torch.manual_seed(0)
    return ak.attach(TINY["t5"](), "lora", r=4)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=True)["input_ids"]


def hand_loss(model, tok, rows) -> float:
    """Token-mean cross-entropy of each target given only its prompt, one unpadded row at a time."""
    from adapterkit.state import unwrap

    base = unwrap(model)
    start = base.config.decoder_start_token_id
    total, count = 0.0, 0
    base.eval()
    with torch.no_grad():
        for row in rows:
            target = ids(tok, row["completion"]) + [EOS]
            enc = torch.tensor([ids(tok, row["prompt"])])
            dec = torch.tensor([[start] + target[:-1]])
            logits = base(input_ids=enc, attention_mask=torch.ones_like(enc), decoder_input_ids=dec).logits[0]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum").item()
            count += len(target)
    return total / count


class FirstBatch(TrainerCallback):
    """Keeps the first batch Trainer's own dataloader produces (what the model is fed)."""

    batch = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.batch = next(iter(train_dataloader))


# --- what the model is fed --------------------------------------------------------------
def test_encoder_gets_the_prompt_and_labels_are_the_completion_plus_eos(tok):
    import datasets

    from adapterkit.training import tokenize

    ds = datasets.Dataset.from_list(PAIRS)
    out = tokenize(ds, tok, task="seq2seq", max_length=16)
    for row, feats in zip(PAIRS, out):
        assert feats["input_ids"] == ids(tok, row["prompt"])
        assert feats["attention_mask"] == [1] * len(feats["input_ids"])
        assert feats["labels"] == ids(tok, row["completion"]) + [EOS]


def test_a_tokenizer_that_appends_eos_itself_gets_no_second_one(tok, tmp_path):
    """T5's own tokenizer ends every text with </s>: the target keeps exactly one."""
    import datasets
    from tokenizers import processors

    from adapterkit.training import tokenize

    t5_like = copy.deepcopy(tok)
    t5_like.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", EOS)]
    )
    out = tokenize(datasets.Dataset.from_list(PAIRS[:1]), t5_like, task="seq2seq", max_length=16)[0]
    assert out["input_ids"] == [3, 4, 5, EOS] and out["labels"] == [40, 41, EOS]


def test_trainer_batch_has_shifted_decoder_inputs_and_minus_100_label_padding(tok):
    spy = FirstBatch()
    model = t5_with_lora()
    ak.train(model, tok, PAIRS, max_steps=1, batch_size=4, callbacks=[spy], **QUIET)
    batch = spy.batch
    # Trainer's default sampler shuffles: match rows back by their encoder input.
    by_prompt = {tuple(ids(tok, r["prompt"])): r for r in PAIRS}
    assert batch["input_ids"].shape[0] == 4
    for input_ids, mask, labels, decoder in zip(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                batch["decoder_input_ids"]):
        prompt = input_ids[mask.bool()].tolist()
        row = by_prompt[tuple(prompt)]
        assert (input_ids[~mask.bool()] == tok.pad_token_id).all()
        target = ids(tok, row["completion"]) + [EOS]
        pad = labels.shape[0] - len(target)
        assert labels.tolist() == target + [-100] * pad
        # decoder input = labels shifted right behind the start token, -100 replaced by pad
        assert decoder.tolist() == [0] + (target + [tok.pad_token_id] * pad)[:-1]


def test_eval_loss_is_the_models_loss_of_target_given_prompt(tok):
    model = t5_with_lora()
    metrics = ak.train(model, tok, PAIRS, PAIRS, max_steps=2, batch_size=4, eval_batch_size=8,
                       learning_rate=1e-2, **QUIET)
    assert metrics["eval_loss"] == pytest.approx(hand_loss(model, tok, PAIRS), rel=1e-4)
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-5)


def test_t5_lora_learns_the_mapping(tok, tmp_path):
    model = t5_with_lora()
    before = hand_loss(model, tok, PAIRS)
    metrics = ak.train(model, tok, PAIRS * 4, PAIRS, num_epochs=6, batch_size=4, learning_rate=3e-2, **QUIET)
    after = hand_loss(model, tok, PAIRS)
    assert after < before * 0.6  # measured: 4.77 -> 1.91
    assert metrics["eval_loss"] == pytest.approx(after, rel=1e-4)
    # trained adapter survives save -> load into a fresh T5
    folder = ak.save(model, tmp_path / "t5-lora")
    torch.manual_seed(0)
    fresh = TINY["t5"]()
    ak.load(fresh, folder)
    assert hand_loss(fresh, tok, PAIRS) == pytest.approx(after, rel=1e-4)


@pytest.mark.parametrize("strategy", ["prefix", "head", "full"])
def test_every_builtin_strategy_trains_t5_on_the_seq2seq_objective(tok, strategy):
    torch.manual_seed(0)
    model = ak.attach(TINY["t5"](), strategy)
    before = hand_loss(model, tok, PAIRS)
    metrics = ak.train(model, tok, PAIRS * 4, PAIRS, max_steps=8, batch_size=4, **QUIET)
    assert metrics["eval_loss"] == pytest.approx(hand_loss(model, tok, PAIRS), rel=1e-4)
    assert metrics["eval_loss"] < before


# --- lengths: the encoder input and the target each have their own budget ----------------
LONG = [{"prompt": " ".join(f"w{i}" for i in range(3, 23)), "completion": " ".join(f"w{i}" for i in range(30, 42))}]


def test_truncate_cuts_prompt_to_max_length_and_target_to_max_target_length(tok):
    import datasets

    from adapterkit.training import tokenize

    out = tokenize(datasets.Dataset.from_list(LONG), tok, task="seq2seq", max_length=8, max_target_length=5)[0]
    assert out["input_ids"] == ids(tok, LONG[0]["prompt"])[:8]
    # the end of the target is cut, its EOS is kept so the decoder still learns to stop
    assert out["labels"] == ids(tok, LONG[0]["completion"])[:4] + [EOS]


def test_max_target_length_defaults_to_max_length(tok):
    import datasets

    from adapterkit.training import tokenize

    out = tokenize(datasets.Dataset.from_list(LONG), tok, task="seq2seq", max_length=6)[0]
    assert len(out["input_ids"]) == 6 and out["labels"] == ids(tok, LONG[0]["completion"])[:5] + [EOS]


def test_training_with_truncation_runs_and_records_both_lengths(tok):
    model = t5_with_lora()
    metrics = ak.train(model, tok, LONG * 4, max_steps=1, batch_size=4, max_length=8, max_target_length=4, **QUIET)
    assert metrics["train_loss"] > 0
    from adapterkit.state import get_store, unwrap

    recorded = get_store(unwrap(model)).record("default").meta["recipe"]["train_settings"]
    assert recorded["max_length"] == 8 and recorded["max_target_length"] == 4


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(max_length=8), r"1 of 4 rows of train_data have a 'prompt' longer than max_length=8 tokens "
                             r"\(longest: 20\)"),
        (dict(max_length=32, max_target_length=5),
         r"1 of 4 rows of train_data have a 'completion' longer than max_target_length=5 tokens "
         r"\(longest: 13, its EOS included\)"),
    ],
    ids=["prompt", "target"],
)
def test_error_policy_refuses_long_prompts_and_long_targets_separately(tok, settings, message):
    model = t5_with_lora()
    before = {k: v.detach().clone() for k, v in ak.trainable_parameters(model, "default").items()}
    data = LONG + PAIRS[:3]
    with pytest.raises(ak.DataError, match=message) as info:
        ak.train(model, tok, data, max_steps=1, length_policy="error", **settings, **QUIET)
    assert 'length_policy="truncate"' in str(info.value)
    for key, value in ak.trainable_parameters(model, "default").items():
        assert torch.equal(value, before[key])


def test_bad_max_target_length_is_refused(tok):
    with pytest.raises(ak.InvalidOptionError, match=r"max_target_length= must be a positive int.*got 0"):
        ak.train(t5_with_lora(), tok, PAIRS, max_steps=1, max_target_length=0, **QUIET)


# --- rows a seq2seq model cannot train on --------------------------------------------------
@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"text": "w3 w4 w5"}] * 4, r"seq2seq model needs 'prompt' \(the encoder's input\) and 'completion'"),
        ([{"prompt": "", "completion": "w5"}, *PAIRS], r"empty 'prompt' \(row indexes \[0\]\)"),
        ([{"prompt": "w3", "completion": ""}, *PAIRS], r"empty 'completion' \(row indexes \[0\]\)"),
    ],
    ids=["text only", "empty prompt", "empty completion"],
)
def test_rows_without_an_encoder_input_or_a_target_are_refused(tok, rows, message):
    with pytest.raises(ak.DataError, match=message):
        ak.train(t5_with_lora(), tok, rows, max_steps=1, **QUIET)


def test_left_padding_tokenizer_still_pads_targets_on_the_right(tok):
    """A tokenizer set to pad on the left (as for decoder generation) must not shift the targets."""
    left = copy.deepcopy(tok)
    left.padding_side = "left"
    spy = FirstBatch()
    ak.train(t5_with_lora(), left, PAIRS, max_steps=1, batch_size=4, callbacks=[spy], **QUIET)
    assert left.padding_side == "left"  # the caller's tokenizer is left as it was
    for labels in spy.batch["labels"].tolist():
        n = len([t for t in labels if t != -100])
        assert labels[:n] == [t for t in labels if t != -100] and labels[n - 1] == EOS
