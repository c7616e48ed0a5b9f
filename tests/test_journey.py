"""The user's journey through the real commands (issue 14): train → evaluate → continue from the
trained model → evaluate; a second run into the same output_dir; resume with a changed config;
a loss of one's own from the config; and user errors, each one line with exit status 2.

The commands run as `python -P -m polopt ...` with only a link to this checkout's polopt package
on PYTHONPATH (no `PYTHONPATH=.`, the working directory not on sys.path): the `polopt` console
script does exactly this. Error cases run `recipe_main` in-process with its real argument parsing
(no process start-up per case); runs are one or two steps on a small batch.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
SMALL = [
    "rollout.num_prompts=8",
    "rollout.num_samples=4",
    "filter.gen_batch_size=8",
    "filter.max_gen_batches=2",
    "validation.max_questions=8",
    "validation.k=1",
    "validation.every_n_steps=1",
    "checkpoint_every_n_steps=null",
]
EVAL_SMALL = ["datasets=[{source: assets/tiny_arith/val.jsonl, name: arith, max_questions: 8}]", "k=1"]
HF_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt", "special_tokens.json", "polopt.json"}


def polopt(env: dict, *args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-P", "-m", "polopt", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"polopt {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def trained(tmp_path_factory, polopt_env) -> tuple[Path, subprocess.CompletedProcess]:
    """One training run of the tiny model (1 step), shared by the tests below."""
    out = tmp_path_factory.mktemp("journey") / "run1"
    proc = polopt(polopt_env, "train", "--config", "tiny_arith", f"output_dir={out}", "max_steps=1", *SMALL)
    return out, proc


def _recipe_module(name: str):
    # Loaded by path: torchtune's wheel installs its own top-level `recipes` package.
    spec = importlib.util.spec_from_file_location(f"journey_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_recipe_main(monkeypatch, capsys, recipe: str, config: str, *overrides: str) -> tuple[int, str]:
    """`recipe_main` of recipes/<recipe>.py as `tune run` calls it; returns (exit status, stderr).
    stderr includes what Python would print as "Exception ignored in ..." with its traceback (an
    object's __del__ failing, e.g. a half-built one), once what the run left is collected."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [f"recipes/{recipe}.py", "--config", config, *overrides])
    ignored: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: ignored.append(
        f"Exception ignored in: {u.object!r}\nTraceback (most recent call last):\n{u.exc_type.__name__}: {u.exc_value}"))
    with pytest.raises(SystemExit) as exited:
        _recipe_module(recipe).recipe_main()
    code = exited.value.code
    del exited
    gc.collect()
    return code, capsys.readouterr().err + "".join(f"\n{text}" for text in ignored)


def _train_config(*overrides: str):
    return OmegaConf.merge(OmegaConf.load(REPO / "configs" / "tiny_arith.yaml"), OmegaConf.from_dotlist(list(overrides)))


@pytest.mark.slow
def test_train_evaluate_train_from_final_evaluate(trained, polopt_env, tmp_path):
    run1, proc = trained
    # final/ is a clean HF model folder: weights as model.safetensors, no copies of the base's data.
    final = run1 / "final"
    assert {p.name for p in final.iterdir()} == HF_FILES
    info = json.loads((final / "polopt.json").read_text())
    assert info["loss"] == "nft" and info["steps"] == 1 and info["base_model"] == "assets/tiny_arith"
    assert not (run1 / "hf").exists() and not list(run1.glob(".final.*"))
    assert (final / "model.safetensors").stat().st_mode & 0o077 == (REPO / "README.md").stat().st_mode & 0o077
    # The progress bar shows what moves, not the on-policy loss (~0).
    for shown in ("reward=", "val_acc=", "grad_norm=", "neg_clip_frac="):
        assert shown in proc.stderr, shown

    # Evaluate it (the checkpointer reads model.safetensors as the config names it).
    polopt(polopt_env, "evaluate", "--config", "evaluate", f"model_dir={final}", f"output_dir={tmp_path / 'eval1'}",
           *EVAL_SMALL)
    eval1 = json.loads((tmp_path / "eval1" / "eval.json").read_text())
    assert eval1["datasets"]["arith"]["n_questions"] == 8
    assert [key for key in eval1["datasets"]["arith"] if key.startswith("pass@")] == ["pass@1"]  # k=1 allows pass@1
    assert not (tmp_path / "eval1" / "checkpointer").exists()

    # Train again from final/: the new run starts from the trained weights, so its first held-out
    # score (same questions, same sampling seed) is the first run's last one.
    run2 = tmp_path / "run2"
    polopt(polopt_env, "train", "--config", "tiny_arith", f"model_dir={final}", f"output_dir={run2}", "max_steps=1", *SMALL)
    before = json.loads((run2 / "summary.json").read_text())["val_accuracy_before"]
    assert before == json.loads((run1 / "summary.json").read_text())["val_accuracy_after"]
    assert json.loads((run2 / "final" / "polopt.json").read_text())["base_model"] == str(final)

    polopt(polopt_env, "evaluate", "--config", "evaluate", f"model_dir={run2 / 'final'}",
           f"output_dir={tmp_path / 'eval2'}", *EVAL_SMALL)
    assert json.loads((tmp_path / "eval2" / "eval.json").read_text())["model_dir"] == str(run2 / "final")


