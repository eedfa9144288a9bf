"""The embedded engine: one base model, an :class:`~adapterkit.serve.pool.AdapterPool`, one model thread.

Requests become jobs on a queue. The engine's thread takes the first job, waits up to the
batching window for more (up to the largest batch), and runs what it collected as mixed
batches: one row per prompt, each row routed to its own adapter through ``pool.route(rows)``.

Generation is step by step over the whole batch: prompts are left-padded, the first forward
fills a KV cache, then each step is one forward of one new token per row. A row that finishes
(end of sequence, a stop string, ``max_tokens``, a client that went away) is answered at once
and leaves the batch (its rows of the cache are dropped), so short answers never wait for long
ones; requests that arrive meanwhile join the running batch between two steps (their prompts
run through a forward of their own, then their cache rows are appended, left-padded).
Classification runs classification adapters' heads, or scores the label words a causal-LM
adapter's recipe recorded (as :func:`adapterkit.prompting.score_label_words` does).

Loading and unloading run on the same thread, between batches, so the adapters a batch names
stay what they were when it started. The event loop never runs model code: the HTTP layer
submits jobs and awaits their futures.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import inspect
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import adapterkit.artifacts as artifacts
import adapterkit.hub as hub
from adapterkit.compat import transformers as transformers_compat
from adapterkit.errors import AdapterNotFoundError, IncompatibleModelError, InvalidOptionError, did_you_mean
from adapterkit.model_info import label_names as base_label_names
from adapterkit.model_info import task_of
from adapterkit.serve.pool import AdapterPool
from adapterkit.prompting import PromptTemplate, score_label_words
from adapterkit.serve.metrics import Metrics
from adapterkit.sources import resolve_source

logger = logging.getLogger(__name__)

_STOP = object()


class ContextLengthError(InvalidOptionError):
    """A prompt and its ``max_tokens`` do not fit the model's context or the server's limit."""


def settle(future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Answer ``future`` unless it is already answered or cancelled (its client went away)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def default_name(source: str) -> str:
    """The name an adapter is served under when none is given: a folder's name, or the Hub repo id."""
    path = Path(source)
    return path.name if path.exists() else source


@dataclasses.dataclass
class Adapter:
    """An adapter the server serves, and what its sidecar says about classifying with it."""

    name: str
    source: str
    folder: Path
    created: int
    task: str | None
    #: class names of a classification adapter, or the classes its label words stand for
    label_names: list[str] | None
    #: a causal-LM adapter's label words (``recipe.label_words``), one per class
    label_words: list[str] | None
    #: the instruction of the prompt its label words follow
    instruction: str | None
    pinned: bool = False

    def describe(self) -> dict[str, Any]:
        """What ``/v1/adapters`` and ``/v1/models`` say about it."""
        return {
            "name": self.name, "source": self.source, "task": self.task, "label_names": self.label_names,
            "label_words": self.label_words, "pinned": self.pinned,
        }


