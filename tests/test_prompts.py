"""Prompt loading, templates, length limits and the resumable prompt stream (polopt.prompts)."""

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from polopt.prompts import PROMPT_TEMPLATES, ChatPrompt, Prompt, PromptDataset, PromptStream, load_rows

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny_arith"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _train_tiny_bpe(directory: Path) -> tuple[Path, Path, Path]:
    """A byte-level BPE trained with Qwen2's pre-tokenizer (see docs/design.md, toolchain facts) + a special-tokens file."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = ["What is 12 + 7? Please reason step by step, and put your final answer within \\boxed{}."] * 20
    corpus += ["Solve the following math problem step by step. The last line of your response Answer: $x$"] * 20
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    tok.model.save(str(directory))
    base = json.loads((directory / "vocab.json").read_text())
    special = directory / "special_tokens.json"
    special.write_text(json.dumps({"added_tokens": [{"id": len(base) + i, "content": t} for i, t in enumerate(SPECIAL_TOKENS)]}))
    return directory / "vocab.json", directory / "merges.txt", special


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from torchtune.models.qwen2 import qwen2_tokenizer

    if (TINY_ASSETS / "vocab.json").exists() and (TINY_ASSETS / "special_tokens.json").exists():
        vocab, merges, special = TINY_ASSETS / "vocab.json", TINY_ASSETS / "merges.txt", TINY_ASSETS / "special_tokens.json"
    else:
        vocab, merges, special = _train_tiny_bpe(tmp_path_factory.mktemp("tok"))
    return qwen2_tokenizer(str(vocab), str(merges), special_tokens_path=str(special))


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- load_rows
def test_jsonl_rows_carry_file_and_line_and_numbers_become_strings(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1?", "answer": 2}, "", {"question": "q", "answer": 2.5}, {"question": "r", "answer": 27.0}])
    rows = load_rows(str(path))
    assert rows == [
        {"question": "1+1?", "answer": "2", "source": f"{path}:1"},
        {"question": "q", "answer": "2.5", "source": f"{path}:3"},
        {"question": "r", "answer": "27", "source": f"{path}:4"},
    ]


def test_json_and_parquet_and_dotted_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    nested = [{"prompt": [{"content": "What is 3?"}], "reward_model": {"ground_truth": "3"}}]
    (tmp_path / "d.json").write_text(json.dumps(nested))
    pq.write_table(pa.Table.from_pylist(nested), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        rows = load_rows(str(tmp_path / name), question_field="prompt.0.content", answer_field="reward_model.ground_truth")
        assert rows == [{"question": "What is 3?", "answer": "3", "source": f"{tmp_path / name}:1"}]


def test_datasets_directory_goes_through_load_dataset(tmp_path):
    """A non-file source is `datasets.load_dataset(source, split=split)` — here a local dataset dir."""
    d = tmp_path / "my_dataset"
    d.mkdir()
    _write_jsonl(d / "test.jsonl", [{"problem": "2*3?", "solution": 6}])
    rows = load_rows(str(d), split="test", question_field="problem", answer_field="solution")
    assert rows == [{"question": "2*3?", "answer": "6", "source": f"{d}[test]:1"}]


def test_hub_name_calls_load_dataset_with_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):  # only the network call is replaced
        calls.append((name, split))
        return [{"question": "1+2?", "answer": "3"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows("someorg/math-set", split="validation")
    assert calls == [("someorg/math-set", "validation")]
    assert rows[0]["source"] == "someorg/math-set[validation]:1"


def test_bad_input_errors_name_file_line_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"))
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "1"}, {"problem": "b", "answer": "2"}])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: .*'question'.*keys present: \['answer', 'problem'\]"):
        load_rows(str(path))
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "1"}, '{"question": "b", '])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        load_rows(str(bad))
    empty = _write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="no rows"):
        load_rows(str(empty))
    nulls = _write_jsonl(tmp_path / "null.jsonl", [{"question": "a", "answer": None}])
    with pytest.raises(ValueError, match=r"null\.jsonl:1: answer field 'answer'"):
        load_rows(str(nulls))


def test_unparseable_gold_answers_are_reported_with_file_and_line(tmp_path, caplog):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"question": "a", "answer": "\\frac{1}{2}"}, {"question": "b", "answer": "\\frac{"}, {"question": "c", "answer": "7"}],
    )
    with caplog.at_level(logging.WARNING, logger="polopt.prompts"):
        rows = load_rows(str(path))
    assert len(rows) == 3  # reported, not dropped
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "1 of 3 gold answers" in warning and f"{path}:2" in warning and f"{path}:1" not in warning


# Any text, with the characters str.splitlines (not JSON) takes for line breaks well represented.
QUESTION_TEXT = st.text(st.characters() | st.sampled_from("\u2028\u2029\x0b\x0c\x1c\x85\r"), min_size=1).filter(str.strip)


@settings(max_examples=40)
@given(st.lists(st.tuples(QUESTION_TEXT, st.one_of(st.integers(), st.text(min_size=1).filter(str.strip))), min_size=1, max_size=6),
       st.sampled_from([".jsonl", ".json"]))
def test_gzip_files_read_as_their_plain_twins(pairs, suffix):
    """`.jsonl.gz` / `.json.gz` give the rows of the same file uncompressed, line numbers included
    (questions may hold any character, U+2028 and form feeds too, inside their JSON strings)."""
    import gzip
    import tempfile

    records = [{"question": q, "answer": a} for q, a in pairs]
    text = json.dumps(records) if suffix == ".json" else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with tempfile.TemporaryDirectory() as tmp:
        plain, packed = Path(tmp) / f"d{suffix}", Path(tmp) / f"d{suffix}.gz"
        plain.write_text(text, encoding="utf-8")
        packed.write_bytes(gzip.compress(text.encode("utf-8")))
        rows, gz_rows = load_rows(str(plain), check_answers=False), load_rows(str(packed), check_answers=False)
    assert [r["question"] for r in gz_rows] == [q for q, _ in pairs]
    assert [(r["question"], r["answer"]) for r in gz_rows] == [(r["question"], r["answer"]) for r in rows]
    assert [r["source"].rsplit(":", 1)[1] for r in gz_rows] == [r["source"].rsplit(":", 1)[1] for r in rows]


def test_a_gz_file_that_is_not_gzip_is_a_data_error(tmp_path):
    (tmp_path / "d.jsonl.gz").write_text('{"question": "a", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl\.gz: not a gzip file"):
        load_rows(str(tmp_path / "d.jsonl.gz"))
    (tmp_path / "latin.jsonl").write_bytes('{"question": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.jsonl: not UTF-8 text"):
        load_rows(str(tmp_path / "latin.jsonl"))


@pytest.mark.parametrize("name, count", [("math500.jsonl", 500), ("dapo_math_17k.jsonl.gz", 17917)])
def test_shipped_data_files_load(name, count):
    """assets/data: what configs/evaluate.yaml and the Qwen configs read on a fresh clone."""
    rows = load_rows(str(REPO / "assets" / "data" / name))
    assert len(rows) == count
    assert all(r["question"].strip() and r["answer"].strip() for r in rows)


SHARED_FILES = {
    "aime24.jsonl": 30, "aime25.jsonl": 30, "amc23.jsonl": 40, "math500.jsonl": 500, "minerva_math.jsonl": 272,
    "olympiadbench.jsonl": 675, "dapo_math_17k.jsonl": 17917, "math_level3to5_simplerl_train.jsonl": 8523,
    "gsm8k_train.jsonl": 7473, "gsm8k_test.jsonl": 1319,
}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
@pytest.mark.parametrize("name", sorted(SHARED_FILES))
def test_every_shared_data_file_loads(name):
    # The gold-answer check is tested above; on the 8.5k-row MATH set it alone takes ~40 s here.
    rows = load_rows(str(SHARED_DATA / name), check_answers=name not in ("math_level3to5_simplerl_train.jsonl",))
    assert len(rows) == SHARED_FILES[name]
    assert all(r["question"].strip() and isinstance(r["answer"], str) for r in rows)


# --------------------------------------------------------------------------- templates and dataset
ROWS = [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "source": f"mem:{i}"} for i in range(12)]


def test_templates_render_the_question(tokenizer):
    boxed = PromptDataset(ROWS, tokenizer, template="qwen_boxed")[3]
    assert boxed.text == "What is 3 + 3?\nPlease reason step by step, and put your final answer within \\boxed{}."
    dapo = PromptDataset(ROWS, tokenizer, template="dapo")[0].text
    assert dapo.startswith("Solve the following math problem step by step.") and "\n\nWhat is 0 + 0?\n\n" in dapo
    assert dapo.endswith('Remember to put your answer on its own line after "Answer:".')
    custom = PromptDataset(ROWS, tokenizer, template="Q: {question} \\boxed{} A:")[1]
    assert custom.text == "Q: What is 1 + 1? \\boxed{} A:"
    assert custom.token_ids == tokenizer.encode(custom.text, add_bos=True, add_eos=False)
    assert custom.answer == "2" and custom.source == "mem:1"
    with pytest.raises(ValueError, match="{question}"):
        PromptDataset(ROWS, tokenizer, template="no placeholder here")


def test_chat_template_is_the_user_turn_plus_an_open_assistant_turn(tokenizer):
    item = PromptDataset(ROWS, tokenizer, template="chat")[2]
    assert item.text == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert item.token_ids[-1] != tokenizer.eos_id and item.token_ids[0] == tokenizer.im_start_id
    boxed = PromptDataset(ROWS, tokenizer, template=PROMPT_TEMPLATES["qwen_boxed_chat"])[0].text
    assert "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n" in boxed
    assert isinstance(PROMPT_TEMPLATES["chat"], ChatPrompt)


def test_prompts_never_end_with_eos(tokenizer):
    for template in PROMPT_TEMPLATES:
        ids = PromptDataset(ROWS, tokenizer, template=template)[0].token_ids
        assert ids and ids[-1] != tokenizer.eos_id, template


def test_too_long_prompts_drop_error_or_truncate(tokenizer, caplog):
    rows = ROWS[:3] + [{"question": "What is 1 + 1? " * 30, "answer": "2", "source": "mem:long"}]
    limit = max(len(PromptDataset(ROWS[:3], tokenizer)[i].token_ids) for i in range(3))
    with caplog.at_level(logging.WARNING, logger="polopt.prompts"):
        dropped = PromptDataset(rows, tokenizer, max_prompt_tokens=limit)
    assert len(dropped) == 3 and dropped.num_dropped == 1
    assert "dropped 1 of 4" in caplog.text
    with pytest.raises(ValueError, match=f"mem:long: prompt has .* tokens > max_prompt_tokens={limit}"):
        PromptDataset(rows, tokenizer, max_prompt_tokens=limit, on_too_long="error")
    truncated = PromptDataset(rows, tokenizer, max_prompt_tokens=limit, on_too_long="truncate_left")
    full = PromptDataset(rows, tokenizer)[3].token_ids
    assert len(truncated) == 4 and truncated[3].token_ids == full[-limit:]
    with pytest.raises(ValueError, match="all 1 prompts are longer"):
        PromptDataset(rows[3:], tokenizer, max_prompt_tokens=limit)
    with pytest.raises(ValueError, match="on_too_long"):
        PromptDataset(rows, tokenizer, on_too_long="skip")


# --------------------------------------------------------------------------- stream
class _Indices:
    """A dataset of its own indices: the stream tests are about order, not content."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": i}


