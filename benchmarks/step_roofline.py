"""How far one RL step is from this machine's arithmetic limit: FLOPs per step, polopt and TRL.

    python benchmarks/step_roofline.py                 # 3 interleaved runs × 7 steps per side, 1 torch thread
    python benchmarks/step_roofline.py --rounds 1 --steps 3 --name step_roofline_smoke

step_vs_trl.py's step (tiny model, 16 prompts × 8 answers, ≤ 48 new tokens, Dr.GRPO, one optimiser
step per rollout) on three sides — polopt's recipe, the same with `pack_sequences=true`, TRL's
GRPOTrainer — each in its own process, with its work split into two phases:

    rollout   polopt: OnlineRLRecipe.rollout   TRL: GRPOTrainer._generate_and_score_completions
              (generate, reward, collate, π_old where it is recomputed)
    update    polopt: update_policy            TRL: the rest of training_step (forward, loss, backward;
              (forward, loss, backward, clip,   its optimiser step, no matrix products, runs outside)
              optimiser step)

For each phase: the floating-point operations of one step, counted by torch.utils.flop_counter
(matrix products and attention, forward and backward — the work, whatever the kernels), and its
CPU seconds (`time.process_time`; counting and timing are separate steps, since the counter slows
what it counts). Divided, they give the rate each phase achieves; against the fp32 matrix-product
rate this machine reaches at the same thread count (measured here, on the step's own shapes), they
give how close each phase runs to the machine's limit, and the least time the step's work could
take: FLOPs / peak. A side cannot beat TRL by more than TRL's measured time / its own least time
without doing less work.

Writes benchmarks/results/<name>.json and .md with the machine, versions, date and command.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, environment, write_results  # noqa: E402
from step_profile import load_recipe, run_recipe  # noqa: E402
from step_vs_trl import ANSWERS, NEW_TOKENS, POLOPT_SIDES, PROMPTS, SIDES, trl_answer_tokens, trl_trainer  # noqa: E402

PHASES = ("rollout", "update")
# The step's matrix products at 1 thread: the update's ([tokens, dim] × [dim, hidden] and back),
# a decode step's ([rows, dim] × [dim, hidden]) and one large square product.
PEAK_SHAPES = ((6272, 128, 512), (6272, 512, 128), (128, 128, 512), (128, 512, 128), (2048, 1024, 1024))


def flop_counter():
    """torch's FlopCounterMode, taught the CPU attention kernels (it knows only the GPU ones)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    })


class PhaseMeter:
    """CPU seconds of each phase on every step, FLOPs of each phase on the step being counted.

    `wrap(owner, name, phase)` replaces a method; a phase that contains another (TRL's
    training_step contains its rollout) is given as `minus=` that phase, so phases never overlap.
    """

    def __init__(self, count_step: int):
        self.count_step = count_step
        self.step = 0
        self.cpu: dict[str, float] = defaultdict(float)
        self.flops: dict[str, int] = defaultdict(int)
        self.steps: list[dict] = []

    def wrap(self, owner, name: str, phase: str, minus: str | None = None, ends_step: bool = False) -> None:
        original = getattr(owner, name)
        meter = self

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            inner_cpu, inner_flops = (meter.cpu[minus], meter.flops[minus]) if minus else (0.0, 0)
            if meter.step == meter.count_step:
                with flop_counter() as counter:
                    out = original(*args, **kwargs)
                meter.flops[phase] += counter.get_total_flops() - (meter.flops[minus] - inner_flops if minus else 0)
            else:
                start = time.process_time()
                out = original(*args, **kwargs)
                elapsed = time.process_time() - start
                meter.cpu[phase] += elapsed - (meter.cpu[minus] - inner_cpu if minus else 0.0)
            if ends_step:
                meter.end_step()
            return out

        setattr(owner, name, wrapped)

    def end_step(self) -> None:
        counted = self.step == self.count_step
        self.steps.append({"counted": counted, **({"flops": dict(self.flops)} if counted else {"cpu": dict(self.cpu)})})
        self.cpu, self.flops = defaultdict(float), defaultdict(int)
        self.step += 1


def polopt_worker(steps: int, threads: int, overrides: list[str]) -> list[dict]:
    recipe = load_recipe(threads)
    meter = PhaseMeter(count_step=steps - 1)
    meter.wrap(recipe.OnlineRLRecipe, "rollout", "rollout")
    meter.wrap(recipe.OnlineRLRecipe, "update_policy", "update", ends_step=True)
    with tempfile.TemporaryDirectory() as tmp:
        history = run_recipe(recipe, steps, Path(tmp) / "run", overrides)
    tokens = [h["response/length_mean"] * PROMPTS * ANSWERS for h in history if "time/step_s" in h]
    return [{**s, "answer_tokens": t} for s, t in zip(meter.steps, tokens)]


def trl_worker(steps: int, threads: int) -> list[dict]:
    from trl import GRPOTrainer

    meter = PhaseMeter(count_step=steps - 1)
    meter.wrap(GRPOTrainer, "_generate_and_score_completions", "rollout")
    meter.wrap(GRPOTrainer, "training_step", "update", minus="rollout", ends_step=True)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, verifier = trl_trainer(steps, threads, [], tmp)
        trainer.train()
    verifier.close()
    return [{**s, "answer_tokens": t} for s, t in zip(meter.steps, trl_answer_tokens(trainer))]


