"""Prefix tuning on encoder-decoder models (T5, BART): prefixes in the encoder self-attention,
the decoder self-attention and the cross-attention; training, generation, saving, routing."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import transformers as tf

import adapterkit as ak
from adapterkit.artifacts import SIDECAR
from adapterkit.state import get_store
from adapterkit.strategies import prefix as prefix_mod
from adapterkit.testing import check_strategy
from tests.tiny import TINY, VOCAB

P = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; several threads on a shared 2-core machine thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bart_config(**overrides) -> tf.BartConfig:
    options = dict(
        vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, forced_bos_token_id=None, num_labels=3,
        init_std=0.3,  # (0.02 leaves a tiny model's greedy output constant)
    )
    options.update(overrides)
    return tf.BartConfig(**options)


MODELS = {
    "t5": TINY["t5"],
    # a decoder deeper than the encoder, so the table's three parts have different sizes
    "t5_deep": lambda: tf.T5ForConditionalGeneration(
        tf.T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=3, num_heads=2,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )
    ),
    "bart": lambda: tf.BartForConditionalGeneration(_bart_config()),
    # (transformers 5.24 cannot generate with a T5 whose decoder is deeper than its encoder; BART can)
    "bart_deep": lambda: tf.BartForConditionalGeneration(_bart_config(encoder_layers=1, decoder_layers=3)),
    "bart_cls": lambda: tf.BartForSequenceClassification(_bart_config()),
    "t5_cls": lambda: tf.T5ForSequenceClassification(
        tf.T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, num_labels=3,
        )
    ),
}


def fresh(arch: str, seed: int = 0, attn: str | None = None):
    torch.manual_seed(seed)
    model = MODELS[arch]()
    if attn:
        model.set_attn_implementation(attn)
    return model.eval()


def batch_for(arch: str, *, batch_size: int = 4, length: int = 8, seed: int = 0, pad: bool = True):
    """Encoder input with right padding in the last row, labels, and explicit decoder inputs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        ids[-1, -3:] = 0
        mask[-1, -3:] = 0
    if arch.endswith("_cls"):
        ids[:, -1] = 2 if arch.startswith("bart") else 1  # classified from the last </s>
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(batch_size) % 3}
    labels = torch.randint(3, VOCAB, (batch_size, 5), generator=g)
    start = torch.full((batch_size, 1), 0 if arch.startswith("t5") else 2, dtype=torch.long)
    return {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "decoder_input_ids": torch.cat([start, labels[:, :-1]], 1),
    }


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def trained(arch: str, name: str = "default", model=None, steps: int = 5, seed: int = 0):
    """Attach a prefix and train it with a plain torch loop on the model's own loss."""
    model = model if model is not None else fresh(arch)
    ak.attach(model, "prefix", name=name, num_virtual_tokens=P)
    batch = batch_for(arch, seed=seed)
    opt = torch.optim.AdamW(list(ak.trainable_parameters(model, name).values()), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return model.eval()


def randomize(model, name: str = "default", seed: int = 1) -> None:
    """A prefix far from its initialisation, so every part visibly matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ak.trainable_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=g))


def _parts(model) -> dict[str, slice]:
    """Column slices of the table per part: encoder self, decoder self, cross (see prefix.py)."""
    g = ak.trainable_parameters(model, "default")["prompt_embeddings"]
    encoder_layers, decoder_layers = prefix_mod._geometry(model).parts
    width = g.shape[1] // (encoder_layers + 2 * decoder_layers)
    bounds = [0, encoder_layers, encoder_layers + decoder_layers, encoder_layers + 2 * decoder_layers]
    names = ["encoder", "decoder", "cross"]
    return {n: slice(bounds[i] * width, bounds[i + 1] * width) for i, n in enumerate(names)}


# --- the contract --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_strategy_contract(arch):
    batch = batch_for(arch)
    result = check_strategy(lambda: MODELS[arch](), "prefix", batch, num_virtual_tokens=P)
    assert result["loss_after"] < result["loss_before"]


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_only_the_table_and_label_head_train(arch):
    model = fresh(arch)
    ak.attach(model, "prefix", num_virtual_tokens=P)
    trainable = ak.trainable_parameters(model, "default")
    encoder_layers, decoder_layers = prefix_mod._geometry(model).parts
    kv_dim = 16  # heads * head_dim of every tiny model here
    assert trainable["prompt_embeddings"].shape == (P, (encoder_layers + 2 * decoder_layers) * 2 * kv_dim)
    heads = {k for k in trainable if k != "prompt_embeddings"}
    if arch.endswith("_cls"):
        assert heads and all(k.startswith("classification_head.") for k in heads)
    else:
        assert not heads  # the vocabulary projection is the base's
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable.values()}


# --- the prefix reaches all three attentions -------------------------------------------------
@pytest.mark.parametrize("arch", ["t5", "t5_deep", "bart", "bart_deep"])
def test_each_part_of_the_table_reaches_its_attention(arch):
    model = fresh(arch)
    batch = batch_for(arch)
    ak.attach(model, "prefix", num_virtual_tokens=P)
    randomize(model)
    table = ak.trainable_parameters(model, "default")["prompt_embeddings"]
    encoder = model.get_encoder()

    def encoded():
        with torch.no_grad():
            return encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

    with ak.use(model, None):
        bare_encoder = encoded()
    reference_encoder, reference = encoded(), logits(model, batch)
    assert not torch.allclose(reference_encoder, bare_encoder)  # the encoder sees its prefix
    for part, cols in _parts(model).items():
        with torch.no_grad():
            saved = table[:, cols].clone()
            table[:, cols] += 1.0
        try:
            changed_encoder = not torch.allclose(encoded(), reference_encoder)
            changed_logits = not torch.allclose(logits(model, batch), reference)
        finally:
            with torch.no_grad():
                table[:, cols] = saved
        assert changed_logits, f"the {part} prefix does not reach the outputs"
        assert changed_encoder == (part == "encoder"), f"the {part} prefix reached the encoder: {changed_encoder}"
    model.train()
    model(**batch).loss.backward()
    for part, cols in _parts(model).items():
        assert table.grad[:, cols].abs().sum() > 0, f"the {part} prefix takes no gradient"


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_eager_and_sdpa_masks_agree_with_a_prefix(arch):
    """Boolean (sdpa) and additive (eager) masks are both widened over the prefix, padding stays masked."""
    batch = batch_for(arch)
    outs = []
    for attn in ("eager", "sdpa"):
        model = fresh(arch, attn=attn)
        ak.attach(model, "prefix", num_virtual_tokens=P)
        randomize(model)
        outs.append(logits(model, {**batch, "decoder_attention_mask": torch.ones_like(batch["decoder_input_ids"])}))
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_padding_does_not_leak_into_a_prefixed_row(arch):
    model = fresh(arch)
    ak.attach(model, "prefix", num_virtual_tokens=P)
    randomize(model)
    batch = batch_for(arch, pad=False)
    padded = {k: v.clone() for k, v in batch.items()}
    padded["input_ids"] = torch.cat([batch["input_ids"], torch.full((4, 3), 5)], 1)  # masked junk, not pad ids
    padded["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(4, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(logits(model, padded), logits(model, batch))


# --- generation -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["t5", "bart", "bart_deep"])
def test_generate_matches_greedy_full_forward(arch):
    """generate() (cached prefixes, cross-attention reused from step 2) equals re-running the decoder."""
    model = fresh(arch)
    model.generation_config.eos_token_id = None  # always the full length
    ak.attach(model, "prefix", num_virtual_tokens=P)
    randomize(model)
    batch = batch_for(arch, batch_size=2)
    enc = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    generated = model.generate(**enc, max_new_tokens=6, do_sample=False, min_length=0)
    current = generated[:, :1]
    for _ in range(generated.shape[1] - 1):
        with torch.no_grad():
            step = model(**enc, decoder_input_ids=current, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        current = torch.cat([current, step], 1)
    assert generated.tolist() == current.tolist()
    with ak.use(model, None):
        bare = model.generate(**enc, max_new_tokens=6, do_sample=False, min_length=0)
    assert bare.tolist() != generated.tolist()


def test_beam_search_runs_with_a_prefix():
    model = fresh("t5")
    ak.attach(model, "prefix", num_virtual_tokens=P)
    randomize(model)
    batch = batch_for("t5", batch_size=2)
    enc = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    out = model.generate(**enc, num_beams=3, max_new_tokens=4)
    assert out.shape[0] == 2


# --- save and load --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_save_load_reproduces_outputs_and_generation(tmp_path, arch):
    from safetensors import safe_open

    model = trained(arch)
    batch = batch_for(arch)
    expected = logits(model, batch)
    folder = ak.save(model, tmp_path / "adapter")
    files = sorted(p.name for p in folder.iterdir())
    assert "adapter.safetensors" in files and "adapter_config.json" not in files  # peft could not reproduce it
    sidecar = json.loads((folder / SIDECAR).read_text())
    assert sidecar["strategy"] == "prefix" and sidecar["options"]["num_virtual_tokens"] == P
    assert sidecar["task"] == ("classification" if arch.endswith("_cls") else "seq2seq")
    encoder_layers, decoder_layers = prefix_mod._geometry(model).parts
    with safe_open(str(folder / "adapter.safetensors"), "pt") as f:
        layout = json.loads(f.metadata()["adapterkit_prefix_layout"])
    assert layout["layers"] == [encoder_layers, decoder_layers, decoder_layers]
    assert layout["order"] == ["encoder_self_attention", "decoder_self_attention", "cross_attention"]

    other = ak.load(fresh(arch), str(folder))
    torch.testing.assert_close(logits(other, batch), expected, rtol=0, atol=0)
    if not arch.endswith(("_cls", "t5_deep")):
        enc = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        assert other.generate(**enc, max_new_tokens=5).tolist() == model.generate(**enc, max_new_tokens=5).tolist()


def test_plain_peft_seq2seq_prefix_is_refused_clearly(tmp_path):
    """peft's T5 prefix reaches only the decoder self-attention; adapterkit says so instead of misloading."""
    import peft

    peft_model = peft.get_peft_model(
        fresh("t5"), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)
    )
    peft_model.save_pretrained(tmp_path / "plain")
    base = fresh("t5")
    with pytest.raises(ak.AdapterMismatchError, match="only the decoder self-attention"):
        ak.load(base, str(tmp_path / "plain"))
    assert ak.list_adapters(base) == []
    assert not any(p.requires_grad is False for p in base.parameters())  # left as it was: nothing frozen


