"""Hyper-parameter sweeps for the recipes: a grid of trials picked on rows carved from the training data.

    python recipes/text_classification.py --sweep learning_rate=1e-4,3e-4,1e-3 num_epochs=1,3
    adapterkit train fewshot_causal_lm --sweep adapter.r=4,8 learning_rate=3e-4,1e-3 --sweep-metric macro_f1

Every trial trains a fresh base and adapter on the training rows minus a stratified, seeded dev
split (``--sweep-dev``) and is scored on that split only; the evaluation split is used once, for
the configuration picked. That configuration is then retrained on all the training rows (or,
with ``--sweep-keep-best``, the best trial's adapter is kept), evaluated, and saved by the recipe
like any run, with the sweep recorded in its sidecar; every trial (values, dev metrics, train
seconds, or its error) is printed as a table and written to ``<output_dir>/sweep.json``.

A recipe takes part in three steps: :func:`parse_options` instead of
:func:`adapterkit.options.parse_options` (it also returns the :class:`Sweep` asked for, or None),
a ``fit(options, train, evaluation) -> Fitted`` that trains one configuration on a fresh base and
measures it, and an ``evaluate(options, fitted, rows)`` for the kept adapter; :meth:`Sweep.run`
does the rest. transformers' ``Trainer.hyperparameter_search`` needs optuna or ray, which are not
dependencies of adapterkit; this plain grid needs neither.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import datasets
import torch
import transformers

import adapterkit as ak
import adapterkit.data as akdata
import adapterkit.options as options
from adapterkit.errors import InvalidOptionError, did_you_mean

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The dev metrics a sweep can pick by (higher is better); the recipes report both.
METRICS = ("accuracy", "macro_f1")

#: Options the recipes read before any trial runs (the data, where results go): sweeping them
#: would not change what the trials train on, so they are refused as sweep keys.
FIXED_OPTIONS = ("dataset", "train_file", "eval_file", "text_column", "label_column", "label_names",
                 "max_train_rows", "max_eval_rows", "output_dir", "name", "publish", "results_json")

SWEEP_FILE = "sweep.json"

HELP = """\
hyper-parameter sweep (each trial on a fresh base, picked on a dev split of the training rows):
  --sweep KEY=V1,V2 [KEY=V1,V2 ...]  values to try, parsed like the flags (KEY.SUB for dict
                                     options such as adapter.r=4,8); the grid is their product
  --sweep-trials N                   N random configurations from the grid instead of all
  --sweep-seed S                     seed of the dev split and of the random draws (default: 0)
  --sweep-dev SIZE                   dev rows carved from the training data, stratified: a
                                     fraction in (0, 1) or a count (default: {dev})
  --sweep-metric NAME                dev metric to pick by: {metrics} (default: accuracy)
  --sweep-keep-best                  keep the best trial's adapter instead of retraining the
                                     chosen configuration on all training rows
"""

_FLAGS = ("--sweep", "--sweep-trials", "--sweep-seed", "--sweep-dev", "--sweep-metric", "--sweep-keep-best")


@dataclasses.dataclass
class Fitted:
    """One trained configuration, as a recipe's ``fit`` returns it.

    Attributes:
        model: the model with the trained adapter.
        tokenizer: its tokenizer.
        metrics: measured on the rows ``fit`` was given to evaluate: at least :data:`METRICS`.
        train_seconds: wall time of training.
        name: the adapter's name on ``model``.
        result: anything else the recipe wants back (its ``TrainResult``).
    """

    model: Any
    tokenizer: Any
    metrics: dict[str, Any]
    train_seconds: float
    name: str = "default"
    result: Any = None


@dataclasses.dataclass
class Trial:
    """One configuration of a sweep and how it did on the dev split."""

    number: int
    values: dict[str, Any]
    output_dir: str
    metrics: dict[str, Any] | None = None
    train_seconds: float | None = None
    seconds: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the trial trained and was scored."""
        return self.error is None and self.metrics is not None

    def score(self, metric: str) -> float:
        """The dev ``metric``; -inf for a failed trial or a metric that is not a number (NaN)."""
        value = (self.metrics or {}).get(metric) if self.ok else None
        return float(value) if _number(value) else -math.inf

    def as_dict(self) -> dict[str, Any]:
        """The trial as ``sweep.json`` holds it."""
        metrics = {k: v for k, v in (self.metrics or {}).items() if isinstance(v, (int, float, str, list))}
        return {"trial": self.number, "values": self.values, "status": "ok" if self.ok else "failed",
                "dev": metrics or None, "train_seconds": _rounded(self.train_seconds),
                "seconds": _rounded(self.seconds), "error": self.error, "output_dir": self.output_dir}


