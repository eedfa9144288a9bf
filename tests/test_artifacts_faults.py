"""Adapters on disk under bad input and faults: a catalog of what must hold.

Categories (issue 8): "no data lost on disk" (save destinations, SIGKILL at any instant of a
save, concurrent saves) and "loading is all-or-nothing and checked" (every tensor, every
sidecar field, manifest hashes, symlinks, cleanup after a failure), plus the manifest API
publish builds on (adapter_files, content_hash) and the model card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterkit as ak
import adapterkit.artifacts as artifacts
import adapterkit.io as io
from adapterkit.artifacts import SIDECAR
from tests.test_artifacts import fresh, logits, trained
from tests.tiny import make_batch

REPO = Path(__file__).resolve().parent.parent


# --- helpers --------------------------------------------------------------------------
# Looked up at call time, so that each case fails on its own where an API is missing.
def adapter_files(folder):
    return artifacts.adapter_files(folder)


def content_hash(folder):
    return artifacts.content_hash(folder)


def recover(path):
    return artifacts.recover(path)


def load_folder(model, folder, **kwargs):
    """Load ``folder`` onto ``model``; returns the name it was loaded under."""
    before = set(ak.list_adapters(model))
    ak.load(model, Path(folder), **kwargs)
    (name,) = set(ak.list_adapters(model)) - before
    return name


def siblings(path: Path) -> list[str]:
    """Names beside ``path`` that a save leaves behind (temporary or renamed-aside copies)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def rehash(folder: Path) -> None:
    """Make the sidecar's manifest match the files again, as if save had written them so."""
    sidecar = json.loads((folder / SIDECAR).read_text())
    sidecar["manifest"] = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != SIDECAR
    }
    (folder / SIDECAR).write_text(json.dumps(sidecar))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_sidecar(folder: Path, **changes) -> None:
    sidecar = json.loads((folder / SIDECAR).read_text())
    for key, value in changes.items():
        if value is KeyError:
            sidecar.pop(key, None)
        else:
            sidecar[key] = value
    (folder / SIDECAR).write_text(json.dumps(sidecar))


def edit_tensors(folder: Path, change) -> None:
    """Rewrite the adapter's weight file through ``change(tensors) -> tensors`` and rehash."""
    path = next(folder / f for f in artifacts.WEIGHT_FILES if (folder / f).is_file())
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    save_file(change(tensors), str(path), metadata={"format": "pt"})
    rehash(folder)


class ModelState:
    """Everything a failed load must leave as it was."""

    def __init__(self, model) -> None:
        self.model = model
        self.tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.adapters = ak.list_adapters(model)
        self.active = ak.get_active_adapter(model)
        self.labels = dict(model.config.id2label)

    def assert_unchanged(self) -> None:
        now = self.model.state_dict()
        assert sorted(now) == sorted(self.tensors)
        for key, value in self.tensors.items():
            assert torch.equal(now[key], value), f"{key} changed"
        assert {n: p.requires_grad for n, p in self.model.named_parameters()} == self.grad
        assert ak.list_adapters(self.model) == self.adapters
        assert ak.get_active_adapter(self.model) == self.active
        assert dict(self.model.config.id2label) == self.labels


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- save destinations: refuse what is not ours, replace what is -----------------------
@pytest.fixture(scope="module")
def lora_model():
    return trained("bert", "lora")


def test_save_onto_a_regular_file_is_refused(tmp_path, lora_model):
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    with pytest.raises(ak.AdapterExistsError, match="existing file, not a folder"):
        ak.save(lora_model, target)
    assert target.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "files",
    [
        {"notes.txt": "mine"},  # user files
        {"config.json": "{}", "model.safetensors": "x"},  # a transformers checkpoint
        {"adapter_config.json": '{"peft_type": "LORA"}', "adapter_model.safetensors": "x"},  # plain peft
        {SIDECAR: "{not json", "adapter.safetensors": "x"},  # a damaged sidecar is not proof of ownership
        {"sub/deep.txt": "nested"},
    ],
    ids=["user-files", "checkpoint", "plain-peft", "broken-sidecar", "nested"],
)
def test_save_onto_a_foreign_folder_is_refused_and_touches_nothing(tmp_path, lora_model, files):
    target = tmp_path / "out"
    for rel, text in files.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_text(text)
    before = snapshot(target)
    with pytest.raises(ak.AdapterExistsError, match="not an adapter saved by adapterkit.save"):
        ak.save(lora_model, target)
    assert snapshot(target) == before
    assert siblings(target) == []


