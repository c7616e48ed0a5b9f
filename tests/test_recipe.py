"""End-to-end tests of recipes/online_rl_distributed.py through `tune run`, on the embedded tiny
model (CPU, fp32). Each run is a few rollout steps on a small batch, so the suite stays short."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TUNE = str(Path(sys.executable).parent / "tune")

# Small and fast: 8 prompts x 4 answers, 2 mini-batches, 16-question validation.
SMALL = [
    "rollout.num_prompts=8",
    "rollout.num_samples=4",
    "filter.gen_batch_size=8",
    "filter.max_gen_batches=2",
    "num_minibatches=2",
    "validation.max_questions=16",
    "validation.every_n_steps=0",
    "metric_logger._component_=torchtune.training.metric_logging.DiskLogger",
]


def tune_command(output_dir: Path, *overrides: str, nproc: int = 1) -> tuple[list[str], dict[str, str]]:
    """The `tune run` command line of the tiny config with SMALL and `overrides`, and its environment."""
    launcher = [TUNE, "run"] + (["--nproc_per_node", str(nproc)] if nproc > 1 else [])
    cmd = [*launcher, "recipes/online_rl_distributed.py", "--config", "configs/tiny_arith.yaml",
           f"output_dir={output_dir}", *SMALL, *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    return cmd, env


def tune_run(output_dir: Path, *overrides: str, nproc: int = 1, check: bool = True, timeout: int = 600):
    cmd, env = tune_command(output_dir, *overrides, nproc=nproc)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"tune run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def tune_run_killed_after_checkpoint(step: int, output_dir: Path, *overrides: str, nproc: int = 1) -> None:
    """Start `tune run` and SIGKILL it and its workers once the step-`step` checkpoint exists."""
    cmd, env = tune_command(output_dir, *overrides, nproc=nproc)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    checkpoint = output_dir / "checkpoints" / f"step_{step}"  # a folder, renamed into place once complete
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    kill_process_tree(proc)
    assert checkpoint.exists(), f"no step-{step} checkpoint was written"
    assert not (output_dir / "history.json").exists(), "the run finished before it was killed"


def kill_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launch started with start_new_session: its workers first (torchrun starts every
    worker in a session of its own, so killing the launcher's process group leaves them running),
    then the launcher's group."""
    if proc.poll() is None:
        for worker in _children(proc.pid):
            _killpg(worker)
        _killpg(proc.pid)
    proc.wait()


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid, ...
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            children.append(int(stat.parent.name))
    return children


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "history.json").read_text())


