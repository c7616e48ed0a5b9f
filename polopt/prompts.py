"""Prompt data: rows from files or the Hugging Face hub → templated, tokenized prompts → a resumable stream.

    rows = load_rows("assets/data/math500.jsonl")                      # [{"question","answer","source"}]
    dataset = PromptDataset(rows, tokenizer, template="qwen_boxed", max_prompt_tokens=1024)
    stream = PromptStream(dataset, batch_size=64, seed=0, num_replicas=world_size, rank=rank)
    batch = stream.next_batch()        # list of Prompt(text, token_ids, answer, source)
    state = stream.state_dict()        # a stream restored from it yields exactly the next prompts

Every row keeps where it came from ("<file>:<line>"), so a bad row — a missing field, a gold answer
math-verify cannot parse — is reported by file and line, not discovered as a reward of 0 later.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from polopt.errors import DataError, DataFileNotFound

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")  # .jsonl and .json also gzip-compressed: .jsonl.gz, .json.gz
TOO_LONG_POLICIES = ("drop", "error", "truncate_left")


# --------------------------------------------------------------------------- rows
def load_rows(
    source: str,
    *,
    split: str = "train",
    question_field: str = "question",
    answer_field: str = "answer",
    check_answers: bool = True,
    config_section: str = "",
) -> list[dict]:
    """Question/answer rows from a .jsonl/.json/.parquet file, a local `datasets` dir, or a hub name.

    Field names may be dotted paths into nested rows (``reward_model.ground_truth``,
    ``prompt.0.content``). Numeric answers become strings. Returns
    ``[{"question": str, "answer": str, "source": "<file>:<line>"}]``; for .json arrays, parquet and
    `datasets` sources the "line" is the 1-based row number. Gold answers math-verify cannot parse
    are logged (file:line and count) here, once, rather than silently scoring every answer 0
    (`check_answers=False` skips that: ~2-5 ms per distinct non-numeric answer, e.g. ~15 s for
    the 8.5k-row MATH training set on one busy core). `split` applies to `datasets` sources only.
    Errors are `DataError`s naming the file and line; `config_section` (e.g. "dataset") makes their
    hints name the full config key to set (`dataset.answer_field`).
    """
    prefix = f"{config_section}." if config_section else ""
    source = str(source)
    path = Path(source).expanduser()
    if _file_format(path) or path.is_file():
        if not path.is_file():
            raise DataFileNotFound(f"prompt file not found: {path} (resolved: {path.resolve()}); set {prefix}source")
        records = _read_file(path)
    else:
        records = _read_datasets(source, split, local_dir=path.is_dir(), key=f"{prefix}source")
    rows = [
        {
            "question": _field(record, question_field, where, kind="question", key=f"{prefix}question_field"),
            "answer": _field(record, answer_field, where, kind="answer", key=f"{prefix}answer_field"),
            "source": where,
        }
        for where, record in records
    ]
    if not rows:
        raise DataError(f"{source}: no rows (split={split!r}); a prompt dataset needs at least one")
    if check_answers:
        _report_unparseable_gold(rows, source)
    return rows


def _file_format(path: Path) -> Optional[str]:
    """".jsonl", ".json" or ".parquet" for a prompt file's name (".jsonl.gz" -> ".jsonl"), else None."""
    suffixes = path.suffixes
    if suffixes[-1:] == [".gz"]:
        return suffixes[-2] if suffixes[-2:-1] and suffixes[-2] in (".jsonl", ".json") else None
    return path.suffix if path.suffix in FILE_SUFFIXES else None


def _read_file(path: Path) -> list[tuple[str, dict]]:
    fmt = _file_format(path) or ".jsonl"  # a file of any other name is read as JSON lines
    if fmt == ".parquet":
        import pyarrow.parquet as pq

        return _numbered(path, pq.read_table(path).to_pylist())
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")) as f:
            text = f.read()
    except gzip.BadGzipFile as e:
        raise DataError(f"{path}: not a gzip file ({e}); a .gz prompt file must be gzip-compressed") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); prompt files are UTF-8") from e
    if fmt == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json prompt file must hold a list of objects, got {type(data).__name__}")
        return _numbered(path, data)
    records = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            # The offset within the row is the column (json's own count would see only this row).
            raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.pos + 1})") from e
        records.append((f"{path}:{lineno}", _require_mapping(record, f"{path}:{lineno}")))
    return records


def _read_datasets(source: str, split: str, *, local_dir: bool, key: str = "source") -> list[tuple[str, dict]]:
    """`datasets.load_dataset(source, split=split)`: a hub name, or a dataset directory on disk."""
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except FileNotFoundError as e:
        kind = "dataset directory" if local_dir else "dataset (not a file path, so tried as a Hugging Face hub name)"
        raise DataFileNotFound(f"{source}: {kind} could not be loaded ({e}); set {key} to a file or dataset") from e
    return [(f"{source}[{split}]:{i}", _require_mapping(r, f"{source}[{split}]:{i}")) for i, r in enumerate(ds, start=1)]


def _numbered(path: Path, records: Sequence[Any]) -> list[tuple[str, dict]]:
    return [(f"{path}:{i}", _require_mapping(r, f"{path}:{i}")) for i, r in enumerate(records, start=1)]


