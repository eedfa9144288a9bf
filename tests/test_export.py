"""Merged export: the written checkpoint, loaded by plain transformers, is the adapted model."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

import adapterkit as ak
from adapterkit.export import REPORT, merged_model
from adapterkit.quantized import dequantize_linear
from adapterkit.state import get_store
from tests.tiny import save_tiny

TEXTS = ["w3 w4 w5 w6", "w7 w8", "w9 w10 w11 w12 w13 w14", "w20 w21 w22"]


def _perturb(model, *, seed=0, scale=0.2):
    """Non-zero adapter updates (LoRA B starts at zero) so a wrong merge shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _base(tmp_path, arch, **kwargs):
    folder = save_tiny(arch, tmp_path / f"base-{arch}", wide=kwargs.pop("wide", False))
    task = "classification" if arch in ("bert", "llama_cls") else "causal-lm"
    return ak.load_base(folder, task=task, **kwargs)


def _logits(model, tokenizer, texts=TEXTS):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits, batch["attention_mask"].bool()


@pytest.mark.parametrize(
    "arch,strategy,options",
    [
        ("llama", "lora", {"r": 4}),
        ("gpt2", "lora", {"r": 4}),  # Conv1D, fan_in_fan_out
        ("llama", "lora", {"r": 4, "use_dora": True}),
        ("llama", "lora", {"r": 4, "use_rslora": True}),
        ("bert", "lora", {"r": 4}),  # with its own label head
        ("llama_cls", "lora", {"r": 2}),
        ("bert", "head", {"train_top_layers": 1}),
        ("llama", "full", {}),
    ],
)
def test_export_reloads_in_plain_transformers_with_the_adapters_outputs(tmp_path, arch, strategy, options):
    model, tok = _base(tmp_path, arch)
    ak.attach(model, strategy, **options)
    _perturb(model)
    model.eval()
    expected, mask = _logits(model, tok)
    report = ak.export(model, tmp_path / "out", tokenizer=tok)
    auto = transformers.AutoModelForSequenceClassification if arch in ("bert", "llama_cls") else transformers.AutoModelForCausalLM
    plain = auto.from_pretrained(tmp_path / "out")
    got, _ = _logits(plain, transformers.AutoTokenizer.from_pretrained(tmp_path / "out"))
    torch.testing.assert_close(got[mask] if got.dim() == 3 else got, expected[mask] if expected.dim() == 3 else expected,
                               rtol=1e-5, atol=1e-5)
    assert not any("lora" in k for k in plain.state_dict())
    assert report.top1_agreement == 1.0 and report.mean_kl < 1e-6 and report.max_abs_logit_diff < 1e-4
    saved = json.loads((tmp_path / "out" / REPORT).read_text())
    assert saved["top1_agreement"] == 1.0 and saved["strategy"] == strategy and saved["adapter"] == "default"
    assert "config.json" in saved["files"] and "model.safetensors" in saved["files"]


def test_export_one_of_several_adapters_leaves_the_model_as_it_was(tmp_path):
    model, tok = _base(tmp_path, "bert")
    ak.attach(model, "lora", name="a", r=2)
    _perturb(model, seed=1)
    ak.attach(model, "lora", name="b", r=2)
    _perturb(model, seed=2)
    model.eval()
    with ak.use(model, "a"):
        expected_a, _ = _logits(model, tok)
    before_b, _ = _logits(model, tok)
    ak.export(model, tmp_path / "a", tokenizer=tok, name="a", texts=TEXTS, labels=[0, 1, 2, 0])
    assert ak.get_active_adapter(model) == "b"
    torch.testing.assert_close(_logits(model, tok)[0], before_b)
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "a")
    torch.testing.assert_close(_logits(plain, tok)[0], expected_a, rtol=1e-5, atol=1e-5)
    report = json.loads((tmp_path / "a" / REPORT).read_text())
    assert report["unmerged_accuracy"] == report["merged_accuracy"] and report["accuracy_delta"] == 0


def test_4bit_base_merges_into_the_dequantized_weights(tmp_path):
    model, tok = _base(tmp_path, "llama", wide=True, bits=4)
    ak.attach(model, "lora", r=4)
    _perturb(model, scale=0.05)
    model.eval()
    layer = model.model.layers[0].self_attn.q_proj
    expected_weight = dequantize_linear(layer.get_base_layer()).weight + layer.get_delta_weight("default")
    merged = merged_model(model, "default")
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected_weight.detach())
    assert not hasattr(merged.config, "quantization_config")
    report = ak.export(model, tmp_path / "out", tokenizer=tok)
    assert report.base_quantization == "bnb-4bit-nf4"
    assert report.top1_agreement == 1.0 and report.max_abs_logit_diff < 1e-3


