"""Hyper-parameter sweeps: grid parsing and its errors, picking on a dev split of the training
rows only, failed trials, the table and sweep.json, and real tiny sweeps through the recipes and
`adapterkit train`."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import datasets
import pytest

import adapterkit as ak
import adapterkit.sweep as sweep
from adapterkit.cli import load_recipe as recipe
from adapterkit.cli import main as cli
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]


#: A recipe's options, as the sweep sees them (``dataset`` and ``output_dir`` cannot be swept).
Opts = dataclasses.make_dataclass("Opts", [
    ("model", str, "tiny"), ("strategy", str, "lora"), ("adapter", dict, dataclasses.field(default_factory=dict)),
    ("learning_rate", float | None, None), ("num_epochs", float, 3.0), ("label_words", list | None, None),
    ("seed", int, 0), ("dataset", str | None, "sst2"), ("output_dir", str, "runs/x"), ("name", str, "default"),
])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, root / arch) for arch in ("bert", "llama")}


def toy_rows(n: int, offset: int = 0) -> list[tuple[str, str]]:
    """Separable toy sentences: "pos" rows use words w6..w29, "neg" rows w30..w59; texts are unique."""
    rng = random.Random(offset)
    rows = []
    for i in range(offset, offset + n):
        words = [f"w{rng.randrange(6, 30) if i % 2 else rng.randrange(30, 60)}" for _ in range(5)]
        rows.append((" ".join([*words, f"w{6 + i % 24 if i % 2 else 30 + i % 30}"]), "pos" if i % 2 else "neg"))
    return list(dict.fromkeys(rows))


def write_csv(path: Path, rows: list[tuple[str, str]]) -> str:
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return str(path)


@pytest.fixture
def toy_files(tmp_path):
    rows = toy_rows(80)
    return write_csv(tmp_path / "train.csv", rows[:64]), write_csv(tmp_path / "eval.csv", rows[64:])


def table(n: int, offset: int = 0) -> datasets.Dataset:
    rows = toy_rows(n, offset)
    return datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [int(y == "pos") for _, y in rows]})


# --- parsing --------------------------------------------------------------------------------
def test_sweep_flags_parse_like_the_recipe_flags():
    opts, tuning = sweep.parse_options(Opts, [
        "--num-epochs", "2", "--sweep", "learning_rate=1e-4,3e-4,1e-3", "num_epochs=1,3",
        "--sweep", "adapter.r=4,8", 'label_words=["bad","good"],["neg, really","pos"]', "--sweep-trials", "5",
        "--sweep-seed", "3", "--sweep-dev", "0.2", "--sweep-metric", "macro_f1", "--sweep-keep-best",
    ])
    assert opts.num_epochs == 2 and opts.learning_rate is None
    assert tuning.grid == {"learning_rate": [1e-4, 3e-4, 1e-3], "num_epochs": [1, 3], "adapter.r": [4, 8],
                           "label_words": [["bad", "good"], ["neg, really", "pos"]]}
    assert (tuning.trials, tuning.seed, tuning.dev, tuning.metric, tuning.keep_best) == (5, 3, 0.2, "macro_f1", True)
    points = tuning.points()
    assert len(points) == 5 and points == tuning.points()  # seeded draws, no repeats
    assert len({json.dumps(p, sort_keys=True) for p in points}) == 5
    every = dataclasses.replace(tuning, trials=None).points()
    assert len(every) == 3 * 2 * 2 * 2 and every[0] == {"learning_rate": 1e-4, "num_epochs": 1, "adapter.r": 4,
                                                         "label_words": ["bad", "good"]}
    assert all(p in every for p in points)
    # A dict option's key is set inside the base value; the rest of it stays.
    applied = tuning.apply(dataclasses.replace(opts, adapter={"r": 2, "lora_alpha": 16}), every[-1], output_dir="o")
    assert applied.adapter == {"r": 8, "lora_alpha": 16} and applied.output_dir == "o" and applied.learning_rate == 1e-3
    assert sweep.parse_options(Opts, ["--seed", "1"]) == (Opts(seed=1), None)


@pytest.mark.parametrize("argv,message", [
    (["--sweep", "learning_rte=1e-4,1e-3"], r"'learning_rte' is no option.*Did you mean 'learning_rate'.*Sweepable: "
                                             r"adapter, label_words, learning_rate, model, num_epochs, seed, strategy\."),
    (["--sweep", "dataset=sst2,trec"], "'dataset' is read before the trials run"),
    (["--sweep", "num_epochs=1,many"], "num_epochs: expected .*float.*got 'many'"),
    (["--sweep", "learning_rate=1e-4,,1e-3"], "empty value"),
    (["--sweep", "learning_rate"], "is not KEY=V1,V2"),
    (["--sweep", "seed.x=1,2"], "only dict options take KEY.SUB"),
    (["--sweep", "seed=1,1"], "lists a value twice"),
    (["--sweep", "seed=1,2", "--sweep", "seed=3"], "swept twice"),
    (["--sweep", "adapter={}", "adapter.r=4"], "swept whole too"),
    (["--sweep", "seed=1,2", "--sweep-dev", "1.5"], "--sweep-dev must be a fraction"),
    (["--sweep", "seed=1,2", "--sweep-trials", "0"], "--sweep-trials must be a positive int"),
    (["--sweep", "seed=1,2", "--sweep-metric", "acc"], "--sweep-metric must be one of accuracy, macro_f1"),
    (["--sweep", "seed=1,2", "--sweep-metrics", "accuracy"], "unknown flag '--sweep-metrics'. Did you mean '--sweep-metric'"),
    (["--sweep-trials", "3"], "add --sweep KEY=V1,V2"),
    (["--sweep", "seed=1,2", "--bogus", "1"], r"unknown option 'bogus'"),
])
def test_bad_sweeps_are_refused_before_anything_runs(argv, message):
    with pytest.raises(ak.InvalidOptionError, match=message):
        sweep.parse_options(Opts, argv)


def test_recipe_refuses_a_bad_sweep_before_loading_anything(tiny, toy_files, tmp_path, capsys):
    train, evaluation = toy_files
    out = tmp_path / "bad"
    assert cli(["train", "text_classification", "--model", tiny["bert"], "--train-file", train, "--eval-file", evaluation,
                "--output-dir", str(out), "--sweep", "learning_rate=1e-3,fast", "max_train_rows=8,16"]) == 2
    err = capsys.readouterr().err
    assert "learning_rate: expected" in err and "'max_train_rows' is read before the trials run" in err
    assert "Sweepable: adapter, batch_size, bits, learning_rate" in err
    assert not out.exists()


# --- the trial loop (a fit that scores by rule, on a real tiny model) ----------------------------
class Recorder:
    """A recipe's fit and evaluate whose dev score is a known function of the learning rate."""

    SCORES = {0.1: 0.6, 0.2: 0.9, 0.3: 0.9, 0.4: float("nan")}

    def __init__(self, model: str) -> None:
        self.model = model
        self.fits: list[tuple[Opts, datasets.Dataset, datasets.Dataset]] = []
        self.evaluated: list[datasets.Dataset] = []

    def fit(self, opts: Opts, train: datasets.Dataset, rows: datasets.Dataset) -> sweep.Fitted:
        self.fits.append((opts, train, rows))
        if opts.learning_rate == 0.5:
            raise ak.InvalidOptionError("learning_rate 0.5 diverges")
        model, tokenizer = ak.load_base(self.model, task="classification", num_labels=2)
        ak.attach(model, "head", name=opts.name)
        score = self.SCORES[opts.learning_rate] + opts.num_epochs / 100
        return sweep.Fitted(model, tokenizer, {"accuracy": score, "macro_f1": 1 - score}, 0.5, name=opts.name)

    def evaluate(self, opts: Opts, fitted: sweep.Fitted, rows: datasets.Dataset) -> dict:
        self.evaluated.append(rows)
        return {"accuracy": 0.75, "macro_f1": 0.7}


