"""The one evaluator: its numbers equal a hand computation from the model's own logits."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from adapterkit.errors import DataError, InvalidOptionError
from adapterkit.evaluate import evaluate_classifier, evaluate_label_words
from adapterkit.prompting import PromptTemplate
from tests.tiny import TINY, save_tiny


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(save_tiny("bert", tmp_path_factory.mktemp("bert")))
    torch.manual_seed(0)
    return TINY["bert"]().eval(), tok


@pytest.fixture(scope="module")
def llama_cls(tmp_path_factory):
    # Reads the last token, so a second text (which comes last) decides its answer.
    tok = AutoTokenizer.from_pretrained(save_tiny("llama_cls", tmp_path_factory.mktemp("llama_cls")))
    torch.manual_seed(0)
    return TINY["llama_cls"]().eval(), tok


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(save_tiny("llama", tmp_path_factory.mktemp("llama")))
    torch.manual_seed(0)
    return TINY["llama"]().eval(), tok


def texts(n: int, seed: int, words: int = 5) -> list[str]:
    rng = random.Random(seed)
    # Different lengths, so every batch of the evaluator is padded.
    return [" ".join(f"w{rng.randrange(3, 60)}" for _ in range(rng.randrange(1, words + 1))) for _ in range(n)]


def hand_predictions(model, tok, rows) -> list[int]:
    """Argmax of each row's logits, one unpadded row at a time."""
    preds = []
    with torch.no_grad():
        for row in rows:
            enc = tok(row["text"], row.get("text_pair"), return_tensors="pt")
            preds.append(int(model(**enc).logits[0].argmax()))
    return preds


def hand_metrics(preds: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    f1 = []
    for c in range(num_labels):
        tp = sum(p == c == y for p, y in zip(preds, labels))
        predicted, actual = preds.count(c), labels.count(c)
        f1.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
    return {"accuracy": sum(p == y for p, y in zip(preds, labels)) / len(labels), "macro_f1": sum(f1) / num_labels}


@pytest.mark.parametrize("arch", ["bert", "llama_cls"])
def test_classifier_metrics_equal_a_hand_computation_from_the_logits(arch, request):
    model, tok = request.getfixturevalue(arch)
    rows = [{"text": t} for t in texts(11, seed=1)]
    preds = hand_predictions(model, tok, rows)
    # Labels equal to the predictions, shifted from them, and mixed: each row's argmax must match.
    for labels in (preds, [(p + 1) % 3 for p in preds], [i % 3 for i in range(len(rows))]):
        result = evaluate_classifier(model, tok, [{**r, "label": y} for r, y in zip(rows, labels)], batch_size=4)
        expected = hand_metrics(preds, labels, num_labels=3)
        assert result["accuracy"] == pytest.approx(expected["accuracy"])
        assert result["macro_f1"] == pytest.approx(expected["macro_f1"])
        assert result["rows"] == len(rows) and result["seconds"] >= 0
    assert evaluate_classifier(model, tok, [{**r, "label": p} for r, p in zip(rows, preds)])["accuracy"] == 1.0


def test_classifier_reads_both_texts_of_a_pair(llama_cls):
    model, tok = llama_cls
    rows = [{"text": a, "text_pair": b} for a, b in zip(texts(12, seed=2), texts(12, seed=3))]
    with_pair = hand_predictions(model, tok, rows)
    first_only = hand_predictions(model, tok, [{"text": r["text"]} for r in rows])
    assert with_pair != first_only  # else this test could not tell the two apart
    labelled = {"text": [r["text"] for r in rows], "text_pair": [r["text_pair"] for r in rows], "label": with_pair}
    assert evaluate_classifier(model, tok, labelled, batch_size=5)["accuracy"] == 1.0


@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_mode_is_restored_and_evaluation_runs_in_eval_mode_without_grad(bert, training):
    model, tok = bert
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append((module.training, torch.is_grad_enabled())))
    model.train(training)
    try:
        evaluate_classifier(model, tok, {"text": ["w3 w4", "w5", "w6 w7 w8"], "label": [0, 1, 2]}, batch_size=2)
    finally:
        handle.remove()
        was = model.training
        model.eval()
    assert seen == [(False, False), (False, False)]
    assert was is training


def hand_label_word(model, tok, prompt: str, words: list[str]) -> int:
    scores = []
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        for word in words:
            label = tok(" " + word, add_special_tokens=False)["input_ids"]
            logp = model(input_ids=torch.tensor([ids + label])).logits.log_softmax(-1)[0]
            scores.append(sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(label)))
    return max(range(len(words)), key=scores.__getitem__)


