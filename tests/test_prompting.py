"""Label-word scoring: batched and padded scores equal one-prompt-at-a-time log-likelihoods."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from adapterkit.prompting import PromptTemplate, predict_by_scoring, score_label_words
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
