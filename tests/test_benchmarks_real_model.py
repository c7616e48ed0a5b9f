"""The SmolLM2 variants of the speed benchmarks (issue 23, item 6), cheaply.

A step of SmolLM2-135M costs about a minute of CPU and the benchmarks start a process per side, so
the suite does not run them on that model (benchmarks/step_roofline.py's own test runs every side on
the tiny model). What is pinned here: both sides of step_vs_trl.py / step_roofline.py read the step
from configs/smollm2_addition.yaml, TRL's conversational prompts render to exactly the tokens of
polopt's `chat` template (which rollout_throughput.py --model smollm2 also uses), and
rollout_throughput.py's engine-per-process mode (the one `--model smollm2` uses) writes
well-formed results (on the tiny random model, two engines)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
SMOLLM2 = REPO / "assets" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if not (SMOLLM2 / "PROVENANCE.md").is_file():
        pytest.fail(f"{SMOLLM2} is missing or incomplete: run `make smollm2` (make test does)")
    return SMOLLM2


def test_smollm2_step_is_the_configs_and_trl_gets_polopts_prompt_tokens(smollm2):
    from transformers import AutoTokenizer

    from rollout_throughput import smollm2_prompts
    from step_vs_trl import Step, trl_prompt

    step = Step.from_config("configs/smollm2_addition.yaml")
    assert (step.model_dir, step.template) == (smollm2, "chat")
    assert (step.prompts, step.answers, step.new_tokens, step.temperature) == (8, 8, 32, 0.7)
    assert step.results_suffix == "_smollm2"
    polopt_ids, stop_ids, _ = smollm2_prompts(3)
    questions = [json.loads(line)["question"] for line in Path(step.train_source).read_text().splitlines()[:3]]
    # What TRL 1.16's GRPOTrainer._tokenize_prompts does with conversational prompts.
    trl_ids = AutoTokenizer.from_pretrained(smollm2).apply_chat_template(
        conversation=[trl_prompt(step.template, q) for q in questions], add_generation_prompt=True, tokenize=True,
        return_dict=True,
    )["input_ids"]
    assert [list(ids) for ids in trl_ids] == polopt_ids
    assert stop_ids  # the model's <|im_end|>: `--stop` has something to stop on


def test_rollout_throughput_engine_per_process_writes_results(tmp_path):
    env = {**os.environ, "POLOPT_BENCH_RESULTS": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "rollout_throughput.py"), "--separate-processes",
         "--engines", "native", "transformers", "--prompts", "2", "--samples", "2", "--prompt-len", "8",
         "--new-tokens", "4", "--repeats", "1", "--warmups", "0", "--name", "rollout"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "rollout.json").read_text())
    assert result["separate_processes"] and set(result["results"]) == {"native, shared prefill", "transformers generate"}
    for engine in result["results"].values():
        assert engine["generated_tokens"] == 2 * 2 * 4 and engine["tokens_per_s"] > 0 and engine["cpu_seconds"] > 0
    assert "| native, shared prefill |" in (tmp_path / "rollout.md").read_text()
