"""One RL step, polopt's recipe vs TRL's GRPOTrainer, side by side in one run.

    python benchmarks/step_vs_trl.py                  # 3 rounds × 6 steps per side (first step of each run dropped)
    python benchmarks/step_vs_trl.py --rounds 1 --steps 2 --name step_vs_trl_smoke

The same step on both sides: the embedded tiny model (assets/tiny_arith, HF format), 16 prompts of
its training set × 8 answers, at most 48 new tokens, temperature 1, lr 1e-4, one optimiser step per
rollout, the Dr.GRPO loss — polopt `loss=dr_grpo` (A = r − r̂, token sums / (B·L)), TRL
`loss_type="dr_grpo", scale_rewards="none"` (the same loss: tests/test_integration_trl.py checks
their gradients agree) — and the same reward function, polopt's MathVerifier (one worker process).
polopt runs with the dynamic-sampling filter off (`filter.enabled=false`), so both sides generate
exactly 128 answers a step and train on all of them.

Three sides: polopt's recipe as configured, the same with `pack_sequences=true` (the update on
polopt/packing.py's layout), and TRL. Each runs in its own process (`tune run` for polopt; a
GRPOTrainer for TRL), rotating which goes first in each round so that a slow spell of the machine
hits all alike. A step is
timed from the start of its rollout to the end of its optimiser step: polopt's `time/step_s`
(history.json), TRL's on_step_begin → on_step_end callback. Reported: median seconds per step,
steps/s and generated tokens/s (answer tokens of the step / step time), and the median ratio
TRL time / polopt time over the rounds (> 1: polopt is faster). Each side also reports the CPU
seconds of its trainer process per step (`time.process_time`; polopt's `time/step_cpu_s`), whose
ratio a shared machine does not distort the way it does wall time — with `--threads 1`: with more,
OpenMP threads spin while they wait for a core, and that spinning is counted. (The MathVerifier decides
plain-integer answers in the calling process, the tiny task's, so on both sides verification is
inside that figure.)

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, environment, write_results  # noqa: E402

ASSETS = REPO / "assets" / "tiny_arith"
PROMPTS, ANSWERS, NEW_TOKENS, LR, SEED = 16, 8, 48, 1e-4, 0
# polopt's sides: the default recipe, and the update on the packed layout (polopt/packing.py).
POLOPT_SIDES = {"polopt": [], "polopt packed": ["pack_sequences=true"]}
SIDES = (*POLOPT_SIDES, "trl")


def polopt_arguments(steps: int, out: Path) -> list[str]:
    """The recipe's arguments for this step (after `tune run recipes/online_rl_distributed.py`)."""
    return [
        "--config", "configs/tiny_arith.yaml", "loss=dr_grpo", "filter.enabled=false",
        f"max_steps={steps}", f"rollout.num_prompts={PROMPTS}", f"rollout.num_samples={ANSWERS}",
        f"rollout.max_new_tokens={NEW_TOKENS}", f"optimizer.lr={LR}", f"seed={SEED}",
        "validation.source=", "checkpoint_every_n_steps=0", "save_final_model=false", f"output_dir={out}",
    ]


