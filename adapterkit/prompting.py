"""Classification with a causal LM: task prompts, label-word scoring, calibration, and generation.

A causal LM classifies by reading a task prompt ("Classify the sentiment of the following
text: ...") and comparing how likely each label word is as the continuation. This module
builds those prompts (zero-shot or with in-context examples; through the tokenizer's chat
template when the model has one), scores label words in batches sorted by length, corrects
the model's prior over the label words by contextual calibration, and parses generated
answers. The few-shot and prompting recipes use it, with or without a trained adapter.

In-context demonstrations are the same for every row, so they are encoded once and their KV
cache is reused for every evaluated row (and for the content-free calibration inputs).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from adapterkit.compat import transformers as transformers_compat
from adapterkit.errors import InvalidOptionError

#: Inputs with no content (Zhao et al., 2021): the label-word distribution the model gives them is its
#: prior, which contextual calibration divides out.
CONTENT_FREE = ("N/A", "", "[MASK]")

Calibration = Literal["contextual"] | None


@dataclasses.dataclass(kw_only=True)
class PromptTemplate:
    """How a text becomes a prompt whose continuation is a label word.

    Attributes:
        instruction: the task, in words (the system message under a chat template).
        text_prefix: put before each text.
        answer_prefix: put before the answer; the label word follows it after a space. Under a
            chat template it ends the user's turn and the label word is the assistant's reply.
        separator: between in-context examples.
        chat: use the tokenizer's chat template (instruction as the system message, each
            example a user/assistant turn). ``None``: when the tokenizer has one.
    """

    instruction: str = "Classify the sentiment of the following text."
    text_prefix: str = "Text: "
    answer_prefix: str = "Answer:"
    separator: str = "\n\n"
    chat: bool | None = None

    def render(self, text: str, examples: Sequence[tuple[str, str]] = ()) -> str:
        """The plain-text prompt for ``text``, after (text, label word) in-context ``examples``."""
        return self._plain_prefix(examples) + self._plain_query(text)

    def uses_chat(self, tokenizer: Any) -> bool:
        """Whether prompts for ``tokenizer`` go through its chat template."""
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if self.chat and not has_template:
            raise InvalidOptionError(
                "PromptTemplate(chat=True) but the tokenizer has no chat template; pass chat=None or chat=False."
            )
        return has_template if self.chat is None else self.chat

    def split(self, tokenizer: Any, texts: Sequence[str], examples: Sequence[tuple[str, str]] = ()) -> tuple[str, list[str]]:
        """The prompts for ``texts`` as (the prefix they share, each text's own rest).

        The prefix holds the instruction and the examples; every rest ends where the label word
        begins (see :meth:`answer_lead`).
        """
        if not self.uses_chat(tokenizer):
            return self._plain_prefix(examples), [self._plain_query(t) for t in texts]
        # No instruction, no system message: the template's own default system prompt, if any, stays.
        shared = [{"role": "system", "content": self.instruction}] if self.instruction else []
        for text, word in examples:
            shared += [{"role": "user", "content": self._chat_query(text)}, {"role": "assistant", "content": word}]
        prefix = tokenizer.apply_chat_template(shared, tokenize=False) if shared else ""
        fulls = [
            tokenizer.apply_chat_template([*shared, {"role": "user", "content": self._chat_query(t)}], tokenize=False,
                                          add_generation_prompt=True)
            for t in texts
        ]
        if not all(full.startswith(prefix) for full in fulls):  # a template that rewrites earlier turns
            return "", fulls
        return prefix, [full[len(prefix):] for full in fulls]

    def answer_lead(self, tokenizer: Any) -> str:
        """What goes between a prompt and its label word: a space, or nothing as an assistant reply."""
        return "" if self.uses_chat(tokenizer) else " "

    def _plain_prefix(self, examples: Sequence[tuple[str, str]]) -> str:
        shots = [f"{self.text_prefix}{t}\n{self.answer_prefix} {w}" for t, w in examples]
        return "".join(part + self.separator for part in [self.instruction, *shots] if part)

    def _chat_query(self, text: str) -> str:
        return f"{self.text_prefix}{text}\n{self.answer_prefix}" if self.answer_prefix else f"{self.text_prefix}{text}"

    def _plain_query(self, text: str) -> str:
        return f"{self.text_prefix}{text}\n{self.answer_prefix}"


def balanced_examples(texts: Sequence[str], labels: Sequence[int], label_words: Sequence[str], *, seed: int) -> list[tuple[str, str]]:
    """(text, label word) demonstrations ordered so classes alternate, in an order drawn from ``seed``.

    Round-robin over the classes (each class's rows shuffled, the class order shuffled) keeps every
    prefix of the demonstrations balanced, so no class is the last one the model saw by construction.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = {}
    for text, label in zip(texts, labels):
        by_class.setdefault(label, []).append(text)
    for rows in by_class.values():
        rng.shuffle(rows)
    order = list(by_class)
    out = []
    for i in range(max(map(len, by_class.values()), default=0)):
        rng.shuffle(order)
        out += [(by_class[c][i], label_words[c]) for c in order if i < len(by_class[c])]
    return out


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


def _label_token_ids(tokenizer: Any, label_words: Sequence[str], lead: str = " ") -> list[list[int]]:
    ids = [tokenizer(lead + w, add_special_tokens=False)["input_ids"] for w in label_words]
    if any(not i for i in ids):
        raise InvalidOptionError(f"A label word tokenizes to nothing: {list(label_words)}.")
    return ids


class _Prefix:
    """A shared prompt prefix encoded once; its KV cache, expanded per batch size, serves every batch."""

    def __init__(self, model: nn.Module, ids: list[int], device: torch.device) -> None:
        self.length = len(ids)
        self._caches: dict[int, Any] = {}
        if ids:
            out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
            self.argument = transformers_compat.cache_argument(model)
            self._one = transformers_compat.output_cache(out)

    def cache(self, rows: int) -> Any:
        """The prefix's cache for a batch of ``rows``; :meth:`release` crops it back to the prefix."""
        if rows not in self._caches:
            expanded = copy.deepcopy(self._one)
            expanded.batch_repeat_interleave(rows)
            self._caches[rows] = expanded
        return self._caches[rows]

    def release(self, rows: int) -> None:
        cache = self._caches[rows]
        cache.crop(self.length - cache.get_seq_length())  # drop the batch's own keys and values, keep the prefix's


def _score_batch(
    model: nn.Module, rows: list[list[int]], label_ids: list[list[int]], device: torch.device, pad: int,
    prefix: _Prefix | None = None,
) -> torch.Tensor:
    """Log-likelihood of each label word after each row of token ids (after ``prefix``, from its cache)."""
    scores = []
    # Single-token label words need one pass for all of them; longer ones one pass per word.
    variants = [[]] if all(len(ids) == 1 for ids in label_ids) else label_ids
    for suffix in variants:
        full = [r + suffix for r in rows]
        width = max(len(r) for r in full)
        # Right padding keeps every row's positions right after the prefix; we read each row at its own end.
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in full], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in full], device=device)
        options: dict[str, Any] = {}
        if prefix is not None and prefix.length:
            options = {prefix.argument: prefix.cache(len(full)), "use_cache": True}
            mask_all = torch.cat([mask.new_ones(len(full), prefix.length), mask], dim=1)
        else:
            mask_all = mask
        try:
            logp = model(input_ids=input_ids, attention_mask=mask_all, **options).logits.float().log_softmax(-1)
        finally:
            if options:
                prefix.release(len(full))
        ends = mask.sum(-1)
        index = torch.arange(len(full), device=device)
        if not suffix:
            scores.append(logp[index, ends - 1][:, [ids[0] for ids in label_ids]].cpu())
            break
        n = len(suffix)
        positions = ends.unsqueeze(1) - n - 1 + torch.arange(n, device=device)
        picked = logp[index.unsqueeze(1), positions]
        target = torch.tensor(suffix, device=device).expand(len(full), n)
        scores.append(picked.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1).cpu().unsqueeze(1))
    return torch.cat(scores, dim=1)


