"""The ``head`` strategy's ``train_top_layers``: the top k blocks train beside the head, base shared.

Cases by category: which parameters train (per architecture, exactly), refusals (bad k, no
layer stack), sharing one base with LoRA/prefix/other head adapters (switching swaps module
references, threads see their own adapter), save/load round trips, and training through
``ak.train`` (no feature cache, only the chosen layers move).
"""

from __future__ import annotations

import threading

import pytest
import torch
import transformers as tf
from transformers import AutoTokenizer

import adapterkit as ak
from adapterkit.registry import default_registry
from adapterkit.state import get_store
from adapterkit.targets import layer_stacks
from adapterkit.testing import check_strategy
from tests.tiny import TINY, make_batch, save_tiny

ARCHS = ["bert", "gpt2", "llama", "llama_cls", "t5"]
# The top-k blocks, head and pooler each architecture's head adapter trains (tiny models have 2 layers).
TOP = {
    "bert": (["bert.encoder.layer"], ["bert.pooler", "classifier"]),
    "gpt2": (["transformer.h"], ["lm_head"]),
    "llama": (["model.layers"], ["lm_head"]),
    "llama_cls": (["model.layers"], ["score"]),
    "t5": (["encoder.block", "decoder.block"], ["lm_head"]),
}


def fresh(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return TINY[arch]().eval()


def outputs(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def train_steps(model, arch: str, name: str, *, steps: int = 3, seed: int = 0, lr: float = 1e-2) -> None:
    ak.use(model, name)
    batch = make_batch(arch, seed=seed)
    optimizer = torch.optim.AdamW(ak.trainable_parameters(model, name).values(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()


def expected_names(model, arch: str, k: int) -> set[str]:
    stacks, rest = TOP[arch]
    names = set()
    for stack in stacks:
        blocks = model.get_submodule(stack)
        for i in range(len(blocks) - k, len(blocks)):
            names |= {f"{stack}.{i}.{n}" for n, _ in blocks[i].named_parameters()}
    for path in rest:
        names |= {f"{path}.{n}" for n, _ in model.get_submodule(path).named_parameters(remove_duplicate=False)}
    return names


# --- what trains ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_layer_stacks_are_discovered(arch):
    assert layer_stacks(fresh(arch)) == TOP[arch][0]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_parameters_are_exactly_top_layers_head_and_pooler(arch, k):
    model = fresh(arch)
    ak.attach(model, "head", train_top_layers=k)
    params = ak.trainable_parameters(model, "default")
    assert set(params) == expected_names(model, arch, k)
    assert ak.summary(model).trainable_parameters == sum(p.numel() for p in params.values())
    assert ak.summary(model).adapters[0].options["train_top_layers"] == k
    # what the model would hand an optimizer: exactly those tensors
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params.values()}
    model.train()
    model(**make_batch(arch)).loss.backward()
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got_grad == {n for n in expected_names(model, arch, k) if n in dict(model.named_parameters())}
    assert all(params[n].grad is not None for n in params)


def test_t5_trains_the_last_blocks_of_encoder_and_decoder():
    model = fresh("t5")
    ak.attach(model, "head", train_top_layers=1)
    assert sorted(get_store(model).heads["default"]) == ["decoder.block.1", "encoder.block.1", "lm_head"]
    assert default_registry.get("head")().backbone_frozen(model, "default") is False


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5"])
def test_contract(arch):
    result = check_strategy(lambda: TINY[arch](), "head", make_batch(arch), train_top_layers=1)
    assert result["loss_after"] < result["loss_before"]


def test_backbone_frozen_only_without_layers():
    model = fresh("bert")
    ak.attach(model, "head", name="plain")
    ak.attach(model, "head", name="top", train_top_layers=1)
    impl = default_registry.get("head")()
    assert impl.backbone_frozen(model, "plain") is True
    assert impl.backbone_frozen(model, "top") is False


def test_head_modules_and_top_layers_combine_without_pooler():
    model = fresh("bert")
    ak.attach(model, "head", head_modules=["classifier"], train_pooler=False, train_top_layers=1)
    assert sorted(get_store(model).heads["default"]) == ["bert.encoder.layer.1", "classifier"]


# --- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_more_layers_than_the_model_has_is_refused(arch):
    model = fresh(arch)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ak.IncompatibleModelError, match=r"train_top_layers=3 but .* has only 2 layers.*between 0 and 2"):
        ak.attach(model, "head", train_top_layers=3)
    assert ak.list_adapters(model) == []
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_a_model_without_a_layer_stack_is_refused():
    model = tf.BertForSequenceClassification(
        tf.BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=0, num_attention_heads=2, num_labels=2)
    )
    with pytest.raises(ak.IncompatibleModelError, match="no discoverable stack of transformer blocks"):
        ak.attach(model, "head", train_top_layers=1)
    ak.attach(model, "head")  # k=0 needs no stack
    assert ak.list_adapters(model) == ["default"]


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2"])
def test_bad_values_are_refused(bad):
    with pytest.raises(ak.InvalidOptionError, match="train_top_layers must be a whole number"):
        ak.attach(fresh("bert"), "head", train_top_layers=bad)


def test_head_modules_inside_the_top_layers_are_refused():
    model = fresh("bert")
    with pytest.raises(ak.IncompatibleModelError, match=r"'bert.encoder.layer.1', which overlaps 'bert.encoder.layer.1.output.dense'"):
        ak.attach(model, "head", head_modules=["classifier", "bert.encoder.layer.1.output.dense"], train_top_layers=1)
    assert ak.list_adapters(model) == []
    ak.attach(model, "head", name="inner", head_modules=["bert.encoder.layer.1.output.dense"])
    with pytest.raises(ak.IncompatibleModelError, match="another head adapter"):
        ak.attach(model, "head", name="top", train_top_layers=1)
    assert ak.list_adapters(model) == ["inner"]


# --- one base, many adapters --------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_many():
    """LoRA, prefix and head adapters with k = 0, 1, 2 on one BERT base, and each one's logits."""
    model = fresh("bert")
    ak.attach(model, "lora", name="a", r=2)
    train_steps(model, "bert", "a", seed=1)
    ak.attach(model, "prefix", name="p", num_virtual_tokens=2)
    train_steps(model, "bert", "p", seed=2)
    for k in (0, 1, 2):
        ak.attach(model, "head", name=f"h{k}", train_top_layers=k)
        train_steps(model, "bert", f"h{k}", seed=3 + k)
    batch = {k: v for k, v in make_batch("bert").items() if k != "labels"}
    expected = {}
    for name in ["a", "p", "h0", "h1", "h2", None]:
        ak.use(model, name)
        expected[name] = outputs(model, batch)
    for x in expected:
        for y in expected:
            assert x == y or not torch.allclose(expected[x], expected[y]), f"{x} and {y} agree: nothing would be shown"
    return model, batch, expected


def test_switching_restores_each_adapter_without_copying_weights(bert_many):
    model, batch, expected = bert_many
    store = get_store(model)
    pointers = {n: p.data_ptr() for name in store.heads for m in store.heads[name].values() for n, p in m.named_parameters()}
    for name in ["h2", "a", "h1", None, "p", "h0", "h2", "h1"]:
        ak.use(model, name)
        torch.testing.assert_close(outputs(model, batch), expected[name], rtol=1e-5, atol=1e-5)
    ak.use(model, "h1")
    assert model.bert.encoder.layer[1] is store.heads["h1"]["bert.encoder.layer.1"]
    assert model.bert.encoder.layer[0] is store.base_heads["bert.encoder.layer.0"]
    ak.use(model, "h2")
    assert model.bert.encoder.layer[0] is store.heads["h2"]["bert.encoder.layer.0"]
    after = {n: p.data_ptr() for name in store.heads for m in store.heads[name].values() for n, p in m.named_parameters()}
    assert after == pointers


def test_layer_copies_made_after_lora_carry_no_lora(bert_many):
    model, batch, expected = bert_many
    store = get_store(model)
    top = store.heads["h1"]["bert.encoder.layer.1"]
    assert type(top.attention.self.query) is torch.nn.Linear
    assert not any("lora" in n for n in ak.trainable_parameters(model, "h1"))
    # the base's own block still carries the LoRA adapter, and the LoRA adapter is unchanged
    assert hasattr(store.base_heads["bert.encoder.layer.1"].attention.self.query, "lora_A")
    with ak.use(model, "a"):
        torch.testing.assert_close(outputs(model, batch), expected["a"], rtol=1e-5, atol=1e-5)


def test_two_threads_with_different_k_each_see_their_own(bert_many):
    model, batch, expected = bert_many
    ak.use(model, "a")
    wrong, errors = [], []
    barrier = threading.Barrier(3)

    def worker(name):
        try:
            barrier.wait()
            for _ in range(30):
                with ak.use(model, name), torch.no_grad():
                    out = model(**batch).logits
                if not torch.allclose(out, expected[name], rtol=1e-5, atol=1e-5):
                    wrong.append(name)
        except BaseException as err:  # noqa: BLE001 - reported to the test
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("h1", "h2", "a")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not wrong, sorted(set(wrong))
    assert ak.get_active_adapter(model) == "a"


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_generation_routes_layer_copies(arch):
    """generate() with the KV cache through routed block copies: a block, default or routed, is the adapter's."""
    model = fresh(arch)
    for k in (1, 2):
        ak.attach(model, "head", name=f"h{k}", train_top_layers=k)
        train_steps(model, arch, f"h{k}", seed=k, steps=5, lr=5e-2)
    ids = make_batch(arch, batch_size=1)["input_ids"]
    want = {}
    for name in ("h1", "h2", None):
        ak.use(model, name)
        want[name] = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert len({tuple(v.flatten().tolist()) for v in want.values()}) == 3, "the adapters generate alike: nothing shown"
    for default in ("h1", "h2", None):
        ak.use(model, default)
        for name in ("h1", "h2", None):
            with ak.use(model, name):
                assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), want[name])