def texts(rows: datasets.Dataset) -> set[str]:
    return set(rows["text"])


def test_picks_by_dev_metric_on_training_rows_only(tiny, tmp_path):
    train, evaluation = table(60), table(20, offset=1000)
    tuning = sweep.Sweep(grid={"learning_rate": [0.1, 0.2, 0.3, 0.4, 0.5], "num_epochs": [1, 2]}, dev=0.25, seed=1)
    rec = Recorder(tiny["bert"])
    tuned = tuning.run(Opts(output_dir=str(tmp_path / "run")), train, evaluation, fit=rec.fit, evaluate=rec.evaluate)
    trials, final = rec.fits[:-1], rec.fits[-1]
    assert len(trials) == 10 and len(tuned.trials) == 10
    # Every trial trains on the same rows of the training data and is scored on other training rows.
    dev = texts(trials[0][2])
    assert len(dev) == 15 and dev <= texts(train) and not dev & texts(trials[0][1])
    assert all(texts(t) == texts(trials[0][1]) and texts(d) == dev for _, t, d in trials)
    assert texts(trials[0][1]) | dev == texts(train)
    assert all(not texts(d) & texts(evaluation) for _, _, d in trials)
    labels = trials[0][2]["label"]
    assert labels.count(0) in (7, 8)  # stratified: the classes are balanced in train
    # lr 0.2/0.3 tie at 0.9 (+ epochs / 100): the earlier trial with 2 epochs wins; NaN and errors never do.
    assert tuned.best.values == {"learning_rate": 0.2, "num_epochs": 2} and tuned.best.number == 4
    assert tuned.options.learning_rate == 0.2 and tuned.options.output_dir == str(tmp_path / "run")
    # Retrained once on all training rows and evaluated on the evaluation split by fit, never by evaluate.
    assert final[0].learning_rate == 0.2 and texts(final[1]) == texts(train) and texts(final[2]) == texts(evaluation)
    assert rec.evaluated == [] and tuned.fitted.metrics["accuracy"] == pytest.approx(0.92)
    assert [t.output_dir for t in tuned.trials][:2] == [str(tmp_path / "run" / "trials" / f"trial-0{i}") for i in (1, 2)]
    failed = [t for t in tuned.trials if not t.ok]
    assert [t.values["learning_rate"] for t in failed] == [0.4, 0.4, 0.5, 0.5]
    assert failed[0].error == "InvalidOptionError: dev accuracy is nan, not a number"
    assert failed[2].error == "InvalidOptionError: learning_rate 0.5 diverges"

    saved = json.loads(tuned.path.read_text())
    assert tuned.path == tmp_path / "run" / "sweep.json"
    assert (saved["train_rows"], saved["trial_train_rows"], saved["dev_rows"], saved["eval_rows"]) == (60, 45, 15, 20)
    assert saved["best"] == {"trial": 4, "values": {"learning_rate": 0.2, "num_epochs": 2}, "dev_accuracy": 0.92}
    assert [t["status"] for t in saved["trials"]].count("failed") == 4
    assert saved["trials"][3]["dev"] == {"accuracy": 0.92, "macro_f1": pytest.approx(0.08)}
    assert saved["trials"][3]["train_seconds"] == 0.5 and saved["final"]["how"] == "retrained"
    assert saved["trials"][8]["error"] == "InvalidOptionError: learning_rate 0.5 diverges"

    lines = tuned.table().splitlines()
    assert lines[0].split() == ["trial", "learning_rate", "num_epochs", "dev", "accuracy", "dev", "macro_f1", "train", "s",
                                "status"]
    assert lines[4].split()[:4] == ["4*", "0.2", "2", "0.9200"]
    assert "failed: InvalidOptionError: learning_rate 0.5 diverges" in lines[9]
    assert "retrained on all 60 training rows: eval accuracy 0.9200" in lines[-1]
    record = ak.get_adapter_record(tuned.fitted.model, "default").meta["recipe"]["sweep"]
    assert record["chosen"] == {"learning_rate": 0.2, "num_epochs": 2} and record["best_trial"] == 4
    assert tuned.summary()["sweep_trials"] == "10 (4 failed)"


