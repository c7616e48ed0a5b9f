"""How far one RL step is from this machine's arithmetic limit: FLOPs per step, polopt and TRL.

    python benchmarks/step_roofline.py                 # tiny model: 3 interleaved runs × 7 steps per side, 1 torch thread
    python benchmarks/step_roofline.py --rounds 1 --steps 2 --name step_roofline_smoke
    python benchmarks/step_roofline.py --config configs/smollm2_addition.yaml --rounds 1 --steps 2   # SmolLM2-135M

step_vs_trl.py's step — the training config's model, prompts, batch and lengths (`--config`, default
configs/tiny_arith.yaml: the tiny model, 16 prompts × 8 answers, ≤ 48 new tokens), the Dr.GRPO loss,
one optimiser step per rollout — on three sides: polopt's recipe, the same with
`pack_sequences=true`, TRL's GRPOTrainer; each in its own process, its work split into phases:

    rollout        polopt: OnlineRLRecipe.rollout     TRL: GRPOTrainer._generate_and_score_completions
                   (generate, reward, collate; both minus their old log-probs)
    old log-probs  polopt: _logprobs inside the rollout (only with recompute_old_logprobs)
                   TRL: _get_per_token_logps_and_entropies inside the rollout (only when it needs π_old:
                   num_iterations > 1, generation batches reused across steps, vLLM's correction)
    update         polopt: update_policy minus the optimizer   TRL: training_step minus the rollout
                   (forward, loss, backward)
    optimizer      polopt: _optimizer_step (clip, AdamW step, LR schedule)
                   TRL: Trainer._clip_grad_norm + the optimizer's step (both outside training_step)

The first step of each run (its warm-up) is counted: under one TorchDispatchMode that times every
aten op (CPU seconds) and counts its floating-point operations with torch.utils.flop_counter's formulas (matrix
products and attention, forward and backward — the work, whatever the kernels; `flop_counter()`
below adds the CPU attention kernels torch knows only for GPUs), each op booked to the innermost
phase running. The other steps are timed: CPU seconds per phase (`time.process_time`, no mode
active; the counter slows what it counts). FLOPs / CPU seconds give the rate each phase achieves;
against the fp32 matrix-product rate this machine reaches at the same thread count — measured here,
on the step's own matrix-product shapes and layouts as the counted steps recorded them — they give
how close each phase runs to the machine's limit, and the least time the step's work could take:
FLOPs / peak. A side cannot beat TRL by more than TRL's measured time / its own least time without
doing less work. The counted step's op times (kernel time of each aten op, by category) show where
each phase's time goes; what CPU time they do not cover is Python, autograd and glue.

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
from step_vs_trl import (POLOPT_SIDES, SIDES, Step, add_step_arguments, polopt_arguments, step_from_arguments,  # noqa: E402
                         trl_answer_tokens, trl_trainer)

PHASES = ("rollout", "old_logprobs", "update", "optimizer")
PHASE_LABELS = {"rollout": "rollout", "old_logprobs": "old log-probs", "update": "update", "optimizer": "optimizer"}
# One large square product beside the step's own shapes: what the machine reaches on a friendly shape.
SQUARE = (2048, 1024, 1024, False, False)
MATMUL_OPS = ("mm", "addmm")
# Op categories of the counted step's time (aten op names, as the dispatcher sees them).
CATEGORIES = (
    ("matrix products", lambda op: op in {"mm", "addmm", "bmm", "baddbmm", "_addmm_activation"}),
    ("attention", lambda op: op.startswith("_scaled_dot_product") or op == "_flash_attention_forward"),
    ("softmax / log-softmax", lambda op: "softmax" in op or op == "logsumexp"),
    ("optimizer kernels", lambda op: op.startswith(("_foreach_", "_fused_"))),
    ("copies, indexing, embedding", lambda op: op in {
        "copy_", "_to_copy", "clone", "cat", "stack", "index", "index_select", "index_put_", "index_add_", "gather",
        "scatter", "scatter_add_", "embedding", "embedding_dense_backward", "masked_fill_", "masked_fill", "where",
        "new_zeros", "zeros_like", "fill_", "zero_", "empty", "empty_like", "new_empty", "full", "arange", "_unsafe_view",
        "view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze", "as_strided", "split",
        "split_with_sizes", "contiguous", "_reshape_alias", "alias", "detach", "constant_pad_nd", "flip", "roll"}),
    ("sampling", lambda op: op in {"multinomial", "exponential_", "uniform_", "topk", "sort", "cumsum", "argmax"}),
)
OTHER = "other elementwise & reductions"


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


def op_meter(meter: "PhaseMeter"):
    """A TorchDispatchMode that times every aten op and counts its FLOPs with flop_counter()'s
    formulas (the same counts as FlopCounterMode, decompositions included), booking both to the
    innermost phase running: meter.ops[phase][op] = [seconds, flops, calls]; the matrix products'
    shapes and layouts go to meter.mm_shapes[phase]["m×k×n"] = [flops, m, k, n, a transposed, b transposed]."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    registry = flop_counter().flop_registry
    matmul = {torch.ops.aten.mm, torch.ops.aten.addmm}

    class OpMeter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if isinstance(func, torch._ops.HigherOrderOperator):
                return NotImplemented
            if func not in registry and func is not torch.ops.prim.device.default:  # as FlopCounterMode does
                with self:
                    out = func.decompose(*args, **kwargs)
                    if out is not NotImplemented:
                        return out
            start = time.process_time()  # CPU seconds, as the phases: a busy machine does not inflate them
            out = func(*args, **kwargs)
            seconds = time.process_time() - start
            packet = func._overloadpacket
            flops = registry[packet](*args, **kwargs, out_val=out) if packet in registry else 0
            phase = meter.active[-1] if meter.active else "outside"
            record = meter.ops[phase][packet.__name__]
            record[0] += seconds
            record[1] += flops
            record[2] += 1
            if packet in matmul:
                a, b = args[-2], args[-1]
                (m, k), n = a.shape, b.shape[1]
                ta, tb = a.stride(-1) != 1, b.stride(-1) != 1  # column-major: a transposed view
                key = f"{m}x{k}x{n}" + ("/aT" if ta else "") + ("/bT" if tb else "")
                shape = meter.mm_shapes[phase].setdefault(key, [0, m, k, n, ta, tb])
                shape[0] += flops
            return out

    return OpMeter()


