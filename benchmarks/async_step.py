"""Steps per second and idle fractions with stale rollouts (`rollout.max_staleness` k = 0, 1, 2) on
this CPU, and a model of what overlapping rollout and update buys where the two have their own
devices.

    python benchmarks/async_step.py                      # the committed run: k = 0 1 2, 3 rounds × 20 steps
    python benchmarks/async_step.py --staleness 0 1 --steps 4 --rounds 1 --name async_step_smoke

Each k is one `tune run` of recipes/online_rl_distributed.py on configs/tiny_arith.yaml with the small
batch of tests/test_async_rollout.py (8 prompts × 4 answers, 2 mini-batches, no validation, no
checkpoints), `recompute_old_logprobs=true`, `num_threads=1` (the trainer's torch threads, and the
producer process's), one after the other in this invocation, the k's interleaved over rounds.
From each run's history.json, over the steps after the first (its warm-up):

    s/step           time/step_s (the trainer's loop: rollout + update + weight push)
    trainer wait     time/trainer_wait_s / time/step_s: the trainer blocked on the producer (k ≥ 1)
    producer idle    time/producer_idle_s / time/step_s: the producer blocked on the weights it needs (k ≥ 1)
    rollout s        time/rollout_s: at k = 0 generation + verification + π_old recompute; at k ≥ 1
                     the wait + π_old recompute

At k = 0 the trainer generates itself (no wait, no producer process); its "producer" (the engine)
is idle for the whole update. The two processes of k ≥ 1 compete for this machine's 2 cores with
each other, with the verifier's worker and with whatever else runs: the table says what overlap
buys *here*; the model below what it buys with the rollout and the update on their own devices.

Model: rollout time R, update time U (π_old recompute, update, weight push). Synchronous: R + U per
step. Asynchronous (k ≥ 1, producer and trainer on their own devices, steady state): max(R, U) per
step, a speed-up of (R + U) / max(R, U) ≤ 2, reached at R = U. R and U: the tiny config's from the
k = 0 run here (R = time/rollout_s, U = time/step_s − R; R includes the π_old recompute, a trainer
forward, so R is slightly over and U slightly under); SmolLM2-135M's from the committed
benchmarks/results/step_roofline_smollm2.json (CPU seconds per phase at 1 thread: R = rollout,
U = old log-probs + update + optimizer; with and without packing). CPU ratios: on a GPU decoding is
memory-bound and R/U is usually larger; the model takes whatever R and U a machine measures.

Writes benchmarks/results/<name>.json and .md with the machine, versions, date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, environment, write_results  # benchmarks/ is on sys.path when run as a script

TUNE = str(Path(sys.executable).parent / "tune")
CONFIG = "configs/tiny_arith.yaml"
# tests/test_async_rollout.py's STALE, without checkpoints, with the DiskLogger.
OVERRIDES = [
    "validation.source=null", "save_final_model=false", "checkpoint_every_n_steps=null", "num_threads=1",
    "recompute_old_logprobs=true", "rollout_correction.enabled=true", "rollout.num_prompts=8", "rollout.num_samples=4",
    "filter.gen_batch_size=8",
    "filter.max_gen_batches=2", "num_minibatches=2",
    "metric_logger._component_=torchtune.training.metric_logging.DiskLogger",
]
ROOFLINE_SMOLLM2 = "benchmarks/results/step_roofline_smollm2.json"


def run(k: int, steps: int, output_dir: Path, extra: list[str]) -> dict:
    """One `tune run` at staleness k; its per-step times from history.json."""
    overrides = [f"output_dir={output_dir}", *OVERRIDES, f"max_steps={steps}", f"rollout.max_staleness={k}", *extra]
    cmd = [TUNE, "run", "recipes/online_rl_distributed.py", "--config", CONFIG, *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"k={k}: tune run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    history = [h for h in json.loads((output_dir / "history.json").read_text()) if "time/step_s" in h]
    timed = history[1:]  # the first step is the warm-up (and, at k ≥ 1, the producer's start)
    keys = ("time/step_s", "time/step_cpu_s", "time/rollout_s", "time/trainer_wait_s", "time/producer_idle_s")
    return {
        "command": " ".join(["PYTHONPATH=.", ".venv/bin/tune", *cmd[1:]]).replace(str(output_dir), "<tmp>/round<i>_k<k>"),
        "process_wall_s": wall,
        "load_average_1min_before": load_before,
        "steps_per_s": len(timed) / sum(h["time/step_s"] for h in timed),
        "staleness": [h.get("rollout/staleness", 0.0) for h in history],
        "reward_mean": [h.get("reward/mean") for h in history],
        "timed": {key: [h.get(key, 0.0) for h in timed] for key in keys},
    }


def summary(k: int, rounds: list[dict]) -> dict:
    """The runs of staleness k: steps/s per round and their median; times pooled over the rounds' timed steps."""
    pooled = {key: [x for r in rounds for x in r["timed"][key]] for key in rounds[0]["timed"]}
    step_s = sum(pooled["time/step_s"])
    rest = [s - r for s, r in zip(pooled["time/step_s"], pooled["time/rollout_s"])]
    return {
        "max_staleness": k,
        "steps": len(rounds[0]["staleness"]),
        "timed_steps": len(pooled["time/step_s"]),
        "command": rounds[0]["command"],
        "steps_per_s_rounds": [r["steps_per_s"] for r in rounds],
        "steps_per_s": statistics.median(r["steps_per_s"] for r in rounds),
        "process_wall_s": statistics.median(r["process_wall_s"] for r in rounds),
        "step_s_median": statistics.median(pooled["time/step_s"]),
        "step_cpu_s_median": statistics.median(pooled["time/step_cpu_s"]),
        "rollout_s_median": statistics.median(pooled["time/rollout_s"]),
        "rest_s_median": statistics.median(rest),
        "trainer_wait_fraction": sum(pooled["time/trainer_wait_s"]) / step_s if k else None,
        "producer_idle_fraction": sum(pooled["time/producer_idle_s"]) / step_s if k else None,
        "staleness": rounds[0]["staleness"],
        "rounds": rounds,
    }