def test_keep_best_evaluates_the_kept_trial_once_and_macro_f1_picks_differently(tiny, tmp_path):
    train, evaluation = table(40), table(10, offset=1000)
    tuning = sweep.Sweep(grid={"learning_rate": [0.1, 0.2]}, dev=10, metric="macro_f1", keep_best=True)
    rec = Recorder(tiny["bert"])
    tuned = tuning.run(Opts(output_dir=str(tmp_path / "run")), train, evaluation, fit=rec.fit, evaluate=rec.evaluate)
    assert len(rec.fits) == 2 and tuned.best.values == {"learning_rate": 0.1}  # macro_f1 = 1 - score here
    assert len(rec.evaluated) == 1 and texts(rec.evaluated[0]) == texts(evaluation)
    assert tuned.fitted.metrics == {"accuracy": 0.75, "macro_f1": 0.7}
    assert "kept trial 1's adapter (trained on 30 rows)" in tuned.record["outcome"]
    metrics = ak.get_adapter_record(tuned.fitted.model, "default").meta["metrics"]
    assert metrics["eval_accuracy"] == 0.75 and metrics["dev_accuracy"] == pytest.approx(0.63)


def test_given_dev_rows_and_exclusions(tiny, tmp_path):
    train = table(40)
    shots = train.select(range(6))
    tuning = sweep.Sweep(grid={"learning_rate": [0.1]}, dev=10)
    rest, dev = tuning.dev_split(train, exclude=shots)
    assert len(dev) == 10 and not texts(dev) & texts(shots) and len(rest) == 24
    rec = Recorder(tiny["bert"])
    tuning.run(Opts(output_dir=str(tmp_path / "run")), shots, table(10, 1000), fit=rec.fit, evaluate=rec.evaluate, dev=dev)
    assert texts(rec.fits[0][1]) == texts(shots) and texts(rec.fits[0][2]) == texts(dev)