def _require_mapping(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object (one row), got {type(record).__name__}")
    return record


def _field(record: dict, dotted: str, where: str, *, kind: str, key: str) -> str:
    value: Any = record
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise DataError(
                f"{where}: row has no {kind} field {dotted!r} (missing {part!r}); "
                f"keys present: {sorted(record)}. Set {key} to one of them."
            )
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        raise DataError(f"{where}: {kind} field {dotted!r} must be a string or number, got {value!r} (set {key})")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    if kind == "question" and not text.strip():
        raise DataError(f"{where}: question field {dotted!r} is empty")
    return text


def _report_unparseable_gold(rows: list[dict], source: str) -> None:
    from polopt.verify import unparseable_gold_answers

    bad = unparseable_gold_answers([r["answer"] for r in rows])
    if bad:
        shown = ", ".join(f"{rows[i]['source']} ({rows[i]['answer'][:40]!r})" for i in bad[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        log.warning(
            f"{source}: {len(bad)} of {len(rows)} gold answers cannot be parsed by math-verify; every "
            f"completion for them will score 0: {shown}{more}"
        )


# --------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class ChatPrompt:
    """A template rendered through the tokenizer's chat format: `user` (with {question}) as the user turn."""

    user: str = "{question}"


QWEN_BOXED_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{question}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)

DEFAULT_TEMPLATE = "{question}"  # the question as it is: what every template setting defaults to

PROMPT_TEMPLATES: dict[str, str | ChatPrompt] = {
    # plain-text continuation prompts (base models, the tiny arithmetic model)
    "plain": DEFAULT_TEMPLATE,
    "qwen_boxed": "{question}\n" + QWEN_BOXED_SUFFIX,
    "dapo": DAPO_TEMPLATE,  # score with MathVerifier(answer_format="answer_line")
    # through the tokenizer's chat template: user turn, then an open assistant turn
    "chat": ChatPrompt("{question}"),
    "qwen_boxed_chat": ChatPrompt("{question}\n" + QWEN_BOXED_SUFFIX),
    "dapo_chat": ChatPrompt(DAPO_TEMPLATE),
}


def resolve_template(template: str | ChatPrompt, key: str = "template") -> str | ChatPrompt:
    """A name in PROMPT_TEMPLATES, a ChatPrompt, or a format string holding ``{question}``."""
    if isinstance(template, ChatPrompt):
        resolved: str | ChatPrompt = template
    elif template in PROMPT_TEMPLATES:
        resolved = PROMPT_TEMPLATES[template]
    else:
        resolved = template
    text = resolved.user if isinstance(resolved, ChatPrompt) else resolved
    if not isinstance(text, str) or "{question}" not in text:
        raise DataError(
            f"prompt template {key}={template!r} is neither a known name ({', '.join(PROMPT_TEMPLATES)}) "
            "nor a format string containing '{question}'"
        )
    return resolved


def _fill(template: str, question: str) -> str:
    # Literal substitution, not str.format: templates and questions hold LaTeX braces (\boxed{}).
    return template.replace("{question}", question)


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


# --------------------------------------------------------------------------- dataset
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


# --------------------------------------------------------------------------- stream
def _as_list(items: list[Prompt]) -> list[Prompt]:
    return items


class PromptStream:
    """An endless, resumable stream of prompt batches for one rank.

    Backed by torchdata's `StatefulDataLoader` over a `StatefulDistributedSampler` (rank's share,
    reshuffled each epoch via `set_epoch`, seeded by `seed`). The loader yields single prompts and
    `next_batch(n)` gathers `n` of them (default `self.batch_size`, which may be reassigned), so a
    caller can ask for batches of any size — the dynamic-sampling filter does — and epochs are
    crossed transparently. `state_dict()` records the epoch and the loader's position; a stream
    restored with `load_state_dict` yields exactly the prompts the original would have yielded next.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if len(dataset) == 0:
            raise ValueError("PromptStream: the dataset is empty")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"PromptStream: rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.batch_size = batch_size
        self.dataset = dataset
        self.epoch = 0
        self.sampler = StatefulDistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.loader = StatefulDataLoader(dataset, batch_size=None, sampler=self.sampler, collate_fn=_as_list, num_workers=0)
        self._iterator = None

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"PromptStream: batch_size must be a positive int, got {value!r}")
        self._batch_size = value

    def _next_item(self) -> Prompt:
        for _ in range(2):  # at most one epoch boundary per item
            if self._iterator is None:
                self.sampler.set_epoch(self.epoch)
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch += 1
        raise RuntimeError("PromptStream: the sampler yielded nothing for a whole epoch")

    def next_batch(self, n: Optional[int] = None) -> list[Prompt]:
        """The next `n` prompts (default `batch_size`) of this rank's endless shuffled stream."""
        n = self.batch_size if n is None else n
        if n < 1:
            raise ValueError(f"PromptStream.next_batch: n must be >= 1, got {n}")
        return [self._next_item() for _ in range(n)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loader": self.loader.state_dict() if self._iterator is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "epoch" not in state or "loader" not in state:
            raise ValueError(f"PromptStream.load_state_dict: expected {{'epoch', 'loader'}}, got {state!r}")
        self.epoch = int(state["epoch"])
        self.sampler.set_epoch(self.epoch)
        self._iterator = None
        if state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])
            self._iterator = iter(self.loader)