@pytest.mark.slow
def test_final_model_loads_in_transformers_as_it_is(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = trained[0] / "final"
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("123+456=", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


VLLM_CHECK = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
import torch
from transformers import AutoModelForCausalLM
from vllm import LLM, SamplingParams

final, prompt = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=final, dtype="float32", enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.05)
out = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=1.0, seed=0, logprobs=0))[0]
ids, tokens = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
vllm_logprobs = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)]
hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
with torch.no_grad():
    logits = hf(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1]
hf_logprobs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
print(json.dumps({"n": len(tokens), "max_diff": (hf_logprobs - torch.tensor(vllm_logprobs)).abs().max().item()}))
"""


@pytest.mark.slow
def test_final_model_serves_in_vllm_as_it_is(trained, polopt_env):
    """vLLM loads final/ unchanged; its sampled tokens' log-probs are transformers' (fp32)."""
    pytest.importorskip("vllm")
    prompt = json.loads((REPO / "assets" / "tiny_arith" / "val.jsonl").read_text().splitlines()[0])["question"]
    proc = subprocess.run([sys.executable, "-c", VLLM_CHECK, str(trained[0] / "final"), json.dumps(prompt)],
                          env=polopt_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] > 0 and result["max_diff"] < 1e-4


@pytest.mark.slow
def test_second_run_into_a_used_output_dir_is_refused_and_changes_nothing(trained, monkeypatch, capsys):
    run1, _ = trained
    before = {p: p.stat().st_mtime_ns for p in run1.rglob("*")}
    code, err = run_recipe_main(monkeypatch, capsys, "online_rl_distributed", "configs/tiny_arith.yaml",
                                f"output_dir={run1}", "max_steps=1")
    assert code == 2
    assert f"output_dir={run1} already holds files" in err and "resume=true" in err and "overwrite=true" in err
    assert {p: p.stat().st_mtime_ns for p in run1.rglob("*")} == before


@pytest.mark.slow
def test_resume_refuses_a_changed_loss_or_batch_shape_unless_allowed(trained, monkeypatch):
    run1, _ = trained
    recipe_class = _recipe_module("online_rl_distributed").OnlineRLRecipe
    from polopt.errors import ConfigError

    monkeypatch.chdir(REPO)
    base = [f"output_dir={run1}", "resume=true", *SMALL]
    with pytest.raises(ConfigError, match=r"loss: nft -> grpo"):
        recipe_class(_train_config(*base, "max_steps=2", "loss=grpo"))
    with pytest.raises(ConfigError, match=r"rollout\.num_prompts: 8 -> 4"):
        recipe_class(_train_config(*base, "max_steps=2", "rollout.num_prompts=4"))
    with pytest.raises(ConfigError, match=r"loss_args\.nft: .*'epsilon': 1\.0.* -> .*'epsilon': 2\.0"):
        recipe_class(_train_config(*base, "loss_args.nft.epsilon=2.0"))
    # What does not change the run's meaning may change; the rest only when allowed.
    recipe_class(_train_config(*base, "max_steps=5", "validation.every_n_steps=3"))
    recipe_class(_train_config(*base, "rollout.num_prompts=4", "resume_allow_changes=true"))


def test_overwrite_deletes_only_a_polopt_run(tmp_path, monkeypatch):
    from polopt.errors import ConfigError

    recipe_class = _recipe_module("online_rl_distributed").OnlineRLRecipe
    monkeypatch.chdir(REPO)
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("keep me")
    with pytest.raises(ConfigError, match="no polopt run"):
        recipe_class(_train_config(f"output_dir={stranger}", "overwrite=true"))
    assert (stranger / "thesis.tex").read_text() == "keep me"

    old_run = tmp_path / "old"
    old_run.mkdir()
    (old_run / "config.yaml").write_text("loss: nft\n")
    (old_run / "summary.json").write_text("{}")
    recipe_class(_train_config(f"output_dir={old_run}", "overwrite=true"))
    assert not old_run.exists()


def _doc_example(name: str) -> str:
    text = (REPO / "docs" / "recipe.md").read_text()
    block = text.split(f"<!-- example:{name} -->", 1)[1].split("<!-- /example -->", 1)[0]
    return block.split("```python", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_a_loss_from_the_users_own_module_trains_through_the_stock_recipe(polopt_env, tmp_path):
    """docs/recipe.md's REINFORCE-with-baseline, saved as the user's own module, via loss_modules."""
    user_code = tmp_path / "user_code"
    user_code.mkdir()
    (user_code / "my_losses.py").write_text(_doc_example("reinforce_baseline"))
    env = {**polopt_env, "PYTHONPATH": f"{polopt_env['PYTHONPATH']}{os.pathsep}{user_code}"}
    out = tmp_path / "run"
    proc = polopt(env, "train", "--config", "tiny_arith", "loss_modules=[my_losses]", "loss=reinforce_baseline",
                  "loss_args.reinforce_baseline.loss_agg=seq-mean-token-mean", f"output_dir={out}", "max_steps=1",
                  "save_final_model=false", *SMALL, "validation.source=null")
    steps = [h for h in json.loads((out / "history.json").read_text()) if "loss" in h]
    assert steps and all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    assert all(h["mean_abs_advantage"] > 0 for h in steps)  # the groups kept have 0 < r̂ < 1
    assert json.loads((out / "summary.json").read_text())["loss"] == "reinforce_baseline"
    assert "mean_abs_advantage=" in proc.stderr


def test_reinforce_baseline_example_gradient_is_the_policy_gradient():
    """On-policy, ∇ of the example's loss is −Σ_t (r − r̂)·∇log π_θ(a_t) / #tokens (token-mean)."""
    namespace: dict = {}
    from polopt.losses import registry

    saved = dict(registry._REGISTRY)
    try:
        exec(compile(_doc_example("reinforce_baseline"), "my_losses.py", "exec"), namespace)
        loss_fn = namespace["ReinforceBaseline"]()
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)
    torch.manual_seed(0)
    logprobs = (-torch.rand(6, 5)).requires_grad_()
    mask = torch.rand(6, 5) > 0.3
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    loss_fn(logprobs, logprobs.detach(), mask, rewards, group_ids).loss.backward()
    advantages = rewards - torch.tensor([1 / 3] * 3 + [1.0] * 3)
    expected = -(advantages[:, None] * mask) / mask.sum()
    torch.testing.assert_close(logprobs.grad, expected)


