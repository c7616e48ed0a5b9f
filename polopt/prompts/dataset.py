"""`Prompt` (one templated, tokenized question and its gold answer), `PromptDataset` over rows, and
`prompt_dataset`, the recipe's `dataset._component_`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from polopt.errors import DataError
from polopt.prompts.chat import _decode_with_specials, _tokenize_chat
from polopt.prompts.rows import load_rows
from polopt.prompts.templates import DEFAULT_TEMPLATE, ChatPrompt, _fill, resolve_template

log = logging.getLogger(__name__)

TOO_LONG_POLICIES = ("drop", "error", "truncate_left")


@dataclass(frozen=True)
class Prompt:
    """One templated, tokenized question and its gold answer, as every stage after the dataset sees it.

    `text` is the prompt as the model reads it (template filled, chat markup included), `token_ids`
    its tokens, `answer` the gold answer the verifier compares with, `source` "<file>:<line>".
    """

    text: str
    token_ids: list[int]
    answer: str
    source: str = ""


class PromptDataset(torch.utils.data.Dataset):
    """Map-style dataset: ``ds[i] -> Prompt``.

    Plain templates are encoded with ``add_bos=True, add_eos=False`` (a prompt is continued, never
    ended); chat templates as in `_tokenize_chat`. With `max_prompt_tokens`, every prompt is
    tokenized up front so over-long ones are handled before training: "drop" (counted in a
    warning), "error" (naming the row), or "truncate_left" (keep the last tokens; "prompt" is then
    the decoded kept tokens).
    """

    def __init__(
        self,
        rows: Sequence[dict],
        tokenizer,
        *,
        template: str | ChatPrompt = DEFAULT_TEMPLATE,
        max_prompt_tokens: Optional[int] = None,
        on_too_long: str = "drop",
        config_section: str = "",
    ):
        self._prefix = prefix = f"{config_section}." if config_section else ""
        if on_too_long not in TOO_LONG_POLICIES:
            raise DataError(f"{prefix}on_too_long must be one of {TOO_LONG_POLICIES}, got {on_too_long!r}")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise DataError(f"{prefix}max_prompt_tokens must be >= 1 or None, got {max_prompt_tokens}")
        if not rows:
            raise DataError("PromptDataset: no rows; a prompt dataset needs at least one")
        self.tokenizer = tokenizer
        self.template = resolve_template(template, key=f"{prefix}template")
        self.max_prompt_tokens = max_prompt_tokens
        self.on_too_long = on_too_long
        self.rows = list(rows)
        self._cache: dict[int, Prompt] = {}
        self.num_dropped = 0
        self.num_truncated = 0
        if max_prompt_tokens is not None:
            self._apply_length_limit()

    def _apply_length_limit(self) -> None:
        kept, kept_items = [], {}
        for i, row in enumerate(self.rows):
            item = self._build(row)
            n = len(item.token_ids)
            if n > self.max_prompt_tokens:
                if self.on_too_long == "error":
                    p = self._prefix
                    raise DataError(
                        f"{row.get('source', f'row {i}')}: prompt has {n} tokens > {p}max_prompt_tokens={self.max_prompt_tokens} "
                        f"(set {p}on_too_long=drop or truncate_left, or raise {p}max_prompt_tokens)"
                    )
                if self.on_too_long == "drop":
                    self.num_dropped += 1
                    continue
                ids = item.token_ids[-self.max_prompt_tokens :]
                item = replace(item, token_ids=ids, text=_decode_with_specials(self.tokenizer, ids))
                self.num_truncated += 1
            kept_items[len(kept)] = item
            kept.append(row)
        if self.num_dropped:
            log.warning(
                f"PromptDataset: dropped {self.num_dropped} of {len(self.rows)} prompts longer than "
                f"max_prompt_tokens={self.max_prompt_tokens}"
            )
        if self.num_truncated:
            log.warning(f"PromptDataset: left-truncated {self.num_truncated} prompts to {self.max_prompt_tokens} tokens")
        if not kept:
            raise DataError(
                f"{self.rows[0].get('source', '').rsplit(':', 1)[0]}: all {len(self.rows)} prompts are longer than "
                f"{self._prefix}max_prompt_tokens={self.max_prompt_tokens}; raise it"
            )
        self.rows, self._cache = kept, kept_items

    def _build(self, row: dict) -> Prompt:
        if isinstance(self.template, ChatPrompt):
            ids = _tokenize_chat(self.tokenizer, _fill(self.template.user, row["question"]))
            prompt = _decode_with_specials(self.tokenizer, ids)
        else:
            prompt = _fill(self.template, row["question"])
            ids = list(self.tokenizer.encode(prompt, add_bos=True, add_eos=False))
        return Prompt(text=prompt, token_ids=ids, answer=row["answer"], source=row.get("source", ""))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Prompt:
        if not 0 <= index < len(self.rows):
            raise IndexError(f"PromptDataset index {index} out of range (size {len(self.rows)})")
        item = self._cache.get(index)
        if item is None:
            item = self._cache[index] = self._build(self.rows[index])
        return item

    def check_fits(self, max_new_tokens: int, max_seq_len: int, *, max_new_tokens_key: str) -> None:
        """Raise a `DataError` now, not mid-training, if a prompt plus `max_new_tokens` would not fit
        the model's context; it names the file, the counts and the keys that fix it."""
        lengths = [len(self[i].token_ids) for i in range(len(self))]
        budget = max_seq_len - max_new_tokens
        too_long = [i for i, n in enumerate(lengths) if n > budget]
        if not too_long:
            return
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        p = self._prefix
        if budget < 1:
            raise DataError(f"{max_new_tokens_key}={max_new_tokens} leaves no room for a prompt in the model's "
                            f"max_seq_len ({max_seq_len}); lower {max_new_tokens_key}")
        raise DataError(
            f"{self[longest].source}: the longest prompt ({lengths[longest]} tokens) + {max_new_tokens_key}="
            f"{max_new_tokens} exceeds the model's max_seq_len ({max_seq_len}); {len(too_long)} of {len(lengths)} "
            f"prompts are longer than {budget} tokens: set {p}max_prompt_tokens={budget} (with {p}on_too_long="
            f"{self.on_too_long} they are {'dropped' if self.on_too_long == 'drop' else 'cut'}) or lower {max_new_tokens_key}"
        )


def prompt_dataset(
    tokenizer,
    source: str,
    *,
    split: str = "train",
    question_field: str = "question",
    answer_field: str = "answer",
    template: str | ChatPrompt = DEFAULT_TEMPLATE,
    max_prompt_tokens: Optional[int] = None,
    on_too_long: str = "drop",
    config_section: str = "dataset",
) -> PromptDataset:
    """The recipe's `dataset._component_`: `load_rows(source, ...)` as a `PromptDataset` (see both
    for the arguments). `config_section` is the config key the errors name."""
    rows = load_rows(source, split=split, question_field=question_field, answer_field=answer_field,
                     config_section=config_section)
    return PromptDataset(rows, tokenizer, template=template, max_prompt_tokens=max_prompt_tokens,
                         on_too_long=on_too_long, config_section=config_section)