def _ids(batch):
    return [item["i"] for item in batch]


def test_stream_covers_each_epoch_once_and_reshuffles(tokenizer):
    stream = PromptStream(_Indices(10), batch_size=4, seed=3)
    seen = sum((_ids(stream.next_batch()) for _ in range(5)), [])  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]
    assert _ids(PromptStream(_Indices(10), batch_size=4, seed=3).next_batch()) == seen[:4]
    assert _ids(PromptStream(_Indices(10), batch_size=10, shuffle=False).next_batch()) == list(range(10))
    real = PromptStream(PromptDataset(ROWS, tokenizer), batch_size=3).next_batch()
    assert len(real) == 3 and all(isinstance(p, Prompt) and p.token_ids for p in real)


def test_ranks_split_each_epoch_disjointly():
    shares = [_ids(PromptStream(_Indices(12), batch_size=4, seed=1, num_replicas=3, rank=r).next_batch()) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(12))


def test_batch_size_is_settable_and_next_batch_takes_n():
    stream = PromptStream(_Indices(7), batch_size=2, shuffle=False)
    assert _ids(stream.next_batch()) == [0, 1]
    stream.batch_size = 3
    assert _ids(stream.next_batch()) == [2, 3, 4]
    assert _ids(stream.next_batch(4)) == [5, 6, 0, 1]
    with pytest.raises(ValueError, match="batch_size"):
        stream.batch_size = 0


@given(
    size=st.integers(1, 13),
    batch_sizes=st.lists(st.integers(1, 6), min_size=0, max_size=8),
    after=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    replicas=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    shuffle=st.booleans(),
)
def test_resumed_stream_yields_exactly_what_the_original_would(size, batch_sizes, after, replicas, seed, shuffle):
    """Random dataset sizes, batch sizes and save points, including across epoch boundaries."""
    make = lambda: PromptStream(  # noqa: E731
        _Indices(size), batch_size=1, seed=seed, shuffle=shuffle, num_replicas=replicas, rank=replicas - 1
    )
    original = make()
    for n in batch_sizes:
        original.next_batch(n)
    state = json.loads(json.dumps(original.state_dict()))  # survives a round trip through a file
    expected = [_ids(original.next_batch(n)) for n in after]
    resumed = make()
    resumed.load_state_dict(state)
    assert [_ids(resumed.next_batch(n)) for n in after] == expected
