"""Build a tiny Llama GGUF file for offline tests.

Tests of GGUF -> safetensors conversion need a real GGUF file, but they must run offline and fast,
so instead of downloading a model we write a random ~7k-parameter Llama with a toy byte-level BPE
tokenizer using the `gguf` package's `GGUFWriter`, as llama.cpp's converter would.

llama.cpp stores the q/k projections with their rotary halves interleaved per head, and the
transformers GGUF loader undoes that on load. We apply the same permutation when writing, so the
state dict returned here is exactly what `AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import pathlib

import gguf
import numpy as np
import torch

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, CONTEXT = 16, 2, 4, 2, 32, 64
HEAD_DIM = HIDDEN // HEADS

BOS, EOS = "<|im_start|>", "<|im_end|>"
# Byte-level BPE spellings: "Ġ" is a space, "Ċ" a newline (as in GPT-2's byte-to-unicode table).
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'") + ["Ġ", "Ċ"]
# BPE merges in GGUF's "left right" form, best first; they spell e.g. "hello", "Ġworld", "user".
_MERGES = (
    "h e|l l|he ll|hell o|o r|Ġ w|Ġw or|Ġwor l|Ġworl d|Ġ t|Ġt he|i n|e r|a n|u s|us er|a s|as s"
).split("|")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _vocab() -> list[str]:
    # "<|endoftext|>" is GPT2Tokenizer's default unk token; without it in the vocab transformers
    # appends it as an extra token, making len(tokenizer) exceed the model's vocab_size.
    tokens = [BOS, EOS, "<|endoftext|>"] + _CHARS + [merge.replace(" ", "") for merge in _MERGES]
    assert len(tokens) == 64
    return tokens


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k permutation (the inverse of transformers' `_reverse_permute_weights`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: pathlib.Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a tiny random Llama-architecture model + tokenizer as a single F32 GGUF file at `path`.

    Returns the state dict (HF parameter names, e.g. 'model.layers.0.self_attn.q_proj.weight') that
    transformers must produce when loading it with
    AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)."""
    tokens = _vocab()
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * 0.1

    # HF name -> (GGUF name, tensor); embeddings are untied, so lm_head is written as output.weight.
    tensors = {
        "model.embed_tokens.weight": ("token_embd.weight", rand(len(tokens), HIDDEN)),
        "model.norm.weight": ("output_norm.weight", 1 + rand(HIDDEN)),
        "lm_head.weight": ("output.weight", rand(len(tokens), HIDDEN)),
    }
    for i in range(LAYERS):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        tensors |= {
            hf + "input_layernorm.weight": (blk + "attn_norm.weight", 1 + rand(HIDDEN)),
            hf + "self_attn.q_proj.weight": (blk + "attn_q.weight", rand(HEADS * HEAD_DIM, HIDDEN)),
            hf + "self_attn.k_proj.weight": (blk + "attn_k.weight", rand(KV_HEADS * HEAD_DIM, HIDDEN)),
            hf + "self_attn.v_proj.weight": (blk + "attn_v.weight", rand(KV_HEADS * HEAD_DIM, HIDDEN)),
            hf + "self_attn.o_proj.weight": (blk + "attn_output.weight", rand(HIDDEN, HEADS * HEAD_DIM)),
            hf + "post_attention_layernorm.weight": (blk + "ffn_norm.weight", 1 + rand(HIDDEN)),
            hf + "mlp.gate_proj.weight": (blk + "ffn_gate.weight", rand(INTERMEDIATE, HIDDEN)),
            hf + "mlp.up_proj.weight": (blk + "ffn_up.weight", rand(INTERMEDIATE, HIDDEN)),
            hf + "mlp.down_proj.weight": (blk + "ffn_down.weight", rand(HIDDEN, INTERMEDIATE)),
        }

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    normal, control = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
    writer.add_token_types([control if t.startswith("<|") else normal for t in tokens])
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(tokens.index(BOS))
    writer.add_eos_token_id(tokens.index(EOS))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for hf_name, (gguf_name, tensor) in tensors.items():
        if hf_name.endswith("q_proj.weight"):
            tensor = _permute(tensor, HEADS)
        elif hf_name.endswith("k_proj.weight"):
            tensor = _permute(tensor, KV_HEADS)
        writer.add_tensor(gguf_name, np.ascontiguousarray(tensor.numpy()))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {hf_name: tensor for hf_name, (_, tensor) in tensors.items()}