def polopt_steps(steps: int, threads: int, overrides: list[str]) -> list[dict]:
    """`tune run` the recipe for `steps` steps; per step: seconds and answer tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [str(Path(sys.executable).with_name("tune")), "run", "recipes/online_rl_distributed.py",
               *polopt_arguments(steps, out), *overrides]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"polopt run failed:\n{proc.stderr[-3000:]}")
        history = json.loads((out / "history.json").read_text())
    return [
        {"seconds": h["time/step_s"], "cpu_seconds": h["time/step_cpu_s"],
         "answer_tokens": h["response/length_mean"] * PROMPTS * ANSWERS}
        for h in history if "time/step_s" in h
    ]


def trl_steps(steps: int, threads: int) -> list[dict]:
    """The same step through TRL's GRPOTrainer, in a child process (`--trl-worker`)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--trl-worker", "--steps", str(steps), "--threads", str(threads)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)},
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"TRL run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trl_trainer(steps: int, threads: int, callbacks: list, output_dir: str):
    """TRL's GRPOTrainer set up for this step (the same model, prompts, reward and loss); returns
    (trainer, verifier): the caller trains, then closes the verifier."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from polopt.prompts import load_rows
    from polopt.verify import MathVerifier

    torch.set_num_threads(threads)
    rows = load_rows(str(ASSETS / "train.jsonl"))
    dataset = Dataset.from_list([{"prompt": r["question"], "answer": r["answer"]} for r in rows])
    verifier = MathVerifier(timeout_s=5.0, num_workers=1)

    def math_reward(completions, answer, **_):
        return verifier(list(completions), list(answer))

    args = GRPOConfig(
        output_dir=output_dir, per_device_train_batch_size=PROMPTS * ANSWERS, num_generations=ANSWERS,
        max_completion_length=NEW_TOKENS, temperature=1.0, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0,
        loss_type="dr_grpo", scale_rewards="none", beta=0.0, num_iterations=1, gradient_accumulation_steps=1,
        max_steps=steps, seed=SEED, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(ASSETS, dtype=torch.float32),
        reward_funcs=math_reward, args=args, train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(ASSETS), callbacks=callbacks,
    )
    return trainer, verifier


def trl_answer_tokens(trainer) -> list[float]:
    """Answer tokens of each logged step (TRL logs the mean completion length)."""
    return [e["completions/mean_length"] * PROMPTS * ANSWERS for e in trainer.state.log_history
            if "completions/mean_length" in e]


def trl_worker(steps: int, threads: int) -> None:
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append({"seconds": time.perf_counter() - self.start, "cpu_seconds": time.process_time() - self.start_cpu})

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, verifier = trl_trainer(steps, threads, [timer], tmp)
        trainer.train()
    verifier.close()
    for step, tokens in zip(timer.steps, trl_answer_tokens(trainer)):
        step["answer_tokens"] = tokens
    print(json.dumps(timer.steps))


def summarise(steps: list[dict]) -> dict:
    seconds = statistics.median(s["seconds"] for s in steps)
    tokens = statistics.median(s["answer_tokens"] / s["seconds"] for s in steps)
    return {"seconds_per_step": seconds, "steps_per_second": 1 / seconds, "answer_tokens_per_second": tokens,
            "cpu_seconds_per_step": statistics.median(s["cpu_seconds"] for s in steps)}


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [
        "# One RL step: polopt vs TRL GRPOTrainer (benchmarks/step_vs_trl.py)",
        "",
        f"Machine: {env['platform']}, {env['cpus_usable']} CPUs usable; Python {env['python']}, torch {env['torch']}, "
        f"TRL {result['trl_version']}, transformers {result['transformers_version']}; {env['date']}.",
        f"Command: `{env['command']}`",
        "",
        f"Tiny model, {PROMPTS} prompts × {ANSWERS} answers, ≤ {NEW_TOKENS} new tokens, Dr.GRPO loss, MathVerifier reward, "
        f"{result['rounds']} rounds × {result['steps']} steps per side (first step of each run dropped), "
        f"{result['threads']} torch threads.",
        "",
        "| side | s / step (median) | steps / s | answer tokens / s | CPU s / step (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for side in SIDES:
        s = result["sides"][side]
        lines.append(f"| {side} | {s['seconds_per_step']:.3f} | {s['steps_per_second']:.3f} | "
                     f"{s['answer_tokens_per_second']:.0f} | {s['cpu_seconds_per_step']:.3f} |")
    lines += ["", "`polopt packed` is the same recipe with `pack_sequences=true` (the update's forward and backward on "
              "polopt/packing.py's layout: each prompt once, no padding).", ""]
    trl_cpu = result["sides"]["trl"]["cpu_seconds_per_step"]
    for side in POLOPT_SIDES:
        ratios = result["round_speedups"][side]
        lines.append(
            f"- {side} over TRL (TRL s/step ÷ {side} s/step): median {statistics.median(ratios):.2f}× "
            f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}); in CPU seconds of the trainer process "
            f"{trl_cpu / result['sides'][side]['cpu_seconds_per_step']:.2f}×."
        )
    lines += [
        "",
        "CPU seconds are `time.process_time` of the trainer process (what a busy machine does not inflate; the "
        "verifier's worker processes are not in it, and every side uses the same MathVerifier).",
        "",
    ]
    if result.get("note"):
        lines += [result["note"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="steps per run; the first is dropped as warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="step_vs_trl", help="results file stem")
    parser.add_argument("--note", default="", help="a sentence for the results file (e.g. the machine was shared)")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step of each run is dropped)")
    if args.trl_worker:
        return trl_worker(args.steps, args.threads)

    import transformers
    import trl

    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    round_speedups: dict[str, list[float]] = {side: [] for side in POLOPT_SIDES}
    for r in range(args.rounds):
        order = SIDES[r % len(SIDES):] + SIDES[: r % len(SIDES)]  # who goes first rotates
        this_round = {}
        for side in order:
            if side == "trl":
                steps = trl_steps(args.steps, args.threads)[1:]
            else:
                steps = polopt_steps(args.steps, args.threads, POLOPT_SIDES[side])[1:]
            this_round[side] = summarise(steps)["seconds_per_step"]
            runs[side] += steps
            print(f"round {r}: {side:13s} {this_round[side]:.3f} s/step", flush=True)
        for side in POLOPT_SIDES:
            round_speedups[side].append(this_round["trl"] / this_round[side])
    result = {
        "env": environment("cpu"), "trl_version": trl.__version__, "transformers_version": transformers.__version__,
        "rounds": args.rounds, "steps": args.steps, "threads": args.threads,
        "sides": {side: summarise(runs[side]) for side in SIDES},
        "round_speedups": round_speedups,
        "speedup": {side: statistics.median(r) for side, r in round_speedups.items()}, "note": args.note,
        "raw": runs,
    }
    write_results(args.name, result, markdown(result))


if __name__ == "__main__":
    main()