def test_wrong_shape_is_refused_before_any_copy(tmp_path):
    from safetensors.torch import load_file

    folder = ak.save(trained("t5"), tmp_path / "a")
    tensors = load_file(str(folder / "adapter.safetensors"))
    tensors["prompt_embeddings"] = tensors["prompt_embeddings"][:, :-16]
    base = fresh("t5")
    ak.attach(base, "prefix", name="mine", num_virtual_tokens=P)
    before = ak.trainable_parameters(base, "mine")["prompt_embeddings"].detach().clone()
    with pytest.raises(ak.AdapterMismatchError, match="prompt_embeddings"):
        prefix_mod.PrefixStrategy().load_state_dict(base, "mine", {"prompt_embeddings": tensors["prompt_embeddings"]})
    assert torch.equal(ak.trainable_parameters(base, "mine")["prompt_embeddings"], before)


# --- routing: per thread, and one choice per encoder forward ------------------------------------
def test_use_routes_per_thread_on_t5():
    model = fresh("t5")
    trained("t5", name="a", model=model, seed=1)
    trained("t5", name="b", model=model, seed=2)
    batch = batch_for("t5")
    expected = {}
    for name in ("a", "b", None):
        with ak.use(model, name):
            expected[name] = logits(model, batch)
    assert not torch.allclose(expected["a"], expected["b"])
    ak.use(model, "b")
    errors, results = [], {}

    def run(name):
        try:
            with ak.use(model, name):
                for _ in range(5):
                    results.setdefault(name, []).append(logits(model, batch))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", None)]
    for t in threads:
        t.start()
    default = [logits(model, batch) for _ in range(5)]
    for t in threads:
        t.join(timeout=60)
    assert not errors
    for out in default:
        torch.testing.assert_close(out, expected["b"])
    for name in ("a", None):
        for out in results[name]:
            torch.testing.assert_close(out, expected[name])


