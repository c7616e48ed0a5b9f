"""Conformance report: polopt's kit (`check_policy_loss`) run on the real loss code of TRL, verl and OpenRLHF.

    PYTHONPATH=. python benchmarks/conformance_report.py                       # all peers, 50 examples/identity
    PYTHONPATH=. python benchmarks/conformance_report.py --venvs /work/venvs --examples 25   # the committed run
    PYTHONPATH=. python benchmarks/conformance_report.py --peers trl --examples 20
    PYTHONPATH=. python benchmarks/conformance_report.py --rewrite             # the .md again from the .json

For every peer loss × setting, hypothesis searches each identity of docs/conformance.md for an input
that breaks it and shrinks a failure to a minimal counter-example. Writes docs/conformance_report.md
and docs/conformance_report.json (verdicts, counter-examples, readings, machine, versions, date,
command). A report, not a test: tests/test_conformance_peers.py pins the TRL verdicts.

How each peer's own code is reached (no re-implementation):
- TRL (installed with polopt): `polopt.integrations.trl.TRLLossFunction` runs GRPOTrainer's own
  `_generate_and_score_completions` (advantages per `scale_rewards`) and `_compute_loss` (per
  `loss_type`) in this process.
- verl 0.9.1 and OpenRLHF 0.11.2 conflict with polopt's environment (transformers, ray pins), so each
  runs in its own virtualenv under `--venvs` (default $POLOPT_PEER_VENVS or ~/.cache/polopt/peer-venvs),
  which this script creates when absent: `torch==2.13.0` first (the pin of constraints.txt; an
  unpinned torch pulls a CUDA build), then the peer. benchmarks/peer_loss_driver.py runs in that venv
  and answers, per example, the peer's loss value and autograd gradient; the kit judges them here.
  OpenRLHF's wheel requires flash-attn==2.8.3, which builds only against CUDA: it is installed with
  --no-deps plus its other requirements (deepspeed included). `import openrlhf.models.loss` then
  fails (flash_attn, and vllm for the advantage code); the report records that error and runs the
  code with stand-in flash_attn/vllm modules whose every function raises (see the driver).
  Creating the venvs (pip) and a full run each take minutes.

Each setting lists the differences its documentation or code announces (`expected`): a failure with
a reading there is the peer's choice; `edges` are failures on inputs real training rarely makes (a batch
with no response tokens) for no documented reason; any other failure is marked "not explained".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from _common import REPO, environment  # benchmarks/ is on sys.path when run as a script

from polopt.testing import check_policy_loss

DOCS = REPO / "docs"
DRIVER = REPO / "benchmarks" / "peer_loss_driver.py"
TORCH_PIN = next(line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))

# What each peer venv installs after torch (pip arguments); OpenRLHF without flash-attn (CUDA-only build).
PEER_INSTALLS = {
    "verl": [["verl==0.9.1", "transformers<5.11", "ray", "tensordict"]],
    "openrlhf": [
        ["--no-deps", "openrlhf==0.11.2"],
        [
            "deepspeed==0.19.6", "ray[default]==2.55.0", "transformers==5.15.0", "accelerate", "datasets",
            "einops", "peft", "optree>=0.15.0", "jsonlines", "loralib", "torchmetrics", "tqdm", "packaging",
            "sympy", "pylatexenc", "huggingface-hub>=1.0.0", "bitsandbytes", "isort", "optimum", "pynvml>=12.0.0",
            "tensorboard", "torchdata", "transformers-stream-generator", "wandb", "wheel",
        ],
    ],
}  # fmt: skip
# CUDA-only packages a peer imports at module level but its loss/advantage code never calls (see the driver).
STAND_INS = {"openrlhf": "flash_attn,vllm"}
WHY_STAND_INS = {
    "openrlhf": (
        "`import openrlhf.models.loss` fails on CPU: openrlhf/models/__init__.py imports actor.py, which imports "
        "ring_attn_utils.py, which imports flash_attn; flash-attn==2.8.3 (a hard requirement) does not install "
        "without CUDA (its setup builds a CUDAExtension: `OSError: CUDA_HOME environment variable is not set`, with "
        "torch 2.13.0+cpu), and the advantage code's module imports vllm (trainer/ray/vllm_engine.py; OpenRLHF pins "
        "CUDA builds of vllm). The report runs OpenRLHF's own PolicyLoss and compute_advantages_and_returns with "
        "stand-in flash_attn and vllm modules whose every function raises; neither is called by that code"
    )
}
PEER_VERSIONS = {"trl": "trl", "verl": "verl", "openrlhf": "openrlhf"}

# One-line readings shared by several settings.
UNBIASED_STD = "unbiased (K−1) std{eps} in A = (r − mean)/std: A is √((K−1)/K)× polopt's, so the on-policy gradient ≠ NFT's (Prop. 4.2 needs the population std)"
EMPTY_ROWS = "an empty response is left out of the sequence count (verl/OpenRLHF divide by the non-empty rows, polopt by B): differs only when a row has no tokens"
NO_TOKENS = "a batch whose every response is empty gives 0/0 = NaN (the divisor is the batch's token or sequence count, not clamped); real rollouts have tokens, a micro-batch of only masked responses would not"
DUAL_CLIP = "dual-clip: for A < 0 the loss is capped at −c·A, so beyond R = c the gradient is 0 (Eq. 11 has −A·R there)"


@dataclass
class Setting:
    peer: str
    label: str  # the peer's own names and values
    config: dict[str, Any]  # what the adapter/driver passes to the peer's code
    kind: str  # polopt's loss it should equal on the kit's identities
    hparams: dict[str, Any] = field(default_factory=dict)  # polopt's names for the same hyperparameters
    expected: dict[str, str] = field(default_factory=dict)  # identity → why it differs (documented or in the code)
    choice: str = ""  # where the peer documents the choice behind the expected failures
    edges: dict[str, str] = field(default_factory=dict)  # identity → an input real training rarely makes, no documented choice


def trl_settings() -> list[Setting]:
    clip = dict(clip_low=0.2, clip_high=0.2)  # TRL's epsilon=0.2, epsilon_high=None → 0.2
    group_std = {
        identity: UNBIASED_STD.format(eps=" + 1e-4")
        for identity in ("agreement", "gradient_matches_analytic_form", "on_policy_equals_nft")
    }
    std_choice = "scale_rewards='group' (the default) divides by the group std; trl.trainer.utils.nanstd applies Bessel's correction (not said in GRPOConfig's help)"
    off_policy = lambda why: {"agreement": why, "gradient_matches_analytic_form": why, "zero_gradient_outside_clip": why}  # noqa: E731
    return [
        Setting("trl", "loss_type=dr_grpo, scale_rewards=none", dict(loss_type="dr_grpo", scale_rewards="none", max_completion_length=10),
                "dr_grpo", dict(clip, max_response_len=10)),
        Setting("trl", "loss_type=dr_grpo, scale_rewards=group", dict(loss_type="dr_grpo", scale_rewards="group", max_completion_length=10),
                "grpo", dict(clip, loss_agg="seq-mean-token-sum-norm", max_response_len=10), group_std, std_choice),
        Setting("trl", "loss_type=grpo, scale_rewards=group", dict(loss_type="grpo", scale_rewards="group"),
                "grpo", dict(clip, loss_agg="seq-mean-token-mean"), group_std, std_choice),
        Setting("trl", "loss_type=grpo, scale_rewards=batch", dict(loss_type="grpo", scale_rewards="batch"),
                "grpo", dict(clip, loss_agg="seq-mean-token-mean"),
                {identity: "A = (r − group mean)/(std of the whole batch + 1e-4), unbiased: the scale depends on the other groups"
                 for identity in ("agreement", "gradient_matches_analytic_form", "on_policy_equals_nft")},
                "scale_rewards='batch' is documented (PPO-Lite's batch std)"),
        Setting("trl", "loss_type=grpo, scale_rewards=none", dict(loss_type="grpo", scale_rewards="none"),
                "dr_grpo", dict(clip, loss_agg="seq-mean-token-mean")),
        Setting("trl", "loss_type=bnpo, scale_rewards=none", dict(loss_type="bnpo", scale_rewards="none"),
                "dr_grpo", dict(clip, loss_agg="token-mean")),
        Setting("trl", "loss_type=dapo, scale_rewards=group (TRL's defaults)", dict(loss_type="dapo", scale_rewards="group"),
                "dapo", dict(clip, loss_agg="token-mean"), group_std, std_choice),
        Setting("trl", "loss_type=dapo, scale_rewards=none, epsilon_high=0.28", dict(loss_type="dapo", scale_rewards="none", epsilon_high=0.28),
                "dr_grpo", dict(clip_low=0.2, clip_high=0.28, loss_agg="token-mean")),
        Setting("trl", "loss_type=cispo, scale_rewards=none, epsilon_high=5", dict(loss_type="cispo", scale_rewards="none", epsilon_high=5.0),
                "dr_grpo", dict(clip, loss_agg="token-mean"),  # ε_max = 5 bounds a weight, not a clip: no polopt counterpart
                off_policy("CISPO is another objective: −sg(min(R, ε_max))·A·log π keeps the gradient of every token, weighted by the clipped ratio"),
                "documented (MiniMax-M1's CISPO); on-policy it is the GRPO family's gradient"),
        Setting("trl", "loss_type=sapo, scale_rewards=none", dict(loss_type="sapo", scale_rewards="none"),
                "dr_grpo", dict(clip, loss_agg="seq-mean-token-mean"),
                off_policy("SAPO replaces the clip by a soft gate σ(τ(R−1))·4/τ: off-policy gradients differ by design"),
                "documented (Soft Adaptive Policy Optimization); at R = 1 the gate's slope is 1"),
        Setting("trl", "loss_type=vespo, scale_rewards=none", dict(loss_type="vespo", scale_rewards="none"),
                "dr_grpo", dict(clip, loss_agg="token-mean"),
                off_policy("VESPO weights −A·log π by a gamma function of the sequence ratio, φ(1) = 1: off-policy it is another objective"),
                "documented (VESPO)"),
        Setting("trl", "loss_type=luspo, importance_sampling_level=sequence, scale_rewards=none",
                dict(loss_type="luspo", scale_rewards="none", importance_sampling_level="sequence"),
                "dr_grpo", dict(clip, loss_agg="seq-mean-token-sum"),
                off_policy("sequence-level ratio exp(mean_t log R_t), clipped per sequence (GSPO), times the length"),
                "documented (LUSPO: GSPO scaled by the length)"),
        Setting("trl", "loss_type=grpo, scale_rewards=none, delta=1.5", dict(loss_type="grpo", scale_rewards="none", delta=1.5),
                "dr_grpo", dict(clip, loss_agg="seq-mean-token-mean"),
                {"agreement": "two-sided clip: R is capped at δ = 1.5 in the unclipped term, so A < 0 tokens beyond δ get no gradient",
                 "gradient_matches_analytic_form": "two-sided clip (δ = 1.5): gradient 0 for A < 0 and R > δ, Eq. 11 has −A·R"},
                "documented (delta: INTELLECT-2's two-sided clipping)"),
    ]  # fmt: skip


def verl_settings() -> list[Setting]:
    modes = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
    settings = []
    for norm in (True, False):
        for mode in modes:
            for clip_c, dual in ((3.0, "on (clip_ratio_c=3, verl's default)"), (float("inf"), "off (clip_ratio_c=inf)")):
                expected: dict[str, str] = {}
                if norm:
                    for identity in ("agreement", "gradient_matches_analytic_form", "on_policy_equals_nft"):
                        expected[identity] = UNBIASED_STD.format(eps=" + 1e-6")
                if mode.startswith("seq-mean"):
                    expected.setdefault("agreement", EMPTY_ROWS)
                    expected.setdefault("gradient_matches_analytic_form", EMPTY_ROWS)
                    expected.setdefault("on_policy_equals_nft", EMPTY_ROWS)
                if clip_c != float("inf"):
                    expected.setdefault("agreement", DUAL_CLIP)
                    expected.setdefault("gradient_matches_analytic_form", DUAL_CLIP)
                choices = []
                if norm:
                    choices.append("norm_adv_by_std_in_grpo=True uses torch.std (unbiased) + epsilon 1e-6 (in the code, not the docs)")
                if clip_c != float("inf"):
                    choices.append("dual-clip is documented (clip_ratio_c, Ye et al. 2019) and always on in the vanilla loss")
                if mode.startswith("seq-mean"):
                    choices.append("agg_loss documents 'exclude fully masked sequences'")
                edges = {} if mode == "token-sum" else {"no_signal_groups_contribute_zero": NO_TOKENS}
                settings.append(
                    Setting(
                        "verl",
                        f"vanilla, norm_adv_by_std_in_grpo={norm}, loss_agg_mode={mode}, dual-clip {dual}",
                        dict(loss_mode="vanilla", norm_adv_by_std_in_grpo=norm, loss_agg_mode=mode, clip_ratio_c=clip_c),
                        "grpo" if norm else "dr_grpo",
                        dict(clip_low=0.2, clip_high=0.2, loss_agg=mode),
                        expected,
                        "; ".join(choices),
                        edges,
                    )
                )
    other = {
        "gspo": ("seq-mean-token-mean", "GSPO: one ratio per sequence, exp(mean_t log R_t), clipped per sequence"),
        "sapo": ("seq-mean-token-mean", "SAPO: a soft gate instead of the clip; always seq-mean-token-mean (loss_agg_mode is ignored, as its code says)"),
        "gpg": ("token-mean", "GPG: −A·log π, no ratio and no clip"),
        "cispo": ("token-mean", "CISPO: −sg(clip(R))·A·log π keeps every token's gradient"),
        "geo_mean": ("seq-mean-token-mean", "GMPO: geometric mean of the token ratios per sequence, mean over sequences (ignores loss_agg_mode)"),
        "clip_cov": ("token-mean", "Clip-Cov: tokens picked by their covariance (a random subset, also on-policy) get no gradient"),
        "kl_cov": ("token-mean", "KL-Cov: a KL penalty on tokens picked by their covariance"),
        "dppo_tv": ("token-mean", "DPPO: a total-variation trust region instead of the ratio clip"),
        "dppo_kl": ("token-mean", "DPPO: a KL trust region instead of the ratio clip"),
        "dro": ("token-mean", "DRO: a quadratic log-ratio penalty (dro_beta=0.1)"),
    }
    for loss_mode, (mode, why) in other.items():
        config = dict(loss_mode=loss_mode, norm_adv_by_std_in_grpo=False, loss_agg_mode=mode, clip_ratio_c=3.0)
        if loss_mode == "dro":
            config["policy_loss"] = {"dro_beta": 0.1}
        expected = {identity: why for identity in ("agreement", "gradient_matches_analytic_form", "zero_gradient_outside_clip")}
        if loss_mode == "clip_cov":  # which tokens lose their gradient depends on the batch and a random draw
            expected.update(on_policy_equals_nft=why, row_order_invariance=why, padding_invariance=why)
        if mode.startswith("seq-mean") and loss_mode != "geo_mean":  # geo_mean takes torch.mean over all rows
            expected["on_policy_equals_nft"] = EMPTY_ROWS
        edges = {} if loss_mode == "geo_mean" else {"no_signal_groups_contribute_zero": NO_TOKENS}
        settings.append(
            Setting("verl", f"{loss_mode}, norm_adv_by_std_in_grpo=False, loss_agg_mode={mode}", config, "dr_grpo",
                    dict(clip_low=0.2, clip_high=0.2, loss_agg=mode), expected, f"documented ({why.split(':')[0]})", edges)
        )  # fmt: skip
    return settings


def openrlhf_settings() -> list[Setting]:
    std = {identity: UNBIASED_STD.format(eps=" + 1e-9") for identity in ("agreement", "gradient_matches_analytic_form", "on_policy_equals_nft")}
    sample_level = {identity: EMPTY_ROWS for identity in ("agreement", "gradient_matches_analytic_form", "on_policy_equals_nft")}
    dual = {"agreement": DUAL_CLIP, "gradient_matches_analytic_form": DUAL_CLIP}
    rloo = "RLOO: baseline = mean of the other K−1 answers, A = K/(K−1)·(r − r̂): the on-policy gradient is K/(K−1)× NFT's"
    whiten = "reinforce_baseline whitens A over the whole batch's tokens: all-right/all-wrong groups get A ≠ 0"
    whiten_noise = "the whitening divides by the batch std clamped at 1e-4: advantages that are 0 up to rounding come out at rounding × 1e4, in an order-dependent way"
    edges = {"no_signal_groups_contribute_zero": NO_TOKENS}
    return [
        Setting("openrlhf", "estimator=group_norm, PolicyLoss() (token-level)", dict(estimator="group_norm"),
                "grpo", dict(clip_low=0.2, clip_high=0.2, loss_agg="token-mean"), std, "group_norm: torch.std (unbiased) + 1e-9, in the code", edges),
        Setting("openrlhf", "estimator=dr_grpo, PolicyLoss() (token-level)", dict(estimator="dr_grpo"),
                "dr_grpo", dict(clip_low=0.2, clip_high=0.2, loss_agg="token-mean"), edges=edges),
        Setting("openrlhf", "estimator=dr_grpo, PolicyLoss(token_level_loss=False)", dict(estimator="dr_grpo", policy_loss={"token_level_loss": False}),
                "dr_grpo", dict(clip_low=0.2, clip_high=0.2, loss_agg="seq-mean-token-mean"), sample_level, "aggregate_loss: 'exclude fully masked sequences'", edges),
        Setting("openrlhf", "estimator=dr_grpo, PolicyLoss(dual_clip=3)", dict(estimator="dr_grpo", policy_loss={"dual_clip": 3.0}),
                "dr_grpo", dict(clip_low=0.2, clip_high=0.2, loss_agg="token-mean"), dual, "dual_clip is documented (off by default)", edges),
        Setting("openrlhf", "estimator=rloo, PolicyLoss()", dict(estimator="rloo"),
                "dr_grpo", dict(clip_low=0.2, clip_high=0.2, loss_agg="token-mean"),
                {identity: rloo for identity in ("agreement", "gradient_matches_analytic_form", "on_policy_equals_nft")}, "documented (RLOO)", edges),
        Setting("openrlhf", "estimator=reinforce_baseline, PolicyLoss()", dict(estimator="reinforce_baseline"),
                "dr_grpo", dict(clip_low=0.2, clip_high=0.2, loss_agg="token-mean"),
                {**{identity: whiten for identity in ("agreement", "gradient_matches_analytic_form", "on_policy_equals_nft", "no_signal_groups_contribute_zero",
                                                      "zero_gradient_outside_clip")}, "row_order_invariance": whiten_noise},
                "documented (REINFORCE++-baseline: batch whitening)", edges),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------- peer processes


def peer_python(venvs: Path, peer: str) -> Path:
    """The peer venv's python, creating the venv first when it is absent (minutes)."""
    venv = venvs / peer
    python = venv / "bin" / "python"
    if not (venv / ".polopt-installed").exists():
        print(f"[{peer}] creating {venv} (torch first, then {peer})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, TORCH_PIN], check=True)
        pin = venv / "torch-pin.txt"
        pin.write_text(TORCH_PIN + "\n")
        for arguments in PEER_INSTALLS[peer]:
            subprocess.run([*pip, "-c", str(pin), *arguments], check=True)
        (venv / ".polopt-installed").write_text("ok\n")
    return python


def import_error(python: Path, peer: str, stand_ins: str) -> Optional[str]:
    """None if the driver imports the peer's loss modules (with these stand-ins), else the error's last line."""
    env = {**os.environ, "POLOPT_STAND_INS": stand_ins}
    probe = subprocess.run([str(python), str(DRIVER), peer, "--probe"], capture_output=True, text=True, env=env)
    if probe.returncode == 0:
        return None
    return probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else f"exit code {probe.returncode}"


class PeerProcess:
    """The driver running in a peer's venv; `call` sends one batch and returns (loss, ∂loss/∂logprobs)."""

    def __init__(self, python: Path, peer: str, stand_ins: str = "") -> None:
        self.peer = peer
        self.process = subprocess.Popen(
            [str(python), str(DRIVER), peer],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, "POLOPT_STAND_INS": stand_ins},
        )

    def call(self, setting: dict, logprobs, old_logprobs, mask, rewards, group_ids) -> tuple[float, list]:
        request = {
            "setting": setting,
            "dtype": str(logprobs.dtype).removeprefix("torch."),
            "logprobs": logprobs.detach().double().tolist(),
            "old_logprobs": old_logprobs.detach().double().tolist(),
            "mask": mask.int().tolist(),
            "rewards": rewards.double().tolist(),
            "group_ids": group_ids.tolist(),
        }
        self.process.stdin.write(json.dumps(request) + "\n")
        reply = json.loads(self.process.stdout.readline())
        if "error" in reply:
            raise RuntimeError(f"{self.peer} raised {reply['error']}")
        return reply["loss"], reply["grad"]

    def version(self) -> str:
        code = f"import importlib.metadata as m; print(m.version({PEER_VERSIONS[self.peer]!r}))"
        python = self.process.args[0]
        return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