@pytest.mark.parametrize("words", [["w7", "w8", "w9"], ["w7 w10", "w8", "w9 w11"]], ids=["single-token", "multi-token"])
def test_label_word_scoring_equals_a_hand_computation(llama, words):
    model, tok = llama
    template = PromptTemplate(instruction="w20 w21")
    examples = [("w30 w31", words[0]), ("w32", words[1])]
    rows = texts(7, seed=4)
    preds = [hand_label_word(model, tok, template.render(t, examples), words) for t in rows]
    for labels in (preds, [(p + 1) % 3 for p in preds]):
        result = evaluate_label_words(model, tok, {"text": rows, "label": labels}, words, template=template,
                                      examples=examples, batch_size=3, calibration=None)
        assert result["accuracy"] == hand_metrics(preds, labels, 3)["accuracy"]
        assert result["macro_f1"] == pytest.approx(hand_metrics(preds, labels, 3)["macro_f1"])
        assert result["rows"] == len(rows)


def test_class_shares_make_a_collapse_visible_and_calibration_is_reported_beside_raw(llama):
    model, tok = llama
    template = PromptTemplate(instruction="w20 w21")
    rows = {"text": texts(10, seed=7), "label": [0, 1] * 5}
    first = tok.convert_tokens_to_ids("w7")

    def prefer_first(module, args, out):  # a prior so strong that every raw answer is the first word
        out = out.clone()
        out[..., first] += 20.0
        return out

    # One content-free input: calibration then cancels a constant logit bias exactly.
    options = dict(template=template, content_free=["w40"])
    unbiased = evaluate_label_words(model, tok, rows, ["w7", "w8"], **options)
    handle = model.lm_head.register_forward_hook(prefer_first)
    try:
        raw = evaluate_label_words(model, tok, rows, ["w7", "w8"], template=template, calibration=None)
        calibrated = evaluate_label_words(model, tok, rows, ["w7", "w8"], **options)
    finally:
        handle.remove()
    assert raw["class_shares"] == [1.0, 0.0] and raw["accuracy"] == 0.5 and "raw_accuracy" not in raw
    assert calibrated["raw_class_shares"] == [1.0, 0.0] and calibrated["raw_accuracy"] == 0.5
    assert max(unbiased["class_shares"]) < 1.0  # else the rows could not show calibration undoing a collapse
    assert calibrated["class_shares"] == unbiased["class_shares"]
    assert calibrated["accuracy"] == unbiased["accuracy"]


def test_label_word_generation_restores_mode(llama):
    model, tok = llama
    model.train()
    try:
        result = evaluate_label_words(model, tok, {"text": texts(4, seed=5), "label": [0, 1, 0, 1]}, ["w7", "w8"],
                                      method="generation", max_new_tokens=2)
        assert model.training and 0 <= result["accuracy"] <= 1 and result["rows"] == 4
    finally:
        model.eval()


def test_progress_is_off_unless_asked(bert, capsys):
    model, tok = bert
    rows = {"text": ["w3", "w4"], "label": [0, 1]}
    evaluate_classifier(model, tok, rows)
    assert capsys.readouterr().err == ""
    evaluate_classifier(model, tok, rows, show_progress=True)
    assert "evaluate" in capsys.readouterr().err


def test_bad_input_is_refused_with_what_to_do(bert, llama):
    model, tok = bert
    with pytest.raises(DataError, match="lack column.*'label'.*prepare_classification"):
        evaluate_classifier(model, tok, {"text": ["w3"]})
    with pytest.raises(DataError, match="empty"):
        evaluate_classifier(model, tok, {"text": [], "label": []})
    with pytest.raises(InvalidOptionError, match="batch_size must be a positive int"):
        evaluate_classifier(model, tok, {"text": ["w3"], "label": [0]}, batch_size=0)
    model, tok = llama
    with pytest.raises(DataError, match=r"Labels \[2\] have no label word"):
        evaluate_label_words(model, tok, {"text": ["w3", "w4"], "label": [0, 2]}, ["w7", "w8"])
    with pytest.raises(InvalidOptionError, match="method must be 'scoring' or 'generation'"):
        evaluate_label_words(model, tok, {"text": ["w3"], "label": [0]}, ["w7"], method="guess")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inputs_go_to_the_model_device(bert, llama):
    for (model, tok), evaluate, extra in ((bert, evaluate_classifier, ()), (llama, evaluate_label_words, (["w7", "w8"],))):
        rows = {"text": texts(6, seed=6), "label": [0, 1] * 3}
        on_cpu = evaluate(model, tok, rows, *extra)
        model.cuda()
        try:
            on_gpu = evaluate(model, tok, rows, *extra)
        finally:
            model.cpu()
        assert on_gpu["accuracy"] == on_cpu["accuracy"]