@dataclasses.dataclass
class Tuned:
    """What :meth:`Sweep.run` hands back to the recipe to save and report.

    Attributes:
        options: the chosen configuration (with the run's own ``output_dir``).
        fitted: the final adapter, retrained on all training rows or the best trial's; its
            ``metrics`` are on the evaluation split.
        trials: every trial, in the order run.
        best: the trial picked.
        path: the ``sweep.json`` written.
        record: the summary recorded in the adapter's sidecar under ``recipe.sweep``.
    """

    options: Any
    fitted: Fitted
    trials: list[Trial]
    best: Trial
    path: Path
    record: dict[str, Any]

    def table(self) -> str:
        """Every trial as an aligned table (the best marked ``*``), then what was kept and its score."""
        return format_table(self.trials, self.record["metric"], best=self.best) + "\n" + self.record["outcome"]

    def summary(self) -> dict[str, Any]:
        """Flat entries for the recipe's results table."""
        failed = sum(not t.ok for t in self.trials)
        return {
            "sweep_trials": len(self.trials) if not failed else f"{len(self.trials)} ({failed} failed)",
            "sweep_best": _describe(self.best.values),
            "sweep_final": self.record["final"],
            f"sweep_dev_{self.record['metric']}": round(self.best.score(self.record["metric"]), 4),
            "sweep_json": str(self.path),
        }


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A sweep as ``--sweep`` and its companion flags ask for it (see :data:`HELP`).

    Attributes:
        grid: each key (an option, or ``option.key`` inside a dict option) and the values to try,
            in the order given; the configurations are their cartesian product.
        trials: random configurations drawn from the grid, without repeats; None runs them all.
        seed: seeds the dev split and the random draws.
        dev: dev rows carved from the training rows: a fraction in (0, 1) or a count.
        metric: the dev metric to pick by (higher is better); ties go to the earlier trial.
        keep_best: keep the best trial's adapter instead of retraining on all training rows.
    """

    grid: dict[str, list[Any]]
    trials: int | None = None
    seed: int = 0
    dev: int | float = 0.1
    metric: str = "accuracy"
    keep_best: bool = False

    def points(self) -> list[dict[str, Any]]:
        """The configurations to try, in order: the grid's product, or ``trials`` draws from it."""
        keys = list(self.grid)
        every = [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]
        if self.trials is None or self.trials >= len(every):
            return every
        picked = sorted(random.Random(self.seed).sample(range(len(every)), self.trials))
        return [every[i] for i in picked]

    def dev_split(
        self, rows: datasets.Dataset, *, exclude: datasets.Dataset | None = None
    ) -> tuple[datasets.Dataset, datasets.Dataset]:
        """``(rest, dev)``: a stratified, seeded dev split of ``rows``.

        Args:
            rows: labelled rows (``text``, ``label``) of the training data.
            exclude: rows that must not be dev rows (a few-shot recipe's training shots): rows
                with the same text are left out of ``rows`` first.

        Raises:
            DataError / InvalidOptionError: too few rows for a dev split of this size.
        """
        if exclude is not None and len(exclude):
            taken = set(exclude["text"])
            rows = rows.filter(lambda text: text not in taken, input_columns="text")
        return akdata.stratified_split(rows, self.dev, seed=self.seed)

    def apply(self, base: T, values: dict[str, Any], **changes: Any) -> T:
        """``base`` with a configuration's ``values`` (``adapter.r`` sets ``r`` in ``base.adapter``)."""
        updates: dict[str, Any] = {}
        for key, value in values.items():
            field, _, inner = key.partition(".")
            if inner:
                updates[field] = {**updates.get(field, getattr(base, field) or {}), inner: value}
            else:
                updates[field] = value
        return dataclasses.replace(base, **updates, **changes)

    def run(
        self,
        base: T,
        train: datasets.Dataset,
        evaluation: datasets.Dataset,
        *,
        fit: Callable[[T, datasets.Dataset, datasets.Dataset], Fitted],
        evaluate: Callable[[T, Fitted, datasets.Dataset], dict[str, Any]],
        dev: datasets.Dataset | None = None,
    ) -> Tuned:
        """Run every trial, pick the best on the dev split, then retrain it (or keep it) and evaluate once.

        Args:
            base: the recipe's options; each trial replaces the swept values and trains under
                ``<output_dir>/trials/trial-NN``.
            train: the training rows of the final run.
            evaluation: the evaluation split: only the final adapter is measured on it.
            fit: trains one configuration on a fresh base: ``fit(options, train, rows)`` returns a
                :class:`Fitted` with its metrics on ``rows``.
            evaluate: measures a :class:`Fitted` on other rows (the kept trial on ``evaluation``).
            dev: rows to pick by, disjoint from ``train`` (the trials then train on all of
                ``train``); default: :meth:`dev_split` of ``train``, the trials training on the rest.

        Returns:
            A :class:`Tuned`; ``<output_dir>/sweep.json`` holds every trial (it is rewritten after
            each one, so an interrupted sweep leaves what it measured).

        Raises:
            InvalidOptionError: every trial failed (each one's error is listed), or the sweep was
                started in several processes (torchrun), which it does not coordinate.
        """
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InvalidOptionError(
                "--sweep runs its trials in one process; start it without torchrun/accelerate (each trial "
                "still uses the accelerator the process sees)."
            )
        root = Path(base.output_dir)
        given = dev is not None
        trial_train, dev = (train, dev) if given else self.dev_split(train)
        data = {"train_rows": len(train), "trial_train_rows": len(trial_train), "dev_rows": len(dev),
                "eval_rows": len(evaluation), "dev_size": self.dev,
                "dev_from": "training data the trials do not train on" if given else "carved from the training rows"}
        points = self.points()
        trials: list[Trial] = []
        best: Trial | None = None
        kept: Fitted | None = None
        logger.info("Sweep: %d configurations of %d, trained on %d rows, picked by dev %s on %d rows (%s)", len(points),
                    math.prod(len(v) for v in self.grid.values()), len(trial_train), self.metric, len(dev), data["dev_from"])
        for number, values in enumerate(points, 1):
            trial = Trial(number, values, output_dir=str(root / "trials" / f"trial-{number:02d}"))
            logger.info("Sweep trial %d/%d: %s", number, len(points), _describe(values))
            fitted = self._trial(trial, self.apply(base, values, output_dir=trial.output_dir), trial_train, dev, fit)
            trials.append(trial)
            if trial.ok and (best is None or trial.score(self.metric) > best.score(self.metric)):
                best = trial
                kept = fitted if self.keep_best else None
            del fitted
            _release()
            self._write(root, trials, data, best=best)
        if best is None:
            errors = "\n".join(f"  - trial {t.number} ({_describe(t.values)}): {t.error}" for t in trials)
            raise InvalidOptionError(f"All {len(trials)} sweep trials failed, so there is nothing to pick:\n{errors}\n"
                                     "Fix the values named above (or the options they share) and run the sweep again.")
        chosen = self.apply(base, best.values)
        if kept is not None:
            final, how = kept, f"kept trial {best.number}'s adapter (trained on {len(trial_train)} rows)"
            final.metrics = evaluate(chosen, final, evaluation)
        else:
            logger.info("Sweep: retraining trial %d's configuration on all %d training rows", best.number, len(train))
            transformers.set_seed(getattr(chosen, "seed", 0))
            final, how = fit(chosen, train, evaluation), f"retrained on all {len(train)} training rows"
        outcome = (f"best: trial {best.number} ({_describe(best.values)}), dev {self.metric} "
                   f"{best.score(self.metric):.4f}; {how}: eval " +
                   ", ".join(f"{k} {final.metrics[k]:.4f}" for k in METRICS if _number(final.metrics.get(k))))
        path = self._write(root, trials, data, best=best, final=final, outcome=outcome)
        # The sidecar travels with the adapter (sweep.json stays beside it): the whole table, compact.
        table = [{"trial": t.number, "values": t.values, "train_seconds": _rounded(t.train_seconds), "error": t.error,
                  "dev": {m: t.metrics[m] for m in METRICS if t.ok and _number(t.metrics.get(m))} or None} for t in trials]
        record = {"metric": self.metric, "grid": self.grid, "sampled": self.trials, "seed": self.seed, **data,
                  "best_trial": best.number, "chosen": best.values,
                  "dev_metrics": {m: best.metrics[m] for m in METRICS if _number((best.metrics or {}).get(m))},
                  "kept_best": kept is not None, "final": how, "outcome": outcome, "trials": table}
        _record_on_adapter(final, record, kept=kept is not None, dev_metrics=best.metrics or {})
        return Tuned(options=chosen, fitted=final, trials=trials, best=best, path=path, record=record)

    def _trial(self, trial: Trial, opts: Any, train: datasets.Dataset, dev: datasets.Dataset,
               fit: Callable[..., Fitted]) -> Fitted | None:
        started = time.perf_counter()
        fitted = None
        try:
            # Seeded here, not only inside Trainer: an adapter's initial weights are drawn when it is
            # attached, and must not depend on how many random numbers the trials before it used.
            transformers.set_seed(getattr(opts, "seed", 0))
            fitted = fit(opts, train, dev)
            trial.metrics, trial.train_seconds = dict(fitted.metrics), fitted.train_seconds
            score = trial.metrics.get(self.metric)
            if not _number(score):
                raise InvalidOptionError(f"dev {self.metric} is {score!r}, not a number" if self.metric in trial.metrics
                                         else f"no dev {self.metric} was reported (only {sorted(trial.metrics)})")
        # Any failure of one configuration (a value the strategy refuses, a diverging run, memory)
        # is that trial's result, not the sweep's end: it is reported and the next trial runs.
        except Exception as err:  # noqa: BLE001
            trial.error = f"{type(err).__name__}: {err}"
            trial.metrics = None
            fitted = None
            logger.warning("Sweep trial %d failed: %s", trial.number, trial.error)
            logger.debug("Sweep trial %d traceback", trial.number, exc_info=True)
        trial.seconds = time.perf_counter() - started
        if trial.ok:
            logger.info("Sweep trial %d: dev %s %.4f (train %.1f s)", trial.number, self.metric,
                        trial.score(self.metric), trial.train_seconds or 0.0)
        return fitted

    def _write(self, root: Path, trials: list[Trial], data: dict[str, Any], *, best: Trial | None,
               final: Fitted | None = None, outcome: str | None = None) -> Path:
        content = {
            "metric": self.metric, "grid": self.grid, "sampled": self.trials, "seed": self.seed,
            "keep_best": self.keep_best, **data,
            "trials": [t.as_dict() for t in trials],
            "best": None if best is None else {"trial": best.number, "values": best.values,
                                               f"dev_{self.metric}": best.score(self.metric)},
            "final": None if final is None else {"how": "kept best trial" if self.keep_best else "retrained",
                                                 "eval": _plain(final.metrics), "train_seconds": _rounded(final.train_seconds),
                                                 "outcome": outcome},
        }
        root.mkdir(parents=True, exist_ok=True)
        path = root / SWEEP_FILE
        tmp = path.with_name(f".{SWEEP_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(content, indent=2, default=str) + "\n")
        os.replace(tmp, path)  # a reader sees the previous table or the new one, never half of one
        return path


def parse_options(
    cls: type[T],
    argv: list[str] | None = None,
    *,
    description: str | None = None,
    fixed: Sequence[str] = FIXED_OPTIONS,
    dev: int | float = 0.1,
    metrics: Sequence[str] = METRICS,
) -> tuple[T, Sweep | None]:
    """A recipe's options (:func:`adapterkit.options.parse_options`) and the sweep its flags ask for.

    Args:
        cls: the recipe's options dataclass (it needs an ``output_dir`` field for a sweep).
        argv: the command line (default: ``sys.argv[1:]``).
        description: shown by ``--help``, followed by the sweep flags.
        fixed: options that cannot be swept (read before the trials run).
        dev: the default of ``--sweep-dev``.
        metrics: the names ``--sweep-metric`` accepts.

    Returns:
        ``(options, sweep)``; ``sweep`` is None without ``--sweep``.

    Raises:
        InvalidOptionError: an unknown or fixed sweep key (the valid ones are listed), a value of
            the wrong type, a bad companion flag, or any problem of the options themselves; all of
            them before anything trains.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--sweep", nargs="+", action="extend", default=None)
    for flag in ("--sweep-trials", "--sweep-seed", "--sweep-dev", "--sweep-metric"):
        parser.add_argument(flag, default=None)
    parser.add_argument("--sweep-keep-best", action="store_true")
    args, rest = parser.parse_known_args(argv)
    problems, kept = [], []
    for i, arg in enumerate(rest):
        if arg.startswith("--sweep"):
            flag = arg.split("=")[0]
            problems.append(f"unknown flag '{flag}'.{did_you_mean(flag, _FLAGS)}")
        elif not (i and rest[i - 1].startswith("--sweep") and "=" not in rest[i - 1] and not arg.startswith("--")):
            kept.append(arg)  # (what follows an unknown --sweep-* flag is its value, reported with it)
    rest = kept
    sweep = None
    if args.sweep is not None:
        sweep, found = _build(cls, args, fixed=fixed, dev=dev, metrics=metrics)
        problems += found
    elif any(getattr(args, name) is not None for name in ("sweep_trials", "sweep_seed", "sweep_dev", "sweep_metric")) \
            or args.sweep_keep_best:
        problems.append("the --sweep-* flags shape a sweep: add --sweep KEY=V1,V2 (e.g. --sweep learning_rate=1e-4,1e-3)")
    message = "Invalid sweep:\n  - " + "\n  - ".join(problems) if problems else ""
    try:
        parsed = options.parse_options(cls, rest, description=description,
                                       epilog=HELP.format(dev=dev, metrics=", ".join(metrics)))
    except InvalidOptionError as err:
        if message:
            raise InvalidOptionError(f"{err}\n{message}") from err
        raise
    if message:
        raise InvalidOptionError(message)
    return parsed, sweep


def parse_grid(cls: type, items: Sequence[str], *, fixed: Sequence[str] = FIXED_OPTIONS) -> tuple[dict[str, list[Any]], list[str]]:
    """``["learning_rate=1e-4,1e-3", "adapter.r=4,8"]`` as a grid of typed values, checked against ``cls``.

    Values are split at commas outside brackets and quotes (``label_words=["bad","good"],["neg","pos"]``)
    and parsed like the recipe's flags (JSON where it parses, else text), then type-checked
    against the options dataclass. ``option.key`` sets one key of a dict option (``adapter.r``);
    those values reach the strategy unchecked, and a value it refuses fails only its trials.

    Returns:
        ``(grid, problems)``: one problem line per bad item (empty when all are fine).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    tunable = sorted(name for name in fields if name not in fixed)
    grid: dict[str, list[Any]] = {}
    problems = []
    for item in items:
        key, eq, text = item.partition("=")
        field, dot, inner = key.strip().partition(".")
        field = field.replace("-", "_")
        key = f"{field}{dot}{inner}"
        if not eq or not key:
            problems.append(f"{item!r} is not KEY=V1,V2,... (e.g. learning_rate=1e-4,1e-3)")
            continue
        if field not in fields or field in fixed:
            why = "is read before the trials run, so it cannot be swept" if field in fields else "is no option of this recipe"
            problems.append(f"'{field}' {why}.{did_you_mean(field, tunable)} Sweepable: {', '.join(tunable)}.")
            continue
        if dot and (not inner or not isinstance(options.default_of(fields[field]), dict)):
            problems.append(f"'{key}': only dict options take KEY.SUB (e.g. adapter.r); '{field}' is not one")
            continue
        parts = _split_values(text)
        if not parts or any(not p for p in parts):
            problems.append(f"'{key}' has an empty value in {text!r}: list values separated by commas")
            continue
        values = [options.parse_value(p) for p in parts]
        if not dot:
            checked = [options.check_values(cls, {key: v}) for v in values]
            wrong = [line for _, found in checked for line in found]
            if wrong:
                problems += wrong
                continue
            values = [c[key] for c, _ in checked]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) < len(values):
            problems.append(f"'{key}' lists a value twice: {text}")
        if key in grid:
            problems.append(f"'{key}' is swept twice: give all its values in one KEY=V1,V2")
        grid[key] = values
    nested = [k for k in grid if "." in k and k.partition(".")[0] in grid]
    if nested:
        problems.append(f"{nested} set keys inside an option that is swept whole too: sweep one or the other")
    return grid, problems


