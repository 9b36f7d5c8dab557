"""Tiny Hugging Face models built from configs (no downloads), seeded, dropout off: for PEFT side-by-side tests.

``build(name)`` returns a fresh model; two calls give identical weights.
``inputs(name)`` a small batch with labels for it. Names: gpt2, opt, llama
(causal LM), bert, roberta (sequence classification, and ``*-base``: the
bare encoder), t5, bart (seq2seq LM).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf

VOCAB = 64
_COMMON = {"vocab_size": VOCAB, "pad_token_id": 0}

TASKS = {"gpt2": "CAUSAL_LM", "opt": "CAUSAL_LM", "llama": "CAUSAL_LM", "bert": "SEQ_CLS", "roberta": "SEQ_CLS",
         "bert-base": "FEATURE_EXTRACTION", "roberta-base": "FEATURE_EXTRACTION", "t5": "SEQ_2_SEQ_LM",
         "bart": "SEQ_2_SEQ_LM"}


def _config(name: str) -> Any:
    kind = name.removesuffix("-base")
    enc = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
           "max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
           "num_labels": 3, **_COMMON}
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, **_COMMON)
    if kind == "opt":
        return tf.OPTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                            max_position_embeddings=64, word_embed_proj_dim=16, dropout=0.0,
                            attention_dropout=0.0, bos_token_id=1, eos_token_id=2, **_COMMON)
    if kind == "llama":
        return tf.LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                              intermediate_size=32, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                              **_COMMON)
    if kind == "bert":
        return tf.BertConfig(**enc)
    if kind == "roberta":
        return tf.RobertaConfig(**{**enc, "pad_token_id": 1})
    if kind == "t5":
        return tf.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
                           decoder_start_token_id=0, eos_token_id=2, **_COMMON)
    if kind == "bart":
        return tf.BartConfig(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                             decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=0.0,
                             attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
                             **{**_COMMON, "pad_token_id": 1})
    raise ValueError(name)


_CLASSES = {"CAUSAL_LM": tf.AutoModelForCausalLM, "SEQ_CLS": tf.AutoModelForSequenceClassification,
            "SEQ_2_SEQ_LM": tf.AutoModelForSeq2SeqLM, "FEATURE_EXTRACTION": tf.AutoModel}


def build(name: str, seed: int = 0) -> Any:
    """A fresh tiny model (the same weights for the same ``seed``)."""
    torch.manual_seed(seed)
    return _CLASSES[TASKS[name]].from_config(_config(name))


def inputs(name: str, seed: int = 0, labels: bool = True) -> dict[str, torch.Tensor]:
    """A batch of 2 sequences of 7 tokens (no padding), with the task's labels unless ``labels=False``
    (a seq2seq model then gets ``decoder_input_ids``, as PEFT's tests give it)."""
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    task = TASKS[name]
    if labels and task == "CAUSAL_LM":
        batch["labels"] = ids.clone()
    elif labels and task == "SEQ_CLS":
        batch["labels"] = torch.randint(0, 3, (2,), generator=g)
    elif task == "SEQ_2_SEQ_LM":
        target = torch.randint(3, VOCAB, (2, 5), generator=g)
        batch["labels" if labels else "decoder_input_ids"] = target
    return batch


def save_local(model: Any, path: Any) -> Any:
    """Save ``model`` as a local Hub-style directory and reload it from there: its ``name_or_path`` is ``path``."""
    model.save_pretrained(path)
    return type(model).from_pretrained(path)
