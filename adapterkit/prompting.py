"""Classification with a causal LM: task prompts, label-word scoring, and generation.

A causal LM classifies by reading a task prompt ("Classify the sentiment of the following
text: ...") and comparing how likely each label word is as the continuation. This module
builds those prompts (zero-shot, or with in-context examples), scores label words in
batches, and parses generated answers; the few-shot and prompting recipes use it, with or
without a trained adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from adapterkit.errors import InvalidOptionError


@dataclasses.dataclass(kw_only=True)
class PromptTemplate:
    """How a text becomes a prompt whose continuation is a label word.

    Attributes:
        instruction: the task, in words.
        text_prefix: put before each text.
        answer_prefix: put before the answer; the label word follows it after a space.
        separator: between in-context examples.
    """

    instruction: str = "Classify the sentiment of the following text."
    text_prefix: str = "Text: "
    answer_prefix: str = "Answer:"
    separator: str = "\n\n"

    def render(self, text: str, examples: Sequence[tuple[str, str]] = ()) -> str:
        """The prompt for ``text``, after (text, label word) in-context ``examples``."""
        shots = [f"{self.text_prefix}{t}\n{self.answer_prefix} {w}" for t, w in examples]
        query = f"{self.text_prefix}{text}\n{self.answer_prefix}"
        return self.separator.join([self.instruction, *shots, query])


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[torch.device]:
    """``model`` in eval mode without autograd for the block, which gets the device inputs go to.

    The model's train/eval mode comes back afterwards, also when the block raises.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _label_token_ids(tokenizer: Any, label_words: Sequence[str]) -> list[list[int]]:
    ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in label_words]
    if any(not i for i in ids):
        raise InvalidOptionError(f"A label word tokenizes to nothing: {list(label_words)}.")
    return ids


def score_label_words(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    label_words: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
) -> torch.Tensor:
    """Log-likelihood of each label word after each prompt, shape (len(prompts), len(label_words)).

    Single-token label words need one forward pass per batch of prompts; multi-token words
    are scored token by token (one pass per label word).
    """
    label_ids = _label_token_ids(tokenizer, label_words)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = []
    with evaluation_mode(model) as device:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            prompt_ids = [ids[-max_length:] for ids in tokenizer(chunk)["input_ids"]]
            per_label = []
            # Right padding keeps every row's positions as in training; we read each row at its own end.
            variants = [[]] if all(len(ids) == 1 for ids in label_ids) else [ids for ids in label_ids]
            for suffix in variants:
                rows = [ids + suffix for ids in prompt_ids]
                width = max(len(r) for r in rows)
                input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
                logp = model(input_ids=input_ids, attention_mask=mask).logits.float().log_softmax(-1)
                ends = mask.sum(-1)
                if not suffix:  # single-token label words: one pass scores them all
                    last = logp[torch.arange(len(rows), device=device), ends - 1]
                    per_label = [last[:, [ids[0] for ids in label_ids]].cpu()]
                    break
                n = len(suffix)
                positions = ends.unsqueeze(1) - n - 1 + torch.arange(n, device=device)
                picked = logp[torch.arange(len(rows), device=device).unsqueeze(1), positions]
                target = torch.tensor(suffix, device=device).expand(len(rows), n)
                per_label.append(picked.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1).cpu())
            scores.append(per_label[0] if len(per_label) == 1 and not variants[0] else torch.stack(per_label, dim=1))
    return torch.cat(scores)


def predict_by_scoring(model: nn.Module, tokenizer: Any, prompts: Sequence[str], label_words: Sequence[str], **kwargs: Any) -> list[int]:
    """Index of the most likely label word per prompt."""
    return score_label_words(model, tokenizer, prompts, label_words, **kwargs).argmax(-1).tolist()


def predict_by_generation(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], label_words: Sequence[str], *, max_new_tokens: int = 5,
    **kwargs: Any,
) -> list[int]:
    """Generate greedily and return the index of the first label word in each answer (-1: none).

    Keyword arguments other than ``max_new_tokens`` (``batch_size``) go to :func:`generate`.
    """
    texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, **kwargs)
    lowered = [w.lower() for w in label_words]
    out = []
    for text in texts:
        words = text.lower().replace(".", " ").replace(",", " ").split()
        out.append(next((lowered.index(w) for w in words if w in lowered), -1))
    return out


def generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 8, max_new_tokens: int = 64
) -> list[str]:
    """Greedy continuations of ``prompts`` (the new text only)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last column
    out: list[str] = []
    try:
        with evaluation_mode(model) as device:
            for start in range(0, len(prompts), batch_size):
                enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
                ids = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                out.extend(tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return out
