"""One RL step, polopt's recipe vs TRL's GRPOTrainer, side by side in one run.

    python benchmarks/step_vs_trl.py                  # 3 rounds × 6 steps per side (first step of each run dropped)
    python benchmarks/step_vs_trl.py --rounds 1 --steps 2 --name step_vs_trl_smoke
    python benchmarks/step_vs_trl.py --config configs/smollm2_addition.yaml   # SmolLM2-135M-Instruct, chat prompts

The step is the training config's (`--config`, default configs/tiny_arith.yaml): its model folder,
training set and prompt template, prompts × answers, new tokens, temperature, top_p and learning
rate, with the loss set to Dr.GRPO on both sides. With tiny_arith.yaml that is the embedded tiny
model (assets/tiny_arith, HF format), 16 prompts of its training set × 8 answers, at most 48 new
tokens, temperature 1, lr 1e-4; with smollm2_addition.yaml SmolLM2-135M-Instruct
(assets/smollm2-135m-instruct, `make smollm2`), 8 chat-templated addition questions × 8 answers,
at most 32 new tokens, temperature 0.7, lr 1e-5 (its NFT loss replaced by Dr.GRPO, which TRL's
GRPOTrainer has; a loss costs milliseconds next to the model, benchmarks/results/loss_overhead.md).
TRL loads the same HF folder with transformers; a chat template becomes TRL's conversational
prompts ([{"role": "user", ...}], rendered by the folder's chat template: the same tokens as
polopt's `chat` template, tests/test_benchmarks_real_model.py). Common to both: one optimiser step
per rollout, the Dr.GRPO loss — polopt `loss=dr_grpo` (A = r − r̂, token sums / (B·L)), TRL
`loss_type="dr_grpo", scale_rewards="none"` (the same loss: tests/test_integration_trl.py checks
their gradients agree) — and the same reward function, polopt's MathVerifier (one worker process).
polopt runs with the dynamic-sampling filter off (`filter.enabled=false`), so both sides generate
exactly prompts × answers answers a step (128 on the tiny model) and train on all of them.
Each side keeps its own memory setting: TRL's GRPOConfig turns gradient checkpointing on by default
(the forward is run again in the backward: on SmolLM2 about 1 of its update's 4.7 TFLOP), polopt's
configs leave activation checkpointing off; `--no-trl-gradient-checkpointing` gives TRL polopt's.

Three sides (`--sides` picks; TRL always runs): polopt's recipe as configured, the same with
`pack_sequences=true` (the update on polopt/packing.py's layout), and TRL. Each runs in its own
process (`tune run` for polopt; a GRPOTrainer for TRL), rotating which goes first in each round so
that a slow spell of the machine hits all alike. A step is timed from the start of its rollout to the end of its optimiser step: polopt's `time/step_s`
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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, environment, write_results  # noqa: E402

PROMPTS, ANSWERS, NEW_TOKENS, LR, SEED = 16, 8, 48, 1e-4, 0  # the tiny step (tiny_arith.yaml's rollout and lr)
DEFAULT_CONFIG = "configs/tiny_arith.yaml"
# polopt's sides: the default recipe, and the update on the packed layout (polopt/packing.py).
POLOPT_SIDES = {"polopt": [], "polopt packed": ["pack_sequences=true"]}
SIDES = (*POLOPT_SIDES, "trl")


@dataclass(frozen=True)
class Step:
    """One RL step as a training config defines it: model folder, prompts, batch, lengths, lr."""

    config: str  # relative to the repository root, as `tune run --config` takes it
    model_dir: Path
    train_source: str
    template: str
    prompts: int
    answers: int
    new_tokens: int
    temperature: float
    top_p: float
    lr: float
    seed: int = SEED
    # TRL's GRPOConfig default (True) recomputes the forward in the backward; polopt's configs do not
    # (enable_activation_checkpointing: false): one more forward of the trunk per update on TRL's side.
    trl_gradient_checkpointing: bool = True

    @classmethod
    def from_config(cls, config: str = DEFAULT_CONFIG, prompts: int | None = None, answers: int | None = None,
                    new_tokens: int | None = None, trl_gradient_checkpointing: bool = True) -> "Step":
        """The config's step; `prompts`, `answers`, `new_tokens` shrink it (smoke runs, tests)."""
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(REPO / config)
        return cls(
            config=config, model_dir=REPO / cfg.model_dir, train_source=str(REPO / cfg.dataset.source),
            template=cfg.dataset.get("template") or "{question}", prompts=prompts or int(cfg.rollout.num_prompts),
            answers=answers or int(cfg.rollout.num_samples), new_tokens=new_tokens or int(cfg.rollout.max_new_tokens),
            temperature=float(cfg.rollout.temperature), top_p=float(cfg.rollout.get("top_p", 1.0)),
            lr=float(cfg.optimizer.lr), trl_gradient_checkpointing=trl_gradient_checkpointing,
        )

    def cli(self) -> list[str]:
        """The options that give this step to a child process."""
        return ["--config", self.config, "--prompts", str(self.prompts), "--answers", str(self.answers),
                "--new-tokens", str(self.new_tokens),
                "--trl-gradient-checkpointing" if self.trl_gradient_checkpointing else "--no-trl-gradient-checkpointing"]

    @property
    def name(self) -> str:
        return Path(self.config).stem

    @property
    def results_suffix(self) -> str:
        """'' for the tiny step (the historical file names), else '_' + the config's first word ('_smollm2')."""
        return "" if self.config == DEFAULT_CONFIG else "_" + self.name.split("_")[0]

    def describe(self) -> str:
        model = "Tiny model (assets/tiny_arith)" if self.config == DEFAULT_CONFIG else f"{self.model_dir.name} ({self.config})"
        return (f"{model}, {self.prompts} prompts × {self.answers} answers, ≤ {self.new_tokens} new tokens, "
                f"temperature {self.temperature:g}, template `{self.template}`; TRL gradient checkpointing "
                + ("on (its default)" if self.trl_gradient_checkpointing else "off (as polopt)"))