def test_all_trials_failing_is_a_clear_error(tiny, tmp_path):
    tuning = sweep.Sweep(grid={"learning_rate": [0.5], "num_epochs": [1, 2]}, dev=0.25)
    rec = Recorder(tiny["bert"])
    with pytest.raises(ak.InvalidOptionError, match=r"All 2 sweep trials failed.*\n  - trial 1 \(learning_rate=0.5 "
                                                    r"num_epochs=1\): InvalidOptionError: learning_rate 0.5 diverges"):
        tuning.run(Opts(output_dir=str(tmp_path / "run")), table(40), table(10, 1000), fit=rec.fit, evaluate=rec.evaluate)
    assert len(rec.fits) == 2
    assert [t["status"] for t in json.loads((tmp_path / "run" / "sweep.json").read_text())["trials"]] == ["failed"] * 2


def test_split_values_respects_brackets_and_quotes():
    assert sweep._split_values('1, [1,2], {"a": [3, 4]}, "x,y"') == ["1", "[1,2]", '{"a": [3, 4]}', '"x,y"']


# --- real tiny sweeps through the recipes --------------------------------------------------
def test_text_classification_sweep_through_the_cli(tiny, toy_files, tmp_path, monkeypatch, capsys):
    """2x2 trials on a tiny BERT, full fine-tuning: a learning rate of 1e-9 cannot learn, 0.01 separates the toy classes."""
    monkeypatch.chdir(ROOT)
    train, evaluation = toy_files
    out = tmp_path / "run"
    common = ["train", "text_classification", "--model", tiny["bert"], "--strategy", "full", "--train-file", train,
              "--eval-file", evaluation, "--batch-size", "8", "--max-length", "16", "--sweep-dev", "0.25"]
    assert cli([*common, "--output-dir", str(out), "--sweep", "learning_rate=1e-9,0.01", "num_epochs=3,4"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "sweep.json").read_text())
    assert [t["values"] for t in saved["trials"]] == [{"learning_rate": lr, "num_epochs": n} for lr in (1e-9, 0.01) for n in (3, 4)]
    dev = [t["dev"]["accuracy"] for t in saved["trials"]]
    assert max(dev[2:]) == 1.0 and max(dev[:2]) < 0.9, dev
    assert saved["best"]["trial"] == 3 and saved["best"]["values"] == {"learning_rate": 0.01, "num_epochs": 3}
    assert (saved["train_rows"], saved["trial_train_rows"], saved["dev_rows"]) == (64, 48, 16)
    assert all(t["train_seconds"] > 0 for t in saved["trials"]) and saved["final"]["how"] == "retrained"
    assert saved["final"]["eval"]["accuracy"] >= 0.9
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"trial-0{i}" for i in range(1, 5)]
    sidecar = json.loads((out / "adapter" / "adapterkit.json").read_text())
    assert sidecar["recipe"]["learning_rate"] == 0.01 and sidecar["recipe"]["output_dir"] == str(out)
    assert sidecar["recipe"]["sweep"]["chosen"] == {"learning_rate": 0.01, "num_epochs": 3}
    assert sidecar["metrics"]["eval_accuracy"] == saved["final"]["eval"]["accuracy"]
    card = (out / "adapter" / "README.md").read_text()
    assert "## Tuning" in card and re.search(r"^\| 3 \| `learning_rate=0.01`, `num_epochs=3` \| 1.0000 \| .* \| picked \|$", card, re.M), card
    header = next(line for line in printed.splitlines() if line.startswith("trial "))
    assert header.split()[:3] == ["trial", "learning_rate", "num_epochs"]
    assert re.search(r"^3\*\s+0.01\s+3\s+1.0000", printed, re.M), printed
    assert re.search(r"^sweep_best\s+learning_rate=0.01 num_epochs=3$", printed, re.M)
    # No state leaks between trials: trial 3 alone (its fresh label head drawn from the same seed) scores the same.
    assert cli([*common, "--output-dir", str(tmp_path / "alone"), "--sweep", "learning_rate=0.01", "num_epochs=3",
                "--sweep-keep-best"]) == 0
    alone = json.loads((tmp_path / "alone" / "sweep.json").read_text())["trials"][0]["dev"]
    assert alone == pytest.approx(saved["trials"][2]["dev"], abs=1e-6)


