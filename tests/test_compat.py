"""adapterkit.compat against the installed libraries: each private behaviour adapterkit relies on.

A failure here means a dependency changed something adapterkit reaches into; the function
named in the test (and its docstring's version) is the one place to update.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from adapterkit.compat import peft as peft_compat
from adapterkit.compat import torch as torch_compat
from adapterkit.compat import transformers as transformers_compat
from tests.tiny import TINY, make_batch, save_tiny


# --- peft --------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _two_adapter_layer():
    """A peft LoRA layer carrying adapters 'a' and 'b' with distinct, non-zero updates."""
    import peft

    torch.manual_seed(0)
    net = _Net()
    for name in ("a", "b"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")  # two adapters on purpose
            peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]), net,
                                         adapter_name=name)
    layer = net.proj
    with torch.no_grad():
        for name in ("a", "b"):
            layer.lora_B[name].weight.normal_()
    return layer


def _expected(layer, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    out = layer.get_base_layer()(x)
    for n in names:
        out = out + layer.scaling[n] * layer.lora_B[n](layer.lora_A[n](x))
    return out


def test_setting_the_active_adapter_attribute_changes_what_the_layer_runs():
    layer = _two_adapter_layer()
    x = torch.randn(3, 8)
    with torch.no_grad():
        for names in (["a"], ["b"], ["a", "b"], []):
            peft_compat.set_active_adapters([("proj", layer)], names)
            assert layer.active_adapters == names
            torch.testing.assert_close(layer(x), _expected(layer, x, names))
    # peft's own switch stores its choice in the same instance attribute.
    layer.set_adapter("b")
    assert layer.__dict__[peft_compat.ACTIVE_ADAPTER_ATTR] == ["b"]


def test_peft_reads_the_active_adapter_through_attribute_access():
    """adapterkit.routing puts a class-level descriptor over the attribute; peft must go through it."""
    layer = _two_adapter_layer()
    peft_compat.set_active_adapters([("proj", layer)], ["a"])

    class Always:
        def __get__(self, obj, owner):
            return self if obj is None else ["b"]

        def __set__(self, obj, value):
            obj.__dict__[peft_compat.ACTIVE_ADAPTER_ATTR] = value

    layer.__class__ = type(type(layer).__name__, (type(layer),), {peft_compat.ACTIVE_ADAPTER_ATTR: Always()})
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _expected(layer, x, ["b"]))


def test_enabling_a_layer_clears_the_disable_flag_and_leaves_requires_grad_alone():
    layer = _two_adapter_layer()
    peft_compat.set_active_adapters([("proj", layer)], ["a"])
    x = torch.randn(3, 8)
    layer.enable_adapters(False)
    layer.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x))
        peft_compat.enable_adapter_layer(layer)
        assert not layer.disable_adapters
        torch.testing.assert_close(layer(x), _expected(layer, x, ["a"]))
    assert not any(p.requires_grad for p in layer.parameters())


# --- transformers ------------------------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        batch = make_batch("bert", batch_size=4)
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def test_trainer_calls_the_checkpoint_hooks_on_save_resume_and_best_model(tmp_path):
    import transformers

    saved, loaded = [], []

    def save(trainer, output_dir):
        assert isinstance(trainer, transformers.Trainer)
        os.makedirs(output_dir, exist_ok=True)  # Trainer writes its own state beside the model
        saved.append(output_dir)

    def load(trainer, checkpoint, model):
        assert isinstance(model, nn.Module)
        loaded.append(checkpoint)

    cls = transformers_compat.checkpoint_trainer_class(save, load)

    def trainer(max_steps: int):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "run"), max_steps=max_steps, per_device_train_batch_size=2,
            save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
            load_best_model_at_end=True, metric_for_best_model="loss", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0, use_cpu=True,
        )
        return cls(model=TINY["bert"](), args=args, train_dataset=_Rows(), eval_dataset=_Rows())

    trainer(2).train()
    checkpoints = [str(tmp_path / "run" / f"checkpoint-{i}") for i in (1, 2)]
    assert [s for s in saved if "checkpoint-" in s] == checkpoints
    assert len(loaded) == 1 and loaded[0] in checkpoints  # the best model, loaded at the end
    saved.clear()
    loaded.clear()
    trainer(3).train(resume_from_checkpoint=checkpoints[1])
    assert loaded[0] == checkpoints[1]
    final = tmp_path / "final"
    trainer(1).save_model(str(final))
    assert saved[-1] == str(final)


@pytest.mark.parametrize("kind", ["eager", "sdpa"])
def test_attn_implementation_is_what_the_model_was_loaded_with(tmp_path, kind):
    import transformers

    folder = save_tiny("llama", tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation=kind)
    assert transformers_compat.attn_implementation(model.config) == kind
    assert transformers_compat.attn_implementation(object()) is None


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return save_tiny("llama", tmp_path_factory.mktemp("llama"), wide=True)


@pytest.mark.bnb
def test_the_peft_flag_is_what_lets_trainer_take_a_quantized_model(llama_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    import transformers

    import adapterkit as ak

    model, _ = ak.load_base(llama_dir, task="causal-lm", bits=4)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=model, args=args)
    assert not transformers_compat.is_marked_peft_loaded(model)
    transformers_compat.mark_peft_loaded(model)
    assert transformers_compat.is_marked_peft_loaded(model)
    transformers.Trainer(model=model, args=args)
    transformers_compat.unmark_peft_loaded(model)
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=model, args=args)


# --- torch -------------------------------------------------------------------------------------
def test_tensor_version_bumps_on_in_place_writes_only():
    layer = nn.Linear(4, 4)
    p = layer.weight
    v = torch_compat.tensor_version(p)
    assert isinstance(v, int)
    layer(torch.randn(2, 4)).sum().backward()  # reads do not count
    _ = p + 1
    assert torch_compat.tensor_version(p) == v
    with torch.no_grad():
        p.copy_(torch.zeros_like(p))
    assert torch_compat.tensor_version(p) > v
    v = torch_compat.tensor_version(p)
    torch.optim.SGD([p], lr=0.1).step()
    assert torch_compat.tensor_version(p) > v
    v = torch_compat.tensor_version(p)
    with torch.no_grad():
        p.mul_(2)
    assert torch_compat.tensor_version(p) > v


def test_compiled_inner_is_the_module_torch_compile_wraps():
    layer = nn.Linear(2, 2)
    compiled = torch.compile(layer)  # compiles lazily, on the first call: none happens here
    assert compiled is not layer and torch_compat.compiled_inner(compiled) is layer
    assert torch_compat.compiled_inner(layer) is None


def test_copy_all_copies_into_views_converting_dtypes_in_one_call():
    slots = torch.zeros(3, 4, 5)
    halves = torch.zeros(2, 5, dtype=torch.bfloat16)
    a, b = torch.randn(2, 5), torch.randn(5, 4)  # b lands transposed: a strided source
    torch_compat.copy_all([slots[1, :2], slots[2], halves], [a, b.T, a])
    assert torch.equal(slots[1, :2], a) and torch.equal(slots[2], b.T) and not slots[0].any()
    assert halves.dtype == torch.bfloat16 and torch.equal(halves, a.to(torch.bfloat16))
    assert getattr(torch, "_foreach_copy_", None) is not None  # without it the loop runs: slower, same result


# --- huggingface_hub ---------------------------------------------------------------------------
def test_client_factory_is_what_set_client_factory_installed():
    from huggingface_hub.utils import set_client_factory

    from adapterkit.compat.huggingface_hub import client_factory

    before = client_factory()
    assert callable(before)

    def mine():
        return before()

    set_client_factory(mine)
    try:
        assert client_factory() is mine
    finally:
        set_client_factory(before)
    assert client_factory() is before


# --- bitsandbytes ------------------------------------------------------------------------------
@pytest.mark.bnb
def test_the_cpu_repacking_switch_is_what_triggers_repacking_and_unpacking_undoes_it(llama_dir):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    import adapterkit as ak
    from adapterkit.compat import bnb as bnb_compat

    model, _ = ak.load_base(llama_dir, task="causal-lm", bits=4)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert type(layer).__name__ == "Linear4bit"
    weight = layer.weight
    dense = F.dequantize_4bit(weight.data, weight.quant_state).reshape(-1).clone()
    idx = torch.randperm(dense.numel(), generator=torch.Generator().manual_seed(0))[:300]
    x = torch.randn(2, 3, layer.in_features)
    layer.eval()
    # Force the switch on (this CPU may lack AVX512-BF16): an eval, no-grad forward then repacks.
    layer.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        layer(x)
    assert bnb_compat.is_cpu_packed(layer.weight.quant_state)
    torch.testing.assert_close(bnb_compat.values_4bit(layer.weight, idx), dense[idx].float(), rtol=1e-2, atol=1e-6)
    assert bnb_compat.unpack_cpu_weight(layer)
    assert not bnb_compat.is_cpu_packed(layer.weight.quant_state)
    assert not bnb_compat.unpack_cpu_weight(layer)
    unpacked = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).reshape(-1)
    torch.testing.assert_close(unpacked, dense, rtol=1e-2, atol=1e-6)  # absmax went through bf16
    assert bnb_compat.disable_cpu_repacking(layer)
    with torch.no_grad():
        layer(x)
    assert not bnb_compat.is_cpu_packed(layer.weight.quant_state)
    assert not bnb_compat.disable_cpu_repacking(nn.Linear(2, 2))


@pytest.mark.bnb
def test_int8_scales_dequantize_an_8bit_weight(llama_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    import adapterkit as ak
    from adapterkit.compat import bnb as bnb_compat

    model, _ = ak.load_base(llama_dir, task="causal-lm", bits=8)
    path = "model.layers.0.mlp.down_proj"
    layer = model.get_submodule(path)
    assert type(layer).__name__ == "Linear8bitLt"
    scb = bnb_compat.int8_scales(layer.weight, layer)
    assert scb is not None and scb.shape == (layer.out_features,)
    original = AutoModelForCausalLM.from_pretrained(llama_dir).get_submodule(path).weight.detach()
    dense = layer.weight.data.float() * scb.float().unsqueeze(1) / 127.0
    step = original.abs().amax(dim=1, keepdim=True) / 127.0  # one int8 step per row
    assert ((dense - original).abs() <= step).all()
    assert bnb_compat.int8_scales(torch.zeros(2, 2)) is None


# --- the package -------------------------------------------------------------------------------
def test_compat_modules_import_only_torch_at_module_level():
    """compat sits at the bottom: any adapterkit module may import it (no cycle), and importing it
    loads no optional package (bitsandbytes) and nothing slow (peft, transformers)."""
    import ast
    from pathlib import Path

    import adapterkit.compat

    folder = Path(adapterkit.compat.__file__).parent
    modules = sorted(folder.glob("*.py"))
    assert {m.stem for m in modules} >= {"__init__", "peft", "transformers", "bnb", "torch", "huggingface_hub", "datasets"}
    for module in modules:
        tree = ast.parse(module.read_text())
        top = set()
        for node in tree.body:  # module level only; imports inside functions are the lazy ones
            if isinstance(node, ast.Import):
                top |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                top.add((node.module or "").split(".")[0])
        assert top <= {"__future__", "collections", "inspect", "typing", "torch"}, f"{module.name} imports {sorted(top)}"


def test_a_registered_attention_runs_by_name_with_sdpa_masks_and_can_be_switched_back():
    calls = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        calls.append(attention_mask)
        return transformers_compat.sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    transformers_compat.register_attention("adapterkit_test_recording", recording)
    model = TINY["bert"]().eval()
    batch = make_batch("bert")  # padding in the last row: the mask must reach the function
    expected = model(**batch).logits
    transformers_compat.set_attn_implementation(model.config, "adapterkit_test_recording")
    torch.testing.assert_close(model(**batch).logits, expected)
    assert len(calls) == 2 and calls[0] is not None and calls[0].dtype == torch.bool
    transformers_compat.set_attn_implementation(model.config, "sdpa")
    model(**batch)
    assert len(calls) == 2


def test_a_dataset_fingerprint_is_a_string_that_every_transform_changes():
    import datasets

    from adapterkit.compat import datasets as datasets_compat

    ds = datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])
    first = datasets_compat.fingerprint(ds)
    assert isinstance(first, str) and first
    mapped = ds.map(lambda row: {"n": len(row["text"])})
    assert datasets_compat.fingerprint(mapped) not in (None, first)
    assert datasets_compat.fingerprint(ds.map(lambda row: row, new_fingerprint="f" * 32)) == "f" * 32
    assert datasets_compat.fingerprint(object()) is None


def test_the_cache_goes_in_under_the_name_the_forward_takes_and_comes_out_readable():
    model = TINY["llama"]().eval()
    name = transformers_compat.cache_argument(model)
    assert name in ("cache", "past_key_values")
    ids = torch.tensor([[5, 6, 7, 8]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated spelling would warn
        out = model(input_ids=ids[:, :3], use_cache=True)
        cache = transformers_compat.output_cache(out)
        assert cache is not None and cache.get_seq_length() == 3
        step = model(input_ids=ids[:, 3:], use_cache=True, **{name: cache})
    full = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-4, atol=1e-5)