class PhaseMeter:
    """CPU seconds of each phase on every step but the counted one; op times and FLOPs of each
    phase on the counted step (`count_step`, the first: the warm-up).

    `begin(phase, minus)` / `end(frame)` bracket a phase; a phase that contains others (TRL's
    training_step contains its rollout) names them in `minus`, so phases never overlap in CPU
    seconds. `wrap(owner, name, phase, ...)` brackets a method; `within=` only when called inside
    that phase (TRL's log-prob function is π_old inside the rollout, the update's forward outside).
    """

    def __init__(self, count_step: int = 0):
        self.count_step = count_step
        self.step = 0
        self.cpu: dict[str, float] = defaultdict(float)
        self.active: list[str] = []
        self.steps: list[dict] = []
        self.ops: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0, 0]))
        self.mm_shapes: dict[str, dict[str, list]] = defaultdict(dict)
        self._mode = None

    def begin(self, phase: str, minus: tuple[str, ...] = ()) -> tuple:
        counted = self.step == self.count_step
        mode = None
        if counted and self._mode is None:  # one mode for the whole counted step, entered by the outermost phase
            mode = self._mode = op_meter(self)
            mode.__enter__()
        self.active.append(phase)
        return phase, minus, counted, sum(self.cpu[m] for m in minus), mode, time.process_time()

    def end(self, frame: tuple) -> None:
        elapsed = time.process_time() - frame[-1]
        phase, minus, counted, inner, mode, _ = frame
        self.active.pop()
        if mode is not None:
            mode.__exit__(None, None, None)
            self._mode = None
        if not counted:
            self.cpu[phase] += elapsed - (sum(self.cpu[m] for m in minus) - inner)

    def wrap(self, owner, name: str, phase: str, minus: tuple[str, ...] = (), within: str | None = None,
             ends_step: bool = False) -> None:
        original = getattr(owner, name)
        meter = self

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            if within is not None and (not meter.active or meter.active[-1] != within):
                return original(*args, **kwargs)
            frame = meter.begin(phase, minus)
            try:
                out = original(*args, **kwargs)
            finally:
                meter.end(frame)
            if ends_step:
                meter.end_step()
            return out

        setattr(owner, name, wrapped)

    def watch_optimizer_step(self, ends_step: bool) -> None:
        """Book every optimiser step (torch's global optimiser hooks) to the "optimizer" phase."""
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        frames: list[tuple] = []  # a wrapper optimiser stepping its inner one: only the outermost counts

        def pre(optimizer, args, kwargs):
            frames.append(self.begin("optimizer") if not frames else None)

        def post(optimizer, args, kwargs):
            frame = frames.pop()
            if frame is not None:
                self.end(frame)
                if ends_step:
                    self.end_step()

        register_optimizer_step_pre_hook(pre)
        register_optimizer_step_post_hook(post)

    def end_step(self) -> None:
        counted = self.step == self.count_step
        if counted:
            flops = {p: sum(record[1] for record in self.ops[p].values()) for p in PHASES}
            self.steps.append({"counted": True, "flops": flops})
        else:
            self.steps.append({"counted": False, "cpu": dict(self.cpu)})
        self.cpu = defaultdict(float)
        self.step += 1

    def report(self, answer_tokens: list[float]) -> dict:
        return {
            "steps": [{**s, "answer_tokens": t} for s, t in zip(self.steps, answer_tokens)],
            "ops": {phase: dict(ops) for phase, ops in self.ops.items()},
            "mm_shapes": {phase: shapes for phase, shapes in self.mm_shapes.items()},
        }