def test_save_fills_an_empty_folder(tmp_path, lora_model):
    (tmp_path / "out").mkdir()
    ak.save(lora_model, tmp_path / "out")
    assert adapter_files(tmp_path / "out") == ["README.md", "adapter_config.json", "adapter_model.safetensors", SIDECAR]


def test_save_replaces_an_earlier_adapter_of_another_strategy(tmp_path, lora_model):
    target = tmp_path / "out"
    ak.save(lora_model, target)
    head = trained("bert", "head", seed=1)
    ak.save(head, target)
    assert adapter_files(target) == ["README.md", "adapter.safetensors", SIDECAR]
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter.safetensors", SIDECAR]
    loaded = ak.load(fresh("bert"), str(target))
    assert ak.get_adapter_record(loaded, "default").strategy == "head"
    assert siblings(target) == []


@pytest.mark.parametrize("extra", ["token.json", ".private/credentials.json"])
def test_save_over_an_adapter_with_user_files_is_refused_naming_them(tmp_path, lora_model, extra):
    target = tmp_path / "out"
    ak.save(lora_model, target)
    (target / extra).parent.mkdir(exist_ok=True)
    (target / extra).write_text('{"secret": 1}')
    before = snapshot(target)
    with pytest.raises(ak.AdapterExistsError, match=f"did not write.*{extra}.*never deletes your files"):
        ak.save(trained("bert", "head"), target)
    assert snapshot(target) == before


def test_save_over_a_legacy_adapter_without_manifest_replaces_it(tmp_path, lora_model):
    target = tmp_path / "out"
    ak.save(lora_model, target)
    edit_sidecar(target, manifest=KeyError)
    ak.save(trained("bert", "head"), target)
    assert "manifest" in json.loads((target / SIDECAR).read_text())
    assert (target / "adapter.safetensors").is_file() and not (target / "adapter_config.json").exists()


