"""Runs a peer's own loss code (verl, OpenRLHF) inside the peer's virtualenv, for the conformance report.

    <peer venv>/bin/python benchmarks/peer_loss_driver.py verl             # serve requests
    <peer venv>/bin/python benchmarks/peer_loss_driver.py openrlhf --probe # import the peer's modules

One JSON request per line on stdin: {"setting": {...}, "logprobs", "old_logprobs", "mask", "rewards",
"group_ids"} (nested lists, float64 values exactly as JSON writes them); one JSON reply per line on
stdout: {"loss": float, "grad": [[...]]} — the peer's loss value and its autograd gradient
∂loss/∂logprobs — or {"error": "..."} when the peer's code raised. It imports only torch and the peer
(never polopt), so that benchmarks/conformance_report.py judges with polopt's kit in the main venv.

What is the peer's code and what is glue:
- verl 0.9.1: `core_algos.compute_grpo_outcome_advantage` (rewards at each response's last token, the
  group ids as verl's `uid` index) → `core_algos.get_policy_loss_fn(loss_mode)` with a real
  `ActorConfig` (clip ratios, clip_ratio_c, loss_agg_mode); the loss aggregates through `agg_loss`.
- OpenRLHF 0.11: the advantage of `args.algo.advantage.estimator` (group_norm, dr_grpo, rloo) from
  `RemoteExperienceMaker.compute_advantages_and_returns` on `Experience` objects, then
  `openrlhf.models.loss.PolicyLoss`. `n_samples_per_prompt` consecutive rows per prompt, as OpenRLHF
  lays them out; the request's rows are sorted by group here and the gradient comes back in order.
  OpenRLHF imports flash_attn (models/ring_attn_utils.py) and vllm (trainer/ray/vllm_engine.py) at
  module level, both CUDA-only here; with POLOPT_STAND_INS=flash_attn,vllm those two packages are
  StandIn modules whose every function raises, which the loss and advantage code never call.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
import traceback
import types

import torch

# The modules each peer's loss and advantage code is imported from (the report's import probe).
MODULES = {
    "verl": ["verl.trainer.ppo.core_algos", "verl.workers.config.actor"],
    "openrlhf": ["openrlhf.models.loss", "openrlhf.trainer.ppo_utils.experience_maker"],
}


class StandIn(types.ModuleType):
    """A CUDA-only package that the peer imports at module level but its loss code never calls:
    any attribute is a function that raises, so a call would show up as an error, never a value."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is a stand-in: the package needs CUDA")

        return unavailable


class StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves StandIn modules for the packages named in POLOPT_STAND_INS (and their submodules)."""

    def __init__(self, packages: list[str]) -> None:
        self.packages = packages

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install_stand_ins() -> list[str]:
    packages = [name for name in os.environ.get("POLOPT_STAND_INS", "").split(",") if name]
    if packages:
        sys.meta_path.append(StandInFinder(packages))  # last: a real installed package still wins
    return packages


def tensors(request: dict):
    dtype = getattr(torch, request.get("dtype", "float64"))  # the kit sends float32 for its ±40 check
    logprobs = torch.tensor(request["logprobs"], dtype=dtype, requires_grad=True)
    old_logprobs = torch.tensor(request["old_logprobs"], dtype=dtype)
    mask = torch.tensor(request["mask"], dtype=torch.bool)
    rewards = torch.tensor(request["rewards"], dtype=torch.float64)
    group_ids = torch.tensor(request["group_ids"], dtype=torch.long)
    return logprobs, old_logprobs, mask, rewards, group_ids


def outcome_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] with each response's reward on its last token (verl's reward managers do this)."""
    token_level = torch.zeros(mask.shape, dtype=rewards.dtype)  # an empty response: its reward still counts
    last = (mask.sum(dim=-1) - 1).clamp(min=0)
    token_level[torch.arange(len(rewards)), last] = rewards
    return token_level


# ---------------------------------------------------------------------------------------------- verl