@dataclasses.dataclass
class Completion:
    """A finished generation: the new text and why it stopped (``"stop"`` or ``"length"``)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(eq=False)
class GenerationJob:
    """One prompt to continue; ``on_text`` (optional) receives the text as it is generated."""

    adapter: str | None
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    on_text: Callable[[str], None] | None = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    #: set by the HTTP layer when the client went away: the row leaves the batch at the next step
    cancelled: bool = False
    rows = 1


@dataclasses.dataclass(eq=False)
class ClassifyJob:
    """Texts to classify with one adapter; the future gets one ``{"label", "scores"}`` per text."""

    adapter: str | None
    texts: list[str]
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)

    @property
    def rows(self) -> int:
        return len(self.texts)


@dataclasses.dataclass(eq=False)
class ControlJob:
    """Work on the pool (load, unload) that runs between batches."""

    run: Callable[[], Any]
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    rows = 0


class _Row:
    """One generating row: its tokens so far, and the text already sent to a streaming client."""

    def __init__(self, job: GenerationJob, engine: Engine) -> None:
        self.job = job
        self.engine = engine
        self.ids: list[int] = []
        self.sent = 0
        self.done = False
        self.generator = None
        if job.temperature > 0:
            self.generator = torch.Generator().manual_seed(job.seed if job.seed is not None else random.getrandbits(63))

    def push(self, token: int) -> None:
        """Take the next token; finish the row when the sequence, a stop string or the budget ends."""
        job = self.job
        if job.cancelled:
            self.finish("", "cancelled")
            return
        if token in self.engine.eos_ids:
            self.finish(self.engine.decode(self.ids), "stop")
            return
        self.ids.append(token)
        text = self.engine.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.finish(text[:cut], "stop")
        elif len(self.ids) >= job.max_tokens:
            self.finish(text, "length")
        elif job.on_text is not None:
            safe = _safe_end(text, job.stop)
            if safe > self.sent:
                job.on_text(text[self.sent:safe])
                self.sent = safe

    def finish(self, text: str, reason: str) -> None:
        self.done = True
        job = self.job
        if reason == "cancelled":
            job.future.cancel()
            return
        if job.on_text is not None and len(text) > self.sent:
            job.on_text(text[self.sent:])
        self.engine.metrics.tokens.inc(amount=len(self.ids))
        settle(job.future, Completion(text, reason, len(job.prompt_ids), len(self.ids)))


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` may be streamed: not a cut multi-byte character, nor a possible start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":  # a character whose bytes are not all generated yet
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return end


@dataclasses.dataclass(eq=False)
class _Batch:
    """Rows generating together: their KV cache, its attention mask, each row's last position and token."""

    rows: list[_Row]
    tokens: list[int]
    mask: torch.Tensor
    positions: torch.Tensor
    cache: DynamicCache

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next forward's inputs: each row's last token, the mask grown by one, the next positions."""
        ids = torch.tensor(self.tokens, device=self.mask.device).unsqueeze(1)
        return ids, torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1), self.positions + 1

    def select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (the others finished)."""
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.rows = [self.rows[i] for i in keep]
        self.tokens = [self.tokens[i] for i in keep]

    @staticmethod
    def merge(first: _Batch, second: _Batch | None) -> _Batch:
        """One batch of the rows of both: the shorter cache is left-padded (masked) to the longer one's length."""
        if second is None:
            return first
        length = max(first.mask.shape[1], second.mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for a, b in zip(first.cache.layers, second.cache.layers):
            # DynamicLayer keeps keys and values as (batch, heads, sequence, head_dim) tensors.
            a.keys = torch.cat([pad(a.keys, 2), pad(b.keys, 2)])
            a.values = torch.cat([pad(a.values, 2), pad(b.values, 2)])
        first.mask = torch.cat([pad(first.mask, 1), pad(second.mask, 1)])
        first.positions = torch.cat([first.positions, second.positions])
        first.rows += second.rows
        first.tokens += second.tokens
        return first


class Engine:
    """Batches requests for one base model and its adapter pool on a thread of its own.

    Args:
        model: the base, from :func:`adapterkit.load_base`.
        tokenizer: its tokenizer.
        pool: the :class:`AdapterPool` on ``model``.
        base_names: the names a request's ``model`` may use for the bare base.
        batch_window: seconds to wait for more requests after the first one of a batch.
        max_batch_size: rows (prompts, texts) per model batch.
        max_tokens_limit: largest ``max_tokens`` a request may ask for (default: the context).
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, pool: AdapterPool, *, base_names: Sequence[str],
        batch_window: float = 0.005, max_batch_size: int = 16, max_tokens_limit: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise InvalidOptionError(f"max_batch_size must be at least 1, got {max_batch_size}.")
        if batch_window < 0:
            raise InvalidOptionError(f"The batching window must be 0 or more seconds, got {batch_window}.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pool = pool
        self.base_names = tuple(base_names)
        self.batch_window = batch_window
        self.max_batch_size = max_batch_size
        self.task = task_of(model)
        config = model.config
        self.context = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)
        self.max_tokens_limit = min(max_tokens_limit or self.context, self.context)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (sorted(self.eos_ids) or [0])[0]
        self.device = next(model.parameters()).device
        accepted = inspect.signature(model.forward).parameters
        self._step_kwargs: dict[str, Any] = {"use_cache": True}
        self._cache_arg = transformers_compat.cache_argument(model)
        if "logits_to_keep" in accepted:
            # Only the last position's logits are read: the LM head skips the prompt's other positions.
            self._step_kwargs["logits_to_keep"] = 1
        self.adapters: dict[str, Adapter] = {}
        self.metrics = Metrics(pool.stats, lambda: len(self.adapters))
        self.started = time.time()
        # Fast tokenizers set padding/truncation state on every call: one caller at a time.
        self._tokenizer_lock = threading.RLock()
        self._queue: queue.Queue = queue.Queue()
        #: jobs taken from the queue while a batch ran, that did not join it (they go first next time)
        self._pending: collections.deque = collections.deque()
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the model thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="adapterkit-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the jobs already queued, then stop the model thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: GenerationJob | ClassifyJob | ControlJob) -> concurrent.futures.Future:
        """Queue ``job`` for the model thread; returns its future."""
        if self._thread is None:
            raise InvalidOptionError("The engine is not running: call start() first.")
        self._queue.put(job)
        return job.future

    # --- names and tokens -------------------------------------------------------------------
    def resolve(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base), or AdapterNotFoundError."""
        if model in self.adapters:
            return model
        if model in self.base_names:
            return None
        known = [*self.base_names, *sorted(self.adapters)]
        raise AdapterNotFoundError(
            f"The model {model!r} does not exist.{did_you_mean(model, known)} Served: {', '.join(known)}. "
            "Load an adapter with POST /v1/adapters."
        )

    def encode(self, text: str, *, special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (thread-safe)."""
        with self._tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens (thread-safe)."""
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The base's chat template applied to ``messages``, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidOptionError(
                "The base model's tokenizer has no chat template, so chat messages cannot be turned into a prompt. "
                "Use /v1/completions with a prompt instead."
            )
        with self._tokenizer_lock:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def check_generation(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        """The ``max_tokens`` a generation may use, or InvalidOptionError for a prompt or budget that does not fit."""
        if self.task != "causal-lm":
            raise IncompatibleModelError(
                f"The base model is a {self.task} model; text generation needs a causal LM. Use /v1/classify."
            )
        if not prompt_ids:
            raise InvalidOptionError("The prompt is empty: it has no tokens to continue.")
        room = self.context - len(prompt_ids)
        if max_tokens is None:
            max_tokens = min(room, self.max_tokens_limit)
        if max_tokens > self.max_tokens_limit:
            raise ContextLengthError(
                f"max_tokens is {max_tokens}, above this server's limit of {self.max_tokens_limit}. Ask for fewer tokens."
            )
        if max_tokens > room:
            raise ContextLengthError(
                f"This model's context is {self.context} tokens; the prompt has {len(prompt_ids)} and max_tokens asks "
                f"for {max_tokens} more ({len(prompt_ids) + max_tokens} in all). Shorten the prompt or ask for fewer tokens."
            )
        return max_tokens

    # --- adapters ---------------------------------------------------------------------------
    def fetch(self, source: str, revision: str | None = None) -> Path:
        """The local folder of an adapter: ``source`` itself, or the Hub repo it names, downloaded (blocking I/O)."""
        found = resolve_source(source, what="adapter", error=AdapterNotFoundError)
        if found.kind == "file":
            raise AdapterNotFoundError(f"{source} is a file; pass the adapter folder that holds it.")
        if found.kind == "folder":
            return found.path
        return hub.download(found.repo_id, revision=revision)

    def load(self, name: str, source: str, folder: Path, *, pin: bool = False) -> Adapter:
        """Load the adapter in ``folder`` into the pool as ``name`` (on the model thread, between batches)."""
        if name in self.base_names:
            raise InvalidOptionError(f"{name!r} names the base model; give the adapter another name.")
        sidecar = artifacts.read_sidecar(folder) or {}
        recipe = sidecar.get("recipe") or {}
        words = recipe.get("label_words")
        self.pool.load(str(folder), name=name)
        if pin:
            self.pool.pin(name)
        adapter = Adapter(
            name=name, source=source, folder=folder, created=int(time.time()), task=sidecar.get("task"),
            label_names=sidecar.get("label_names") or recipe.get("label_names") or (list(words) if words else None),
            label_words=list(words) if words else None, instruction=recipe.get("instruction"), pinned=pin,
        )
        self.adapters[name] = adapter
        logger.info("Serving adapter '%s' from %s", name, source)
        return adapter

    def unload(self, name: str) -> None:
        """Stop serving ``name`` and free its slot (on the model thread, between batches)."""
        if name in self.base_names:
            raise InvalidOptionError(f"{name!r} is the base model; it cannot be unloaded.")
        self.resolve(name)
        self.pool.unload(name)
        del self.adapters[name]

    # --- the model thread -------------------------------------------------------------------
    def _loop(self) -> None:
        stopping = False
        while not stopping:
            jobs = [self._pending.popleft() if self._pending else self._queue.get()]
            if jobs[0] is not _STOP and not isinstance(jobs[0], ControlJob):
                self._collect(jobs)
            if jobs[-1] is _STOP:
                jobs.pop()
                stopping = True
            try:
                self._process(jobs)
            except BaseException as err:  # noqa: BLE001 - the thread must outlive any one batch
                logger.exception("A batch failed")
                for job in jobs:
                    settle(job.future, error=err)

    def _collect(self, jobs: list) -> None:
        """Add the jobs that arrive within the batching window, up to the largest batch."""
        deadline = time.monotonic() + self.batch_window
        rows = jobs[0].rows
        while rows < self.max_batch_size:
            try:
                job = self._pending.popleft() if self._pending else self._queue.get(
                    timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                return
            jobs.append(job)
            if job is _STOP or isinstance(job, ControlJob):
                return
            rows += job.rows

    def _process(self, jobs: list) -> None:
        with torch.no_grad():
            generation = [j for j in jobs if isinstance(j, GenerationJob) and self._known(j)]
            for chunk in self._chunks(generation):
                self._guarded(chunk, self._generate)
            classify = [j for j in jobs if isinstance(j, ClassifyJob) and self._known(j)]
            groups: dict[Any, list[ClassifyJob]] = {}
            for job in classify:
                groups.setdefault(self._classify_group(job), []).append(job)
            for group in groups.values():
                self._guarded(group, self._classify)
        for job in jobs:
            if isinstance(job, ControlJob):
                try:
                    settle(job.future, job.run())
                except BaseException as err:  # noqa: BLE001 - the caller gets it
                    settle(job.future, error=err)

    @staticmethod
    def _guarded(jobs: list, run: Callable[[list], None]) -> None:
        try:
            run(jobs)
        except BaseException as err:  # noqa: BLE001 - one failed batch answers its own requests only
            logger.exception("A batch of %d requests failed", len(jobs))
            for job in jobs:
                settle(job.future, error=err)

    def _known(self, job: GenerationJob | ClassifyJob) -> bool:
        """Fail a job whose adapter was unloaded while it waited."""
        if job.future.cancelled() or getattr(job, "cancelled", False):
            return False
        if job.adapter is None or job.adapter in self.adapters:
            return True
        settle(job.future, error=AdapterNotFoundError(f"The adapter {job.adapter!r} was unloaded before the request ran."))
        return False

    def _adapter_limit(self) -> tuple[set[str], int]:
        """Pinned adapters (always in a slot), and how many others one batch may name."""
        pinned = {n for n, a in self.adapters.items() if a.pinned}
        return pinned, max(1, self.pool.slots - len(pinned))

    @staticmethod
    def _fits(job: GenerationJob, names: set[str], pinned: set[str], limit: int) -> bool:
        return job.adapter is None or job.adapter in names or job.adapter in pinned or len(names) < limit

    def _chunks(self, jobs: list[GenerationJob]) -> list[list[GenerationJob]]:
        """Batches of at most ``max_batch_size`` rows naming no more adapters than the pool has free slots."""
        pinned, limit = self._adapter_limit()
        chunks: list[tuple[list, set]] = []
        for job in jobs:
            for rows, names in chunks:
                if len(rows) < self.max_batch_size and self._fits(job, names, pinned, limit):
                    break
            else:
                rows, names = [], set()
                chunks.append((rows, names))
            rows.append(job)
            if job.adapter is not None and job.adapter not in pinned:
                names.add(job.adapter)
        return [rows for rows, _ in chunks]

    def _generate(self, jobs: list[GenerationJob]) -> None:
        """Continue every job's prompt, one forward of the whole batch per token.

        Between steps, generation requests that arrived meanwhile join the running batch (their
        prompts run through one forward of their own, then their cache rows are appended), as
        long as nothing else waits: a load, an unload or a classification lets the batch drain.
        ``jobs`` grows by the requests that joined, so a failure answers them too.
        """
        batch = self._prefill(jobs)
        while batch is not None:
            batch = self._advance(batch, batch.step_inputs())
            if batch is None or len(batch.rows) >= self.max_batch_size or not self._joinable(batch):
                continue
            joiners = self._joiners(batch)
            if joiners:
                self.metrics.joined.inc(amount=len(joiners))
                jobs.extend(joiners)
                batch = _Batch.merge(batch, self._prefill(joiners))

    def _prefill(self, jobs: list[GenerationJob]) -> _Batch | None:
        """Run the prompts of ``jobs`` (left-padded) into a new cache and take each row's first token."""
        self.metrics.batch_rows.observe(len(jobs), "generate")
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.tensor([[self.pad_id] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs], device=self.device)
        # Left padding: each row's positions count its own tokens only, as for the prompt alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = _Batch([_Row(j, self) for j in jobs], [], mask, positions, DynamicCache(config=self.model.config))
        return self._advance(batch, (ids, mask, positions))

    def _advance(self, batch: _Batch, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> _Batch | None:
        """One forward of ``inputs`` for every row of ``batch``; rows that finish leave it (None: none is left)."""
        ids, mask, positions = inputs
        with self.pool.route([r.job.adapter for r in batch.rows]):
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, **self._step_kwargs,
                **{self._cache_arg: batch.cache},
            ).logits[:, -1, :]
        tokens = self._pick(logits, batch.rows)
        for row, token in zip(batch.rows, tokens):
            row.push(token)
        batch.mask, batch.positions, batch.tokens = mask, positions[:, -1:], tokens
        keep = [i for i, row in enumerate(batch.rows) if not row.done]
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            batch.select(keep)
        return batch

    def _joinable(self, batch: _Batch) -> bool:
        """Whether requests may join ``batch``: nothing else waits, and its cache is one that rows can be added to."""
        return not self._pending and all(type(layer) is DynamicLayer for layer in batch.cache.layers)

    def _joiners(self, batch: _Batch) -> list[GenerationJob]:
        """Generation requests waiting in the queue that fit in ``batch``; anything else waits in ``_pending``."""
        pinned, limit = self._adapter_limit()
        names = {r.job.adapter for r in batch.rows if r.job.adapter is not None and r.job.adapter not in pinned}
        joiners: list[GenerationJob] = []
        while len(batch.rows) + len(joiners) < self.max_batch_size and not self._pending:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(job, GenerationJob) or not self._fits(job, names, pinned, limit):
                self._pending.append(job)
            elif self._known(job):
                joiners.append(job)
                if job.adapter is not None and job.adapter not in pinned:
                    names.add(job.adapter)
        return joiners

    @staticmethod
    def _pick(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """The next token of each row: greedy at temperature 0, else sampled (with top-p)."""
        greedy = logits.argmax(-1).tolist()
        if all(r.generator is None for r in rows):
            return greedy
        scores = logits.float().cpu()
        picked = []
        for i, row in enumerate(rows):
            if row.generator is None:
                picked.append(greedy[i])
                continue
            probs = torch.softmax(scores[i] / row.job.temperature, dim=-1)
            if row.job.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # Keep the smallest set of tokens whose probability reaches top_p (the first always stays).
                outside = sorted_probs.cumsum(0) - sorted_probs >= row.job.top_p
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            picked.append(int(torch.multinomial(probs, 1, generator=row.generator)))
        return picked

    # --- classification ---------------------------------------------------------------------
    def classify_kind(self, adapter: str | None) -> str:
        """How texts are classified with ``adapter``: ``"head"`` or ``"label-words"``; else an error saying why not."""
        record = self.adapters.get(adapter) if adapter is not None else None
        if self.task == "classification":
            return "head"
        if record is not None and record.label_words:
            if self.task != "causal-lm":
                raise IncompatibleModelError(f"Label-word adapters need a causal-LM base; this one is {self.task}.")
            return "label-words"
        what = "the base model" if record is None else f"the adapter {adapter!r}"
        raise IncompatibleModelError(
            f"{what} cannot classify: the base is a {self.task} model without a classification head, and "
            f"{'it records no label words' if record is not None else 'only adapters record label words'} "
            "(recipe.label_words, from recipes/fewshot_causal_lm.py). Use /v1/completions to generate text."
        )

    def labels_of(self, adapter: str | None) -> list[str]:
        """The class names ``adapter`` (None: the base) predicts, in id order."""
        record = self.adapters.get(adapter) if adapter is not None else None
        if record is not None and record.label_names:
            return list(record.label_names)
        names = base_label_names(self.model)
        return names or [str(i) for i in range(getattr(self.model.config, "num_labels", 2))]

    def _classify_group(self, job: ClassifyJob) -> Any:
        # Rows of one batch must agree on the head's width, or on the label words they score.
        record = self.adapters.get(job.adapter) if job.adapter is not None else None
        if self.task == "classification" or record is None or not record.label_words:
            return ("head", len(self.labels_of(job.adapter)))
        return ("label-words", tuple(record.label_words), record.instruction)

    def _classify(self, jobs: list[ClassifyJob]) -> None:
        rows = [(job, text) for job in jobs for text in job.texts]
        kind = self._classify_group(jobs[0])
        probs: list[torch.Tensor] = []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start : start + self.max_batch_size]
            self.metrics.batch_rows.observe(len(chunk), "classify")
            names = [job.adapter for job, _ in chunk]
            if kind[0] == "head":
                with self._tokenizer_lock:
                    enc = self.tokenizer([t for _, t in chunk], padding=True, truncation=True, max_length=self.context,
                                         return_tensors="pt").to(self.device)
                with self.pool.route(names):
                    logits = self.model(**enc).logits
                probs.extend(logits.float().softmax(-1).cpu())
            else:
                _, words, instruction = kind
                template = PromptTemplate(instruction=instruction or PromptTemplate().instruction)
                prompts = [template.render(t) for _, t in chunk]
                with self._tokenizer_lock, self.pool.route(names):
                    scores = score_label_words(self.model, self.tokenizer, prompts, list(words),
                                               batch_size=len(prompts), max_length=self.context)
                # Log-likelihoods of the label words, normalised over them: a distribution over the classes.
                probs.extend(scores.float().softmax(-1))
        results: dict[int, list] = {id(job): [] for job in jobs}
        for (job, _), p in zip(rows, probs):
            labels = self.labels_of(job.adapter)
            scores = {label: float(v) for label, v in zip(labels, p.tolist())}
            results[id(job)].append({"label": labels[int(p.argmax())], "scores": scores})
        for job in jobs:
            settle(job.future, results[id(job)])


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Token ids that end a generation: the generation config's and the tokenizer's end of sequence."""
    found: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return found