def test_encoder_keeps_one_prefix_when_the_default_changes_mid_forward():
    model = fresh("t5")
    for name, seed in (("a", 1), ("b", 2)):
        ak.attach(model, "prefix", name=name, num_virtual_tokens=P)
        randomize(model, name, seed=seed)
    batch = batch_for("t5")
    encoder = model.get_encoder()
    ak.use(model, "a")
    with torch.no_grad():
        pure_a = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    # another thread's statement-form use() lands between the encoder's first and second layer
    def switch(*_):
        ak.use(model, "b")

    handle = encoder.block[0].register_forward_hook(switch)
    try:
        with torch.no_grad():
            torn = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    finally:
        handle.remove()
    assert ak.get_active_adapter(model) == "b"
    torch.testing.assert_close(torn, pure_a, rtol=0, atol=0)
    assert prefix_mod._PINNED.get() == {}  # nothing pinned outlives the forward


def test_pin_is_released_when_the_encoder_raises():
    model = fresh("t5")
    ak.attach(model, "prefix", num_virtual_tokens=P)
    with pytest.raises(ValueError):
        model.get_encoder()(input_ids=None)  # transformers refuses: neither ids nor embeddings
    assert prefix_mod._PINNED.get() == {}


# --- what this relies on, and what it refuses ---------------------------------------------------
def test_attention_module_layout_of_transformers():
    """The transformers internals the encoder-decoder prefix relies on (prefix._attention_modules)."""
    t5 = fresh("t5_deep")
    found = prefix_mod._attention_modules(t5.get_encoder())
    assert [m for m, _, _ in found] == [b.layer[0].SelfAttention for b in t5.encoder.block]
    assert {(c, k) for _, c, k in found} == {("cache", "mask")}
    found = prefix_mod._attention_modules(t5.get_decoder())
    expected = [m for b in t5.decoder.block for m in (b.layer[0].SelfAttention, b.layer[1].EncDecAttention)]
    assert [m for m, _, _ in found] == expected
    assert [m.layer_idx for m, _, _ in found] == [0, 0, 1, 1, 2, 2]
    bart = fresh("bart")
    found = prefix_mod._attention_modules(bart.get_encoder())
    assert [m for m, _, _ in found] == [layer.self_attn for layer in bart.model.encoder.layers]
    assert {(c, k) for _, c, k in found} == {("cache", "attention_mask")}
    found = prefix_mod._attention_modules(bart.get_decoder())
    layers = bart.model.decoder.layers
    assert [m for m, _, _ in found] == [m for layer in layers for m in (layer.self_attn, layer.encoder_attn)]