def test_lora_attached_while_a_layer_adapter_is_active_adapts_the_base():
    batch = make_batch("bert")
    alone = fresh("bert")
    ak.attach(alone, "lora", name="a", r=2)
    train_steps(alone, "bert", "a", seed=1)
    want_a = outputs(alone, batch)
    model = fresh("bert")
    ak.attach(model, "head", name="h", train_top_layers=1)
    train_steps(model, "bert", "h", seed=3)
    want_h = outputs(model, batch)
    ak.attach(model, "lora", name="a", r=2)  # while "h" (and its block copy) is installed
    with torch.no_grad():
        for key, p in ak.trainable_parameters(model, "a").items():
            p.copy_(ak.trainable_parameters(alone, "a")[key])
    assert type(get_store(model).heads["h"]["bert.encoder.layer.1"].attention.self.query) is torch.nn.Linear
    torch.testing.assert_close(outputs(model, batch), want_a, rtol=1e-5, atol=1e-5)
    ak.use(model, "h")
    torch.testing.assert_close(outputs(model, batch), want_h, rtol=1e-5, atol=1e-5)


def test_detaching_lora_while_a_layer_adapter_is_active_keeps_that_adapter():
    batch = make_batch("bert")
    model = fresh("bert")
    reference = outputs(model, batch)
    ak.attach(model, "lora", name="a", r=2)
    train_steps(model, "bert", "a", seed=1)
    ak.attach(model, "head", name="h", train_top_layers=1)
    train_steps(model, "bert", "h", seed=3)
    want_h = outputs(model, batch)
    ak.detach(model, "a")  # "h" is the default
    torch.testing.assert_close(outputs(model, batch), want_h, rtol=1e-5, atol=1e-5)
    ak.use(model, None)
    assert type(model.bert.encoder.layer[1].attention.self.query) is torch.nn.Linear
    torch.testing.assert_close(outputs(model, batch), reference, rtol=1e-5, atol=1e-5)


