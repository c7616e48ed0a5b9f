"""The embedded default: arithmetic task, committed tiny model + tokenizer, and the script making them.

The committed assets must load the same way in torchtune (the recipe) and transformers (users,
vLLM), the task's noisy solutions must be wrong exactly when an error was injected (otherwise the
verifier's reward would not measure the skill RL is meant to sharpen), and the script must run
end to end (in --quick mode) producing files the same loaders accept.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from polopt.models import TINY_ARITH, tiny_arith
from polopt.tasks.arith import Problem, make_splits, write_solution
from polopt.verify import score_one

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets" / "tiny_arith"
HARD = REPO / "assets" / "tiny_arith_hard"  # `make_tiny_arith.py --hard`: configs/tiny_arith_hard.yaml
sys.path.insert(0, str(REPO / "scripts"))

problems = st.builds(Problem, st.integers(0, 99_999), st.integers(0, 99_999))


def _torchtune_tokenizer(path: Path):
    from torchtune.models.qwen2 import qwen2_tokenizer

    return qwen2_tokenizer(
        str(path / "vocab.json"), str(path / "merges.txt"), special_tokens_path=str(path / "special_tokens.json")
    )


def _torchtune_model(path: Path, output_dir: Path):
    from torchtune.training import FullModelHFCheckpointer

    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(path), checkpoint_files=["model.safetensors"], model_type="QWEN2",
        output_dir=str(output_dir),
    )
    model = tiny_arith()
    model.load_state_dict(checkpointer.load_checkpoint()["model"])
    return model.eval()


# ------------------------------------------------------------------------------------- the task
@given(problems)
def test_clean_solution_is_correct_and_verified(problem):
    solution = write_solution(problem)
    assert solution.num_errors == 0
    assert solution.final_answer == problem.a + problem.b
    assert solution.text.endswith("\\boxed{" + problem.answer + "}")
    assert score_one(solution.text, problem.answer) == 1.0


@given(problems, st.floats(0.05, 1.0), st.integers(0, 2**32 - 1))
def test_noisy_solution_is_wrong_exactly_when_an_error_was_injected(problem, q, seed):
    solution = write_solution(problem, random.Random(seed), q)
    assert (solution.final_answer != problem.a + problem.b) == (solution.num_errors > 0)
    assert solution.text.endswith("\\boxed{" + str(solution.final_answer) + "}")
    # Every written step is faithful to what it shows except the corrupted ones.
    steps = solution.text.strip().split(",")[:-1]
    wrong_sums = sum(sum(map(int, lhs.split("+"))) != int(rhs) for lhs, rhs in (s.split("=") for s in steps))
    assert wrong_sums <= solution.num_errors


@given(st.integers(0, 1000), st.integers(1, 50), st.integers(1, 50))
def test_splits_are_disjoint_and_deterministic(seed, n_train, n_val):
    splits = make_splits(seed, 3, {"train": n_train, "val": n_val, "test": 7})
    assert splits == make_splits(seed, 3, {"train": n_train, "val": n_val, "test": 7})
    assert [len(s) for s in splits.values()] == [n_train, n_val, 7]
    assert not set(splits["train"]) & set(splits["val"]) and not set(splits["val"]) & set(splits["test"])
    assert not set(splits["train"]) & set(splits["test"])


def test_bad_task_arguments_are_named():
    with pytest.raises(ValueError, match="q must be in"):
        write_solution(Problem(1, 2), random.Random(0), 1.5)
    with pytest.raises(ValueError, match="needs an rng"):
        write_solution(Problem(1, 2), None, 0.5)
    with pytest.raises(ValueError, match="only 81 exist"):
        make_splits(0, 1, {"train": 100})


# ----------------------------------------------------------------------------- committed assets
@pytest.mark.parametrize("assets", [ASSETS, HARD], ids=lambda p: p.name)
def test_assets_are_small_and_match_the_builder(assets):
    files = {p.name: p.stat().st_size for p in assets.iterdir()}
    assert sum(files.values()) < 20 * 2**20, files
    for name in ("config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens.json", "train.jsonl", "val.jsonl",
                 "test.jsonl", "base_eval.json"):
        assert name in files, name
    config = json.loads((assets / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (
        TINY_ARITH["vocab_size"], TINY_ARITH["embed_dim"], TINY_ARITH["num_layers"])
    assert config["tie_word_embeddings"] is TINY_ARITH["tie_word_embeddings"]
    rows = {name: [json.loads(line) for line in (assets / f"{name}.jsonl").open()] for name in ("train", "val", "test")}
    questions = {name: {r["question"] for r in rs} for name, rs in rows.items()}
    assert not questions["train"] & questions["val"] and not questions["val"] & questions["test"]
    for r in rows["val"][:20]:
        a, b = r["question"].removeprefix("Q: ").removesuffix("=? A:").split("+")
        assert r["answer"] == str(int(a) + int(b))


@given(problems, st.floats(0.0, 1.0), st.integers(0, 2**32 - 1), st.text(max_size=30))
def test_torchtune_and_transformers_tokenizers_agree(problem, q, seed, free_text):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(ASSETS))
    tt = _torchtune_tokenizer(ASSETS)
    text = problem.question + write_solution(problem, random.Random(seed), q).text + "<|endoftext|>"
    for t in (text, free_text, "<|im_start|>user\n" + free_text + "<|im_end|>"):
        ids = tt.encode(t, add_bos=False, add_eos=False)
        assert ids == hf(t, add_special_tokens=False)["input_ids"], t
    assert hf.eos_token_id == tt.special_tokens["<|endoftext|>"] in tt.stop_tokens


def test_transformers_and_torchtune_models_give_the_same_logprobs(tmp_path):
    from transformers import AutoModelForCausalLM

    tt = _torchtune_tokenizer(ASSETS)
    hf_model = AutoModelForCausalLM.from_pretrained(str(ASSETS), dtype=torch.float32).eval()
    tt_model = _torchtune_model(ASSETS, tmp_path)
    rng = random.Random(0)
    for _ in range(4):
        problem = Problem(rng.randint(100, 999), rng.randint(100, 999))
        text = problem.question + write_solution(problem).text + "<|endoftext|>"  # the stop token it learned
        ids = torch.tensor([tt.encode(text, add_bos=False, add_eos=False)])
        with torch.no_grad():
            hf_logprobs = torch.log_softmax(hf_model(ids).logits.float(), -1)
            tt_logprobs = torch.log_softmax(tt_model(ids).float(), -1)
        assert torch.allclose(hf_logprobs, tt_logprobs, atol=1e-5, rtol=0), (hf_logprobs - tt_logprobs).abs().max()
        # The committed model has learned the format: a clean solution is likely under it.
        token_logprobs = tt_logprobs[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
        assert token_logprobs[12:].mean() > -0.5


def test_base_eval_leaves_room_for_rl():
    report = json.loads((ASSETS / "base_eval.json").read_text())
    for split in ("val", "test"):
        assert 0.15 <= report[split]["avg_at_k"] <= 0.5, report[split]
        assert report[split]["pass_at_k"] >= 0.8, report[split]
    assert "not run on GPU" in report["device"]


def test_hard_base_eval_is_hard_but_within_reach_of_sampling():
    """Issue 16's second task: few right answers per question (pass@1 <= 0.1) yet most questions
    solved within 16 samples (pass@16 >= 0.5), the regime NFT's prompt weighting targets."""
    report = json.loads((HARD / "base_eval.json").read_text())
    val = report["val"]
    assert val["k"] == 16 and val["n_questions"] == 200
    assert val["pass@1"] <= 0.1 and val["pass@16"] >= 0.5, val
    assert val["pass@1"] == pytest.approx(val["avg_at_k"]) and val["pass@16"] == pytest.approx(val["pass_at_k"])
    # the settings `make_tiny_arith.py --hard` uses (the committed copy was written to a scratch folder first)
    assert (report["args"]["digits"], report["args"]["q"], report["args"]["seed"]) == (3, 0.63, 0)
    assert "not run on GPU" in report["device"]