def test_a_deep_copy_carries_its_own_prefix():
    import copy

    model = trained("t5")
    batch = batch_for("t5")
    expected = logits(model, batch)
    other = copy.deepcopy(model)
    torch.testing.assert_close(logits(other, batch), expected, rtol=0, atol=0)
    with torch.no_grad():
        ak.trainable_parameters(other, "default")["prompt_embeddings"].add_(1.0)
    assert not torch.allclose(logits(other, batch), expected)
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)  # the original is untouched
    ak.detach(other, "default")
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)


def test_detach_removes_every_hook_and_restores_outputs():
    model = fresh("bart")
    batch = batch_for("bart")
    reference = logits(model, batch)
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    trained("bart", name="a", model=model)
    trained("bart", name="b", model=model, seed=1)
    ak.detach(model, "a")
    ak.detach(model, "b")
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks_before
    torch.testing.assert_close(logits(model, batch), reference, rtol=0, atol=0)


def test_unequal_encoder_and_decoder_heads_are_refused():
    model = tf.BartForConditionalGeneration(_bart_config(decoder_attention_heads=4))
    with pytest.raises(ak.IncompatibleModelError, match="encoder and 4 decoder attention heads"):
        ak.attach(model, "prefix", num_virtual_tokens=P)
    store = get_store(model)
    assert store is None or not store.records


def test_flex_attention_is_refused():
    model = fresh("t5")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ak.IncompatibleModelError, match="flex_attention"):
        ak.attach(model, "prefix", num_virtual_tokens=P)