def polopt_worker(steps: int, threads: int, overrides: list[str], step: Step) -> dict:
    recipe = load_recipe(threads)
    meter = PhaseMeter()
    cls = recipe.OnlineRLRecipe
    meter.wrap(cls, "rollout", "rollout", minus=("old_logprobs",))
    meter.wrap(cls, "_logprobs", "old_logprobs", within="rollout")  # π_old, recomputed inside the rollout
    meter.wrap(cls, "update_policy", "update", minus=("optimizer",), ends_step=True)
    meter.wrap(cls, "_optimizer_step", "optimizer", within="update")
    with tempfile.TemporaryDirectory() as tmp:
        history = run_recipe(recipe, steps, Path(tmp) / "run", overrides, step)
    tokens = [h["response/length_mean"] * step.prompts * step.answers for h in history if "time/step_s" in h]
    return meter.report(tokens)


def trl_worker(steps: int, threads: int, step: Step) -> dict:
    from trl import GRPOTrainer

    meter = PhaseMeter()
    meter.wrap(GRPOTrainer, "_generate_and_score_completions", "rollout", minus=("old_logprobs",))
    meter.wrap(GRPOTrainer, "_get_per_token_logps_and_entropies", "old_logprobs", within="rollout")
    meter.wrap(GRPOTrainer, "training_step", "update", minus=("rollout", "old_logprobs"))
    meter.wrap(GRPOTrainer, "_clip_grad_norm", "optimizer")
    meter.watch_optimizer_step(ends_step=True)  # TRL's step ends with its optimiser step, after training_step
    with tempfile.TemporaryDirectory() as tmp:
        trainer, verifier = trl_trainer(steps, threads, [], tmp, step)
        trainer.train()
    verifier.close()
    return meter.report(trl_answer_tokens(trainer, step))


