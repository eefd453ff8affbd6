"""Tiny random causal LMs of many architectures, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

HIDDEN, INTER, LAYERS, HEADS = 64, 128, 3, 4

#: model_type -> config overrides for a tiny model of that type.
TINY_CONFIGS: dict[str, dict] = {
    "gpt2": dict(n_embd=HIDDEN, n_inner=INTER, n_layer=LAYERS, n_head=HEADS, n_positions=128),
    "gpt_neo": dict(hidden_size=HIDDEN, intermediate_size=INTER, num_layers=LAYERS, num_heads=HEADS,
                    attention_types=[[["global", "local"], 1], [["global"], 1]], max_position_embeddings=128),
    "gptj": dict(n_embd=HIDDEN, n_inner=INTER, n_layer=LAYERS, n_head=HEADS, rotary_dim=8, n_positions=128),
    "gpt_neox": dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, max_position_embeddings=128),
    "llama": dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=2, max_position_embeddings=128),
    "mistral": dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=2, max_position_embeddings=128),
    "qwen3": dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128),
    "gemma": dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128),
    "gemma2": dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, num_key_value_heads=2, head_dim=16, max_position_embeddings=128),
    "phi": dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                max_position_embeddings=128),
    "phi3": dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0),
    "opt": dict(hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                word_embed_proj_dim=HIDDEN, max_position_embeddings=128, pad_token_id=1),
    "falcon": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   new_decoder_architecture=False, multi_query=True, parallel_attn=True),
    "olmo2": dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  max_position_embeddings=128),
    "bloom": dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS),
    "mixtral": dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=128),
}


def tiny_model(model_type: str, vocab_size: int = 256, seed: int = 0, bos: int = 0, eos: int = 0, **overrides):
    """A tiny randomly initialised causal LM of ``model_type`` in eval mode (fp32)."""
    kwargs = dict(TINY_CONFIGS[model_type], vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos)
    kwargs.update(overrides)
    if "pad_token_id" in kwargs and kwargs["pad_token_id"] >= vocab_size:
        kwargs["pad_token_id"] = 0
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
