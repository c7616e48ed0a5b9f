"""Conformance kit: check a third-party policy loss against polopt's property suite.

    from polopt.testing import check_policy_loss
    report = check_policy_loss(my_loss, "grpo", clip_low=0.2, clip_high=0.2)
    assert report.ok, report

`my_loss(logprobs, old_logprobs, mask, rewards, group_ids) -> scalar tensor` (the polopt loss
contract without the optional kwargs). Hypothesis draws batches from the strategies polopt's own
tests use (polopt.testing.strategies) and, for every identity, searches for an input that breaks
it; a failure is shrunk to a minimal counter-example. Inputs are float64 except where noted.

Identities (docs/design.md numbers in brackets):
  agreement                       value and ∂/∂logprobs equal polopt's loss of `kind` with `hparams`
  no_signal_groups_contribute_zero   all-right/all-wrong groups: zero loss, zero gradient on their rows
  padding_invariance              what padding holds changes nothing; gradient on padding is 0
  finite_at_extreme_log_ratios    log-ratios of ±40 in float32 give a finite loss and gradient
  row_order_invariance            reordering rows reorders the gradient and keeps the loss: the
                                  aggregation runs over the whole batch, not over parts of it
  gradient_matches_analytic_form  [4] Eq. 11 (GRPO family, zero outside the clip region), Eq. 12
                                  (NFT, straight-through max_v), −r (RFT); token-level kinds
  zero_gradient_outside_clip      [4] GRPO family: tokens clipped on the advantage's side get 0
  on_policy_equals_nft            [1] GRPO family: on-policy ∇ = ∇NFT (ω=grpo for grpo/dapo,
                                  ω=dr_grpo for dr_grpo, ε ≤ 1) under the same aggregation
  on_policy_equals_grpo_family    [1] NFT with ε ≤ 1, ω ∈ {grpo, dr_grpo}, neg_weight 1
  zero_at_old_policy              [2] NFT (ε ≤ 1) and RFT: loss 0 at π_θ = π_old
  dpo_with_two_answers            [3] InfoNCA (sft_coef 0): one right, one wrong answer is DPO
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from hypothesis import HealthCheck, Phase, find, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky, NoSuchExample

from polopt.losses import BUILTIN_LOSSES, GRPO_FAMILY, TOKEN_LEVEL_LOSSES, get_loss
from polopt.losses.group_stats import group_correct_rate
from polopt.losses.registry import hparam_names
from polopt.testing.references import analytic_gradient, dpo_loss, loss_and_grad, reference_group_stats
from polopt.testing.strategies import PolicyBatch, extreme_batches, policy_batches

KINDS = BUILTIN_LOSSES
TOKEN_LEVEL = TOKEN_LEVEL_LOSSES

LossFunction = Callable[..., torch.Tensor]


@dataclass
class ConformanceFailure:
    """One broken identity and the minimal input (after shrinking) that breaks it."""

    identity: str
    message: str
    counterexample: dict[str, Any]

    def __str__(self) -> str:
        example = "\n".join(f"    {name} = {value}" for name, value in self.counterexample.items())
        return f"FAILED {self.identity}: {self.message}\n  minimal counter-example:\n{example}"


@dataclass
class ConformanceReport:
    kind: str
    hparams: dict[str, Any]
    checks_run: list[str] = field(default_factory=list)
    failures: list[ConformanceFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failed_identities(self) -> list[str]:
        return [failure.identity for failure in self.failures]

    def __str__(self) -> str:
        hparams = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        status = "OK" if self.ok else f"{len(self.failures)} of {len(self.checks_run)} identities FAILED"
        lines = [f"conformance of a {self.kind}({hparams}) loss: {status}"]
        failed = set(self.failed_identities)
        lines += [f"  {'FAIL' if name in failed else 'ok  '} {name}" for name in self.checks_run]
        lines += [str(failure) for failure in self.failures]
        return "\n".join(lines)


class Checker:
    """The identities of one kind, evaluated on examples; each raises AssertionError when broken."""

    def __init__(
        self, fn: LossFunction, kind: str, hparams: dict, rtol: float, atol: float, equal_group_sizes: bool = False
    ) -> None:
        self.fn, self.kind, self.rtol, self.atol = fn, kind, rtol, atol
        self.equal_group_sizes = equal_group_sizes
        self.reference = get_loss(kind, **hparams)
        # Every hyperparameter, defaults filled in, as the reference formulas need them.
        self.hp = {name: getattr(self.reference, name) for name in hparam_names(type(self.reference))}

    def close(self, actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        actual, expected = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
        torch.testing.assert_close(
            actual, expected, rtol=self.rtol, atol=self.atol, msg=lambda detail: f"{what}: {detail}"
        )

    def run(self, batch: PolicyBatch, fn: Optional[LossFunction] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return loss_and_grad(self.fn if fn is None else fn, batch)

    def agreement(self, batch: PolicyBatch) -> None:
        loss, grad = self.run(batch)
        expected_loss, expected_grad = self.run(batch, self.reference)
        self.close(loss, expected_loss, f"loss value vs polopt's {self.kind}")
        self.close(grad, expected_grad, f"gradient vs polopt's {self.kind}")

    def no_signal_groups_contribute_zero(self, batches: tuple[PolicyBatch, PolicyBatch]) -> None:
        mixed, without_signal = batches
        _, grad = self.run(mixed)
        rate = group_correct_rate(mixed.rewards, mixed.group_ids)
        rows = (rate == 0) | (rate == 1)
        assert torch.isfinite(grad).all(), "gradient is not finite"
        self.close(grad[rows], torch.zeros_like(grad[rows]), "gradient on rows of all-right/all-wrong groups")
        loss, grad = self.run(without_signal)
        self.close(loss, torch.zeros_like(loss), "loss of a batch of only all-right/all-wrong groups")
        self.close(grad, torch.zeros_like(grad), "gradient on a batch of only all-right/all-wrong groups")

    def padding_invariance(self, batch: PolicyBatch) -> None:
        loss, grad = self.run(batch)
        zero_padded = replace(
            batch,
            logprobs=torch.where(batch.mask, batch.logprobs, 0.0),
            old_logprobs=torch.where(batch.mask, batch.old_logprobs, 0.0),
        )
        other_loss, other_grad = self.run(zero_padded)
        self.close(loss, other_loss, "loss with padding garbage vs zero padding")
        self.close(grad, other_grad, "gradient with padding garbage vs zero padding")
        self.close(grad[~batch.mask], torch.zeros_like(grad[~batch.mask]), "gradient on padding")

    def finite_at_extreme_log_ratios(self, batch: PolicyBatch) -> None:
        batch32 = replace(batch, logprobs=batch.logprobs.float(), old_logprobs=batch.old_logprobs.float())
        loss, grad = self.run(batch32)
        assert torch.isfinite(loss), f"loss is {loss.item()} at log-ratios of ±40 (float32)"
        assert torch.isfinite(grad).all(), "gradient is not finite at log-ratios of ±40 (float32)"

    def row_order_invariance(self, batch: PolicyBatch) -> None:
        order = torch.roll(torch.arange(batch.rewards.numel()), -1)  # first row moved to the end
        permuted = PolicyBatch(*(t[order] for t in (batch.logprobs, batch.old_logprobs, batch.mask, batch.rewards, batch.group_ids)))
        loss, grad = self.run(batch)
        permuted_loss, permuted_grad = self.run(permuted)
        self.close(permuted_loss, loss, "loss after moving the first row to the end")
        self.close(permuted_grad, grad[order], "gradient after moving the first row to the end")

    def gradient_matches_analytic_form(self, batch: PolicyBatch) -> None:
        _, grad = self.run(batch)
        self.close(grad, analytic_gradient(self.kind, self.hp, batch), "gradient vs Eq. 11/12 (analytic form)")

    def zero_gradient_outside_clip(self, batch: PolicyBatch) -> None:
        _, grad = self.run(batch)
        rate, _ = reference_group_stats(batch)
        advantage = batch.rewards - torch.tensor(rate, dtype=torch.float64)
        ratio = torch.exp(torch.where(batch.mask, batch.logprobs - batch.old_logprobs, 0.0))
        outside = ((advantage[:, None] > 0) & (ratio > 1 + self.hp["clip_high"])) | (
            (advantage[:, None] < 0) & (ratio < 1 - self.hp["clip_low"])
        )
        outside &= batch.mask
        self.close(grad[outside], torch.zeros_like(grad[outside]), "gradient on tokens outside the clip region")

    def on_policy_equals_nft(self, batch: PolicyBatch) -> None:
        batch = batch.on_policy()
        weight = "dr_grpo" if self.kind == "dr_grpo" else "grpo"
        nft = get_loss(
            "nft", epsilon=1.0, prompt_weight=weight, loss_agg=self.hp["loss_agg"], max_response_len=self.hp["max_response_len"]
        )
        _, grad = self.run(batch)
        _, nft_grad = self.run(batch, nft)
        self.close(grad, nft_grad, f"on-policy gradient vs NFT(ε=1, ω={weight}) (Prop. 4.2)")

    def on_policy_equals_grpo_family(self, batch: PolicyBatch) -> None:
        batch = batch.on_policy()
        rl = get_loss(self.hp["prompt_weight"], loss_agg=self.hp["loss_agg"], max_response_len=self.hp["max_response_len"])
        _, grad = self.run(batch)
        _, rl_grad = self.run(batch, rl)
        self.close(grad, rl_grad, f"on-policy gradient vs {self.hp['prompt_weight']} (Prop. 4.2)")

    def zero_at_old_policy(self, batch: PolicyBatch) -> None:
        loss, _ = self.run(batch.on_policy())
        self.close(loss, torch.zeros_like(loss), "loss at π_θ = π_old")

    def dpo_with_two_answers(self, batch: PolicyBatch) -> None:
        loss, grad = self.run(batch)
        logprobs = batch.leaf()
        dpo = dpo_loss(logprobs, batch, self.hp["beta"])
        (dpo_grad,) = torch.autograd.grad(dpo, logprobs)
        self.close(loss, dpo.detach(), "loss vs DPO with π_ref = π_old")
        self.close(grad, dpo_grad, "gradient vs DPO with π_ref = π_old")

    def batches(self, make: Callable[..., st.SearchStrategy] = policy_batches, **options) -> st.SearchStrategy:
        """`make(**options)`; with equal_group_sizes, one group size per batch (drawn, then shrunk, too)."""
        if not self.equal_group_sizes:
            return make(**options)
        smallest, largest = options.pop("min_group_size", 2), options.pop("max_group_size", 16)
        return st.integers(smallest, largest).flatmap(lambda size: make(min_group_size=size, max_group_size=size, **options))

    def identities(self) -> dict[str, tuple[Callable, st.SearchStrategy]]:
        """name → (check, strategy of its examples) for this kind and these hyperparameters."""
        hp, kind = self.hp, self.kind
        max_len = hp.get("max_response_len") or 10
        batches = self.batches(max_len=max_len)
        checks = {
            "agreement": (self.agreement, batches),
            "no_signal_groups_contribute_zero": (
                self.no_signal_groups_contribute_zero,
                st.tuples(batches, self.batches(signal="none", max_len=max_len, max_log_ratio_scale=40.0)),
            ),
            "padding_invariance": (self.padding_invariance, batches),
            "finite_at_extreme_log_ratios": (
                self.finite_at_extreme_log_ratios,
                self.batches(lambda **options: extreme_batches(40.0, **options), max_len=max_len),
            ),
            "row_order_invariance": (self.row_order_invariance, batches),
        }
        if kind in TOKEN_LEVEL:
            analytic = self.batches(max_len=max_len, max_log_ratio_scale=2.0)
            checks["gradient_matches_analytic_form"] = (self.gradient_matches_analytic_form, analytic)
        if kind in GRPO_FAMILY:
            checks["zero_gradient_outside_clip"] = (self.zero_gradient_outside_clip, analytic)
            checks["on_policy_equals_nft"] = (self.on_policy_equals_nft, batches)
        if kind == "nft" and hp["epsilon"] <= 1 and hp["prompt_weight"] != "constant" and hp["neg_weight"] == 1:
            checks["on_policy_equals_grpo_family"] = (self.on_policy_equals_grpo_family, batches)
        if (kind == "nft" and hp["epsilon"] <= 1) or kind == "rft":
            checks["zero_at_old_policy"] = (self.zero_at_old_policy, batches)
        if kind == "infonca" and hp["sft_coef"] == 0:
            checks["dpo_with_two_answers"] = (self.dpo_with_two_answers, self.batches(max_group_size=2, signal="all", max_len=max_len))
        return checks


def describe(example: Any) -> dict[str, Any]:
    """A counter-example as plain lists, readable in a report and pasteable into a test."""
    if isinstance(example, PolicyBatch):
        return {
            "logprobs": example.logprobs.tolist(),
            "old_logprobs": example.old_logprobs.tolist(),
            "mask": example.mask.int().tolist(),
            "rewards": example.rewards.tolist(),
            "group_ids": example.group_ids.tolist(),
        }
    if isinstance(example, tuple):
        described: dict[str, Any] = {}
        for index, part in enumerate(example):
            for name, value in (describe(part) if isinstance(part, PolicyBatch) else {"value": part}).items():
                described[f"[{index}].{name}"] = value
        return described
    return {"value": example}


def batch_from_counterexample(example: dict[str, Any]) -> PolicyBatch:
    """The PolicyBatch of a (single-batch) counter-example, as `describe` wrote it: to replay a failure."""
    return PolicyBatch(
        logprobs=torch.tensor(example["logprobs"], dtype=torch.float64),
        old_logprobs=torch.tensor(example["old_logprobs"], dtype=torch.float64),
        mask=torch.tensor(example["mask"], dtype=torch.bool),
        rewards=torch.tensor(example["rewards"], dtype=torch.float64),
        group_ids=torch.tensor(example["group_ids"]),
    )


def breaks(check: Callable, example: Any) -> Optional[str]:
    """The failure message if `check` fails on `example` (an exception from the loss counts), else None."""
    try:
        check(example)
    except AssertionError as error:
        return str(error) or "assertion failed"
    except Exception as error:  # the third-party loss raised: that breaks the identity too
        return f"raised {type(error).__name__}: {error}"
    return None


def check_policy_loss(
    fn: LossFunction,
    kind: str,
    *,
    max_examples: int = 100,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    equal_group_sizes: bool = False,
    **hparams,
) -> ConformanceReport:
    """Run polopt's identities for `kind` against `fn(logprobs, old_logprobs, mask, rewards, group_ids)`.

    `hparams` are polopt's names for `kind` (e.g. clip_low, loss_agg; epsilon, prompt_weight) and
    must describe what `fn` computes. `max_examples` inputs per identity; `rtol`/`atol` compare
    float64 results (a float32 implementation needs about rtol=1e-4, atol=1e-6).
    `equal_group_sizes=True` draws batches whose groups all have one size, for code that takes
    `num_generations` consecutive rows per prompt (TRL, OpenRLHF).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable (logprobs, old_logprobs, mask, rewards, group_ids) -> loss, got {fn!r}")
    if not (isinstance(max_examples, int) and max_examples >= 1):
        raise ValueError(f"max_examples must be an int >= 1, got {max_examples!r}")
    checker = Checker(fn, kind, hparams, rtol, atol, equal_group_sizes)
    report = ConformanceReport(kind=kind, hparams=dict(hparams))
    search_settings = settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )
    for name, (check, strategy) in checker.identities().items():
        report.checks_run.append(name)
        try:
            minimal = find(strategy, lambda example: breaks(check, example) is not None, settings=search_settings)
        except NoSuchExample:
            continue
        except Flaky as error:  # the same input broke the identity on one call and not on the next
            report.failures.append(ConformanceFailure(name, f"the loss is not deterministic: {str(error).splitlines()[0]}", {}))
            continue
        report.failures.append(ConformanceFailure(name, breaks(check, minimal) or "flaky failure", describe(minimal)))
    return report


def as_loss_function(loss: torch.nn.Module) -> LossFunction:
    """A polopt loss (returns LossOutput) as the kit's `fn` (returns the scalar loss)."""

    def fn(logprobs, old_logprobs, mask, rewards, group_ids):
        return loss(logprobs, old_logprobs, mask, rewards, group_ids).loss

    return fn


__all__ = ["ConformanceFailure", "ConformanceReport", "KINDS", "as_loss_function", "batch_from_counterexample", "check_policy_loss"]