def test_save_onto_a_symlink_is_refused(tmp_path, lora_model):
    real = tmp_path / "real"
    ak.save(lora_model, real)
    (tmp_path / "link").symlink_to(real)
    before = snapshot(real)
    with pytest.raises(ak.AdapterExistsError, match="symbolic link"):
        ak.save(lora_model, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and snapshot(real) == before


def test_a_failed_save_into_a_new_path_leaves_nothing(tmp_path, lora_model, monkeypatch):
    monkeypatch.setattr(artifacts, "_card", lambda sidecar: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        ak.save(lora_model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_dead_saves_are_removed_and_live_ones_kept(tmp_path, lora_model):
    target = tmp_path / "out"
    ak.save(lora_model, target)
    dead = dead_pid()
    for name in (f".out.tmp-{dead}-abc", f".out.old-{dead}-def", f".out.old-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("partial")
    live = tmp_path / f".out.tmp-{os.getppid()}-xyz"  # a running process's save in progress
    live.mkdir()
    other = tmp_path / ".outer.tmp-1-abc"  # another adapter's sibling
    other.mkdir()
    ak.save(lora_model, target)
    assert siblings(target) == [live.name]
    assert other.is_dir()


def test_a_stranded_copy_is_recovered_by_the_next_save(tmp_path, lora_model):
    target = tmp_path / "out"
    ak.save(lora_model, target)
    old_hash = content_hash(target)
    stranded = tmp_path / f".out.old-{dead_pid()}-abc"
    os.rename(target, stranded)  # what a save killed between its renames leaves
    head = trained("bert", "head")
    ak.save(head, target)
    assert siblings(target) == []
    assert ak.get_adapter_record(ak.load(fresh("bert"), str(target)), "default").strategy == "head"
    # and recover() / load put a stranded copy back
    os.rename(target, stranded)
    assert recover(target) is True and content_hash(target) != old_hash and siblings(target) == []
    os.rename(target, stranded)
    load_folder(fresh("bert"), target)
    assert target.is_dir() and siblings(target) == []


def test_concurrent_saves_to_one_path_serialise(tmp_path):
    model = trained("bert", "lora", name="a")
    trained("bert", "head", name="b", model=model)
    target = tmp_path / "out"
    errors = []

    def worker(name: str) -> None:
        try:
            for _ in range(6):
                ak.save(model, target, name=name)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b", "a")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert siblings(target) == []
    adapter_files(target)  # one complete adapter, bytes as recorded


# --- SIGKILL at any instant of a save ---------------------------------------------------
ZYGOTE = textwrap.dedent(
    """
    import os, sys, time
    import torch
    import adapterkit as ak
    import adapterkit.artifacts as A
    import adapterkit.io as IO
    from tests.tiny import TINY

    torch.manual_seed(0)
    model = TINY["bert"]()
    ak.attach(model, "lora", name="a", r=4)
    ak.attach(model, "head", name="b")
    refs = sys.argv[1]
    for name in ("a", "b"):  # warm every lazy import before forking
        ak.save(model, os.path.join(refs, name), name=name)
    print("ready", A.content_hash(os.path.join(refs, "a")), A.content_hash(os.path.join(refs, "b")), flush=True)

    def say(text):
        os.write(1, (text + "\\n").encode())

    for line in sys.stdin:
        mode, step, path = line.split()
        pid = os.fork()
        if pid == 0:
            IO._USE_EXCHANGE = mode == "exchange"
            if step != "random":
                def hook(name, step=step):
                    if name == step:
                        say("at " + name)
                        time.sleep(3600)
                IO._STEP_HOOK = hook
                try:
                    current = A.content_hash(path)
                except Exception:
                    current = None
                ak.save(model, path, name="b" if current == A.content_hash(os.path.join(refs, "a")) else "a")
                say("finished")
                os._exit(0)
            say("started")
            i = 0
            while True:
                ak.save(model, path, name="ab"[i % 2])
                i += 1
        say("child %d" % pid)
        os.waitpid(pid, 0)
        say("reaped")
    """
)


class Zygote:
    """A process with a loaded model that forks one saving child per command, to be killed."""

    def __init__(self, tmp: Path) -> None:
        script = tmp / "zygote.py"
        script.write_text(ZYGOTE)
        (tmp / "refs").mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp / "refs")], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.children: list[int] = []
        threading.Thread(target=self._read, daemon=True).start()
        words = self.expect("ready").split()
        self.hashes = set(words[1:])

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, *prefixes: str, timeout: float = 120) -> dict[str, str]:
        """Wait for one line starting with each prefix, in any order (the child and the zygote race)."""
        got: dict[str, str] = {}
        while len(got) < len(prefixes):
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"the zygote sent nothing while waiting for {prefixes}, got {got}") from None
            match = [p for p in prefixes if line.startswith(p + " ") or line == p]
            assert match, f"expected one of {prefixes}, got {line!r}"
            got[match[0]] = line
        return got if len(prefixes) > 1 else got[prefixes[0]]

    def _command(self, mode: str, step: str, path: Path, wait_for: str) -> int:
        self.proc.stdin.write(f"{mode} {step} {path}\n")
        self.proc.stdin.flush()
        got = self.expect("child", wait_for)
        pid = int(got["child"].split()[1])
        self.children.append(pid)
        return pid

    def save_once(self, mode: str, path: Path) -> None:
        """One save that runs to the end (no step pauses it)."""
        self._command(mode, "none", path, "finished")
        self.expect("reaped")

    def kill_at(self, mode: str, step: str, path: Path, delay: float = 0.0) -> None:
        pid = self._command(mode, step, path, "at" if step != "random" else "started")
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        self.expect("reaped")

    def close(self) -> None:
        for pid in self.children:  # a child a failed test left paused
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


def assert_one_adapter(path: Path, hashes: set[str]) -> None:
    assert content_hash(path) in hashes  # complete, bytes as recorded, and one of the two adapters


STEPS = {
    "exchange": ["writing", "installing", "exchanged", "done"],
    "rename": ["writing", "installing", "moved-aside", "renamed", "done"],
}


@pytest.mark.parametrize("mode,step", [(m, s) for m, steps in STEPS.items() for s in steps])
def test_kill_at_each_step_of_a_replacing_save(tmp_path, zygote, mode, step):
    target = tmp_path / "out"
    zygote.save_once(mode, target)
    before = content_hash(target)
    zygote.kill_at(mode, step, target)
    if mode == "exchange":  # the path never lacks an adapter, even before recovery
        assert_one_adapter(target, zygote.hashes)
    recover(target)
    assert_one_adapter(target, zygote.hashes)
    assert siblings(target) == []
    if step in ("exchanged", "renamed", "done"):
        assert content_hash(target) != before  # the new adapter was in place
    elif step in ("writing", "installing", "moved-aside"):
        assert content_hash(target) == before


