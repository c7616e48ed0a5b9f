"""Question/answer rows from a .jsonl/.json/.parquet file (.jsonl and .json also gzip-compressed), a
local `datasets` folder or a hub name, each with where it came from ("<file>:<line>")."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from polopt.errors import DataError, DataFileNotFound
from polopt.prompts.gold_check import report_unparseable_gold

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")  # .jsonl and .json also gzip-compressed: .jsonl.gz, .json.gz


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
    (`check_answers=False` skips that; its cost is in docs/data.md). `split` applies to `datasets`
    sources only.
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
        report_unparseable_gold(rows, source)
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