def test_fewshot_sweep_keeps_the_shots_and_reports_a_failed_trial(tiny, toy_files, tmp_path):
    train, evaluation = toy_files
    results = recipe("fewshot_causal_lm").main([
        "--model", tiny["llama"], "--train-file", train, "--eval-file", evaluation, "--label-words", '["w7", "w8"]',
        "--k", "4", "--max-steps", "2", "--max-length", "32", "--output-dir", str(tmp_path / "fs"),
        "--sweep", "learning_rate=1e-3,0", "--sweep-dev", "8", "--sweep-keep-best",
    ])
    saved = json.loads((tmp_path / "fs" / "sweep.json").read_text())
    assert [t["status"] for t in saved["trials"]] == ["ok", "failed"]
    assert "learning-rate" in saved["trials"][1]["error"] and saved["best"]["trial"] == 1
    # The trials train on the k shots of the plain run; their dev rows are 8 other training rows.
    assert (saved["train_rows"], saved["trial_train_rows"], saved["dev_rows"]) == (8, 8, 8)
    assert saved["final"]["how"] == "kept best trial" and results["sweep_trials"] == "2 (1 failed)"
    assert results["sweep_final"] == "kept trial 1's adapter (trained on 8 rows)"
    sidecar = json.loads((tmp_path / "fs" / "adapter" / "adapterkit.json").read_text())
    assert sidecar["metrics"]["eval_accuracy"] == results["accuracy"] and sidecar["recipe"]["sweep"]["kept_best"]