def side_steps(side: str, steps: int, threads: int) -> list[dict]:
    """Run one side in a child process (`--worker`): a fresh interpreter per side."""
    cmd = [sys.executable, __file__, "--worker", side, "--steps", str(steps), "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matmul_peak(threads: int) -> dict:
    """fp32 matrix-product GFLOP/s at `threads` threads on PEAK_SHAPES; the best is the peak."""
    import torch

    torch.set_num_threads(threads)
    rates = {}
    for m, k, n in PEAK_SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        repeats = max(3, int(2e9 / (2 * m * k * n)))  # ~2 GFLOP per shape
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            best = min(best, (time.perf_counter() - start) / repeats)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
    return {"gflops_by_shape": rates, "peak_gflops": max(rates.values())}


def summarise(runs: list[list[dict]]) -> dict:
    """One side's figures from its runs (each a list of steps; a run's first step is warm-up)."""
    timed = [s for steps in runs for s in steps[1:] if not s["counted"]]
    counted = [s for steps in runs for s in steps if s["counted"]]
    if not timed or not counted:
        raise RuntimeError("need at least one timed step after the warm-up and one counted step (--steps >= 3)")
    cpu = {p: statistics.median(s["cpu"].get(p, 0.0) for s in timed) for p in PHASES}
    flops = {p: counted[-1]["flops"].get(p, 0) for p in PHASES}
    return {
        "cpu_seconds": cpu, "flops": flops,
        "answer_tokens_timed": statistics.median(s["answer_tokens"] for s in timed),
        "answer_tokens_counted": counted[-1]["answer_tokens"],
    }


def markdown(result: dict) -> str:
    env, peak = result["env"], result["matmul"]["peak_gflops"]
    lines = [
        "# One RL step against the machine's arithmetic limit (benchmarks/step_roofline.py)",
        "",
        f"Machine: {env['platform']}, {env['cpus_usable']} CPUs usable; Python {env['python']}, torch {env['torch']}; "
        f"{env['date']}.",
        f"Command: `{env['command']}`",
        "",
        f"step_vs_trl's step ({PROMPTS} prompts × {ANSWERS} answers, ≤ {NEW_TOKENS} new tokens, Dr.GRPO), "
        f"{result['rounds']} interleaved runs × {result['steps']} steps per side, {result['threads']} torch thread(s). "
        "FLOPs of a run's last step (torch.utils.flop_counter, attention included; the runs are seeded alike), "
        "CPU seconds: median over the runs' steps between the first and the last.",
        "",
        f"fp32 matrix-product rate at {result['threads']} thread(s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in result["matmul"]["gflops_by_shape"].items())
        + f" GFLOP/s; peak {peak:.0f} GFLOP/s.",
        "",
        "| side | phase | GFLOP / step | CPU s / step | GFLOP/s | of peak |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for side in SIDES:
        s = result["sides"][side]
        for phase in (*PHASES, "step"):
            flops = sum(s["flops"].values()) if phase == "step" else s["flops"][phase]
            cpu = sum(s["cpu_seconds"].values()) if phase == "step" else s["cpu_seconds"][phase]
            name = "**step**" if phase == "step" else phase
            lines.append(f"| {side} | {name} | {flops / 1e9:.1f} | {cpu:.3f} | {flops / 1e9 / cpu:.0f} | "
                         f"{flops / 1e9 / cpu / peak:.0%} |")
    lines += ["", "Answer tokens per step (timed / counted step): " + "; ".join(
        f"{side} {result['sides'][side]['answer_tokens_timed']:.0f} / {result['sides'][side]['answer_tokens_counted']:.0f}"
        for side in SIDES) + ".", ""]
    trl_cpu = sum(result["sides"]["trl"]["cpu_seconds"].values())
    for side in POLOPT_SIDES:
        b = result["bounds"][side]
        lines.append(
            f"- {side}: {b['measured_cpu_seconds']:.3f} CPU s per step measured, {b['least_cpu_seconds']:.3f} s if every "
            f"FLOP ran at the peak; TRL's {trl_cpu:.3f} s over it: {b['measured_ratio']:.2f}× measured, at most "
            f"{b['bound_ratio']:.2f}× with this work."
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=7, help="steps per side: the first is warm-up, the last is counted")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, interleaved; timed steps are pooled")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="step_roofline", help="results file stem")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be >= 3 (a warm-up step, a timed step, a counted step)")
    if args.worker:
        steps = (trl_worker(args.steps, args.threads) if args.worker == "trl"
                 else polopt_worker(args.steps, args.threads, POLOPT_SIDES[args.worker]))
        print(json.dumps(steps))
        return

    env = environment("cpu")
    runs: dict[str, list[list[dict]]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        for side in SIDES[r % len(SIDES):] + SIDES[: r % len(SIDES)]:  # who goes first rotates
            steps = side_steps(side, args.steps, args.threads)
            runs[side].append(steps)
            print(f"round {r}: {side}: {json.dumps(summarise([steps]))}", flush=True)
    sides = {side: summarise(steps) for side, steps in runs.items()}
    matmul = matmul_peak(args.threads)
    trl_cpu = sum(sides["trl"]["cpu_seconds"].values())
    bounds = {}
    for side in POLOPT_SIDES:
        measured = sum(sides[side]["cpu_seconds"].values())
        least = sum(sides[side]["flops"].values()) / 1e9 / matmul["peak_gflops"]
        bounds[side] = {"measured_cpu_seconds": measured, "least_cpu_seconds": least,
                        "measured_ratio": trl_cpu / measured, "bound_ratio": trl_cpu / least}
    result = {"env": env, "rounds": args.rounds, "steps": args.steps, "threads": args.threads, "matmul": matmul, "sides": sides,
              "bounds": bounds}
    write_results(args.name, result, markdown(result))


if __name__ == "__main__":
    main()