def side_run(side: str, steps: int, threads: int, step: Step) -> dict:
    """Run one side in a child process (`--worker`): a fresh interpreter per side."""
    cmd = [sys.executable, __file__, "--worker", side, "--steps", str(steps), "--threads", str(threads), *step.cli()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_shapes(sides: dict, per_phase: int = 3) -> list[list]:
    """The matrix-product shapes (with layouts) that carry the most FLOPs: the top `per_phase` of
    every side's phases, and one large square product."""
    chosen: dict[str, list] = {}
    for side in sides.values():
        for shapes in side["mm_shapes"].values():
            for key, (flops, *shape) in sorted(shapes.items(), key=lambda kv: -kv[1][0])[:per_phase]:
                chosen.setdefault(key, shape)
    m, k, n, ta, tb = SQUARE
    chosen.setdefault(f"{m}x{k}x{n}", list(SQUARE))
    return [[key, *shape] for key, shape in chosen.items()]


def matmul_peak(threads: int, shapes: list[list]) -> dict:
    """fp32 matrix-product GFLOP/s at `threads` threads on `shapes` ([key, m, k, n, a transposed,
    b transposed]: the layouts the step's own products had); the best is the peak."""
    import torch

    torch.set_num_threads(threads)
    rates = {}
    for key, m, k, n, ta, tb in shapes:
        a = torch.randn(k, m).t() if ta else torch.randn(m, k)
        b = torch.randn(n, k).t() if tb else torch.randn(k, n)
        repeats = max(3, int(2e9 / (2 * m * k * n)))  # ~2 GFLOP per timing
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            best = min(best, (time.perf_counter() - start) / repeats)
        rates[key] = 2 * m * k * n / best / 1e9
    return {"gflops_by_shape": rates, "peak_gflops": max(rates.values())}


def categorise(ops: dict[str, list]) -> dict[str, list]:
    """{category: [seconds, flops, calls]} of one phase's ops."""
    out: dict[str, list] = {}
    for op, (seconds, flops, calls) in ops.items():
        name = next((c for c, test in CATEGORIES if test(op)), OTHER)
        record = out.setdefault(name, [0.0, 0, 0])
        record[0] += seconds
        record[1] += flops
        record[2] += calls
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))


def summarise(runs: list[dict]) -> dict:
    """One side's figures from its runs (each: steps, the counted step's ops and shapes)."""
    timed = [s for run in runs for s in run["steps"][1:] if not s["counted"]]
    counted = [s for run in runs for s in run["steps"] if s["counted"]]
    if not timed or not counted:
        raise RuntimeError("need a counted step and at least one timed step per run (--steps >= 2)")
    ops = runs[-1]["ops"]
    return {
        "cpu_seconds": {p: statistics.median(s["cpu"].get(p, 0.0) for s in timed) for p in PHASES},
        "flops": {p: counted[-1]["flops"].get(p, 0) for p in PHASES},
        "answer_tokens_timed": statistics.median(s["answer_tokens"] for s in timed),
        "answer_tokens_counted": counted[-1]["answer_tokens"],
        "op_seconds_counted": {p: sum(r[0] for r in ops.get(p, {}).values()) for p in PHASES},
        "categories": {p: categorise(ops[p]) for p in PHASES if p in ops},
        "top_ops": {p: dict(sorted(ops[p].items(), key=lambda kv: -kv[1][0])[:8]) for p in PHASES if p in ops},
        "mm_shapes": runs[-1]["mm_shapes"],
    }


