"""Tiny models built from configs: every architecture family the suite covers, offline."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 64



TINY = {
    # encoder, sequence classification
    "bert": lambda: tf.BertForSequenceClassification(
        tf.BertConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3, max_position_embeddings=64,
        )
    ),
    # decoder with GPT-2's Conv1D layers, causal LM
    "gpt2": lambda: tf.GPT2LMHeadModel(
        tf.GPT2Config(
            vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    ),
    # Llama with grouped-query attention, causal LM
    "llama": lambda: tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    ),
    # Llama with grouped-query attention, sequence classification
    "llama_cls": lambda: tf.LlamaForSequenceClassification(
        tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=3,
        )
    ),
    # encoder-decoder
    "t5": lambda: tf.T5ForConditionalGeneration(
        tf.T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )
    ),
}


def make_batch(arch: str, *, batch_size: int = 4, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed batch with padding in the last row, and labels for the arch's task."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    if arch == "llama_cls":  # Llama classification reads the last non-pad token
        ids[-1, -2:] = 0
        mask[-1, -2:] = 0
    elif arch != "t5":
        mask[-1, -2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if arch in ("bert", "llama_cls"):
        batch["labels"] = torch.arange(batch_size) % 3
    elif arch == "t5":
        batch["labels"] = torch.randint(3, VOCAB, (batch_size, 5), generator=g)
        # explicit decoder inputs (labels shifted right) so logits can be taken without labels
        batch["decoder_input_ids"] = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), batch["labels"][:, :-1]], 1)
    else:
        labels = ids.clone()
        labels[mask == 0] = -100
        batch["labels"] = labels
    return batch


def save_tiny(arch: str, folder, *, seed: int = 0, **overrides) -> str:
    """Save a tiny model of ``arch`` with a word-level tokenizer, loadable by ``load_base``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    model = make_wide(arch) if overrides.pop("wide", False) else TINY[arch]()
    for key, value in overrides.items():
        setattr(model.config, key, value)
    model.save_pretrained(folder)
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(folder)
    return str(folder)


def make_wide(arch: str):
    """A tiny model wide enough (hidden 64) for bitsandbytes' 64-element quantization blocks."""
    if arch == "llama":
        return tf.LlamaForCausalLM(
            tf.LlamaConfig(
                vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            )
        )
    if arch == "bert":
        return tf.BertForSequenceClassification(
            tf.BertConfig(
                vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3, max_position_embeddings=64,
            )
        )
    raise KeyError(arch)