def smollm2_phases() -> dict:
    """R and U (CPU seconds per step) of SmolLM2-135M from the committed roofline run."""
    data = json.loads((REPO / ROOFLINE_SMOLLM2).read_text())
    out = {}
    for side in ("polopt", "polopt packed"):
        seconds = data["sides"][side]["cpu_seconds"]
        out[side] = {"R": seconds["rollout"], "U": seconds["old_logprobs"] + seconds["update"] + seconds["optimizer"]}
    return {"source": ROOFLINE_SMOLLM2, "date": data["env"]["date"], "threads": data["threads"], "step": data["step"],
            "sides": out}


def model(R: float, U: float) -> dict:
    return {"R": R, "U": U, "R_over_U": R / U, "sync_step": R + U, "async_step": max(R, U),
            "speedup": (R + U) / max(R, U)}


def markdown(result: dict) -> str:
    env, runs = result["env"], result["runs"]
    base = runs[0]
    lines = [
        "# Stale rollouts: steps/s and idle time for k = " + ", ".join(str(r["max_staleness"]) for r in runs)
        + " (benchmarks/async_step.py)", "",
        f"Machine: {env['platform']}, {env['cpus_usable']} CPUs usable; Python {env['python']}, torch {env['torch']}, "
        f"torchtune {result['torchtune']}; {env['date']}. 1-min load average at the start / end: "
        f"{result['load_average_start']:.2f} / {result['load_average_end']:.2f}.",
        f"Command: `{env['command']}`", "",
        f"Each run: `{runs[0]['command'].replace(' rollout.max_staleness=0', ' rollout.max_staleness=k')}`.",
        f"{result['rounds']} interleaved round(s) (each k in turn, then again); timed: steps 2 … {runs[0]['steps']} of each"
        " run (the first is its warm-up). steps/s: median over rounds of (timed steps / their Σ time/step_s) (the"
        " rounds' values in the JSON); the other columns pool the rounds' timed steps.", "",
        "| k | staleness per step | steps/s | s/step (median) | trainer CPU s/step | rollout s (median) "
        "| rest of the step s (median) | trainer wait | producer idle | process wall s (median) | vs k=0 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        frac = lambda x: "—" if x is None else f"{100 * x:.0f}%"  # noqa: E731
        lines.append(
            f"| {r['max_staleness']} | {' '.join(str(int(s)) for s in r['staleness'])} | {r['steps_per_s']:.3f} "
            f"| {r['step_s_median']:.3f} | {r['step_cpu_s_median']:.3f} | {r['rollout_s_median']:.3f} "
            f"| {r['rest_s_median']:.3f} | {frac(r['trainer_wait_fraction'])} | {frac(r['producer_idle_fraction'])} "
            f"| {r['process_wall_s']:.1f} | {r['steps_per_s'] / base['steps_per_s']:.2f}× |"
        )
    lines += [
        "",
        "trainer wait = Σ time/trainer_wait_s / Σ time/step_s (the trainer blocked on the producer); producer idle ="
        " Σ time/producer_idle_s / Σ time/step_s (the producer blocked on the weights of the version it must"
        " generate with). At k = 0 neither is logged: the trainer generates itself (its rollout time is all"
        " generation, no waiting) and its engine is idle for the rest of the step. rollout s at k ≥ 1 = the wait"
        " + the π_old recompute.", "",
        "## What overlap buys here", "",
        *result["reading"], "",
        "## Model: rollout and update on their own devices", "",
        "Per step, rollout time R and update time U: synchronous R + U, asynchronous (k ≥ 1, steady state)"
        " max(R, U); speed-up (R + U) / max(R, U), at most 2 (at R = U). Weight pushes and the π_old recompute"
        " are in U; what the producer and the trainer would share (a bus, host memory) is not modelled.", "",
        "| workload | R s | U s | R/U | sync s/step | async s/step | predicted speed-up | source |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["model"]:
        m = row["model"]
        lines.append(f"| {row['workload']} | {m['R']:.3f} | {m['U']:.3f} | {m['R_over_U']:.2f} | {m['sync_step']:.3f} "
                     f"| {m['async_step']:.3f} | {m['speedup']:.2f}× | {row['source']} |")
    lines += ["", *result["model_notes"]]
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines)


def readings(runs: list[dict], tiny: dict) -> list[str]:
    """What the table says, in sentences (from the numbers, so a rerun rewrites them)."""
    base = runs[0]
    lines = []
    for r in runs[1:]:
        slower = r["rest_s_median"] > 1.2 * base["rest_s_median"]
        lines.append(
            f"- k = {r['max_staleness']}: {r['steps_per_s'] / base['steps_per_s']:.2f}× the steps/s of k = 0"
            f" (rounds: {', '.join(f'{x:.2f}' for x in r['steps_per_s_rounds'])} against"
            f" {', '.join(f'{x:.2f}' for x in base['steps_per_s_rounds'])}); the trainer waits"
            f" {100 * r['trainer_wait_fraction']:.0f}% of its step, the producer is idle"
            f" {100 * r['producer_idle_fraction']:.0f}%. The trainer's own CPU per step falls from"
            f" {base['step_cpu_s_median']:.3f} to {r['step_cpu_s_median']:.3f} s (generation moved out);"
            f" the rest of its step (π_old, update, push) takes {r['rest_s_median']:.3f} s against"
            f" {base['rest_s_median']:.3f} s at k = 0"
            + (": it runs beside the producer on shared cores, and slows." if slower else "."))
    lines.append(
        f"- The model below predicts {tiny['speedup']:.2f}× for this config with its own devices. Here the trainer "
        "(1 torch thread), the producer process (1 torch thread) and the verifier's worker share 2 cores"
        " with each other and with other users of the machine, so overlap can at best use the second core;"
        " the π_old recompute, the weight copies pushed through a queue and the producer's own process are"
        " extra work that the synchronous run does not do.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loss", default="nft")
    parser.add_argument("--name", default="async_step")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    if args.staleness[0] != 0:
        raise SystemExit("--staleness must start with 0 (the synchronous baseline the others are compared to)")

    import torchtune

    load_start = os.getloadavg()[0]
    rounds: dict[int, list[dict]] = {k: [] for k in args.staleness}
    with tempfile.TemporaryDirectory(prefix="async_step_") as tmp:
        for i in range(args.rounds):  # interleaved, so that a change in the machine's load hits every k alike
            for k in args.staleness:
                r = run(k, args.steps, Path(tmp) / f"round{i}_k{k}", [f"loss={args.loss}"])
                rounds[k].append(r)
                print(f"round {i + 1}/{args.rounds}, k={k}: {r['steps_per_s']:.3f} steps/s, "
                      f"staleness {[int(s) for s in r['staleness']]}", flush=True)
    runs = [summary(k, rounds[k]) for k in args.staleness]
    base = runs[0]
    tiny = model(base["rollout_s_median"], base["rest_s_median"])
    reading = readings(runs, tiny)
    smollm2 = smollm2_phases()
    rows = [{"workload": "tiny_arith, this run's k = 0 (8 prompts × 4 answers, 2 mini-batches)",
             "source": "this run (time/rollout_s; time/step_s − time/rollout_s), median", "model": tiny}]
    for side, phases in smollm2["sides"].items():
        rows.append({"workload": f"SmolLM2-135M, {side}" + (" (pack_sequences=true)" if "packed" in side else "")
                     + f": {smollm2['step']}", "source": f"{smollm2['source']} ({smollm2['date']}, CPU s at "
                     f"{smollm2['threads']} thread)", "model": model(phases["R"], phases["U"])})
    ratios = " and ".join(f"{row['model']['R_over_U']:.2f}" for row in rows[1:])
    notes = [
        "The SmolLM2 figures are CPU seconds of one process at 1 thread (R = generation, reward, collate;"
        f" U = old log-probs + update + optimizer): the update dominates (R/U = {ratios}), so overlap can hide at"
        " most the rollout. On a GPU decoding is memory-bound and long answers make R the larger term; the"
        " speed-up is the same formula with that machine's R and U.",
    ]
    result = {
        "env": environment("cpu"), "torchtune": torchtune.__version__, "config": CONFIG, "overrides": OVERRIDES,
        "steps": args.steps, "rounds": args.rounds, "loss": args.loss,
        "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
        "runs": runs, "reading": reading, "model": rows, "model_notes": notes, "smollm2_source": smollm2,
        "note": args.note,
    }
    write_results(args.name, result, markdown(result))


if __name__ == "__main__":
    main()