def markdown(result: dict) -> str:
    env, peak = result["env"], result["matmul"]["peak_gflops"]
    threads = result["threads"]
    lines = [
        "# One RL step against the machine's arithmetic limit (benchmarks/step_roofline.py)",
        "",
        f"Machine: {env['platform']}, {env['cpus_usable']} CPUs usable; Python {env['python']}, torch {env['torch']}; "
        f"{env['date']}." + (f" 1-min load average at the end: {result['load_average_1min']:.1f}." if "load_average_1min" in result else ""),
        f"Command: `{env['command']}`",
        "",
        f"step_vs_trl's step ({result.get('step', '16 prompts × 8 answers, ≤ 48 new tokens')}, Dr.GRPO), "
        f"{result['rounds']} interleaved run(s) × {result['steps']} steps per side, {threads} torch thread(s). "
        "FLOPs: the first step of a run (its warm-up), counted op by op (torch.utils.flop_counter's formulas, "
        "attention included; the runs are seeded alike); CPU seconds: median over the other steps.",
        "",
        f"fp32 matrix-product rate at {threads} thread(s) on the step's largest shapes (m×k×n, /aT /bT: that operand "
        "a transposed view, as the step had it): "
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
            name = "**step**" if phase == "step" else PHASE_LABELS[phase]
            rate = flops / 1e9 / cpu if cpu > 0 else 0.0
            lines.append(f"| {side} | {name} | {flops / 1e9:.1f} | {cpu:.3f} | {rate:.0f} | {rate / peak:.0%} |")
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
    lines += [
        "",
        "## Where each phase's time goes (the counted step, op by op)",
        "",
        "Kernel seconds of the aten ops of the counted step (the warm-up, under the op meter), by category; "
        "'not in ops' = the phase's CPU seconds per timed step minus the ops' seconds: Python, autograd "
        "and glue (an estimate: two different steps). GFLOP/s of a category = its FLOPs / its kernel seconds.",
        "",
        "| side | phase | category | kernel s | share | GFLOP | GFLOP/s | of peak |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for side in SIDES:
        s = result["sides"][side]
        for phase in PHASES:
            categories = s["categories"].get(phase)
            if not categories:
                continue
            total = s["op_seconds_counted"][phase]
            for name, (seconds, flops, _) in categories.items():
                if seconds < 0.005 * total:
                    continue
                rate = flops / 1e9 / seconds if seconds > 0 and flops else 0.0
                lines.append(f"| {side} | {PHASE_LABELS[phase]} | {name} | {seconds:.3f} | {seconds / total:.0%} | "
                             f"{flops / 1e9:.1f} | {rate:.0f} | {rate / peak:.0%} |")
            rest = s["cpu_seconds"][phase] - total
            lines.append(f"| {side} | {PHASE_LABELS[phase]} | not in ops | {rest:.3f} | | | | |")
    lines += ["", "Largest ops (kernel seconds in the counted step): " + " ".join(
        f"{side}/{PHASE_LABELS[phase]}: " + ", ".join(f"{op} {r[0]:.2f}" for op, r in list(ops.items())[:5]) + ";"
        for side in SIDES for phase, ops in result["sides"][side]["top_ops"].items()), ""]
    if result.get("note"):
        lines += [result["note"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=7, help="steps per side: the first is counted (and warms up), the rest timed")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, interleaved; timed steps are pooled")
    parser.add_argument("--threads", type=int, default=1)
    add_step_arguments(parser)
    parser.add_argument("--name", help="results file stem (default step_roofline, step_roofline_smollm2 with smollm2_addition.yaml)")
    parser.add_argument("--note", default="", help="a sentence for the results file (e.g. the machine was shared)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (a counted step, then timed steps)")
    step = step_from_arguments(args)
    if args.worker:
        run = (trl_worker(args.steps, args.threads, step) if args.worker == "trl"
               else polopt_worker(args.steps, args.threads, POLOPT_SIDES[args.worker], step))
        print(json.dumps(run))
        return

    env = environment("cpu")
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        for side in SIDES[r % len(SIDES):] + SIDES[: r % len(SIDES)]:  # who goes first rotates
            run = side_run(side, args.steps, args.threads, step)
            runs[side].append(run)
            brief = summarise([run])
            print(f"round {r}: {side}: cpu {json.dumps(brief['cpu_seconds'])} flops {json.dumps(brief['flops'])}", flush=True)
    sides = {side: summarise(side_runs) for side, side_runs in runs.items()}
    matmul = matmul_peak(args.threads, peak_shapes(sides))
    trl_cpu = sum(sides["trl"]["cpu_seconds"].values())
    bounds = {}
    for side in POLOPT_SIDES:
        measured = sum(sides[side]["cpu_seconds"].values())
        least = sum(sides[side]["flops"].values()) / 1e9 / matmul["peak_gflops"]
        bounds[side] = {"measured_cpu_seconds": measured, "least_cpu_seconds": least,
                        "measured_ratio": trl_cpu / measured, "bound_ratio": trl_cpu / least}
    result = {"env": env, "config": step.config, "step": step.describe(), "rounds": args.rounds, "steps": args.steps,
              "threads": args.threads, "load_average_1min": os.getloadavg()[0], "matmul": matmul, "sides": sides,
              "bounds": bounds, "note": args.note}
    write_results(args.name or "step_roofline" + step.results_suffix, result, markdown(result))


if __name__ == "__main__":
    main()
