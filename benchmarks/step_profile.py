"""Where one RL step's time goes: the recipe run in-process under cProfile, phase by phase.

    python benchmarks/step_profile.py                      # step_vs_trl's step: 16 prompts x 8, 48 tokens, dr_grpo
    python benchmarks/step_profile.py --steps 4 --threads 1 --name step_profile_smoke

Runs `recipes/online_rl_distributed.py` with the same overrides as benchmarks/step_vs_trl.py for
`--steps` steps (the first is dropped: imports and warm-up) under cProfile with a CPU-time clock
(`time.process_time`, all of this process's threads), so the breakdown holds on a shared machine,
where wall-clock time mostly measures the neighbours. Verification runs in worker processes and
does not appear in this process's CPU time: it is reported as wall time of `MathVerifier.__call__`
(answers the parent decides itself, plain integers, cost CPU here instead). Phases, per step:

    rollout/generate     the engine's generate (prefill, decode steps, sampling)
    rollout/verify       MathVerifier.__call__ (wall)
    update/forward       the trainer's log-probs (response_logprobs) inside update_policy
    update/loss          the loss module
    update/backward      autograd
    update/optimizer     clip + AdamW step + LR schedule (_optimizer_step)
    other                the rest of the step: collate, metrics, logging, Python glue

Writes benchmarks/results/<name>.md and .json.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, environment, write_results  # noqa: E402
from step_vs_trl import ANSWERS, NEW_TOKENS, PROMPTS, polopt_arguments  # noqa: E402 - the same step

PHASES = {  # phase -> (file suffix, function name) as cProfile records them
    "rollout/generate": ("polopt/rollout/native.py", "generate"),
    "update/forward": ("polopt/policy.py", "response_logprobs"),
    "update/loss": ("polopt/losses/base.py", "forward"),
    "update/backward": ("torch/_tensor.py", "backward"),
    "update/optimizer": ("recipes/online_rl_distributed.py", "_optimizer_step"),
    "step": ("recipes/online_rl_distributed.py", "rollout"),
    "update": ("recipes/online_rl_distributed.py", "update_policy"),
}


def load_recipe(threads: int):
    """The recipe module, imported in this process with `threads` torch threads."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe", REPO / "recipes" / "online_rl_distributed.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def run_recipe(recipe, steps: int, out: Path, overrides: list[str], step=None) -> list[dict]:
    """step_vs_trl's step (default: the tiny model's; `step`: a `step_vs_trl.Step`) for `steps` steps
    through `recipe.recipe_main`; returns history.json."""
    sys.argv = ["recipes/online_rl_distributed.py", *polopt_arguments(steps, out, step), *overrides]
    try:
        recipe.recipe_main()
    except SystemExit as e:
        if e.code:
            raise
    return json.loads((out / "history.json").read_text())


def run(steps: int, threads: int, out: Path, overrides: list[str]) -> tuple[pstats.Stats, float, list[dict]]:
    recipe = load_recipe(threads)
    from polopt.verify import MathVerifier

    verify_wall = [0.0]
    call = MathVerifier.__call__

    def timed_call(self, completions, answers):
        start = time.perf_counter()
        try:
            return call(self, completions, answers)
        finally:
            verify_wall[0] += time.perf_counter() - start

    MathVerifier.__call__ = timed_call
    profiler = cProfile.Profile(timer=time.process_time)
    profiler.enable()
    history = run_recipe(recipe, steps, out, overrides)
    profiler.disable()
    return pstats.Stats(profiler), verify_wall[0], history


def phase_seconds(stats: pstats.Stats) -> dict[str, float]:
    found = {}
    for (file, _, name), (_, _, _, cumulative, _) in stats.stats.items():
        for phase, (suffix, function) in PHASES.items():
            if file.endswith(suffix) and name == function:
                found[phase] = found.get(phase, 0.0) + cumulative
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="step_profile")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides of the recipe (e.g. pack_sequences=true)")
    args = parser.parse_args()
    env = environment("cpu")  # before run() replaces sys.argv with the recipe's
    with tempfile.TemporaryDirectory() as tmp:
        stats, verify_wall, history = run(args.steps, args.threads, Path(tmp) / "run", args.overrides)
    # Cumulative CPU seconds over all steps (the first included: cProfile cannot drop it, so
    # the per-step figures below are over all steps, warm-up too).
    cpu = phase_seconds(stats)
    steps = args.steps
    train_cpu = cpu["step"] + cpu["update"]
    rows = {
        "rollout/generate": cpu.get("rollout/generate", 0.0),
        "rollout/rest (verify in parent, collate)": cpu["step"] - cpu.get("rollout/generate", 0.0),
        "update/forward": cpu.get("update/forward", 0.0),
        "update/loss": cpu.get("update/loss", 0.0),
        "update/backward": cpu.get("update/backward", 0.0),
        "update/optimizer": cpu.get("update/optimizer", 0.0),
        "update/rest": cpu["update"] - sum(cpu.get(k, 0.0) for k in ("update/forward", "update/loss", "update/backward", "update/optimizer")),
    }
    wall = [h["time/step_s"] for h in history if "time/step_s" in h][1:]
    result = {
        "environment": env,
        "steps": steps,
        "threads": args.threads,
        "cpu_seconds_per_step": {k: v / steps for k, v in rows.items()},
        "cpu_seconds_per_step_total": train_cpu / steps,
        "verify_wall_seconds_per_step": verify_wall / steps,
        "wall_seconds_per_step_median_after_first": sorted(wall)[len(wall) // 2] if wall else None,
        "load_average_1min": os.getloadavg()[0],
    }
    lines = [
        f"# Where the step's time goes (benchmarks/step_profile.py)\n",
        f"Machine: {result['environment']['platform']}, {result['environment']['cpus_usable']} CPUs; "
        f"torch {result['environment']['torch']}; {result['environment']['date']}; 1-min load average at the end "
        f"{result['load_average_1min']:.1f}.  ",
        f"Command: `{result['environment']['command']}`\n",
        f"step_vs_trl's step ({PROMPTS} prompts × {ANSWERS} answers, ≤ {NEW_TOKENS} new tokens, dr_grpo, filter off"
        f"{''.join(', ' + o for o in args.overrides)}), "
        f"{steps} steps, {args.threads} torch thread(s). CPU seconds of this process per step (cProfile with "
        "`time.process_time`, warm-up step included), which a busy machine does not inflate:\n",
        "| phase | CPU s / step | share |",
        "|---|---:|---:|",
    ]
    total = result["cpu_seconds_per_step_total"]
    for name, value in result["cpu_seconds_per_step"].items():
        lines.append(f"| {name} | {value:.3f} | {value / total:.0%} |")
    lines += [
        f"| **total (rollout + update)** | **{total:.3f}** | |",
        "",
        f"Verification in worker processes: {result['verify_wall_seconds_per_step']:.3f} s wall per step "
        "(`MathVerifier.__call__`, including answers decided in the parent).",
        f"Wall seconds per step (median after the first): {result['wall_seconds_per_step_median_after_first']:.3f}.",
    ]
    write_results(args.name, result, "\n".join(lines))


if __name__ == "__main__":
    main()