class PeerLoss(torch.autograd.Function):
    """The peer's loss as an autograd node: value and gradient both come from the peer's own autograd."""

    @staticmethod
    def forward(ctx, logprobs, old_logprobs, mask, rewards, group_ids, peer, setting):
        loss, grad = peer.call(setting, logprobs, old_logprobs, mask, rewards, group_ids)
        ctx.save_for_backward(torch.tensor(grad, dtype=logprobs.dtype))
        return torch.tensor(loss, dtype=logprobs.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None, None, None, None, None


def peer_loss_function(peer: PeerProcess, setting: dict):
    def fn(logprobs, old_logprobs, mask, rewards, group_ids):
        return PeerLoss.apply(logprobs, old_logprobs, mask, rewards, group_ids, peer, setting)

    return fn


# ------------------------------------------------------------------------------------------- running


def classify(setting: Setting, identity: str) -> tuple[str, str]:
    """(category, reading) of a failure: the peer's choice, an edge case, or unexplained."""
    if identity in setting.expected:
        return "choice", setting.expected[identity]
    if identity in setting.edges:
        return "edge", setting.edges[identity]
    return "unexplained", "not explained by the peer's documented choices: read the counter-example"


def reclassify(results: list[dict]) -> None:
    """Readings from this script's settings (their one owner), also for results read back from the .json."""
    settings = {(s.peer, s.label): s for s in trl_settings() + verl_settings() + openrlhf_settings()}
    for result in results:
        setting = settings.get((result["peer"], result["setting"]))
        if setting is None or "error" in result:
            continue
        for failure in result["failures"]:
            failure["category"], failure["reading"] = classify(setting, failure["identity"])
        checked = set(result["verdicts"])
        failed = {failure["identity"] for failure in result["failures"]}
        result["expected_but_held"] = sorted(set(setting.expected) & (checked - failed))
        result["edges_held"] = sorted(set(setting.edges) & (checked - failed))


def run_setting(setting: Setting, fn, examples: int, tolerance: dict) -> dict:
    start = time.perf_counter()
    try:
        report = check_policy_loss(fn, setting.kind, max_examples=examples, equal_group_sizes=True, **tolerance, **setting.hparams)
    except Exception as error:  # a bad setting in this script: record it, run the others
        print(f"  setting failed to run: {type(error).__name__}: {error}", flush=True)
        return {"peer": setting.peer, "setting": setting.label, "error": f"{type(error).__name__}: {error}"}
    failed = set(report.failed_identities)
    failures = []
    for failure in report.failures:
        category, reading = classify(setting, failure.identity)
        failures.append(
            {
                "identity": failure.identity,
                "reading": reading,
                "category": category,
                "message": failure.message.splitlines()[0] + " " + " ".join(failure.message.splitlines()[2:4]),
                "counterexample": failure.counterexample,
            }
        )
    return {
        "peer": setting.peer,
        "setting": setting.label,
        "config": {k: (str(v) if v == float("inf") else v) for k, v in setting.config.items()},
        "judged_as": {"kind": setting.kind, **setting.hparams},
        "verdicts": {name: ("fail" if name in failed else "pass") for name in report.checks_run},
        "failures": failures,
        "expected_but_held": sorted(set(setting.expected) & (set(report.checks_run) - failed)),
        "edges_held": sorted(set(setting.edges) & (set(report.checks_run) - failed)),
        "choice": setting.choice,
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_trl(examples: int) -> tuple[list[dict], dict]:
    import trl

    from polopt.integrations.trl import TRLLossFunction

    results = []
    for setting in trl_settings():
        print(f"[trl] {setting.label}", flush=True)
        # TRL computes advantages in float32: compare at float32 precision (docs/conformance.md).
        results.append(run_setting(setting, TRLLossFunction(**setting.config), examples, dict(rtol=1e-4, atol=1e-6)))
    return results, {"version": trl.__version__, "imports": True}


def run_peer(peer: str, settings: list[Setting], venvs: Path, examples: int) -> tuple[list[dict], dict]:
    python = peer_python(venvs, peer)
    status: dict[str, Any] = {"imports": True}
    error = import_error(python, peer, stand_ins="")
    if error and peer in STAND_INS:
        status.update(plain_import_error=error, stand_ins=STAND_INS[peer], why=WHY_STAND_INS[peer])
        error = import_error(python, peer, stand_ins=STAND_INS[peer])
    if error:
        print(f"[{peer}] does not import on CPU: {error}", flush=True)
        return [], {"imports": False, "why": error}
    process = PeerProcess(python, peer, status.get("stand_ins", ""))
    try:
        status["version"] = process.version()
        results = []
        for setting in settings:
            print(f"[{peer}] {setting.label}", flush=True)
            results.append(run_setting(setting, peer_loss_function(process, setting.config), examples, {}))
    finally:
        process.close()
    return results, status


# ------------------------------------------------------------------------------------------- writing

# The rows of the headline table (README.md carries the same lines): each peer's default and its closest to polopt.
HEADLINE = [
    ("trl", "loss_type=dr_grpo, scale_rewards=none"),
    ("trl", "loss_type=grpo, scale_rewards=none"),
    ("trl", "loss_type=grpo, scale_rewards=group"),
    ("trl", "loss_type=dapo, scale_rewards=group (TRL's defaults)"),
    ("trl", "loss_type=cispo, scale_rewards=none, epsilon_high=5"),
    ("verl", "vanilla, norm_adv_by_std_in_grpo=True, loss_agg_mode=token-mean, dual-clip on (clip_ratio_c=3, verl's default)"),
    ("verl", "vanilla, norm_adv_by_std_in_grpo=False, loss_agg_mode=token-mean, dual-clip off (clip_ratio_c=inf)"),
    ("verl", "vanilla, norm_adv_by_std_in_grpo=False, loss_agg_mode=seq-mean-token-sum-norm, dual-clip off (clip_ratio_c=inf)"),
    ("openrlhf", "estimator=group_norm, PolicyLoss() (token-level)"),
    ("openrlhf", "estimator=dr_grpo, PolicyLoss() (token-level)"),
]

IDENTITY_COLUMNS = [
    ("agreement", "agree"),
    ("no_signal_groups_contribute_zero", "no-signal 0"),
    ("padding_invariance", "padding"),
    ("finite_at_extreme_log_ratios", "±40 finite"),
    ("row_order_invariance", "row order"),
    ("gradient_matches_analytic_form", "Eq. 11"),
    ("zero_gradient_outside_clip", "0 outside clip"),
    ("on_policy_equals_nft", "on-policy = NFT"),
]


def verdict_cell(result: dict, identity: str) -> str:
    verdict = result["verdicts"].get(identity)
    if verdict is None:
        return "–"
    if verdict == "pass":
        return "✓"
    failure = next(f for f in result["failures"] if f["identity"] == identity)
    return {"choice": "✗ choice", "edge": "✗ edge", "unexplained": "✗ **?**"}[failure["category"]]


def judged_as(result: dict) -> str:
    hparams = {k: v for k, v in result["judged_as"].items() if k != "kind"}
    return f"{result['judged_as']['kind']}(" + ", ".join(f"{k}={v}" for k, v in hparams.items()) + ")"


def headline_table(results: list[dict]) -> list[str]:
    lines = ["| peer | setting | judged as polopt's | " + " | ".join(label for _, label in IDENTITY_COLUMNS) + " |"]
    lines.append("|---" * (3 + len(IDENTITY_COLUMNS)) + "|")
    for result in results:
        if "error" in result:
            lines.append(f"| {result['peer']} | {result['setting']} | did not run: {result['error']} |" + " |" * len(IDENTITY_COLUMNS))
            continue
        cells = [verdict_cell(result, identity) for identity, _ in IDENTITY_COLUMNS]
        lines.append(f"| {result['peer']} | {result['setting']} | `{judged_as(result)}` | " + " | ".join(cells) + " |")
    return lines


def summary(results: list[dict]) -> list[str]:
    """What held where, counted from the results."""
    ran = [r for r in results if "error" not in r]
    name = lambda r: f"{r['peer']} `{r['setting']}`"  # noqa: E731
    every = [name(r) for r in ran if not r["failures"]]
    on_policy = [name(r) for r in ran if r["verdicts"].get("on_policy_equals_nft") == "pass"]
    counts = {category: sum(f["category"] == category for r in ran for f in r["failures"]) for category in ("choice", "edge", "unexplained")}
    return [
        "## Summary",
        "",
        f"- Every identity holds in {len(every)} of {len(ran)} settings: " + "; ".join(every) + ".",
        f"- The on-policy gradient is NFT's (Prop. 4.2) in {len(on_policy)} of {len(ran)}: " + "; ".join(on_policy) + ".",
        f"- Failures: {counts['choice']} the peers' documented or stated choices, {counts['edge']} edge cases (a batch "
        f"with no response tokens), {counts['unexplained']} unexplained.",
    ]


def write_report(results: list[dict], peers: dict, examples: int, env: dict) -> None:
    reclassify(results)
    (DOCS / "conformance_report.json").write_text(
        json.dumps({"environment": env, "examples_per_identity": examples, "peers": peers, "results": results}, indent=1) + "\n"
    )
    lines = [
        "# Conformance report: TRL, verl and OpenRLHF losses against polopt's identities",
        "",
        f"Made by `{env['command']}` on {env['date']} ({env['device_name']}, {env['cpus_usable']} CPUs, shared machine; "
        f"Python {env['python']}, torch {env['torch']}). Each identity of [the kit](conformance.md) was searched with "
        f"{examples} hypothesis examples per setting (groups of one size per batch, as these trainers lay them out); a "
        "failure is shrunk to a minimal counter-example. Raw results: `conformance_report.json`.",
        "",
        "Peers: " + "; ".join(
            f"{name} {status.get('version', '')} (" + ("its own code, " + ("in this process" if name == "trl" else "in its own venv") + ")"
                                                       if status.get("imports") else f"does not import on CPU: {status.get('why')})")
            for name, status in peers.items()
        ) + ".",
        "",
        *[f"{name}: {status['why']} (plain import: `{status['plain_import_error']}`)." for name, status in peers.items() if "stand_ins" in status],
        "",
        "Not covered: verl's `bypass_mode` loss (it needs the rollout engine's log-probs); KL terms (β = 0 "
        "everywhere); gradient accumulation across micro-batches (each call is one whole batch, one optimizer "
        "step; tests/test_integration_trl.py checks polopt against TRL's dr_grpo under accumulation).",
        "",
        "✓ holds; ✗ choice: broken for a reason the peer documents or its code states (reading below); ✗ edge: broken "
        "only on an input real training rarely makes, for no documented reason (arguably a bug); ✗ **?**: broken with "
        "no reading; – not an identity of the loss it is judged as. \"Judged as\" is the polopt loss with the "
        "same advantage, clip and aggregation the setting claims; `on-policy = NFT` is Prop. 4.2 (ω = grpo for a std-"
        "normalised advantage, ω = 1 − r̂ without).",
        "",
        *summary(results),
        "",
        "## Headline",
        "",
        *headline_table([r for key in HEADLINE for r in results if (r["peer"], r["setting"]) == key]),
        "",
        "## Every setting",
        "",
        *headline_table(results),
        "",
        "## Failures: minimal counter-examples and readings",
        "",
    ]  # fmt: skip
    for result in results:
        if not result.get("failures"):
            continue
        lines += [f"### {result['peer']}: {result['setting']}", ""]
        if result["choice"]:
            lines += [f"Documented/stated choice: {result['choice']}.", ""]
        for failure in result["failures"]:
            example = failure["counterexample"]
            lines.append(f"- **{failure['identity']}** — {failure['reading']}.")
            lines.append(f"  `{failure['message'].strip()}`")
            rows = max((len(value) for name, value in example.items() if name.endswith("rewards")), default=0)
            if rows > 8:  # not shrunk (e.g. a random loss): too long to read here
                lines.append(f"  ({rows} rows: see the .json)")
            elif example:
                lines.append("  " + "; ".join(f"`{name} = {value}`" for name, value in example.items()))
        if result["expected_but_held"]:
            lines.append(f"- announced differences not found in {examples} examples: {', '.join(result['expected_but_held'])}")
        lines.append("")
    (DOCS / "conformance_report.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="trl,verl,openrlhf", help="comma-separated: trl, verl, openrlhf")
    parser.add_argument("--examples", type=int, default=50, help="hypothesis examples per identity and setting")
    parser.add_argument(
        "--venvs", type=Path, default=Path(os.environ.get("POLOPT_PEER_VENVS", Path.home() / ".cache/polopt/peer-venvs")),
        help="folder holding (or to hold) the verl and openrlhf virtualenvs",
    )  # fmt: skip
    parser.add_argument("--rewrite", action="store_true", help="only rewrite the .md from docs/conformance_report.json")
    args = parser.parse_args()
    if args.rewrite:
        saved = json.loads((DOCS / "conformance_report.json").read_text())
        write_report(saved["results"], saved["peers"], saved["examples_per_identity"], saved["environment"])
        return
    warnings.filterwarnings("ignore")
    peers = [name.strip() for name in args.peers.split(",") if name.strip()]
    unknown = set(peers) - {"trl", "verl", "openrlhf"}
    if unknown:
        parser.exit(2, f"conformance_report.py: --peers: unknown {sorted(unknown)}; choose from trl, verl, openrlhf\n")
    torch.set_num_threads(1)
    env = environment("cpu")
    results: list[dict] = []
    statuses: dict[str, dict] = {}
    for peer in peers:
        if peer == "trl":
            peer_results, statuses[peer] = run_trl(args.examples)
        else:
            settings = verl_settings() if peer == "verl" else openrlhf_settings()
            peer_results, statuses[peer] = run_peer(peer, settings, args.venvs, args.examples)
        results += peer_results
    write_report(results, statuses, args.examples, env)
    print("\n".join(headline_table(results)))
    print(f"wrote {DOCS / 'conformance_report.md'} and .json")


if __name__ == "__main__":
    main()