# Each: overrides, fragments the one-line message must contain.
TRAIN_ERRORS = {
    "malformed JSONL": (["dataset.source={bad_jsonl}"], ["bad.jsonl:2: invalid JSON", "(column 20)"]),
    "missing answer field": (["dataset.answer_field=solution"], ["train.jsonl:1:", "Set dataset.answer_field"]),
    "unknown template": (["dataset.template=qwen_boxd"], ["dataset.template='qwen_boxd'", "qwen_boxed"]),
    "kl term without a reference policy": (["loss_args.nft.kl_coef=0.1"], ["loss_args.nft.kl_coef=0.1", "kl_coef=0"]),
    "missing model_dir": (["model_dir=/no/such/model"], ["/no/such/model: no such folder", "set model_dir"]),
    "missing weights": (["checkpointer.checkpoint_files=[weights.safetensors]"],
                        ["weights.safetensors", "model.safetensors", "set checkpointer.checkpoint_files"]),
    "too-long training prompts": (["dataset.source={long_jsonl}", "validation.source=null"],
                                  ["long.jsonl:1: the longest prompt (", "set dataset.max_prompt_tokens=208"]),
    "too-long validation prompts": (["validation.source={long_jsonl}"],
                                    ["long.jsonl:1:", "set validation.max_prompt_tokens=208"]),
    "loss_args section typo": (["loss_args.nfft.epsilon=0.5"], ["'loss_args.nfft'", "not a registered loss"]),
    "loss_args key typo": (["loss_args.grpo.clip_hihg=0.3"], ["'loss_args.grpo.clip_hihg'", "clip_high"]),
    "unknown loss": (["loss=reinforce_baseline"], ["reinforce_baseline", "loss_modules"]),
    "missing dataset file": (["dataset.source=/no/such/file.jsonl"], ["/no/such/file.jsonl"]),
    "max_steps not a number": (["max_steps=two"], ["max_steps"]),
    "unimportable loss module": (["loss_modules=[no_such_losses]"], ["loss_modules[0]", "no_such_losses"]),
    "component key typo (dataset)": (["dataset.sorce=x.jsonl"],
                                     ["unknown config key 'dataset.sorce'", "polopt.prompts.prompt_dataset", "source"]),
    "component key typo (optimizer)": (["optimizer.lrr=0.1"], ["unknown config key 'optimizer.lrr'", "lr"]),
    "component key typo (lr_scheduler)": (["lr_scheduler.num_warmup=3"],
                                          ["unknown config key 'lr_scheduler.num_warmup'", "num_warmup_steps"]),
    "unimportable component": (["verifier._component_=polopt.verify.NoSuchVerifier"],
                               ["verifier._component_", "polopt.verify.NoSuchVerifier"]),
    # Values a component's constructor rejects, and arguments it lacks: the section named, no traceback.
    "verifier rejects its timeout": (["verifier.timeout_s=-1"], ["verifier (polopt.verify.MathVerifier)", "timeout_s must be > 0"]),
    "optimizer rejects its lr": (["optimizer.lr=-1"], ["optimizer (torch.optim.AdamW)", "Invalid learning rate: -1"]),
    "engine without its model": (["rollout.engine._component_=polopt.rollout.VLLMRolloutEngine"],
                                 ["rollout.engine (polopt.rollout.VLLMRolloutEngine)", "set rollout.engine.model_name_or_path"]),
    "tokenizer file missing": (["tokenizer.path=/no/such/vocab.json"], ["tokenizer (", "/no/such/vocab.json"]),
    "rollout temperature 0": (["rollout.temperature=0"], ["rollout.temperature must be > 0, got 0"]),
    "validation top_p above 1": (["validation.top_p=2"], ["validation.top_p must be in (0, 1], got 2"]),
    "output_dir is a file": (["output_dir={bad_jsonl}"], ["bad.jsonl is a file, not a folder", "set output_dir to a folder"]),
    "negative warm-up": (["lr_scheduler.num_warmup_steps=-5"], ["'lr_scheduler.num_warmup_steps' must be >= 0, got -5"]),
    "negative checkpoint count": (["keep_last_checkpoints=-1"], ["'keep_last_checkpoints' must be >= 0, got -1"]),
    "log every 0 steps": (["log_every_n_steps=0"], ["'log_every_n_steps' must be >= 1, got 0"]),
    "validation batch of 0": (["validation.batch_size=0"], ["'validation.batch_size' must be >= 1, got 0"]),
    "negative gradient clip": (["clip_grad_norm=-1"], ["'clip_grad_norm' must be > 0", "got -1"]),
    "staleness without the trainer's pi_old": (["rollout.max_staleness=1"],
                                              ["rollout.max_staleness=1 needs recompute_old_logprobs: true"]),
    "staleness without the rollout correction": (["rollout.max_staleness=1", "recompute_old_logprobs=true"],
                                                 ["rollout.max_staleness=1 needs rollout_correction.enabled=true"]),
    "staleness with vLLM": (["rollout.max_staleness=2", "recompute_old_logprobs=true",
                             "rollout.engine._component_=polopt.rollout.VLLMRolloutEngine"],
                            ["rollout.max_staleness=2 runs the native engine in a producer process"]),
    "negative staleness": (["rollout.max_staleness=-1"], ["rollout.max_staleness", "-1"]),
    "more mini-batches than prompts": (["num_minibatches=9", "rollout.num_prompts=8"],
                                       ["num_minibatches=9 is more than rollout.num_prompts=8"]),
    # torchtune's DiskLogger makes its folder in its constructor; a failure there must not add
    # its half-built object's "Exception ignored" traceback after the one line.
    "metric log folder cannot be made": (["metric_logger.log_dir=/proc/polopt_nope"],
                                         ["metric_logger.log_dir", "cannot make /proc/polopt_nope"]),
}