def test_bf16_export_writes_bf16_weights(tmp_path):
    model, tok = _base(tmp_path, "llama")
    ak.attach(model, "lora", r=2)
    _perturb(model)
    report = ak.export(model, tmp_path / "out", tokenizer=tok, dtype="bfloat16")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    assert report.top1_agreement > 0.9 and report.dtype == "bfloat16"


@pytest.mark.parametrize("quantize,layer_class", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_requantized_export_loads_quantized_and_reports_its_fidelity(tmp_path, quantize, layer_class):
    model, tok = _base(tmp_path, "llama", wide=True)
    ak.attach(model, "lora", r=4)
    _perturb(model, scale=0.05)
    merged = merged_model(model, "default")
    report = ak.export(model, tmp_path / "out", tokenizer=tok, quantize=quantize, texts=TEXTS)
    assert report.quantization == ("bnb-4bit-nf4" if quantize == "nf4" else "bnb-8bit")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == report.files  # no full-precision copy left
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(back.model.layers[0].self_attn.q_proj).__name__ == layer_class
    # quantized from the merged weights: close to the merged model, not equal, and the report says how close
    ours, mask = _logits(back, tok)
    exact, _ = _logits(merged, tok)
    assert 0 < (ours - exact)[mask].abs().max() < 1.0
    assert report.max_abs_logit_diff == pytest.approx(float((ours - _logits(model, tok)[0])[mask].abs().max()), rel=1e-4)
    with pytest.raises(ak.InvalidOptionError, match="quantize must be one of nf4, fp4, int8"):
        ak.export(model, tmp_path / "o", tokenizer=tok, quantize="int4")


def test_export_of_a_saved_adapter_folder_loads_its_recorded_base(tmp_path):
    model, tok = _base(tmp_path, "bert")
    ak.attach(model, "lora", r=2)
    _perturb(model)
    model.eval()
    expected, _ = _logits(model, tok)
    ak.save(model, tmp_path / "adapter")
    report = ak.export(tmp_path / "adapter", tmp_path / "out")
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(plain, tok)[0], expected, rtol=1e-5, atol=1e-5)
    assert report.top1_agreement == 1.0


def test_a_prefix_adapter_is_refused_and_nothing_is_written(tmp_path):
    model, tok = _base(tmp_path, "llama")
    ak.attach(model, "prefix", num_virtual_tokens=2)
    with pytest.raises(ak.IncompatibleModelError, match="cannot be merged"):
        ak.export(model, tmp_path / "out", tokenizer=tok)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_export_never_overwrites_files_that_are_not_an_export(tmp_path):
    model, tok = _base(tmp_path, "llama")
    ak.attach(model, "lora", r=2)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ak.AdapterExistsError, match="never deletes your files"):
        ak.export(model, out, tokenizer=tok)
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    ak.export(model, tmp_path / "again", tokenizer=tok)
    ak.export(model, tmp_path / "again", tokenizer=tok)  # an earlier export is replaced
    assert (tmp_path / "again" / REPORT).is_file()


def test_export_options_are_checked(tmp_path):
    model, tok = _base(tmp_path, "llama")
    ak.attach(model, "lora", r=2)
    with pytest.raises(ak.InvalidOptionError, match="dtype"):
        ak.export(model, tmp_path / "o", tokenizer=tok, dtype="int3")
    with pytest.raises(ak.InvalidOptionError, match="adapterkit.save"):
        ak.export(model, tmp_path / "o", tokenizer=tok, merge=False)
    with pytest.raises(ak.InvalidOptionError, match="tokenizer"):
        ak.export(model, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert get_store(model) is not None


def test_cli_export_writes_the_checkpoint_and_prints_the_report(tmp_path, capsys):
    from adapterkit.cli import main as cli

    model, tok = _base(tmp_path, "bert")
    ak.attach(model, "lora", r=2)
    _perturb(model)
    ak.save(model, tmp_path / "adapter")
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(TEXTS)))
    assert cli(["export", str(tmp_path / "adapter"), str(tmp_path / "out"), "--dataset", str(rows)]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement  1.0000" in printed and "rows             4" in printed and "unmerged" in printed
    assert (tmp_path / "out" / "model.safetensors").is_file()
