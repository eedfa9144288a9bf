"""Saving and loading adapters: round trips, peft interoperability, runtime swapping, bad input."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

import adapterkit as ak
from adapterkit.artifacts import SIDECAR
from tests.tiny import TINY, make_batch

OPTIONS = {"lora": {"r": 4}, "prefix": {"num_virtual_tokens": 4}, "head": {}, "full": {}}


def fresh(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return TINY[arch]().eval()


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def trained(arch: str, strategy: str, name: str = "default", model=None, steps: int = 3, seed: int = 0):
    model = model if model is not None else fresh(arch)
    ak.attach(model, strategy, name=name, **OPTIONS[strategy])
    batch = make_batch(arch, seed=seed)
    params = list(ak.trainable_parameters(model, name).values())
    opt = torch.optim.AdamW(params, lr=1e-2 if strategy != "full" else 1e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return model


ROUND_TRIPS = [(s, a) for s in ("lora", "prefix", "head", "full") for a in ("bert", "gpt2", "llama_cls", "t5")]


@pytest.mark.parametrize("strategy,arch", ROUND_TRIPS)
def test_save_load_reproduces_outputs(tmp_path, strategy, arch):
    model = trained(arch, strategy)
    batch = make_batch(arch)
    expected = logits(model, batch)
    folder = ak.save(model, tmp_path / "adapter", metrics={"accuracy": 0.5})
    sidecar = json.loads((folder / SIDECAR).read_text())
    assert sidecar["strategy"] == strategy and sidecar["format_version"] == 1
    assert sidecar["metrics"] == {"accuracy": 0.5}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    other = ak.load(fresh(arch), str(folder))
    assert ak.get_active_adapter(other) == "default"
    torch.testing.assert_close(logits(other, batch), expected)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama_cls"])
def test_lora_adapters_added_to_existing_layers_match_peft_injection(tmp_path, arch, monkeypatch):
    """A second LoRA adapter on the same layers skips peft's model-wide injection and behaves the same."""
    import peft

    injections = []
    real_inject = peft.inject_adapter_in_model
    monkeypatch.setattr(peft, "inject_adapter_in_model", lambda *a, **k: injections.append(k) or real_inject(*a, **k))

    model = trained(arch, "lora", name="a")
    a_weights = {k: v.clone() for k, v in ak.trainable_parameters(model, "a").items()}
    model = trained(arch, "lora", name="b", model=model, seed=1)  # trains b only, on the layers a already wraps
    assert len(injections) == 1
    for key, value in ak.trainable_parameters(model, "a").items():
        torch.testing.assert_close(value, a_weights[key], rtol=0, atol=0)
    batch = make_batch(arch)
    expected = {}
    for name in ("a", "b"):
        ak.use(model, name)
        expected[name] = logits(model, batch)
    assert not torch.equal(expected["a"], expected["b"])
    ak.save(model, tmp_path / "a", name="a")
    ak.save(model, tmp_path / "b", name="b")

    other = fresh(arch)
    ak.load(other, str(tmp_path / "b"), name="b")  # injected by peft
    ak.load(other, str(tmp_path / "a"), name="a")  # added to b's layers
    assert len(injections) == 2
    for name in ("a", "b", "a"):
        ak.use(other, name)
        torch.testing.assert_close(logits(other, batch), expected[name])
    ak.detach(other, "b")
    ak.use(other, "a")
    torch.testing.assert_close(logits(other, batch), expected["a"])
    # Other targets than the layers in place go through peft again.
    ak.attach(other, "lora", name="c", r=2, target_modules="attention")
    assert len(injections) == 3


def test_card_has_hub_metadata(tmp_path):
    from huggingface_hub import ModelCard

    model = trained("bert", "lora")
    folder = ak.save(model, tmp_path / "a", metrics={"accuracy": 0.75})
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "adapterkit"
    assert "lora" in card.data.tags and "peft" in card.data.tags
    assert card.data.metrics == ["accuracy"]


@pytest.mark.parametrize("arch", ["bert", "llama_cls", "gpt2"])
def test_plain_peft_loads_lora_files(tmp_path, arch):
    import peft

    model = trained(arch, "lora")
    batch = make_batch(arch)
    expected = logits(model, batch)
    folder = ak.save(model, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    peft_model = peft.PeftModel.from_pretrained(fresh(arch), str(folder))
    torch.testing.assert_close(logits(peft_model, batch), expected)


def test_plain_peft_loads_prefix_files(tmp_path):
    import peft

    model = trained("gpt2", "prefix")
    batch = make_batch("gpt2")
    expected = logits(model, batch)
    folder = ak.save(model, tmp_path / "p")
    peft_model = peft.PeftModel.from_pretrained(fresh("gpt2"), str(folder))
    torch.testing.assert_close(logits(peft_model, batch), expected)


def test_adapterkit_loads_plain_peft_lora(tmp_path):
    import peft

    base = fresh("bert")
    peft_model = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], use_dora=True)
    )
    for n, p in peft_model.named_parameters():
        if "lora_B" in n or "modules_to_save" in n:
            torch.nn.init.normal_(p, std=0.1)
    batch = make_batch("bert")
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "plain")
    model = ak.load(fresh("bert"), str(tmp_path / "plain"), name="plain")
    assert ak.get_adapter_record(model, "plain").config.use_dora
    torch.testing.assert_close(logits(model, batch), expected)


