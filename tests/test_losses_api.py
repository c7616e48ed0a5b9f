"""The loss contract: registry, defaults, errors on bad input, normalizers, metrics, KL, README example."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import epsilons_at_most_one, loss_configs, policy_batches

from polopt.losses import (
    GRPO_FAMILY,
    PolicyLoss,
    TokenLevelLoss,
    get_loss,
    global_normalizer,
    group_correct_rate,
    list_losses,
    register_loss,
)
from polopt.losses import registry

REPO = Path(__file__).resolve().parent.parent
ALL = ["dapo", "dr_grpo", "grpo", "infonca", "nft", "rft"]


def small_batch(dtype=torch.float64):
    """Two groups of 3: [right, wrong, wrong] and [right, right, wrong]; ragged lengths 4, 2, 0, 3, 4, 1."""
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(6, 4, generator=generator, dtype=dtype)
    old_logprobs = logprobs + 0.3 * torch.randn(6, 4, generator=generator, dtype=dtype)
    mask = torch.arange(4)[None, :] < torch.tensor([4, 2, 0, 3, 4, 1])[:, None]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    group_ids = torch.tensor([5, 5, 5, 9, 9, 9])
    return logprobs.requires_grad_(True), old_logprobs, mask, rewards, group_ids


# ---------------------------------------------------------------- registry and defaults


def test_all_six_losses_are_registered():
    assert list_losses() == ALL
    for name in ALL:
        loss_fn = get_loss(name)
        assert isinstance(loss_fn, PolicyLoss) and isinstance(loss_fn, torch.nn.Module) and loss_fn.name == name


def test_defaults_follow_the_papers():
    nft = get_loss("nft")
    assert (nft.epsilon, nft.prompt_weight, nft.neg_weight, nft.loss_agg) == (1.0, "dr_grpo", 1.0, "token-mean")
    assert get_loss("rft").loss_agg == "token-mean"
    for name, clip_high, loss_agg in [
        ("grpo", 0.2, "seq-mean-token-mean"),
        ("dr_grpo", 0.2, "seq-mean-token-sum-norm"),
        ("dapo", 0.28, "token-mean"),
    ]:
        loss_fn = get_loss(name)
        assert (loss_fn.clip_low, loss_fn.clip_high, loss_fn.loss_agg) == (0.2, clip_high, loss_agg), name
    infonca = get_loss("infonca")
    assert (infonca.beta, infonca.sft_coef) == (0.1, 0.0)
    assert "epsilon=1.0" in repr(nft) and "prompt_weight='dr_grpo'" in repr(nft)


def test_unknown_loss_lists_registered_names():
    with pytest.raises(ValueError, match="nope") as error:
        get_loss("nope")
    assert all(name in str(error.value) for name in ALL)


def test_unknown_hyperparameter_lists_accepted_ones():
    with pytest.raises(TypeError, match=r"\['eps'\].*epsilon, prompt_weight, neg_weight, loss_agg"):
        get_loss("nft", eps=0.5)


def test_register_loss_adds_a_custom_loss(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_loss("sft_on_positives")
    class SFTOnPositives(TokenLevelLoss):
        def __init__(self, loss_agg: str = "token-mean") -> None:
            super().__init__(loss_agg)

        def token_losses(self, inputs):
            return torch.where(inputs.positive[:, None], -inputs.logprobs, 0.0), {}

    assert "sft_on_positives" in list_losses()
    out = get_loss("sft_on_positives")(*small_batch())
    out.loss.backward()
    assert out.loss.item() > 0
    with pytest.raises(ValueError, match="already registered"):
        register_loss("nft")(SFTOnPositives)
    with pytest.raises(TypeError, match="PolicyLoss subclass"):
        register_loss("function")(lambda *args: None)


# ---------------------------------------------------------------- bad hyperparameters


@pytest.mark.parametrize(
    "name, hparams, message",
    [
        ("nft", dict(epsilon=0.0), r"epsilon must be > 0, got 0\.0"),
        ("nft", dict(epsilon=-0.5), r"epsilon must be > 0, got -0\.5"),
        ("nft", dict(epsilon="big"), r"epsilon must be a number > 0, got 'big'"),
        ("nft", dict(prompt_weight="sqrt"), r"prompt_weight must be one of \('constant', 'dr_grpo', 'grpo'\), got 'sqrt'"),
        ("nft", dict(neg_weight=-1.0), r"neg_weight must be >= 0"),
        ("nft", dict(loss_agg="mean"), r"loss_agg must be one of \['token-mean', .*'seq-mean-token-sum-norm'\], got 'mean'"),
        ("grpo", dict(clip_low=0.0), r"clip_low must be in \(0, 1\), got 0\.0"),
        ("grpo", dict(clip_high=1.0), r"clip_high must be in \(0, 1\), got 1\.0"),
        ("dapo", dict(clip_high=-0.28), r"clip_high must be in \(0, 1\)"),
        ("dr_grpo", dict(loss_agg="seq-mean"), r"loss_agg must be one of"),
        ("dr_grpo", dict(max_response_len=0), r"max_response_len must be None or an int >= 1, got 0"),
        ("rft", dict(kl_coef=-0.1), r"kl_coef must be >= 0"),
        ("infonca", dict(beta=0.0), r"beta must be > 0, got 0\.0"),
        ("infonca", dict(sft_coef=math.nan), r"sft_coef must be >= 0, got nan"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(name, hparams, message):
    with pytest.raises(ValueError, match=message):
        get_loss(name, **hparams)


# ---------------------------------------------------------------- bad inputs


def replaced(index: int, value):
    args = list(small_batch())
    args[index] = value
    return args


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (replaced(1, torch.zeros(6, 3)), {}, r"old_logprobs must have the shape of logprobs \[6, 4\], got \[6, 3\]"),
        (replaced(2, torch.ones(5, 4, dtype=torch.bool)), {}, r"mask must have the shape of logprobs \[6, 4\], got \[5, 4\]"),
        (replaced(3, torch.ones(5)), {}, r"rewards must have shape \[B\] = \[6\].*got \[5\]"),
        (replaced(4, torch.zeros(6, 1)), {}, r"group_ids must have shape \[B\] = \[6\].*got \[6, 1\]"),
        (replaced(0, torch.zeros(6)), {}, r"logprobs must be a floating-point \[B, T\] tensor, got torch.float32 \[6\]"),
        (replaced(0, torch.zeros(6, 4, dtype=torch.long)), {}, r"logprobs must be a floating-point"),
        (replaced(3, torch.tensor([1.0, 0.5, 0.0, 1.0, 2.0, 0.0])), {}, r"rewards must be 0 or 1, got \[0\.5, 2\.0\] at \[\[1\], \[4\]\]"),
        (replaced(2, torch.full((6, 4), 2)), {}, r"mask must be bool or 0/1, got \[2, 2"),
        (small_batch(), dict(correct_rate=torch.full((6,), 1.5)), r"correct_rate must be in \[0, 1\], got \[1\.5"),
        (small_batch(), dict(correct_rate=torch.ones(3)), r"correct_rate must have shape \[B\] = \[6\].*got \[3\]"),
        (small_batch(), dict(correct_rate=torch.zeros(6)), r"correct_rate must be > 0 on rows with reward 1"),
        (small_batch(), dict(normalizer=-3.0), r"normalizer must be a finite number >= 0, got \[-3\.0\]"),
        (small_batch(), dict(normalizer=torch.tensor(math.inf)), r"normalizer must be a finite number >= 0, got \[inf\]"),
        (replaced(3, [1.0, 0.0]), {}, r"rewards must be a torch.Tensor, got list"),
    ],
)
@pytest.mark.parametrize("name", ["nft", "grpo", "infonca"])
def test_bad_inputs_name_the_argument_and_what_was_given(name, args, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        get_loss(name)(*args, **kwargs)


def test_kl_needs_reference_logprobs_and_horizon_must_cover_the_mask():
    with pytest.raises(ValueError, match=r"kl_coef=0\.1 needs ref_logprobs"):
        get_loss("grpo", kl_coef=0.1)(*small_batch())
    with pytest.raises(ValueError, match=r"mask has 4 token columns, more than max_response_len=3"):
        get_loss("dr_grpo", max_response_len=3)(*small_batch())


# ---------------------------------------------------------------- normalizers


def test_global_normalizer_per_kind():
    _, _, mask, _, group_ids = small_batch()
    expected = {"tokens": 14.0, "sequences": 6.0, "sequences_x_horizon": 24.0, "groups": 2.0, "none": 1.0}
    kinds = {"nft": "tokens", "grpo": "sequences", "dr_grpo": "sequences_x_horizon", "infonca": "groups"}
    for name, kind in kinds.items():
        loss_fn = get_loss(name)
        assert loss_fn.normalizer_kind == kind
        assert global_normalizer(loss_fn, mask, group_ids) == expected[kind]
    assert global_normalizer(get_loss("nft", loss_agg="token-sum"), mask) == 1.0
    assert global_normalizer(get_loss("dr_grpo", max_response_len=10), mask) == 60.0
    assert global_normalizer("seq-mean-token-sum-norm", mask, max_response_len=7) == 42.0
    assert global_normalizer("seq-mean-token-sum", mask) == 6.0
    with pytest.raises(ValueError, match="needs group_ids"):
        global_normalizer(get_loss("infonca"), mask)
    with pytest.raises(ValueError, match=r"PolicyLoss or a loss_agg in \['token-mean'"):
        global_normalizer("mean", mask)


def test_normalizer_replaces_the_local_denominator():
    """loss(normalizer=N) = (the loss's numerator) / N: here N = 2 × the local token count."""
    args = small_batch()
    loss_fn = get_loss("dapo")
    local = loss_fn(*args).loss
    assert loss_fn(*args, normalizer=28).loss.item() == pytest.approx(local.item() / 2, rel=1e-12)
    assert loss_fn(*args, normalizer=torch.tensor(28.0)).loss.item() == pytest.approx(local.item() / 2, rel=1e-12)


def test_group_correct_rate():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    rate = group_correct_rate(rewards, torch.tensor([4, 2, 4, 4, 2]))
    torch.testing.assert_close(rate, torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]))
    rate = group_correct_rate(rewards, torch.tensor([4, 2, 2, 4, 4]))
    torch.testing.assert_close(rate, torch.tensor([2 / 3, 0.5, 0.5, 2 / 3, 2 / 3]))
    with pytest.raises(ValueError, match=r"group_ids \[4\]"):
        group_correct_rate(rewards, torch.zeros(4))