def format_table(trials: Sequence[Trial], metric: str = "accuracy", *, best: Trial | None = None) -> str:
    """Trials as an aligned text table: values, dev metrics, train seconds, status (errors shortened)."""
    keys = list(dict.fromkeys(k for t in trials for k in t.values))
    header = ["trial", *keys, *(f"dev {m}" for m in METRICS), "train s", "status"]
    rows = []
    for t in trials:
        mark = "*" if best is not None and t.number == best.number else ""
        dev = [f"{t.metrics[m]:.4f}" if t.ok and _number(t.metrics.get(m)) else "-" for m in METRICS]
        status = "ok" if t.ok else "failed: " + _shortened(t.error or "")
        rows.append([f"{t.number}{mark}", *(_text(t.values.get(k, "")) for k in keys), *dev,
                     f"{t.train_seconds:.1f}" if t.train_seconds is not None else "-", status])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines) + (f"\n(* picked by dev {metric})" if best is not None else "")


def _build(cls: type, args: argparse.Namespace, *, fixed: Sequence[str], dev: int | float,
           metrics: Sequence[str]) -> tuple[Sweep | None, list[str]]:
    """The :class:`Sweep` of parsed flags, or the problems with them."""
    problems = []
    if "output_dir" not in {f.name for f in dataclasses.fields(cls)}:
        problems.append(f"{cls.__name__} has no output_dir option to put the trials under")
    grid, found = parse_grid(cls, args.sweep, fixed=fixed)
    problems += found
    if not args.sweep:
        problems.append("--sweep needs KEY=V1,V2 items (e.g. --sweep learning_rate=1e-4,1e-3 num_epochs=1,3)")

    def number(flag: str, text: str | None, default: Any, ok: Callable[[Any], bool], expected: str) -> Any:
        if text is None:
            return default
        value = options.parse_value(text)
        if isinstance(value, bool) or not ok(value):
            problems.append(f"{flag} must be {expected}, got {text!r}")
            return default
        return value

    trials = number("--sweep-trials", args.sweep_trials, None, lambda v: isinstance(v, int) and v >= 1, "a positive int")
    seed = number("--sweep-seed", args.sweep_seed, 0, lambda v: isinstance(v, int) and 0 <= v < 2**32, "an int >= 0")
    dev = number("--sweep-dev", args.sweep_dev, dev,
                 lambda v: (isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v < 1),
                 "a fraction in (0, 1) or a row count >= 1")
    metric = args.sweep_metric or "accuracy"
    if metric not in metrics:
        problems.append(f"--sweep-metric must be one of {', '.join(metrics)}, got {metric!r}.{did_you_mean(metric, metrics)}")
    if problems:
        return None, problems
    return Sweep(grid=grid, trials=trials, seed=seed, dev=dev, metric=metric, keep_best=args.sweep_keep_best), []