@pytest.fixture
def bad_data(tmp_path) -> dict:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": 2}\n{"question": "2+2" "answer": 4}\n')
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"question": "1+" * 300 + "1", "answer": 301}) + "\n"
                    + (REPO / "assets" / "tiny_arith" / "val.jsonl").read_text().splitlines()[0] + "\n")
    return {"bad_jsonl": bad, "long_jsonl": long}


@pytest.mark.parametrize("case", sorted(TRAIN_ERRORS))
def test_training_user_errors_are_one_line_exit_2_and_leave_no_output_dir(case, bad_data, tmp_path, monkeypatch, capsys):
    overrides, fragments = TRAIN_ERRORS[case]
    out = tmp_path / "run"
    code, err = run_recipe_main(monkeypatch, capsys, "online_rl_distributed", "configs/tiny_arith.yaml",
                                f"output_dir={out}", "max_steps=1", *(o.format(**bad_data) for o in overrides))
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists()


def test_a_typo_in_the_config_file_is_reported_with_file_and_line(tmp_path, monkeypatch, capsys):
    text = (REPO / "configs" / "tiny_arith.yaml").read_text().replace("  temperature: 1.0\n", "  temprature: 1.0\n", 1)
    config = tmp_path / "my_run.yaml"
    config.write_text(text)
    line = text.splitlines().index("  temprature: 1.0") + 1
    code, err = run_recipe_main(monkeypatch, capsys, "online_rl_distributed", str(config), f"output_dir={tmp_path / 'o'}")
    assert code == 2
    assert f"error: {config}:{line}: unknown config key 'rollout.temprature'" in err


