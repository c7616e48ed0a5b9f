"""Prompt data: rows from files or the Hugging Face hub → templated, tokenized prompts → a resumable stream.

    rows = load_rows("assets/data/math500.jsonl")                      # [{"question","answer","source"}]
    dataset = PromptDataset(rows, tokenizer, template="qwen_boxed", max_prompt_tokens=1024)
    stream = PromptStream(dataset, batch_size=64, seed=0, num_replicas=world_size, rank=rank)
    batch = stream.next_batch()        # list of Prompt(text, token_ids, answer, source)
    state = stream.state_dict()        # a stream restored from it yields exactly the next prompts

Every row keeps where it came from ("<file>:<line>"), so a bad row — a missing field, a gold answer
math-verify cannot parse — is reported by file and line, not discovered as a reward of 0 later.

One concern per module:

    rows.py        question/answer rows from .jsonl/.json/.parquet files, `datasets` folders or the hub
    gold_check.py  the load-time warning about gold answers math-verify cannot parse
    templates.py   prompt templates: named ones, format strings, chat templates (`ChatPrompt`)
    chat.py        a chat prompt through the tokenizer's chat format (torchtune's Qwen2 and Llama3 spellings)
    dataset.py     `Prompt`, `PromptDataset` (templated, tokenized, length-limited), `prompt_dataset`
    stream.py      `PromptStream`: the endless, resumable, per-rank stream of prompts
"""

from polopt.prompts.dataset import TOO_LONG_POLICIES, Prompt, PromptDataset, prompt_dataset
from polopt.prompts.rows import FILE_SUFFIXES, load_rows
from polopt.prompts.stream import PromptStream
from polopt.prompts.templates import (
    DAPO_TEMPLATE,
    DEFAULT_TEMPLATE,
    PROMPT_TEMPLATES,
    QWEN_BOXED_SUFFIX,
    ChatPrompt,
    resolve_template,
)

__all__ = [
    "DAPO_TEMPLATE", "DEFAULT_TEMPLATE", "FILE_SUFFIXES", "PROMPT_TEMPLATES", "QWEN_BOXED_SUFFIX", "TOO_LONG_POLICIES",
    "ChatPrompt", "Prompt", "PromptDataset", "PromptStream", "load_rows", "prompt_dataset", "resolve_template",
]
