"""Model builders named in the configs (`model._component_: polopt.models.<name>`); a model whose
torchtune builder already has the right shapes (Qwen2.5-32B) is named directly in its config.

Each returns a torchtune `TransformerDecoder` whose shapes match a Hugging Face Qwen2 checkpoint,
so `FullModelHFCheckpointer(model_type="QWEN2")` loads the weights into it. The Qwen2.5-Math
shapes differ from torchtune's `qwen2_*` builders (rope_base 10000 and a 4K context instead of
1e6 and 32K), which is why they are spelled out here rather than reused.
"""

from __future__ import annotations

from torchtune.models.qwen2 import qwen2
from torchtune.modules import TransformerDecoder

# The embedded tiny model (assets/tiny_arith/config.json is written from these by
# scripts/make_tiny_arith.py, so the two cannot drift apart).
TINY_ARITH = dict(
    vocab_size=320,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=128,
    intermediate_dim=512,
    max_seq_len=256,
    norm_eps=1e-6,
    rope_base=10000.0,
    tie_word_embeddings=True,
)


def tiny_arith() -> TransformerDecoder:
    """The ~1 M-parameter Qwen2 trained from scratch on `polopt.tasks.arith` (assets/tiny_arith)."""
    return qwen2(attn_dropout=0.0, **TINY_ARITH)


# What the Qwen2.5-Math checkpoints share (their config.json: rope_theta 10000, 4096 positions,
# rms_norm_eps 1e-6); the sizes differ.
_QWEN2_5_MATH = dict(max_seq_len=4096, attn_dropout=0.0, norm_eps=1e-6, rope_base=10000.0)


def qwen2_5_math_1_5b() -> TransformerDecoder:
    """Qwen/Qwen2.5-Math-1.5B: its config.json has hidden 1536, intermediate 8960, 28 layers,
    12 heads, 2 KV heads, vocab 151936, tied embeddings, rope_theta 10000, 4096 positions."""
    return qwen2(vocab_size=151936, num_layers=28, num_heads=12, num_kv_heads=2, embed_dim=1536,
                 intermediate_dim=8960, tie_word_embeddings=True, **_QWEN2_5_MATH)


def qwen2_5_math_7b() -> TransformerDecoder:
    """Qwen/Qwen2.5-Math-7B: its config.json has hidden 3584, intermediate 18944, 28 layers,
    28 heads, 4 KV heads, vocab 152064, untied embeddings, rope_theta 10000, 4096 positions."""
    return qwen2(vocab_size=152064, num_layers=28, num_heads=28, num_kv_heads=4, embed_dim=3584,
                 intermediate_dim=18944, tie_word_embeddings=False, **_QWEN2_5_MATH)