def polopt_arguments(steps: int, out: Path, step: Step | None = None) -> list[str]:
    """The recipe's arguments for this step (after `tune run recipes/online_rl_distributed.py`)."""
    step = step or Step.from_config()
    return [
        "--config", step.config, "loss=dr_grpo", "filter.enabled=false",
        f"max_steps={steps}", f"rollout.num_prompts={step.prompts}", f"rollout.num_samples={step.answers}",
        f"rollout.max_new_tokens={step.new_tokens}", f"rollout.temperature={step.temperature}",
        f"rollout.top_p={step.top_p}", f"optimizer.lr={step.lr}", f"seed={step.seed}",
        "validation.source=", "checkpoint_every_n_steps=0", "save_final_model=false", f"output_dir={out}",
    ]


def polopt_steps(steps: int, threads: int, overrides: list[str], step: Step | None = None) -> list[dict]:
    """`tune run` the recipe for `steps` steps; per step: seconds and answer tokens."""
    step = step or Step.from_config()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [str(Path(sys.executable).with_name("tune")), "run", "recipes/online_rl_distributed.py",
               *polopt_arguments(steps, out, step), *overrides]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"polopt run failed:\n{proc.stderr[-3000:]}")
        history = json.loads((out / "history.json").read_text())
    return [
        {"seconds": h["time/step_s"], "cpu_seconds": h["time/step_cpu_s"],
         "answer_tokens": h["response/length_mean"] * step.prompts * step.answers}
        for h in history if "time/step_s" in h
    ]


def trl_steps(steps: int, threads: int, step: Step | None = None) -> list[dict]:
    """The same step through TRL's GRPOTrainer, in a child process (`--trl-worker`)."""
    step = step or Step.from_config()
    proc = subprocess.run(
        [sys.executable, __file__, "--trl-worker", "--steps", str(steps), "--threads", str(threads), *step.cli()],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)},
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"TRL run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trl_prompt(template: str, question: str):
    """The prompt TRL gets for `question` under polopt's `template`: a conversation for a chat
    template (TRL renders it with the folder's chat template, generation prompt open), else the
    filled-in text."""
    from polopt.prompts import ChatPrompt, resolve_template

    resolved = resolve_template(template)
    if isinstance(resolved, ChatPrompt):
        return [{"role": "user", "content": resolved.user.replace("{question}", question)}]
    return resolved.replace("{question}", question)