def test_three_strategies_share_one_base_and_switch_without_copies(tmp_path):
    model = fresh("bert")
    outs = {}
    batch = make_batch("bert")
    for i, strategy in enumerate(("lora", "prefix", "head")):
        trained("bert", strategy, name=strategy, model=model, seed=i)
        outs[strategy] = logits(model, batch)
    storage = set()
    for strategy in (None, *outs):
        ak.use(model, strategy)
        storage |= {p.data_ptr() for p in model.parameters()}
    for strategy in ("head", "lora", "prefix", "lora"):
        ak.use(model, strategy)
        torch.testing.assert_close(logits(model, batch), outs[strategy])
        # switching registers existing tensors; it never allocates or copies weights
        assert {p.data_ptr() for p in model.parameters()} <= storage
    with ak.use(model, "head"):
        torch.testing.assert_close(logits(model, batch), outs["head"])
    assert ak.get_active_adapter(model) == "lora"
    # save all three, load them into a fresh base, and get the same outputs
    for strategy in outs:
        ak.save(model, tmp_path / strategy, name=strategy)
    other = fresh("bert")
    for strategy in outs:
        ak.load(other, str(tmp_path / strategy))
    for strategy in outs:
        ak.use(other, strategy)
        torch.testing.assert_close(logits(other, batch), outs[strategy])


def test_detach_frees_adapter_memory():
    model = trained("bert", "lora", name="a")
    trained("bert", "head", name="b", model=model)
    refs = [weakref.ref(p) for p in ak.trainable_parameters(model, "a").values()]
    refs += [weakref.ref(p) for p in ak.trainable_parameters(model, "b").values()]
    ak.detach(model, "a")
    ak.detach(model, "b")
    gc.collect()
    assert all(r() is None for r in refs)


# --- bad input -------------------------------------------------------------------------
def test_truncated_safetensors_is_a_clear_error(tmp_path):
    folder = ak.save(trained("bert", "lora"), tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ak.AdapterFormatError, match="'adapter_model.safetensors'.*changed since adapterkit.save"):
        ak.load(fresh("bert"), str(folder))
    (folder / SIDECAR).unlink()  # a plain peft folder has no manifest: reading the file reports it
    with pytest.raises(ak.AdapterFormatError, match="corrupt or truncated"):
        ak.load(fresh("bert"), str(folder))


def test_garbage_safetensors_is_a_clear_error(tmp_path):
    folder = ak.save(trained("bert", "head"), tmp_path / "a")
    (folder / "adapter.safetensors").write_bytes(b"\x00" * 64)
    sidecar = json.loads((folder / SIDECAR).read_text())
    del sidecar["manifest"]  # as written before the manifest existed
    (folder / SIDECAR).write_text(json.dumps(sidecar))
    with pytest.raises(ak.AdapterFormatError, match="corrupt or truncated"):
        ak.load(fresh("bert"), str(folder))


def test_newer_format_version_is_refused(tmp_path):
    folder = ak.save(trained("bert", "lora"), tmp_path / "a")
    data = json.loads((folder / SIDECAR).read_text())
    data["format_version"] = 99
    (folder / SIDECAR).write_text(json.dumps(data))
    with pytest.raises(ak.AdapterFormatError, match="version 99.*Upgrade adapterkit"):
        ak.load(fresh("bert"), str(folder))


def test_adapter_for_another_architecture_is_refused(tmp_path):
    folder = ak.save(trained("gpt2", "lora"), tmp_path / "a")
    with pytest.raises(ak.AdapterMismatchError, match="other architecture \\(gpt2 vs llama\\)"):
        ak.load(fresh("llama"), str(folder))


def test_adapter_for_another_hidden_size_is_refused(tmp_path):
    import transformers as tf

    folder = ak.save(trained("bert", "lora"), tmp_path / "a")
    wider = tf.BertForSequenceClassification(
        tf.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_labels=3)
    )
    with pytest.raises(ak.AdapterMismatchError, match="other hidden size \\(16 vs 32\\)"):
        ak.load(wider, str(folder))


def test_same_architecture_other_weights_is_refused_unless_overridden(tmp_path):
    model = trained("bert", "lora")
    batch = make_batch("bert")
    folder = ak.save(model, tmp_path / "a")
    with pytest.raises(ak.AdapterMismatchError, match="same architecture but other weights.*ignore_mismatch=True"):
        ak.load(fresh("bert", seed=1), str(folder))
    other = ak.load(fresh("bert", seed=1), str(folder), ignore_mismatch=True)
    assert ak.list_adapters(other) == ["default"]
    assert logits(other, batch).shape == logits(model, batch).shape


def test_name_already_loaded_and_unknown_use(tmp_path):
    model = trained("bert", "lora")
    folder = ak.save(model, tmp_path / "a")
    with pytest.raises(ak.AdapterExistsError, match="'default' is already loaded"):
        ak.load(model, str(folder))
    ak.load(model, str(folder), name="copy")
    with pytest.raises(ak.AdapterNotFoundError, match="No adapter named 'cpoy'.*Did you mean 'copy'"):
        ak.use(model, "cpoy")


def test_pickle_files_are_never_loaded(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["query"]}))
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.bin")
    with pytest.raises(ak.AdapterFormatError, match="never loads pickle"):
        ak.load(fresh("bert"), str(folder))


def test_failed_save_leaves_the_old_artifact(tmp_path, monkeypatch):
    import adapterkit.artifacts as artifacts

    model = trained("bert", "lora")
    folder = ak.save(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifacts, "_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ak.save(model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_not_a_folder_nor_repo(tmp_path):
    with pytest.raises(ak.AdapterNotFoundError):
        ak.load(fresh("bert"), str(tmp_path / "missing" / "deeper"))