def _score_ids(
    model: nn.Module, tokenizer: Any, rows: list[list[int]], label_ids: list[list[int]], *, prefix_ids: list[int] = (),
    reuse_prefix: bool = True, batch_size: int = 8, show_progress: bool = False, desc: str = "score",
) -> torch.Tensor:
    """Scores of ``rows`` (each after ``prefix_ids``), batched by length, in the rows' own order."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidOptionError(f"batch_size must be a positive int, got {batch_size!r}.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix_ids = list(prefix_ids)
    # Similar lengths in a batch waste little on padding; the scores go back to the rows' order.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = torch.empty(len(rows), len(label_ids))
    with evaluation_mode(model) as device:
        prefix = _Prefix(model, prefix_ids, device) if reuse_prefix else None
        starts = range(0, len(rows), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not show_progress):
            picked = order[start : start + batch_size]
            batch = [rows[i] if reuse_prefix else prefix_ids + rows[i] for i in picked]
            out[picked] = _score_batch(model, batch, label_ids, device, pad, prefix)
    return out


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

    The raw, uncalibrated scores of whole prompt strings, each label word after a space; see
    :func:`score_texts` for templates, in-context examples and calibration.
    """
    label_ids = _label_token_ids(tokenizer, label_words)
    rows = [ids[-max_length:] for ids in tokenizer(list(prompts))["input_ids"]] if prompts else []
    return _score_ids(model, tokenizer, rows, label_ids, batch_size=batch_size)