def _record_on_adapter(final: Fitted, record: dict[str, Any], *, kept: bool, dev_metrics: dict[str, Any]) -> None:
    """Put the sweep in the adapter's recorded recipe, so the recipe's ``ak.save`` writes it to the sidecar."""
    meta = ak.get_adapter_record(final.model, final.name).meta
    meta["recipe"] = {**(meta.get("recipe") or {}), "sweep": _plain(record)}
    if kept:
        # The kept trial was evaluated on the dev rows during training: those numbers are dev
        # metrics, and the evaluation split's are the ones measured just now.
        recorded = meta.get("metrics") or {}
        meta["metrics"] = {**{("dev_" + k[5:] if k.startswith("eval_") else k): v for k, v in recorded.items()},
                           **{f"dev_{k}": v for k, v in dev_metrics.items() if k in METRICS},
                           **{f"eval_{k}": final.metrics[k] for k in METRICS if _number(final.metrics.get(k))}}


def _split_values(text: str) -> list[str]:
    """``text`` split at commas that are outside brackets, braces and double quotes."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if quoted:
            quoted = not (ch == '"' and text[i - 1] != "\\")
        elif ch == '"':
            quoted = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts if text.strip() else []


def _release() -> None:
    """Free a finished trial's model before the next one loads its base."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _shortened(error: str, width: int = 120) -> str:
    """An error on one line, cut to ``width`` characters (sweep.json keeps it whole)."""
    flat = " ".join(error.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _describe(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={_text(v)}" for k, v in values.items())


def _plain(value: Any) -> Any:
    """``value`` as plain JSON data (what a sidecar can hold)."""
    return json.loads(json.dumps(value, default=str))
