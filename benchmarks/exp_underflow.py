"""Why polopt.ops.probs_from_logprobs_ zeroes probabilities below e^-60: CPU exp's underflow path.

    python benchmarks/exp_underflow.py            # 1 torch thread, CPU time (robust on a shared machine)

1. `Tensor.exp_` on [1024, 320] fp32 filled with one value, for values around fp32's underflow
   (≈ −87.3), and a multiply on subnormals against one on normal numbers.
2. The fused log-prob op (forward with entropy + backward, N = 6144 rows, D = 128, V = 320: the
   tiny model's update) on flat logits (std ≈ 1) and on peaked ones (std ≈ 30, a trained model),
   next to the plain exp it would use without the cut (`shifted.exp()` / `.exp_()`), in one run.

Writes benchmarks/results/exp_underflow.md and .json.
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch

from _common import environment, write_results


def cpu_ms(fn, repeats: int = 5) -> float:
    """Fastest CPU milliseconds of `fn()` over `repeats` (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best * 1e3


def exp_by_input(values: list[float]) -> dict[str, float]:
    out = {}
    for v in values:
        x = torch.full((1024, 320), float(v))
        out[f"{v:g}"] = cpu_ms(lambda: x.clone().exp_())
    return out


def op_ms(scale: float, cut: bool) -> float:
    # The module (polopt.ops re-exports a function of the same name); its probs_from_logprobs_ is
    # swapped for the plain exp below.
    module = importlib.import_module("polopt.ops.token_logprobs")

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6144, 128, generator=g) * (scale / 11.3) ** 0.5
    weight = torch.randn(320, 128, generator=g) * (scale / 11.3) ** 0.5
    targets = torch.randint(0, 320, (6144,), generator=g)
    original = module.probs_from_logprobs_
    if not cut:
        module.probs_from_logprobs_ = lambda logprobs: logprobs.exp_()
    try:
        def step():
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            logprobs, _ = module.token_logprobs(h, w, targets, return_entropy=True)
            logprobs.sum().backward()
        return cpu_ms(step, repeats=3)
    finally:
        module.probs_from_logprobs_ = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="exp_underflow")
    args = parser.parse_args()
    torch.set_num_threads(1)
    exp = exp_by_input([-50, -87, -88, -95, -103, -110, -1000])
    subnormal = torch.full((1024, 320), 1e-39)
    normal = torch.full((1024, 320), 1e-30)
    mul = {"normal": cpu_ms(lambda: normal.clone().mul_(0.5)), "subnormal": cpu_ms(lambda: subnormal.clone().mul_(0.5))}
    op = {f"std {scale:g}": {"plain exp": op_ms(scale, cut=False), "cut at e^-60": op_ms(scale, cut=True)}
          for scale in (1.0, 30.0)}
    result = {"environment": environment("cpu"), "exp_ms_by_input": exp, "mul_ms": mul, "fused_op_ms": op}
    lines = [
        "# CPU exp underflow (benchmarks/exp_underflow.py)",
        "",
        f"Machine: {result['environment']['platform']}, {result['environment']['cpus_usable']} CPUs; torch "
        f"{result['environment']['torch']}; {result['environment']['date']}; 1 torch thread, fastest CPU time of 5.",
        f"Command: `{result['environment']['command']}`",
        "",
        "`Tensor.exp_` on [1024, 320] fp32, every entry the same input:",
        "",
        "| input | ms |",
        "|---:|---:|",
        *(f"| {v} | {ms:.3f} |" for v, ms in exp.items()),
        "",
        f"`mul_(0.5)` on the same shape: normal numbers {mul['normal']:.3f} ms, subnormals {mul['subnormal']:.3f} ms.",
        "",
        "Fused log-prob op, forward with entropy + backward, N = 6144, D = 128, V = 320 (the tiny model's update), "
        "logits of the given standard deviation:",
        "",
        "| logits | plain exp, ms | cut at e^-60, ms | ratio |",
        "|---|---:|---:|---:|",
        *(f"| {k} | {v['plain exp']:.1f} | {v['cut at e^-60']:.1f} | {v['plain exp'] / v['cut at e^-60']:.2f}× |"
          for k, v in op.items()),
        "",
    ]
    write_results(args.name, result, "\n".join(lines))


if __name__ == "__main__":
    main()