EVAL_ERRORS = {
    "typo temprature": (["temprature=0.7"], ["unknown config key 'temprature'", "temperature"]),
    "typo max_new_token": (["max_new_token=8"], ["unknown config key 'max_new_token'", "max_new_tokens"]),
    "dataset entry typo": (["datasets=[{source: assets/tiny_arith/val.jsonl, max_question: 3}]"],
                           ["'datasets[0].max_question'", "max_questions"]),
    "missing model_dir": (["model_dir=/no/such/model"], ["/no/such/model: no such folder"]),
    "missing answer field": (["datasets=[{source: assets/tiny_arith/val.jsonl, answer_field: solution}]"],
                             ["val.jsonl:1:", "Set datasets[0].answer_field"]),
    "k below 1": (["k=0"], ["'k' must be >= 1"]),
    "missing dataset file": (["datasets=[/no/such/set.jsonl]"], ["/no/such/set.jsonl"]),
    # pass@j for j > k, asked for (configs/evaluate.yaml's pass_k: null gives what k allows)
    "pass_k above k": (["k=4", "pass_k=[1,4,16]"], ["'pass_k' asks for pass@16", "k=4", "drop 16 from pass_k"]),
    "pass_k not a list": (["pass_k=4"], ["'pass_k' must be a list"]),
    "pass_k below 1": (["pass_k=[0,1]"], ["'pass_k' must be a list of integers >= 1"]),
    "temperature 0": (["temperature=0"], ["temperature must be > 0"]),
    "verifier rejects its workers": (["verifier.num_workers=0"], ["verifier (polopt.verify.MathVerifier)", "num_workers"]),
    # vLLM loads model_dir unless told otherwise; with neither there is no model to load
    "vLLM engine without model_dir": (["rollout.engine._component_=polopt.rollout.VLLMRolloutEngine", "model_dir=null",
                                       "tokenizer.path=assets/tiny_arith"], ["set rollout.engine.model_name_or_path"]),
    "max_questions 0": (["max_questions=0"], ["'max_questions' must be >= 1, got 0"]),
    "batch_size 0": (["batch_size=0"], ["'batch_size' must be >= 1, got 0"]),
}