def verl_loss(setting: dict, logprobs, old_logprobs, mask, rewards, group_ids) -> torch.Tensor:
    import numpy as np
    from verl.trainer.ppo import core_algos
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig

    response_mask = mask.to(logprobs.dtype)
    advantages, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=outcome_rewards(rewards, mask),
        response_mask=response_mask,
        index=np.array([f"uid-{g}" for g in group_ids.tolist()], dtype=object),
        norm_adv_by_std_in_grpo=setting["norm_adv_by_std_in_grpo"],
    )
    policy_loss = PolicyLossConfig(loss_mode=setting["loss_mode"], **setting.get("policy_loss", {}))
    config = ActorConfig(
        strategy="fsdp",
        ppo_micro_batch_size_per_gpu=len(rewards),
        rollout_n=1,
        clip_ratio=setting.get("clip_ratio", 0.2),
        clip_ratio_low=setting.get("clip_ratio_low", 0.2),
        clip_ratio_high=setting.get("clip_ratio_high", 0.2),
        clip_ratio_c=setting.get("clip_ratio_c", 3.0),
        loss_agg_mode=setting["loss_agg_mode"],
        policy_loss=policy_loss,
        **setting.get("actor", {}),
    )
    loss_fn = core_algos.get_policy_loss_fn(setting["loss_mode"])
    loss, _ = loss_fn(
        old_log_prob=old_logprobs,
        log_prob=logprobs,
        advantages=advantages,
        response_mask=response_mask,
        loss_agg_mode=setting["loss_agg_mode"],
        config=config,
    )
    return loss


# ------------------------------------------------------------------------------------------ OpenRLHF


def openrlhf_loss(setting: dict, logprobs, old_logprobs, mask, rewards, group_ids) -> torch.Tensor:
    from types import SimpleNamespace

    from openrlhf.models.loss import PolicyLoss
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

    sizes = torch.unique(group_ids, return_counts=True)[1]
    if not (sizes == sizes[0]).all():
        raise ValueError(f"OpenRLHF needs groups of one size (n_samples_per_prompt), got {sizes.tolist()}")
    order = torch.sort(group_ids, stable=True).indices  # prompt-major: each group's rows consecutive
    action_mask = mask[order]
    args = SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=int(sizes[0])),
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator=setting["estimator"], gamma=1.0, lambd=1.0, no_std_norm=False)),
        reward=SimpleNamespace(clip_range=None),
        **setting.get("args", {}),
    )
    maker = RemoteExperienceMaker.__new__(RemoteExperienceMaker)  # the method needs only these attributes
    maker.strategy = SimpleNamespace(args=args)
    maker.kl_ctl = SimpleNamespace(value=0.0)
    maker.advantage_estimator = setting["estimator"]
    experience = Experience(
        index=list(range(len(rewards))),
        rewards=rewards[order].clone(),
        action_mask=action_mask,
        kl=torch.zeros(action_mask.shape, dtype=logprobs.dtype),
        info={},
    )
    (experience,) = maker.compute_advantages_and_returns([experience])
    policy_loss = PolicyLoss(**setting.get("policy_loss", {}))
    loss, *_ = policy_loss(
        logprobs[order], old_logprobs[order], experience.advantages, action_mask=action_mask.to(logprobs.dtype)
    )
    return loss


LOSSES = {"verl": verl_loss, "openrlhf": openrlhf_loss}


def main() -> None:
    peer = sys.argv[1]
    install_stand_ins()
    if sys.argv[2:] == ["--probe"]:  # import the peer's modules and say so
        for module in MODULES[peer]:
            __import__(module)
        print("imported " + ", ".join(MODULES[peer]))
        return
    loss_of = LOSSES[peer]
    # Replies go to the real stdout; anything the peer's libraries print (Python or C) goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    for line in sys.stdin:
        request = json.loads(line)
        try:
            logprobs, old_logprobs, mask, rewards, group_ids = tensors(request)
            loss = loss_of(request["setting"], logprobs, old_logprobs, mask, rewards, group_ids)
            (grad,) = torch.autograd.grad(loss, logprobs, allow_unused=True)
            grad = torch.zeros_like(logprobs) if grad is None else grad
            reply = {"loss": loss.item(), "grad": grad.tolist()}
        except Exception as error:  # the peer raised: the kit counts that as breaking the identity
            reply = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=3)}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
