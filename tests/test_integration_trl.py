"""polopt losses inside the real TRL GRPOTrainer (CPU, a tiny Qwen2 built in memory).

Exactness: polopt's dr_grpo equals TRL's own loss_type="dr_grpo" with scale_rewards="none" on the
same micro-batches (value and parameter gradients), including off-policy iterations
(num_iterations=2) and gradient accumulation — a check against a trainer we did not write.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import polopt.integrations.trl as polopt_trl  # noqa: E402
from polopt.integrations.trl import PoloptGRPOTrainer, check_trl_version  # noqa: E402
from polopt.losses import BUILTIN_LOSSES  # noqa: E402
from polopt.testing.tiny_lm import tiny_qwen2_with_tokenizer  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
PROMPTS = ["1+2=", "3*4=", "5-1=", "9+9="]


def alternating_reward(completions, **kwargs):
    """Binary and deterministic: every group of an even num_generations is mixed."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def config(tmp_path, **overrides) -> GRPOConfig:
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    options.update(overrides)
    return GRPOConfig(**options)


def trainer(tmp_path, cls=PoloptGRPOTrainer, reward=alternating_reward, args=None, **kwargs):
    model, tokenizer = tiny_qwen2_with_tokenizer()
    return cls(
        model=model,
        reward_funcs=reward,
        args=args or config(tmp_path),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        **kwargs,
    )


@pytest.mark.parametrize("loss", BUILTIN_LOSSES)
def test_each_loss_trains_two_steps(tmp_path, loss):
    # InfoNCA needs whole groups per micro-batch; the others run with accumulation and reuse.
    overrides = dict(steps_per_generation=1) if loss == "infonca" else dict(gradient_accumulation_steps=2, num_iterations=2)
    run = trainer(tmp_path, args=config(tmp_path, **overrides), loss=loss)
    before = [p.detach().clone() for p in run.model.parameters()]
    result = run.train()
    assert run.state.global_step == 2
    assert torch.isfinite(torch.tensor(result.training_loss))
    change = max((p.detach() - b).abs().max().item() for p, b in zip(run.model.parameters(), before))
    assert change > 0
    logged = [entry for entry in run.state.log_history if "polopt/informative_frac" in entry]
    assert logged and all(entry["polopt/informative_frac"] == 1.0 for entry in logged)


class ComparingTrainer(PoloptGRPOTrainer):
    """Computes polopt's loss and TRL's parent loss on the same `inputs`, with their gradients."""

    compared: list

    def _compute_loss(self, model, inputs):
        ours = super()._compute_loss(model, inputs)
        theirs = GRPOTrainer._compute_loss(self, model, inputs)
        params = [p for p in model.parameters() if p.requires_grad]
        our_grads = torch.autograd.grad(ours, params, retain_graph=True)
        their_grads = torch.autograd.grad(theirs, params, retain_graph=True)
        off_policy = "old_per_token_logps" in inputs
        self.compared.append((ours.detach(), theirs.detach(), our_grads, their_grads, off_policy))
        return ours


def test_dr_grpo_equals_trls_own_dr_grpo(tmp_path):
    args = config(
        tmp_path, loss_type="dr_grpo", scale_rewards="none", gradient_accumulation_steps=2, num_iterations=2, max_steps=3
    )
    run = trainer(tmp_path, cls=ComparingTrainer, args=args, loss="dr_grpo")
    run.compared = []
    run.train()
    assert len(run.compared) == 6  # 3 optimizer steps × 2 micro-batches
    assert any(off_policy for *_, off_policy in run.compared)
    assert any(ours.abs() > 1e-4 for ours, *_ in run.compared)
    for ours, theirs, our_grads, their_grads, _ in run.compared:
        assert abs(ours.item() - theirs.item()) <= 1e-6
        for ours_g, theirs_g in zip(our_grads, their_grads):
            torch.testing.assert_close(ours_g, theirs_g, rtol=0, atol=1e-6)


def test_old_logprobs_come_from_trl_when_iterating(tmp_path):
    """num_iterations=2: the second pass over a generation uses TRL's old log-probs, so R ≠ 1."""
    run = trainer(tmp_path, args=config(tmp_path, num_iterations=2, max_steps=2), loss="nft")
    run.train()
    ratio_max = [e["polopt/ratio_max"] for e in run.state.log_history if "polopt/ratio_max" in e]
    assert ratio_max[0] == 1.0 and ratio_max[1] != 1.0


def test_non_binary_reward_raises_naming_the_completion(tmp_path):
    def graded(completions, **kwargs):
        return [0.5] + [1.0] * (len(completions) - 1)

    run = trainer(tmp_path, reward=graded, loss="nft")
    with pytest.raises(ValueError, match=r"needs binary rewards .* completion 0 .* got 0\.5 .*graded=0\.5"):
        run.train()


def test_num_generations_below_two_raises(tmp_path):
    args = config(tmp_path)
    args.num_generations = 1  # GRPOConfig checks this at construction; a later edit must fail too
    with pytest.raises(ValueError, match="num_generations=1"):
        trainer(tmp_path, args=args, loss="nft")


def test_trl_version_outside_the_tested_range_raises(tmp_path, monkeypatch):
    assert check_trl_version() == polopt_trl.trl.__version__
    with pytest.raises(RuntimeError, match=r"supports trl>=1\.16,<1\.17.*trl 1\.17\.0 is installed"):
        check_trl_version("1.17.0")
    monkeypatch.setattr(polopt_trl.trl, "__version__", "2.0.0")
    with pytest.raises(RuntimeError, match="trl 2.0.0 is installed"):
        trainer(tmp_path, loss="nft")


@pytest.mark.parametrize(
    ("overrides", "kwargs", "message"),
    [
        ({}, dict(loss="ppo"), "unknown loss 'ppo'"),
        ({}, dict(loss="nft", loss_kwargs={"epsilon": -1}), "epsilon must be"),
        (dict(gradient_accumulation_steps=2), dict(loss="infonca"), "needs whole groups"),
        (dict(beta=0.1), dict(loss="infonca"), "has no KL term"),
        ({}, dict(loss="nft", loss_kwargs={"kl_coef": 0.1}), "GRPOConfig.beta"),
        (dict(importance_sampling_level="sequence", loss_type="grpo"), dict(loss="nft"), "importance_sampling_level"),
    ],
)
def test_bad_settings_raise_at_construction(tmp_path, overrides, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        trainer(tmp_path, args=config(tmp_path, **overrides), **kwargs)


def test_importing_polopt_does_not_import_trl():
    code = "import sys, polopt, polopt.losses, polopt.integrations; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docs_trl_example_runs(tmp_path, monkeypatch):
    """docs/integrations.md's "Use NFT in TRL" example, executed as written."""
    text = (DOCS / "integrations.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(DOCS / "integrations.md"), "exec"), namespace)
    assert namespace["trainer"].state.global_step == 2