def test_hard_config_differs_from_the_default_only_where_it_must():
    from omegaconf import OmegaConf

    def flat(cfg, prefix=""):
        for key, value in cfg.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    default, hard = (dict(flat(OmegaConf.to_container(OmegaConf.load(REPO / "configs" / f"{name}.yaml"))))
                     for name in ("tiny_arith", "tiny_arith_hard"))
    changed = {key for key in default.keys() | hard.keys() if default.get(key) != hard.get(key)}
    assert changed <= {"model_dir", "output_dir", "dataset.source", "validation.source", "rollout.max_new_tokens",
                       "validation.max_new_tokens"}, changed
    assert hard["model_dir"] == "assets/tiny_arith_hard" and "tiny_arith_hard" in hard["dataset.source"]
    assert hard["validation.source"] == "assets/tiny_arith_hard/val.jsonl"


# ----------------------------------------------------------------------------- the script
def test_script_quick_mode_produces_loadable_assets(tmp_path):
    import make_tiny_arith
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "assets"
    report = make_tiny_arith.main(["--quick", "--out", str(out), "--threads", "1"])
    assert set(report) >= {"val", "test", "command", "wall_seconds"}
    assert json.loads((out / "base_eval.json").read_text())["val"]["k"] == report["val"]["k"]
    _torchtune_model(out, tmp_path / "unused")
    AutoModelForCausalLM.from_pretrained(str(out))
    hf = AutoTokenizer.from_pretrained(str(out))
    tt = _torchtune_tokenizer(out)
    question = json.loads((out / "val.jsonl").read_text().splitlines()[0])["question"]
    assert hf(question, add_special_tokens=False)["input_ids"] == tt.encode(question, add_bos=False, add_eos=False)
    # Every id the model can sample decodes (an untrained model samples all of them).
    assert len(tt.encoder) + len(tt.special_tokens) == TINY_ARITH["vocab_size"]


def test_script_hard_preset_refuses_its_own_settings_given_twice():
    import make_tiny_arith

    with pytest.raises(SystemExit):
        make_tiny_arith.main(["--hard", "--q", "0.2", "--quick"])