@pytest.mark.parametrize("case", sorted(EVAL_ERRORS))
def test_evaluation_user_errors_are_one_line_exit_2(case, tmp_path, monkeypatch, capsys):
    overrides, fragments = EVAL_ERRORS[case]
    code, err = run_recipe_main(monkeypatch, capsys, "evaluate", "configs/evaluate.yaml",
                                f"output_dir={tmp_path / 'eval'}", *overrides)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "eval").exists()


def test_evaluation_with_a_small_k_reports_the_pass_at_j_it_allows(tmp_path, monkeypatch, capsys):
    """`k=2` with configs/evaluate.yaml as shipped (pass_k: null): pass@1 (and pass@2 = solved in 2),
    not a refusal over the pass@4 and pass@16 that 16 samples would give."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["recipes/evaluate.py", "--config", "configs/evaluate.yaml", f"output_dir={tmp_path}",
                                      "k=2", "datasets=[{source: assets/tiny_arith/val.jsonl, name: arith, max_questions: 4}]"])
    with pytest.raises(SystemExit) as exited:  # torchtune's config.parse exits with the recipe's return value
        _recipe_module("evaluate").recipe_main()
    assert not exited.value.code, capsys.readouterr().err
    arith = json.loads((tmp_path / "eval.json").read_text())["datasets"]["arith"]
    assert arith["k"] == 2 and [key for key in arith if key.startswith("pass@")] == ["pass@1"]
    assert arith["pass@1"] == pytest.approx(arith["avg_at_k"])
    assert "| pass@1 |" in (tmp_path / "eval.md").read_text().splitlines()[0]


@pytest.mark.parametrize("config", ["evaluate", "smollm2_addition_eval"])
def test_evaluating_with_vllm_needs_the_model_written_once(config):
    """The engine override alone: vLLM's model_name_or_path is model_dir (one `model_dir=` names the
    model for the tokenizer, the checkpointer and the engine); a path given for the engine stays.
    (tests/test_vllm_engine.py's evaluate run goes through this with the real engine.)"""
    from polopt.config.validate import validate_eval_config

    def engine(*overrides):
        cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs" / f"{config}.yaml"), OmegaConf.from_dotlist(
            ["output_dir=/tmp/unused", "rollout.engine._component_=polopt.rollout.VLLMRolloutEngine", *overrides]))
        return validate_eval_config(cfg).rollout.engine

    assert engine("model_dir=/models/mine").model_name_or_path == "/models/mine"
    assert engine("model_dir=/models/mine", "rollout.engine.model_name_or_path=/models/other").model_name_or_path == "/models/other"
    assert "model_name_or_path" not in engine("model_dir=null")


def test_evaluation_refuses_to_replace_an_earlier_eval(tmp_path, monkeypatch, capsys):
    (tmp_path / "eval.json").write_text("{}")
    code, err = run_recipe_main(monkeypatch, capsys, "evaluate", "configs/evaluate.yaml", f"output_dir={tmp_path}")
    assert code == 2 and "already holds an eval.json" in err and "overwrite=true" in err
    assert (tmp_path / "eval.json").read_text() == "{}"


def test_cli_hands_tune_run_a_relative_recipe_and_resolves_config_names():
    from polopt.cli import tune_argv

    args = tune_argv(["train", "--nproc_per_node", "2", "--config", "tiny_arith", "loss=grpo"], REPO)
    assert args == ["run", "--nproc_per_node", "2", "recipes/online_rl_distributed.py",
                    "--config", str(REPO / "configs" / "tiny_arith.yaml"), "loss=grpo"]
    args = tune_argv(["run", str(REPO / "recipes" / "evaluate.py"), "--config", "configs/evaluate.yaml"], REPO)
    assert args[1] == "recipes/evaluate.py"
    with pytest.raises(SystemExit, match="tiny_arith"):
        tune_argv(["train", "--config", "tiny_arihtm"], REPO)
