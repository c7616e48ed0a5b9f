"""The tokenizer the recipes use, and `HFTokenizer`: that protocol over an HF model folder's own tokenizer.

What the recipes ask of `cfg.tokenizer` (`check_tokenizer` checks it at setup, one line on failure):

    encode(text, add_bos=True, add_eos=False) -> list[int]   # a plain-template prompt
    decode(ids, skip_special_tokens=True) -> str             # answers for the verifier; False keeps markup
    tokenize_messages(messages, add_eos=False) -> (ids, mask) # chat templates: [user, empty assistant]
                                                              #   -> the prompt, assistant turn open
    pad_id: int                                               # padding of batches (never attended to)
    stop_tokens: list[int]                                    # generation ends at any of them

torchtune's `qwen2_tokenizer`/`qwen2_5_tokenizer` give exactly this (the embedded tiny model and the
Qwen2.5 configs may use them); `HFTokenizer` gives it for any folder with a `tokenizer.json`
(Llama 3, SmolLM, Qwen, Mistral, ...), through transformers, so token ids, special tokens and the
chat template are the model's own and render as transformers renders them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from polopt.errors import ConfigError

PROTOCOL_METHODS = ("encode", "decode", "tokenize_messages")
PROTOCOL_ATTRIBUTES = ("pad_id", "stop_tokens")


class HFTokenizer:
    """The HF folder `path`'s tokenizer (tokenizer.json, tokenizer_config.json with its special
    tokens and chat template, or chat_template.jinja) with the recipes' tokenizer protocol.

    - `stop_tokens`: the model's end-of-sequence ids: generation_config.json's `eos_token_id`
      (an id or a list, e.g. Llama 3's `<|eot_id|>` and `<|end_of_text|>`) and the tokenizer's
      `eos_token`.
    - `pad_id`: the tokenizer's pad token, else its first stop token.
    - `encode(text, add_bos=True)` adds what the tokenizer itself adds around a text (Llama 3:
      `<|begin_of_text|>`; Qwen and SmolLM add nothing); `add_eos` appends the eos token.
    - `tokenize_messages`: the chat template through `apply_chat_template`; a final assistant
      message with empty content and `add_eos=False` leaves the assistant turn open
      (`add_generation_prompt=True`), which is how the prompts are built.
    - `max_seq_len` is kept for callers that ask the tokenizer for the context length.
    """

    def __init__(self, path: str, max_seq_len: Optional[int] = None) -> None:
        from transformers import AutoTokenizer

        folder = Path(path)
        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
            raise ConfigError(f"tokenizer.path={path}: no tokenizer.json or tokenizer.model there; set tokenizer.path "
                              "to the HF model folder", "tokenizer.path")
        self.path = str(folder)
        self.max_seq_len = max_seq_len
        self.hf = AutoTokenizer.from_pretrained(self.path)
        # Prompt lengths are checked against the model and the config (PromptDataset.check_fits), with
        # the keys to set; transformers' own warning about its model_max_length would only add noise.
        self.hf.model_max_length = int(1e30)
        self.stop_tokens = self._stop_tokens(folder)
        pad = self.hf.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.stop_tokens[0]
        self.vocab_size = len(self.hf)

    def _stop_tokens(self, folder: Path) -> list[int]:
        ids: list[int] = []
        generation_config = folder / "generation_config.json"
        if generation_config.is_file():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
        if self.hf.eos_token_id is not None:
            ids.append(self.hf.eos_token_id)
        if not ids:
            raise ConfigError(f"tokenizer.path={folder}: neither generation_config.json nor the tokenizer names an "
                              "end-of-sequence token, so generation could never stop; add eos_token_id to "
                              "generation_config.json", "tokenizer.path")
        return list(dict.fromkeys(int(i) for i in ids))

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = list(self.hf.encode(text, add_special_tokens=add_bos))
        if add_eos and self.hf.eos_token_id is not None:
            ids.append(self.hf.eos_token_id)
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def tokenize_messages(self, messages: Sequence[Any], add_eos: bool = True) -> tuple[list[int], list[bool]]:
        """(ids, mask) of `messages` (torchtune `Message`s or {"role", "content"} dicts) rendered by
        the chat template. mask is all False: the recipes train on sampled answers, not on messages."""
        turns = [_as_turn(m) for m in messages]
        open_turn = bool(turns) and turns[-1]["role"] == "assistant" and not turns[-1]["content"] and not add_eos
        if open_turn:
            turns = turns[:-1]
        if self.hf.chat_template is None:
            raise ConfigError(f"tokenizer.path={self.path}: the tokenizer has no chat template; use a plain prompt "
                              "template (dataset.template) or a folder with one", "dataset.template")
        ids = list(self.hf.apply_chat_template(turns, add_generation_prompt=open_turn, tokenize=True,
                                               return_dict=True)["input_ids"])
        return ids, [False] * len(ids)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab {self.vocab_size}, pad {self.pad_id}, stop {self.stop_tokens})"


def _as_turn(message: Any) -> dict[str, str]:
    if isinstance(message, dict):
        return {"role": message["role"], "content": message["content"]}
    return {"role": message.role, "content": message.text_content}  # torchtune.data.Message


def check_tokenizer(tokenizer: Any, vocab_size: Optional[int] = None, key: str = "tokenizer") -> None:
    """Raise a one-line ConfigError naming `key` if `tokenizer` lacks what the recipes use (module
    docstring), or if its pad/stop ids fall outside the model's vocabulary."""
    name = type(tokenizer).__name__
    missing = [m for m in PROTOCOL_METHODS if not callable(getattr(tokenizer, m, None))]
    missing += [a for a in PROTOCOL_ATTRIBUTES if getattr(tokenizer, a, None) is None]
    if missing:
        raise ConfigError(f"{key} ({name}) lacks {', '.join(missing)}, which the recipes use; set "
                          f"{key}._component_=polopt.tokenizer.HFTokenizer with {key}.path=<the model folder>", key)
    stops = list(tokenizer.stop_tokens)
    if not stops:
        raise ConfigError(f"{key} ({name}) has no stop tokens: generation would never end", key)
    if vocab_size is not None:
        outside = [i for i in [tokenizer.pad_id, *stops] if not 0 <= int(i) < vocab_size]
        if outside:
            raise ConfigError(f"{key} ({name}): pad/stop ids {outside} are outside the model's vocabulary "
                              f"({vocab_size}); the tokenizer does not belong to this model", key)
    try:
        ids = tokenizer.encode("12 + 30 = 42", add_bos=False, add_eos=False)
        text = tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError as e:
        raise ConfigError(f"{key} ({name}): encode(text, add_bos=, add_eos=) / decode(ids, skip_special_tokens=) "
                          f"failed ({e}); set {key}._component_=polopt.tokenizer.HFTokenizer", key) from e
    if text.strip() != "12 + 30 = 42":
        raise ConfigError(f"{key} ({name}): decode(encode('12 + 30 = 42')) gives {text!r}; the tokenizer does not "
                          "round-trip plain text", key)