@dataclasses.dataclass
class LabelWordScores:
    """Label-word scores of a batch of texts, raw and calibrated.

    Attributes:
        raw: log-likelihood of each label word after each prompt, (texts, label words).
        calibrated: ``log softmax(raw) - log prior`` (contextual calibration), or None when off.
        prior: the label-word distribution on the content-free inputs (mean of their softmaxes).
    """

    raw: torch.Tensor
    calibrated: torch.Tensor | None = None
    prior: torch.Tensor | None = None

    @property
    def scores(self) -> torch.Tensor:
        """The calibrated scores when there are any, else the raw ones."""
        return self.raw if self.calibrated is None else self.calibrated

    def predictions(self) -> list[int]:
        """Index of the best label word per text."""
        return self.scores.argmax(-1).tolist()


def contextual_calibration(raw: torch.Tensor, prior_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibrated scores, prior): ``raw``'s label-word distribution divided by the content-free one.

    ``prior_raw`` holds the raw scores of the content-free inputs; the prior is the mean of their
    softmaxes over the label words (Zhao et al., 2021, with W = diag(prior)^-1 and b = 0).
    """
    prior = prior_raw.log_softmax(-1).exp().mean(0)
    return raw.log_softmax(-1) - prior.log(), prior


def score_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    label_words: Sequence[str],
    *,
    template: PromptTemplate | None = None,
    examples: Sequence[tuple[str, str]] = (),
    calibration: Calibration = "contextual",
    content_free: Sequence[str] = CONTENT_FREE,
    reuse_prefix: bool = True,
    batch_size: int = 8,
    max_length: int = 1024,
    show_progress: bool = False,
) -> LabelWordScores:
    """Score each label word as the answer to each text's prompt, raw and calibrated.

    Args:
        model: A causal LM (with or without an adapter), on any device.
        tokenizer: Its tokenizer; its chat template is used when it has one, unless
            ``template.chat`` is False.
        texts: The texts to classify.
        label_words: One word per class.
        template: Renders the prompts (default: ``PromptTemplate()``).
        examples: (text, label word) in-context examples put before every text (see
            :func:`balanced_examples`); encoded once, their KV cache reused for every row.
        calibration: ``"contextual"`` divides out the label-word prior measured on the
            ``content_free`` inputs (after the same examples); None: raw scores only.
        content_free: The content-free texts for calibration.
        reuse_prefix: False re-encodes the instruction and examples with every row (same scores,
            slower: for measuring the cache's speed-up).
        batch_size: Rows per forward pass (rows are batched by length).
        max_length: Each row keeps its last ``max_length`` tokens (the shared prefix is not cut).
        show_progress: A tqdm bar over the batches.
    """
    if calibration not in ("contextual", None):
        raise InvalidOptionError(f"calibration must be 'contextual' or None, got {calibration!r}.")
    if calibration and not content_free:
        raise InvalidOptionError("calibration='contextual' needs at least one content-free input, got none.")
    template = template or PromptTemplate()
    chat = template.uses_chat(tokenizer)
    label_ids = _label_token_ids(tokenizer, label_words, template.answer_lead(tokenizer))
    cf = list(content_free) if calibration else []
    prefix, queries = template.split(tokenizer, [*texts, *cf], examples)
    # Whole prompts are tokenized (a chat template writes its own special tokens; a plain prompt
    # gets the tokenizer's BOS), as training tokenizes them: the prefix tokenized apart can split
    # differently at the boundary (SmolLM2's BPE: "\n\n" + "Text:" is not "\n\nText:"). The ids
    # every prompt starts with are the shared prefix whose KV cache is reused.
    fulls = tokenizer([prefix + q for q in queries], add_special_tokens=not chat)["input_ids"]
    shared = _shared_length(fulls) if prefix else 0
    prefix_ids = list(fulls[0][:shared]) if shared else []
    rows = [ids[shared:][-max_length:] for ids in fulls]
    options = {"prefix_ids": prefix_ids, "reuse_prefix": reuse_prefix, "batch_size": batch_size}
    raw = _score_ids(model, tokenizer, rows[: len(texts)], label_ids, show_progress=show_progress, **options)
    if not calibration:
        return LabelWordScores(raw)
    prior_raw = _score_ids(model, tokenizer, rows[len(texts):], label_ids, desc="calibrate", **options)
    calibrated, prior = contextual_calibration(raw, prior_raw)
    return LabelWordScores(raw, calibrated, prior)


def _shared_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading ids all ``sequences`` share, leaving each at least its last id."""
    first = sequences[0]
    limit = min(len(ids) for ids in sequences) - 1
    shared = 0
    while shared < limit and all(ids[shared] == first[shared] for ids in sequences):
        shared += 1
    return shared


def predict_by_scoring(model: nn.Module, tokenizer: Any, prompts: Sequence[str], label_words: Sequence[str], **kwargs: Any) -> list[int]:
    """Index of the most likely label word per prompt (raw scores of whole prompts)."""
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
