"""A chat prompt through the tokenizer's chat format, and its text with the chat markup.

torchtune's tokenizers spell "no end-of-turn token" differently (Qwen2 `add_eos`, Llama3
`add_end_tokens`) and some `decode`s take no `skip_special_tokens`: each is tried in turn.
"""

from __future__ import annotations


def _tokenize_chat(tokenizer, user_text: str) -> list[int]:
    """`[user turn, empty final assistant turn]` through `tokenizer.tokenize_messages`, no end tokens.

    torchtune tokenizers leave a final assistant message open (no end-of-turn token), so for Qwen2
    this is ``<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n``.
    """
    from torchtune.data import Message

    messages = [Message(role="user", content=user_text), Message(role="assistant", content="")]
    try:
        ids, _ = tokenizer.tokenize_messages(messages, add_eos=False)  # Qwen2 spelling
    except TypeError:
        ids, _ = tokenizer.tokenize_messages(messages, add_end_tokens=False)  # Llama3 spelling
    return list(ids)


def _decode_with_specials(tokenizer, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=False)
    except TypeError:
        return tokenizer.decode(ids)
