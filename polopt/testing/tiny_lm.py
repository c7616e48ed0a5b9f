"""A tiny Qwen2 causal LM and a character-level tokenizer, built in memory in well under a second.

For integration tests and runnable docs that need a real `transformers` model (TRL's trainer, HF
generation) but no download: random weights, a vocabulary of digits, arithmetic symbols and
lowercase letters.
"""

from __future__ import annotations

import string

import torch

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
CHARACTERS = list(string.digits + "+-*/=() ?." + string.ascii_lowercase)


def tiny_tokenizer():
    """A PreTrainedTokenizerFast with one token per character (pad, eos and unk set)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_qwen2_with_tokenizer(hidden_size: int = 32, num_layers: int = 1, seed: int = 0):
    """(Qwen2ForCausalLM with random weights, its tokenizer), fp32, a few tens of thousands of parameters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config), tokenizer