# ---------------------------------------------------------------- metrics and extras


def test_metrics_report_clipping_ratios_and_token_counts():
    """One group [right, wrong] (r̂ = ½): the right answer's tokens at R = 2 and 1, the wrong
    answer's at R = 0.5 and 1.5 (the 2nd token is padding)."""
    log = math.log
    logprobs = torch.tensor([[log(2.0), 0.0], [log(0.5), log(1.5)]], dtype=torch.float64) - 1
    old_logprobs = torch.full((2, 2), -1.0, dtype=torch.float64)
    args = (logprobs, old_logprobs, torch.tensor([[True, True], [True, False]]), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    grpo = get_loss("grpo")(*args).metrics
    assert (grpo["clip_frac_high"], grpo["clip_frac_low"], grpo["clip_frac"]) == pytest.approx((1 / 3, 1 / 3, 2 / 3))
    assert (grpo["ratio_min"], grpo["ratio_max"], grpo["ratio_mean"]) == pytest.approx((0.5, 2.0, 3.5 / 3))
    assert (grpo["pos_tokens"], grpo["neg_tokens"], grpo["informative_frac"]) == (2.0, 1.0, 1.0)
    # NFT: the wrong answer's (1 − ½·0.5)/(1 − ½) = 1.5 is above ε = 1 (not clipped), below ε = 2.
    assert get_loss("nft")(*args).metrics["neg_clip_frac"] == 0.0
    assert get_loss("nft", epsilon=2.0)(*args).metrics["neg_clip_frac"] == 1.0
    assert all(isinstance(v, float) for v in grpo.values())


CLIP_FRACTIONS = ("clip_frac", "clip_frac_high", "clip_frac_low", "neg_clip_frac")


@given(policy_batches(), loss_configs(names=("nft", *GRPO_FAMILY)), st.sampled_from([0.0, 1e-7, 1e-5]), st.data())
def test_no_token_counts_as_clipped_on_policy_even_with_rounding_noise(batch, config, noise, data):
    """On-policy, π_old = π_θ exactly or recomputed (log π_old off by rounding-sized noise, as the
    engine's and the trainer's forward passes are), every clip fraction is exactly 0: R = 1 is
    inside every clip range, NFT's with ε ≤ 1 included (x(1) = 1 ≥ ε; with ε = 1 the boundary is
    R = 1 itself, where an exact comparison counted the noise)."""
    name, hp = config
    if name == "nft":  # ε = 1 (the default) puts the boundary at R = 1; ε > 1 clips on-policy, in value too
        hp["epsilon"] = data.draw(st.just(1.0) | epsilons_at_most_one)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    batch = batch.on_policy()
    old = batch.old_logprobs + noise * torch.randn(batch.old_logprobs.shape, generator=generator, dtype=batch.old_logprobs.dtype)
    metrics = get_loss(name, **hp)(batch.leaf(), old, batch.mask, batch.rewards, batch.group_ids).metrics
    fractions = {key: metrics[key] for key in CLIP_FRACTIONS if key in metrics}
    assert fractions and all(value == 0.0 for value in fractions.values()), (name, hp, fractions)


@given(policy_batches(), loss_configs(names=("nft", *GRPO_FAMILY), options=False))
def test_clip_fractions_count_tokens_far_off_policy(batch, config):
    """R = e^±4 is past every clip boundary these losses can have (NFT's R_ε ≤ 1/r̂ ≤ 16 for groups
    of ≤ 16): the first group's right answer (A > 0) and wrong answer (A < 0, NFT's negatives) count."""
    name, hp = config
    loss_fn = get_loss(name, **hp)
    args = (batch.mask, batch.rewards, batch.group_ids)
    above = loss_fn(batch.leaf(), batch.logprobs - 4.0, *args).metrics
    below = loss_fn(batch.leaf(), batch.logprobs + 4.0, *args).metrics
    if name == "nft":
        assert above["neg_clip_frac"] > 0
    else:
        assert above["clip_frac_high"] > 0 and above["clip_frac_low"] == 0
        assert below["clip_frac_low"] > 0 and below["clip_frac_high"] == 0


def test_k3_kl_term_adds_kl_coef_times_k3():
    """kl_coef·k3 per token, k3 = π_ref/π_θ − log(π_ref/π_θ) − 1, aggregated like the policy term."""
    logprobs, old_logprobs, mask, rewards, group_ids = small_batch()
    ref_logprobs = logprobs.detach() + 0.5 * torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = get_loss("nft")(logprobs, old_logprobs, mask, rewards, group_ids).loss
    with_kl = get_loss("nft", kl_coef=0.3)(logprobs, old_logprobs, mask, rewards, group_ids, ref_logprobs=ref_logprobs)
    d = (ref_logprobs - logprobs.detach())[mask]
    k3 = (d.exp() - d - 1).mean()
    assert with_kl.loss.item() == pytest.approx(plain.item() + 0.3 * k3.item(), rel=1e-12)
    assert with_kl.metrics["kl"] == pytest.approx(k3.item(), rel=1e-12)


def test_import_needs_only_torch():
    """`import polopt.losses` adds no module beyond polopt's own to what `import torch` loaded."""
    code = (
        "import sys, torch; before = set(sys.modules); import polopt.losses; "
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] != 'polopt'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_readme_example_runs(capsys):
    """The worked example in README.md's Losses section runs as is and learns."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("<!-- section:losses -->") : readme.index("<!-- /section:losses -->")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (Losses)", "exec"), {"__name__": "readme_example"})
    accuracies = [float(a) for a in re.findall(r"accuracy (\S+)", capsys.readouterr().out)]
    assert len(accuracies) == 4 and max(accuracies[1:]) > accuracies[0]