@pytest.mark.parametrize("mode,step", [("exchange", "writing"), ("exchange", "installing"), ("exchange", "renamed")])
def test_kill_during_a_first_save_leaves_nothing_or_the_adapter(tmp_path, zygote, mode, step):
    target = tmp_path / "out"
    zygote.kill_at(mode, step, target)
    recover(target)
    assert siblings(target) == []
    if step == "renamed":
        assert_one_adapter(target, zygote.hashes)
    else:
        assert not target.exists()


@pytest.mark.parametrize("mode", ["exchange", "rename"])
def test_kill_at_random_instants_of_repeated_saves(tmp_path, zygote, mode):
    rng = random.Random(8)
    target = tmp_path / "out"
    zygote.save_once(mode, target)
    for _ in range(12):
        zygote.kill_at(mode, "random", target, delay=rng.uniform(0, 0.12))
        if mode == "exchange":
            assert_one_adapter(target, zygote.hashes)
        recover(target)
        assert_one_adapter(target, zygote.hashes)
        assert siblings(target) == []
    # whatever was left loads (the zygote's base is fresh("bert") too)
    assert load_folder(fresh("bert"), target, ignore_mismatch=True) in ("a", "b")


# --- loading is all-or-nothing ----------------------------------------------------------
def with_prev(arch: str = "bert"):
    """A base with an adapter 'prev' attached and active, whose LoRA weights change the outputs.

    Only its LoRA matrices are set: its head copy stays equal to the base's, so the base
    still matches the fingerprint of the adapters saved from fresh bases.
    """
    model = fresh(arch)
    ak.attach(model, "lora", name="prev", r=4)
    torch.manual_seed(5)
    with torch.no_grad():
        for key, p in ak.trainable_parameters(model, "prev").items():
            if ".lora_" in key:
                p.normal_(std=0.2)
    return model


@pytest.fixture
def prev_model():
    return with_prev()


_SAVED: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _saved_root(tmp_path_factory):
    _SAVED.clear()
    _SAVED["root"] = tmp_path_factory.mktemp("saved")


def saved(tmp_path, strategy: str) -> Path:
    """A fresh copy of a trained bert adapter of ``strategy`` (trained and saved once per module)."""
    if strategy not in _SAVED:
        _SAVED[strategy] = ak.save(trained("bert", strategy, seed=3), _SAVED["root"] / strategy)
    return Path(shutil.copytree(_SAVED[strategy], tmp_path / strategy, symlinks=True))


@pytest.fixture(scope="module")
def shared_prev():
    """One base with 'prev' active, shared by tests whose loads fail before touching it."""
    return with_prev()


def _nan_first(t):
    key = sorted(t)[0]
    t[key][0] = float("nan")
    return t


def _inf_last(t):
    key = sorted(t)[-1]
    t[key].view(-1)[0] = float("inf")
    return t


def _int_dtype(t):
    key = sorted(t)[0]
    t[key] = t[key].to(torch.int64)
    return t


def _bool_dtype(t):
    key = sorted(t)[-1]
    t[key] = t[key] > 0
    return t


def _bad_shape_last(t):
    key = sorted(t)[-1]
    t[key] = torch.zeros(*t[key].shape[:-1], t[key].shape[-1] + 1) if t[key].dim() else torch.zeros(2)
    return t


def _drop_head_bias(t):
    return {k: v for k, v in t.items() if not k.endswith("classifier.bias")}


def _extra_tensor(t):
    return {**t, "base_model.model.bert.encoder.made_up.weight": torch.zeros(2, 2)}


def _missing_one(t):
    return dict(sorted(t.items())[1:])


TENSOR_FAULTS = {
    "nan": (_nan_first, ak.AdapterFormatError, "NaN/inf"),
    "inf": (_inf_last, ak.AdapterFormatError, "NaN/inf"),
    "int-dtype": (_int_dtype, ak.AdapterFormatError, "dtype torch.int64"),
    "bool-dtype": (_bool_dtype, ak.AdapterFormatError, "dtype torch.bool"),
    "bad-shape": (_bad_shape_last, ak.AdapterMismatchError, "shape"),
    "head-missing-bias": (_drop_head_bias, ak.AdapterMismatchError, "classifier.bias"),
    "extra-tensor": (_extra_tensor, ak.AdapterMismatchError, "no place for|unexpected"),
    "missing-tensor": (_missing_one, ak.AdapterMismatchError, "missing|incomplete head"),
}
FAULT_CASES = [
    (s, f)
    for s in ("lora", "prefix", "head", "full")
    for f in TENSOR_FAULTS
    if not (f == "head-missing-bias" and s == "full")  # full has no separate head; covered by missing-tensor
]