def trl_trainer(steps: int, threads: int, callbacks: list, output_dir: str, step: Step | None = None):
    """TRL's GRPOTrainer set up for this step (the same model, prompts, reward and loss); returns
    (trainer, verifier): the caller trains, then closes the verifier."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from polopt.prompts import load_rows
    from polopt.verify import MathVerifier

    step = step or Step.from_config()
    torch.set_num_threads(threads)
    rows = load_rows(step.train_source)
    dataset = Dataset.from_list([{"prompt": trl_prompt(step.template, r["question"]), "answer": r["answer"]} for r in rows])
    verifier = MathVerifier(timeout_s=5.0, num_workers=1)

    def math_reward(completions, answer, **_):
        # conversational prompts get conversational completions: [{"role": "assistant", "content": text}]
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return verifier(texts, list(answer))

    args = GRPOConfig(
        output_dir=output_dir, per_device_train_batch_size=step.prompts * step.answers, num_generations=step.answers,
        max_completion_length=step.new_tokens, temperature=step.temperature, top_p=step.top_p, learning_rate=step.lr,
        lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0,
        loss_type="dr_grpo", scale_rewards="none", beta=0.0, num_iterations=1, gradient_accumulation_steps=1,
        max_steps=steps, seed=step.seed, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        gradient_checkpointing=step.trl_gradient_checkpointing,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(step.model_dir, dtype=torch.float32),
        reward_funcs=math_reward, args=args, train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(step.model_dir), callbacks=callbacks,
    )
    return trainer, verifier


def trl_answer_tokens(trainer, step: Step | None = None) -> list[float]:
    """Answer tokens of each logged step (TRL logs the mean completion length)."""
    step = step or Step.from_config()
    return [e["completions/mean_length"] * step.prompts * step.answers for e in trainer.state.log_history
            if "completions/mean_length" in e]


def trl_worker(steps: int, threads: int, step: Step) -> None:
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
        trainer, verifier = trl_trainer(steps, threads, [timer], tmp, step)
        trainer.train()
    verifier.close()
    for timed, tokens in zip(timer.steps, trl_answer_tokens(trainer, step)):
        timed["answer_tokens"] = tokens
    print(json.dumps(timer.steps))


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="the training config whose step is run (model, data, template, batch, lengths, lr)")
    parser.add_argument("--prompts", type=int, help="prompts per step (default: the config's rollout.num_prompts)")
    parser.add_argument("--answers", type=int, help="answers per prompt (default: the config's rollout.num_samples)")
    parser.add_argument("--new-tokens", type=int, help="at most this many new tokens (default: the config's rollout.max_new_tokens)")
    parser.add_argument("--trl-gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="TRL's gradient checkpointing (default on: GRPOConfig's default; polopt's configs have it off)")


def step_from_arguments(args) -> Step:
    return Step.from_config(args.config, args.prompts, args.answers, args.new_tokens, args.trl_gradient_checkpointing)


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
        f"{result.get('step', 'Tiny model, 16 prompts × 8 answers, ≤ 48 new tokens')}, Dr.GRPO loss, MathVerifier reward, "
        f"{result['rounds']} rounds × {result['steps']} steps per side (first step of each run dropped), "
        f"{result['threads']} torch threads.",
        "",
        "| side | s / step (median) | steps / s | answer tokens / s | CPU s / step (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for side, s in result["sides"].items():
        lines.append(f"| {side} | {s['seconds_per_step']:.3f} | {s['steps_per_second']:.3f} | "
                     f"{s['answer_tokens_per_second']:.0f} | {s['cpu_seconds_per_step']:.3f} |")
    if "polopt packed" in result["sides"]:
        lines += ["", "`polopt packed` is the same recipe with `pack_sequences=true` (the update's forward and backward "
                  "on polopt/packing.py's layout: each prompt once, no padding)."]
    lines += ["", "Answer tokens per step (median): " + "; ".join(
        f"{side} {statistics.median(s['answer_tokens'] for s in result['raw'][side]):.0f}" for side in result["sides"]) + ".", ""]
    trl_cpu = result["sides"]["trl"]["cpu_seconds_per_step"]
    for side in result["round_speedups"]:
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
    add_step_arguments(parser)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="sides to run (trl always runs)")
    parser.add_argument("--name", help="results file stem (default step_vs_trl, step_vs_trl_smollm2 with smollm2_addition.yaml)")
    parser.add_argument("--note", default="", help="a sentence for the results file (e.g. the machine was shared)")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step of each run is dropped)")
    step = step_from_arguments(args)
    if args.trl_worker:
        return trl_worker(args.steps, args.threads, step)
    name = args.name or "step_vs_trl" + step.results_suffix

    import transformers
    import trl

    sides = tuple(side for side in SIDES if side in args.sides or side == "trl")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    round_speedups: dict[str, list[float]] = {side: [] for side in sides if side != "trl"}
    for r in range(args.rounds):
        order = sides[r % len(sides):] + sides[: r % len(sides)]  # who goes first rotates
        this_round = {}
        for side in order:
            if side == "trl":
                steps = trl_steps(args.steps, args.threads, step)[1:]
            else:
                steps = polopt_steps(args.steps, args.threads, POLOPT_SIDES[side], step)[1:]
            this_round[side] = summarise(steps)["seconds_per_step"]
            runs[side] += steps
            print(f"round {r}: {side:13s} {this_round[side]:.3f} s/step", flush=True)
        for side in round_speedups:
            round_speedups[side].append(this_round["trl"] / this_round[side])
    result = {
        "env": environment("cpu"), "trl_version": trl.__version__, "transformers_version": transformers.__version__,
        "config": step.config, "step": step.describe(), "load_average_1min": os.getloadavg()[0],
        "rounds": args.rounds, "steps": args.steps, "threads": args.threads,
        "sides": {side: summarise(runs[side]) for side in sides},
        "round_speedups": round_speedups,
        "speedup": {side: statistics.median(r) for side, r in round_speedups.items()}, "note": args.note,
        "raw": runs,
    }
    write_results(name, result, markdown(result))


if __name__ == "__main__":
    main()
