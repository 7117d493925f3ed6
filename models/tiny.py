"""Models built in code from a config: tiny random ones for tests, large synthetic ones for benchmarks.

Random weights are fine wherever what is checked is arithmetic (parity) or speed (bytes moved),
and they need no download. A byte-level tokenizer comes with them so the whole CLI runs on a tiny
model saved to a folder.
"""

from __future__ import annotations

import torch

TINY_CONFIGS = {
    # OPT: ReLU, biases, learned positions, multi-head attention.
    "opt": dict(
        model_type="opt", vocab_size=260, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        ffn_dim=96, max_position_embeddings=128, word_embed_proj_dim=64, do_layer_norm_before=True,
        activation_function="relu", pad_token_id=256, bos_token_id=257, eos_token_id=258,
    ),
    # Llama: RMSNorm, RoPE, GQA (6 query heads over 2 kv heads), SwiGLU, tied embeddings.
    "llama": dict(
        model_type="llama", vocab_size=260, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, intermediate_size=80, max_position_embeddings=128,
        hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        pad_token_id=256, bos_token_id=257, eos_token_id=258,
    ),
    # The families after Llama (models/adapters.py), each at the proportions its small releases have.
    # Qwen3: q/k norms, head_dim 32 != hidden/heads, GQA 4:2, tied.
    "qwen3": dict(
        model_type="qwen3", vocab_size=260, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=80, max_position_embeddings=128,
        hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        pad_token_id=256, bos_token_id=257, eos_token_id=258,
    ),
    # Gemma 3 (270M-like): one kv head, (1 + w) norms before and after each block, gelu-tanh, local
    # layers with a window of 8 and their own RoPE base interleaved with global ones, scaled embeddings.
    "gemma3_text": dict(
        model_type="gemma3_text", vocab_size=260, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, intermediate_size=96, max_position_embeddings=128,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, query_pre_attn_scalar=24,
        sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_theta=1000000.0, rope_local_base_freq=10000.0, tie_word_embeddings=True,
        pad_token_id=256, bos_token_id=257, eos_token_id=258,
    ),
    # Phi-3 / Phi-4-mini: fused qkv and gate_up, partial rotary (half of each head), untied head.
    "phi3": dict(
        model_type="phi3", vocab_size=260, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, intermediate_size=80, max_position_embeddings=128,
        original_max_position_embeddings=128, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
        partial_rotary_factor=0.5, tie_word_embeddings=False, sliding_window=None,
        pad_token_id=256, bos_token_id=257, eos_token_id=258,
    ),
    # Sliding-window attention on the Llama skeleton: Qwen2 windowing the layers from max_window_layers
    # on, Mistral every layer.
    "qwen2-window": dict(
        model_type="qwen2", vocab_size=260, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, intermediate_size=80, max_position_embeddings=128, hidden_act="silu",
        rms_norm_eps=1e-6, rope_theta=10000.0, use_sliding_window=True, sliding_window=8, max_window_layers=1,
        tie_word_embeddings=False, pad_token_id=256, bos_token_id=257, eos_token_id=258,
    ),
    "mistral-window": dict(
        model_type="mistral", vocab_size=260, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, intermediate_size=80, max_position_embeddings=128, hidden_act="silu",
        rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=8, tie_word_embeddings=False,
        pad_token_id=256, bos_token_id=257, eos_token_id=258,
    ),
}
# tiny configs whose norm weights are drawn at random too (so that a q/k norm or a (1 + w) offset
# handled wrongly shows); the older ones keep HF's ones, which their tests' tolerances were set on
RANDOM_NORMS = ("qwen3", "gemma3_text", "phi3", "qwen2-window", "mistral-window")


# Benchmark shapes in the memory-bound regime (issue 6): decode speed is set by the bytes of weights
# read per token, so random weights measure exactly what real ones would.
SYNTHETIC_CONFIGS = {
    "tinyllama-1.1b": dict(
        model_type="llama", vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048, hidden_act="silu",
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    ),
    "opt-1.3b": dict(
        model_type="opt", vocab_size=50272, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
        ffn_dim=8192, max_position_embeddings=2048, word_embed_proj_dim=2048, do_layer_norm_before=True,
        activation_function="relu", pad_token_id=1, bos_token_id=2, eos_token_id=2,
    ),
}


def build_synthetic(name: str, seed: int = 0):
    """A randomly initialised model of one of SYNTHETIC_CONFIGS' shapes (fp32, eval mode, HF's init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .errors import ShadowError

    if name not in SYNTHETIC_CONFIGS:
        raise ShadowError(f"synthetic model {name!r}: expected one of {', '.join(SYNTHETIC_CONFIGS)}")
    config = AutoConfig.for_model(**SYNTHETIC_CONFIGS[name])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model._shadowllm_source = f"synthetic:{name}:seed{seed}"
    return model


def build_model(model_type: str, seed: int = 0, **overrides):
    """A randomly initialised HF causal LM of one of TINY_CONFIGS (by key) in fp32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(TINY_CONFIGS[model_type], **overrides)
    config = AutoConfig.for_model(**params)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # HF initialises with std 0.02, which makes a tiny model's logits nearly uniform; larger random
    # weights give parity tests logits with real spread (and real chances to disagree).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
            elif "norm" in name and model_type in RANDOM_NORMS:  # Gemma stores w of (1 + w): centred on 0
                p.normal_(0.0 if model_type == "gemma3_text" else 1.0, 0.2)
    return model.eval()


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <pad> <unk> <bos> <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # ids 0..255
    vocab.update({"<pad>": 256, "<bos>": 257, "<eos>": 258, "<unk>": 259})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def save_tiny(model_type: str, folder, seed: int = 0, **overrides):
    """Save a tiny random model + byte tokenizer as a local HF folder (safetensors); `overrides`
    change its config (e.g. max_position_embeddings)."""
    model = build_model(model_type, seed, **overrides)
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    return model