# --- save / load --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama_cls", "t5"])
def test_save_load_round_trip_into_a_fresh_base(tmp_path, arch):
    model = fresh(arch)
    ak.attach(model, "head", train_top_layers=1)
    train_steps(model, arch, "default")
    batch = make_batch(arch)
    want = outputs(model, batch)
    folder = ak.save(model, tmp_path / "adapter")
    other = fresh(arch)
    assert not torch.allclose(outputs(other, batch), want)
    ak.load(other, folder, name="top")
    torch.testing.assert_close(outputs(other, batch), want, rtol=0, atol=0)
    assert ak.get_adapter_record(other, "top").config.train_top_layers == 1
    assert set(ak.trainable_parameters(other, "top")) == expected_names(other, arch, 1)


def test_load_beside_other_adapters(tmp_path, bert_many):
    model, batch, expected = bert_many
    folder = ak.save(model, tmp_path / "h2", name="h2")
    other = fresh("bert")
    ak.attach(other, "lora", name="a", r=2)
    ak.load(other, folder, name="mine")
    torch.testing.assert_close(outputs(other, batch), expected["h2"], rtol=1e-6, atol=1e-6)
    ak.use(other, None)
    torch.testing.assert_close(outputs(other, batch), expected[None], rtol=1e-6, atol=1e-6)