@pytest.mark.parametrize("strategy,fault", FAULT_CASES)
def test_a_bad_tensor_is_refused_and_the_model_left_as_it_was(tmp_path, strategy, fault):
    change, error, message = TENSOR_FAULTS[fault]
    folder = saved(tmp_path, strategy)
    edit_tensors(folder, change)
    # `full` cannot share a base, so it is loaded onto a bare one
    model = fresh("bert") if strategy == "full" else with_prev()
    batch = make_batch("bert")
    expected = logits(model, batch)
    state = ModelState(model)
    with pytest.raises(error, match=message):
        ak.load(model, str(folder), name="bad")
    state.assert_unchanged()
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)


def test_the_nonfinite_tensor_is_named_when_dtypes_are_mixed(tmp_path):
    # One finiteness test covers all tensors of a dtype; the error still names the bad one.
    folder = saved(tmp_path, "lora")

    def half_with_inf_in_the_middle(t):
        keys = sorted(t)
        for key in keys[::2]:
            t[key] = t[key].to(torch.float16)
        t[keys[len(keys) // 2]].view(-1)[-1] = float("-inf")
        return t

    edit_tensors(folder, half_with_inf_in_the_middle)
    keys = sorted(load_file(str(folder / "adapter_model.safetensors")))
    middle = keys[len(keys) // 2]
    with pytest.raises(ak.AdapterFormatError, match=f"Tensor '{re.escape(middle)}' .* 1 NaN/inf value"):
        ak.load(fresh("bert"), str(folder), name="bad")


def test_the_weights_loaded_are_the_bytes_that_were_hashed(tmp_path):
    folder = saved(tmp_path, "lora")
    path = folder / "adapter_model.safetensors"
    read = io.hashed_file(path)
    before = load_file(str(path))
    edit_tensors(folder, lambda t: {k: v + 1 for k, v in t.items()})  # replaced after the read
    assert read.sha256 == hashlib.sha256(read.data).hexdigest() != io.sha256_file(path)
    got = read.tensors()
    assert got.keys() == before.keys() and all(torch.equal(got[k], before[k]) for k in before)


def test_nonfinite_values_load_with_a_warning_when_allowed(tmp_path, caplog):
    folder = saved(tmp_path, "lora")
    edit_tensors(folder, _nan_first)
    model = fresh("bert")
    with caplog.at_level(logging.WARNING, logger="adapterkit"):
        load_folder(model, folder, allow_nonfinite=True)
    assert "NaN/inf" in caplog.text and "allow_nonfinite=True" in caplog.text
    assert ak.list_adapters(model) == ["default"]


def test_head_rows_must_match_the_label_names(tmp_path, prev_model):
    folder = saved(tmp_path, "lora")
    edit_sidecar(folder, label_names=["neg", "pos"])  # the head has 3 rows
    state = ModelState(prev_model)
    with pytest.raises(ak.AdapterFormatError, match="classifier.weight' .* 3 output rows .* 2 labels"):
        ak.load(prev_model, str(folder), name="bad")
    state.assert_unchanged()


def test_a_head_missing_entirely_is_refused_for_adapterkit_files(tmp_path, prev_model):
    folder = saved(tmp_path, "lora")
    edit_tensors(folder, lambda t: {k: v for k, v in t.items() if "classifier" not in k and "pooler" not in k})
    state = ModelState(prev_model)
    with pytest.raises(ak.AdapterMismatchError, match="no tensors for the task head"):
        ak.load(prev_model, str(folder), name="bad")
    state.assert_unchanged()


def test_cleanup_failure_does_not_mask_the_load_error(tmp_path, prev_model, monkeypatch, caplog):
    import adapterkit.api as api

    folder = saved(tmp_path, "lora")
    edit_tensors(folder, _bad_shape_last)

    def broken_discard(*args, **kwargs):
        raise RuntimeError("cleanup broke")

    monkeypatch.setattr(api, "_discard", broken_discard)
    with caplog.at_level(logging.ERROR, logger="adapterkit"):
        with pytest.raises(ak.AdapterMismatchError, match="shape"):
            ak.load(prev_model, str(folder), name="bad")
    assert "cleanup broke" in caplog.text


# --- bytes changed since save -----------------------------------------------------------
@pytest.mark.parametrize("file", ["adapter_model.safetensors", "adapter_config.json"])
def test_changed_bytes_are_refused_naming_the_file(tmp_path, prev_model, file):
    folder = saved(tmp_path, "lora")
    path = folder / file
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01  # one flipped bit, same size
    path.write_bytes(bytes(data))
    state = ModelState(prev_model)
    with pytest.raises(ak.AdapterFormatError, match=f"'{file}'.*changed since adapterkit.save"):
        ak.load(prev_model, str(folder), name="bad")
    state.assert_unchanged()
    with pytest.raises(ak.AdapterFormatError, match=f"'{file}'"):
        adapter_files(folder)


def test_an_edited_card_still_loads(tmp_path):
    folder = saved(tmp_path, "lora")
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nEdited on the Hub.\n")
    before = content_hash(folder)
    ak.load(fresh("bert"), str(folder))
    assert "README.md" in adapter_files(folder) and content_hash(folder) == before


def test_a_file_listed_in_the_manifest_but_missing_is_refused(tmp_path):
    folder = saved(tmp_path, "lora")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(ak.AdapterFormatError, match="missing 'adapter_config.json'"):
        ak.load(fresh("bert"), str(folder))


def test_a_plain_peft_folder_loads_with_a_warning(tmp_path, caplog):
    folder = saved(tmp_path, "lora")
    (folder / SIDECAR).unlink()
    with caplog.at_level(logging.WARNING, logger="adapterkit"):
        ak.load(fresh("bert"), str(folder))
    assert "could not be verified" in caplog.text


# --- sidecar and config fields of the wrong type ----------------------------------------
SIDECAR_FAULTS = {
    "strategy-missing": ({"strategy": KeyError}, "'strategy' is missing"),
    "strategy-int": ({"strategy": 5}, "'strategy'"),
    "name-int": ({"name": 3}, "'name'"),
    "options-string": ({"options": "r=4"}, "'options'"),
    "options-bad-value": ({"options": {"r": "four"}}, "(?s)'options'.*r must be a positive integer"),
    "options-unknown-type": ({"options": {"r": [4]}}, "'options'"),
    "base-missing": ({"base_model": KeyError}, "'base_model' is missing"),
    "base-list": ({"base_model": []}, "'base_model'"),
    "base-no-fingerprint": ({"base_model": {"id": "x"}}, "'base_model.fingerprint'"),
    "base-id-int": ({"base_model": {"id": 5, "fingerprint": {}}}, "'base_model.id'"),
    "labels-string": ({"label_names": "neg,pos"}, "'label_names'"),
    "labels-ints": ({"label_names": [0, 1, 2]}, "'label_names'"),
    "head-modules-int": ({"head_modules": 3}, "'head_modules'"),
    "metrics-list": ({"metrics": [0.5]}, "'metrics'"),
    "recipe-string": ({"recipe": "sst2"}, "'recipe'"),
    "task-int": ({"task": 1}, "'task'"),
    "files-string": ({"files": "adapter.safetensors"}, "'files'"),
    "manifest-list": ({"manifest": []}, "'manifest'"),
    "manifest-entry": ({"manifest": {"adapter_model.safetensors": {"size": "12"}}}, "manifest entry"),
    "manifest-escape": ({"manifest": {"../secret.txt": {"size": 1, "sha256": "0" * 64}}}, "inside the adapter folder"),
    "version-string": ({"format_version": "1"}, "integer format_version"),
}


@pytest.mark.parametrize("fault", sorted(SIDECAR_FAULTS))
def test_a_bad_sidecar_field_is_a_format_error_naming_it(tmp_path, shared_prev, fault):
    changes, message = SIDECAR_FAULTS[fault]
    folder = saved(tmp_path, "lora")
    edit_sidecar(folder, **changes)
    state = ModelState(shared_prev)
    with pytest.raises(ak.AdapterFormatError, match=message):
        ak.load(shared_prev, str(folder), name="bad")
    state.assert_unchanged()


@pytest.mark.parametrize(
    "case",
    ["name-with-newline", "unknown-strategy", "name-taken", "full-beside-others", "newer-format"],
)
def test_other_refused_loads_leave_the_model_as_it_was(tmp_path, shared_prev, case):
    strategy = "full" if case == "full-beside-others" else "lora"
    folder = saved(tmp_path, strategy)
    name = {"name-taken": "prev"}.get(case, "bad")
    if case == "name-with-newline":
        edit_sidecar(folder, name="a\n")
        name = None
    elif case == "unknown-strategy":
        edit_sidecar(folder, strategy="lroa")
    elif case == "newer-format":
        edit_sidecar(folder, format_version=99, strategy=7)  # a newer format may change fields: say upgrade
    errors = {
        "name-with-newline": (ak.InvalidOptionError, "is invalid"),
        "unknown-strategy": (ak.UnknownStrategyError, "Did you mean 'lora'"),
        "name-taken": (ak.AdapterExistsError, "already loaded"),
        "full-beside-others": (ak.IncompatibleModelError, "cannot share a base"),
        "newer-format": (ak.AdapterFormatError, "Upgrade adapterkit"),
    }
    error, message = errors[case]
    state = ModelState(shared_prev)
    with pytest.raises(error, match=message):
        ak.load(shared_prev, str(folder), name=name)
    state.assert_unchanged()


def test_save_to_a_path_without_a_name_is_refused(lora_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ak.InvalidOptionError, match="name the folder"):
        ak.save(lora_model, ".")
    assert list(tmp_path.iterdir()) == []


def test_a_sidecar_that_is_not_an_object_is_a_format_error(tmp_path):
    folder = saved(tmp_path, "head")
    (folder / SIDECAR).write_text("[1, 2]")
    with pytest.raises(ak.AdapterFormatError, match="not an object"):
        ak.load(fresh("bert"), str(folder))


@pytest.mark.parametrize("text", ["{broken", '{"peft_type": "LORA", "r": "x"}', '["LORA"]'])
def test_a_broken_peft_config_is_a_format_error(tmp_path, text):
    folder = saved(tmp_path, "lora")
    (folder / SIDECAR).unlink()
    (folder / "adapter_config.json").write_text(text)
    with pytest.raises(ak.AdapterFormatError):
        ak.load(fresh("bert"), str(folder))


def test_config_from_dict_refuses_non_mappings():
    from adapterkit.strategies.lora import LoraConfig

    for bad in ("r=4", [("r", 4)], None):
        with pytest.raises(ak.InvalidOptionError, match="mapping of option names"):
            LoraConfig.from_dict(bad)


# --- symlinks ----------------------------------------------------------------------------
def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    folder = saved(tmp_path, "lora")
    outside = tmp_path / "elsewhere.safetensors"
    os.rename(folder / "adapter_model.safetensors", outside)
    (folder / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(ak.AdapterFormatError, match="symbolic link .* outside the adapter folder"):
        ak.load(fresh("bert"), str(folder))
    with pytest.raises(ak.AdapterFormatError, match="symbolic link"):
        adapter_files(folder)  # publish must not upload what the link points to


def test_hub_cache_style_links_into_blobs_load(tmp_path):
    folder = saved(tmp_path, "lora")
    repo = tmp_path / "models--me--a"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in folder.iterdir():
        blob = repo / "blobs" / sha256(p)
        os.rename(p, blob)
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    model = ak.load(fresh("bert"), str(snap))
    assert ak.list_adapters(model) == ["default"]
    assert content_hash(snap) and "adapter_model.safetensors" in adapter_files(snap)


# --- the manifest API (what publish uploads, and the pool's identity) -------------------
def test_adapter_files_lists_exactly_what_save_wrote(tmp_path, lora_model):
    folder = ak.save(lora_model, tmp_path / "a")
    (folder / ".private").mkdir()
    (folder / ".private" / "token.json").write_text('{"token": "hf_x"}')
    (folder / "credentials.json").write_text("{}")
    assert adapter_files(folder) == ["README.md", "adapter_config.json", "adapter_model.safetensors", SIDECAR]
    manifest = json.loads((folder / SIDECAR).read_text())["manifest"]
    assert sorted(manifest) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert all(manifest[f]["size"] == (folder / f).stat().st_size for f in manifest)


def test_adapter_files_refuses_non_adapters(tmp_path):
    with pytest.raises(ak.AdapterNotFoundError):
        adapter_files(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ak.AdapterNotFoundError):
        adapter_files(tmp_path / "file")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    with pytest.raises(ak.AdapterFormatError, match="not an adapter saved by adapterkit.save"):
        adapter_files(tmp_path / "plain")
    (tmp_path / "plain" / SIDECAR).write_text("{nope")
    with pytest.raises(ak.AdapterFormatError, match="not an adapter saved by adapterkit.save"):
        adapter_files(tmp_path / "plain")


def test_adapter_files_of_a_legacy_sidecar_are_the_known_names(tmp_path):
    folder = saved(tmp_path, "head")
    edit_sidecar(folder, manifest=KeyError)
    (folder / "notes.txt").write_text("mine")
    assert adapter_files(folder) == ["README.md", "adapter.safetensors", SIDECAR]


def test_content_hash_identifies_the_adapter_bytes(tmp_path):
    model = trained("bert", "lora", name="a")
    trained("bert", "lora", name="b", model=model, seed=1)
    one = content_hash(ak.save(model, tmp_path / "a1", name="a", metrics={"accuracy": 0.1}))
    again = content_hash(ak.save(model, tmp_path / "a2", name="a", metrics={"accuracy": 0.9}))
    other = content_hash(ak.save(model, tmp_path / "b", name="b"))
    assert one == again != other and len(one) == 64
    edit_tensors(tmp_path / "a1", _nan_first)
    assert content_hash(tmp_path / "a1") != one


# --- the model card ---------------------------------------------------------------------
def test_card_metrics_hold_metrics_only(tmp_path, lora_model):
    from huggingface_hub import ModelCard

    trainer_metrics = {
        "eval_accuracy": 0.8, "eval_loss": 0.4, "epoch": 1.0, "eval_runtime": 2.1, "eval_samples_per_second": 400.0,
        "eval_steps_per_second": 50.0, "total_flos": 1e12, "train_runtime": 30.0, "train_seconds": 30.0,
    }
    folder = ak.save(lora_model, tmp_path / "a", metrics=trainer_metrics)
    card = ModelCard.load(folder / "README.md")
    assert card.data.metrics == ["eval_accuracy", "eval_loss"]
    assert "eval_runtime" not in card.text


def test_card_snippet_names_the_embedded_alias(tmp_path):
    model = trained("bert", "lora")
    model.__dict__["_adapterkit_base_id"] = "sentence-transformers/all-MiniLM-L6-v2"
    folder = ak.save(model, tmp_path / "a")
    text = (folder / "README.md").read_text()
    assert "ak.load_base('minilm-l6'" in text
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in text


# --- attaching: a LoRA injection that fails midway leaves nothing behind -----------------
@pytest.mark.parametrize("prev,options", [
    (False, {"r": 4}),                                       # peft's injection into a bare base
    (True, {"r": 4}),                                        # the same layers as 'prev': extended in place
    (True, {"r": 4, "target_modules": ["query", "value", "key"]}),  # other targets: peft's path beside 'prev'
], ids=["bare", "extend", "inject-beside"])
def test_a_lora_injection_failing_midway_leaves_the_model_as_it_was(monkeypatch, prev, options):
    from peft.tuners.lora import LoraLayer

    model = with_prev() if prev else fresh("bert")
    batch = make_batch("bert")
    expected = logits(model, batch)
    types = {n: type(m) for n, m in model.named_modules()}
    state = ModelState(model)
    real, calls = LoraLayer.update_layer, []

    def third_layer_fails(self, adapter_name, *args, **kwargs):
        if adapter_name == "new":
            calls.append(adapter_name)
            if len(calls) == 3:
                raise MemoryError("simulated: out of memory on the third layer")
        return real(self, adapter_name, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "update_layer", third_layer_fails)
    with pytest.raises(MemoryError, match="third layer"):
        ak.attach(model, "lora", name="new", **options)
    assert len(calls) == 3  # it did fail midway, after two layers took the adapter
    state.assert_unchanged()
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert not any("new" in getattr(m, "lora_A", {}) for m in model.modules())
    assert "new" not in (getattr(model, "peft_config", None) or {})
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)
    monkeypatch.setattr(LoraLayer, "update_layer", real)
    ak.attach(model, "lora", name="new", **options)  # the name is free again, and the layers attach cleanly
    assert "new" in ak.list_adapters(model)