def run_in_process(output_dir: Path, *overrides: str) -> None:
    """The tiny config with SMALL and `overrides` through the recipe class in this process: what
    `tune run` does after parsing, without a process start per run (the `tune run` path has its own
    tests). Run from the repository root (the config's paths are relative to it)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "tiny_arith.yaml"),
                          OmegaConf.from_dotlist([f"output_dir={output_dir}", *SMALL, *overrides]))
    recipe = _load_recipe_class()(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


@pytest.mark.slow
def test_every_registered_loss_runs_two_steps(tmp_path, monkeypatch):
    from polopt.losses import list_losses

    monkeypatch.chdir(REPO)
    for loss in list_losses():
        out = tmp_path / loss
        run_in_process(out, f"loss={loss}", "max_steps=2", "save_final_model=false")
        steps = [h for h in history(out) if h["step"] > 0]
        assert [h["step"] for h in steps] == [1, 2], loss
        # A step whose groups were all filtered out has no update (and no loss); the run must update.
        assert sum(h["optimizer_steps"] for h in steps) >= 1, (loss, steps)
        for h in steps:
            assert ("loss" in h) == (h["optimizer_steps"] > 0), (loss, h)
            if h["optimizer_steps"] > 0:
                assert torch.isfinite(torch.tensor([h["loss"], h["grad_norm"]])).all(), (loss, h)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["loss"] == loss


@pytest.mark.slow
def test_demo_outputs_summary_plot_and_hf_model_loadable_by_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    tune_run(out, "max_steps=1", "validation.every_n_steps=1")
    summary = json.loads((out / "summary.json").read_text())
    for key in ("val_accuracy_before", "val_accuracy_after", "steps", "wall_seconds"):
        assert summary[key] is not None, key
    assert (out / "training_curves.png").stat().st_size > 1000
    assert list((out / "logs").glob("*.txt")), "DiskLogger wrote no metric log"

    # The HF model written at the end loads in transformers and gives the torchtune model's log-probs.
    hf = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    from torchtune.training import FullModelHFCheckpointer

    from polopt.models import tiny_arith

    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(out / "final"),
        checkpoint_files=sorted(p.name for p in (out / "final").glob("*.safetensors")),
        model_type="QWEN2",
        output_dir=str(tmp_path / "scratch"),
    )
    tt = tiny_arith()
    tt.load_state_dict(ckpt.load_checkpoint()["model"])
    tt.eval()
    tokens = torch.randint(0, hf.config.vocab_size, (3, 20))
    with torch.no_grad():
        hf_logp = torch.log_softmax(hf(tokens).logits.float(), -1)
        tt_logp = torch.log_softmax(tt(tokens).float(), -1)
    assert (hf_logp - tt_logp).abs().max().item() < 1e-5


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(tmp_path):
    steps = "max_steps=4"
    full = tmp_path / "full"
    tune_run(full, steps, "save_final_model=false")

    # Same run, killed (SIGKILL) once the step-2 checkpoint exists, then resumed.
    killed = tmp_path / "killed"
    tune_run_killed_after_checkpoint(2, killed, steps, "save_final_model=false", "checkpoint_every_n_steps=2")
    tune_run(killed, steps, "save_final_model=false", "checkpoint_every_n_steps=2", "resume=true")

    def losses(out):
        return {h["step"]: h.get("loss") for h in history(out) if h["step"] > 2}

    assert losses(killed).keys() == {3, 4}
    for step, value in losses(full).items():
        assert losses(killed)[step] == pytest.approx(value, abs=1e-6), step


# The configs that run on this machine; the GPU configs are built (at full size, on meta) by
# tests/test_configs_gpu.py. Every file in configs/ is one or the other.
CPU_TRAINING_CONFIGS = ("smollm2_addition", "tiny_arith", "tiny_arith_hard", "tiny_arith_vllm")
EVALUATION_CONFIGS = ("evaluate", "smollm2_addition_eval")


def test_every_config_is_built_by_a_test():
    from test_configs_gpu import PUBLISHED_PARAMETERS

    gpu = {Path(name).stem for name in PUBLISHED_PARAMETERS}
    assert {p.stem for p in (REPO / "configs").glob("*.yaml")} == {*CPU_TRAINING_CONFIGS, *EVALUATION_CONFIGS, *gpu}


@pytest.mark.parametrize("name", CPU_TRAINING_CONFIGS)
def test_cpu_config_builds_every_component(name, tmp_path, monkeypatch):
    """Each component of the config built for real, as the recipe's setup builds it: the model with
    the checkpoint's weights, a tokenizer that fits it, the dataset (prompts that fit the context),
    the validation set, the verifier (scoring a right and a wrong answer, then closed), the native
    engine (generating), optimiser, LR schedule, rollout correction, metric logger. A vLLM engine's
    arguments are only checked against its constructor and vllm.LLM's here (as the GPU configs'
    are); tests/test_vllm_engine.py runs the real one."""
    from functools import partial

    from omegaconf import OmegaConf
    from test_configs_gpu import _check_engine_arguments as check_engine_arguments
    from test_configs_gpu import build_datasets
    from torchtune.config._utils import _get_component_from_path

    from polopt.checkpoint import load_hf_model
    from polopt.config.instantiate import instantiate_component, sampling_params
    from polopt.config.validate import validate_config
    from polopt.losses import get_loss
    from polopt.tokenizer import check_tokenizer

    monkeypatch.chdir(REPO)
    cfg = validate_config(OmegaConf.merge(OmegaConf.load(REPO / "configs" / f"{name}.yaml"),
                                          OmegaConf.from_dotlist([f"output_dir={tmp_path / 'run'}"])))
    for loss, kwargs in cfg.loss_args.items():
        get_loss(loss, **OmegaConf.to_container(kwargs))
    _, state = load_hf_model(cfg.checkpointer)
    tokenizer = instantiate_component(cfg.tokenizer, "tokenizer")
    model = instantiate_component(cfg.model, "model")
    model.load_state_dict(state)
    check_tokenizer(tokenizer, vocab_size=model.tok_embeddings.num_embeddings)
    optimizer = instantiate_component(cfg.optimizer, "optimizer", model.parameters())
    instantiate_component(cfg.lr_scheduler, "lr_scheduler", optimizer, num_training_steps=cfg.max_steps)
    instantiate_component(cfg.rollout_correction, "rollout_correction")

    dataset, _ = build_datasets(cfg, tokenizer, model.max_seq_len)
    assert len(dataset) > 100

    verifier = instantiate_component(cfg.verifier, "verifier")
    try:
        prompt = dataset[0]
        assert verifier([f"The answer is {prompt.answer}", "The answer is -1.5"], [prompt.answer] * 2) == [1.0, 0.0]
    finally:
        verifier.close()

    decode = partial(tokenizer.decode, skip_special_tokens=True)
    engine_cfg = cfg.rollout.engine
    if _get_component_from_path(engine_cfg._component_).shares_trainer_model:
        engine = instantiate_component(engine_cfg, "rollout.engine", model=model, pad_id=tokenizer.pad_id, decode=decode)
        params = sampling_params("rollout.", temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                 top_k=cfg.rollout.top_k, max_new_tokens=4, stop_token_ids=list(tokenizer.stop_tokens), seed=0)
        (completions,) = engine.generate([prompt.token_ids], 2, params)
        assert len(completions) == 2 and all(0 < len(c.token_ids) <= 4 for c in completions)
    else:
        check_engine_arguments(cfg, tokenizer)
    instantiate_component(cfg.metric_logger, "metric_logger").close()


@pytest.mark.parametrize("name", EVALUATION_CONFIGS)
def test_evaluation_config_builds_every_component(name, tmp_path, monkeypatch):
    """recipes/evaluate.py's setup on the config as shipped: model and weights, tokenizer, engine,
    every dataset read and checked against the context, verifier (closed by cleanup)."""
    from omegaconf import OmegaConf

    monkeypatch.chdir(REPO)
    recipe = _load_recipe_module("evaluate").EvaluateRecipe(
        OmegaConf.merge(OmegaConf.load(REPO / "configs" / f"{name}.yaml"),
                        OmegaConf.from_dotlist([f"output_dir={tmp_path / 'eval'}"])))
    recipe.setup()
    try:
        assert recipe.model.tok_embeddings.weight.abs().sum() > 0  # the checkpoint's weights, loaded
        assert recipe.engine.model is recipe.model
        assert len(recipe.datasets) == len(recipe.cfg.datasets) and all(len(d) > 0 for _, _, d in recipe.datasets)
    finally:
        recipe.cleanup()
    assert not (tmp_path / "eval").exists()  # setup writes nothing


def test_every_data_file_a_config_names_is_in_the_checkout():
    """A fresh clone runs every config: no data source points outside the repository."""
    from omegaconf import OmegaConf

    def sources(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "source" and isinstance(value, str) and value:
                    yield value
                yield from sources(value)
        elif isinstance(node, list):
            for value in node:
                yield from sources(value)

    checked = 0
    for path in sorted((REPO / "configs").glob("*.yaml")):
        for source in sources(OmegaConf.to_container(OmegaConf.load(path), resolve=True)):
            assert not source.startswith(".."), (path.name, source)
            assert (REPO / source).is_file(), (path.name, source)
            checked += 1
    assert checked >= 10  # every training config's dataset and validation sources, evaluate's datasets


@pytest.mark.slow
def test_fused_materialised_and_packed_logprobs_give_the_same_first_steps(tmp_path, monkeypatch):
    """Issue 6: the fused chunked log-prob op is a drop-in for materialised logits in the recipe;
    issue 15: so is the packed layout (pack_sequences, polopt/packing.py), π_old recomputed too.
    GRPO's on-policy loss is not 0 (unlike NFT's), so the loss values themselves are compared."""
    variants = {
        "fused": ["fused_logprobs=true"],
        "materialised": ["fused_logprobs=false"],
        "packed": ["fused_logprobs=true", "pack_sequences=true"],
    }
    runs = {}
    monkeypatch.chdir(REPO)
    for name, overrides in variants.items():
        out = tmp_path / name
        run_in_process(out, "loss=grpo", "max_steps=2", "logprob_chunk_size=7", "recompute_old_logprobs=true",
                       "save_final_model=false", *overrides)
        runs[name] = [h for h in history(out) if "loss" in h]
    assert [len(r) for r in runs.values()] == [2, 2, 2]
    for name in ("materialised", "packed"):
        for reference, other in zip(runs["fused"], runs[name]):
            assert other["loss"] == pytest.approx(reference["loss"], abs=1e-5), name
            assert other["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4), name
            assert other["entropy"] == pytest.approx(reference["entropy"], abs=1e-5), name


def _load_recipe_module(name: str):
    import importlib.util

    # Loaded by path: torchtune's wheel installs its own top-level `recipes` package.
    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_recipe_class():
    return _load_recipe_module("online_rl_distributed").OnlineRLRecipe


@pytest.mark.slow
def test_non_finite_losses_are_skipped_counted_and_bounded(tmp_path, monkeypatch):
    from dataclasses import replace

    from omegaconf import OmegaConf

    monkeypatch.chdir(REPO)
    cfg = OmegaConf.merge(
        OmegaConf.load(REPO / "configs" / "tiny_arith.yaml"),
        OmegaConf.from_dotlist([f"output_dir={tmp_path}", *SMALL, "max_steps=3", "max_nan_steps=1",
                                "validation.source=null", "save_final_model=false"]),
    )
    recipe = _load_recipe_class()(cfg)
    recipe.setup()
    real_forward = recipe.loss_fn.forward
    monkeypatch.setattr(recipe.loss_fn, "forward",
                        lambda *a, **k: replace(out := real_forward(*a, **k), loss=out.loss * float("nan")))
    before = {k: v.clone() for k, v in recipe.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="max_nan_steps=1"):
        recipe.train()
    # Both NaN steps were skipped: the weights never moved, and the count was kept.
    assert recipe.nan_steps == 2
    for name, value in recipe.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    recipe.cleanup()


def test_instantiate_component_blames_the_config_only_for_what_the_config_got_wrong():
    from omegaconf import OmegaConf

    from polopt.errors import ConfigError
    from polopt.config.instantiate import instantiate_component

    with pytest.raises(ConfigError, match=r"verifier \(polopt.verify.MathVerifier\): .*timeout_s must be > 0") as e:
        instantiate_component(OmegaConf.create({"_component_": "polopt.verify.MathVerifier", "timeout_s": -1}), "verifier")
    assert e.value.key == "verifier"
    with pytest.raises(ConfigError, match=r"missing a required argument: 'model_name_or_path'; set rollout.engine.model_name_or_path"):
        instantiate_component(OmegaConf.create({"_component_": "polopt.rollout.VLLMRolloutEngine"}), "rollout.engine")
    # A TypeError raised inside a constructor is a bug to see with its traceback, not a config error.
    with pytest.raises(TypeError) as raised:
        instantiate_component(OmegaConf.create({"_component_": "datetime.timedelta", "days": "x"}), "x")
    assert not isinstance(raised.value, ConfigError)
    built = instantiate_component(OmegaConf.create({"_component_": "datetime.timedelta", "days": 2}), "x")
    assert built.days == 2