def test_detach_gives_back_the_base_blocks():
    model = fresh("bert")
    batch = make_batch("bert")
    reference = outputs(model, batch)
    block = model.bert.encoder.layer[1]
    ak.attach(model, "head", name="t", train_top_layers=1)
    train_steps(model, "bert", "t")
    assert model.bert.encoder.layer[1] is not block
    ak.detach(model, "t")
    assert model.bert.encoder.layer[1] is block and type(block) is tf.models.bert.modeling_bert.BertLayer
    torch.testing.assert_close(outputs(model, batch), reference)


# --- training -----------------------------------------------------------------------------------
def test_train_moves_only_the_top_layers_and_skips_the_feature_cache(tmp_path):
    tok = AutoTokenizer.from_pretrained(save_tiny("bert", tmp_path / "tok"))
    model = ak.attach(fresh("bert"), "head", train_top_layers=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"text": " ".join(f"w{(i * 7 + j) % 30 + 6 + 20 * (i % 2)}" for j in range(6)), "label": i % 2} for i in range(32)]
    metrics = ak.train(model, tok, rows, num_epochs=1, batch_size=8, max_length=16, learning_rate=1e-2, show_progress=False)
    assert metrics["cached_features"] is False
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= expected_names(model, "bert", 1)
    assert any(n.startswith("bert.encoder.layer.1.") for n in changed)


@pytest.mark.bnb
def test_top_layers_of_a_4bit_base_train_as_float_copies(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    model, _ = ak.load_base(save_tiny("llama", tmp_path / "llama", wide=True), task="causal-lm", bits=4)
    batch = make_batch("llama")
    ak.attach(model, "lora", name="a", r=2)
    ak.attach(model, "head", name="h", train_top_layers=1)
    store = get_store(model)
    top = store.heads["h"]["model.layers.1"]
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in top.modules())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in store.base_heads["model.layers.1"].modules())
    ak.use(model, "h")
    model.train()
    first = model(**batch).loss.item()
    train_steps(model, "llama", "h", steps=4)
    assert model(**batch).loss.item() < first
    want = outputs(model, batch)
    ak.use(model, "a")
    with ak.use(model, "h"):
        torch.testing.assert_close(outputs(model, batch), want, rtol=1e-5, atol=1e-5)
