"""A small-scale "Table 1": every loss on the same task, data, rollout settings and step budget.

    python benchmarks/compare_losses.py                      # 6 losses x 3 seeds, the config's 60 steps
    python benchmarks/compare_losses.py --seeds 0 1 2 3 4 --max-steps 40 validation.max_questions=100
                                                             # the committed run (README table)
    python benchmarks/compare_losses.py --ablation --max-steps 40 validation.max_questions=100
                                                             # NFT: epsilon x prompt_weight (Figs. 9-10)
    python benchmarks/compare_losses.py --losses nft rft --seeds 0 --max-steps 10   # quick look
    python benchmarks/compare_losses.py --num-minibatches 4 8 --seeds 0 1 2 3 4    # off-policy regime:
                                                             # 4 and 8 optimiser steps per rollout

Each run is `tune run recipes/online_rl_distributed.py --config configs/tiny_arith.yaml loss=<name>
seed=<s> ...` in its own process with identical overrides apart from the loss (each loss keeps the
defaults of its own paper, nothing is tuned per loss). `--num-minibatches N ...` runs every variant
once per N with `num_minibatches=N`: the rollout is split into N mini-batches of whole groups, one
optimiser step each at the config's learning rate, so all but the first step of a rollout are
off-policy (the paper's regime is 16). Reads each run's history.json and writes

    benchmarks/results/<name>.md    mean ± std over seeds of final held-out accuracy and of the
                                    area under the validation curve; machine, versions, command
    benchmarks/results/<name>.json  every run's validation curve, entropy and reward per step
    benchmarks/results/<name>.png   validation curves (mean ± std bands) and entropy per loss
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from _common import REPO, RESULTS, environment  # benchmarks/ is on sys.path when run as a script

ALL_LOSSES = ["nft", "rft", "grpo", "dr_grpo", "dapo", "infonca"]


def run_one(tag: str, overrides: list[str], runs_dir: Path, log_dir: Path) -> dict:
    out = runs_dir / tag
    cmd = [
        str(Path(sys.executable).parent / "tune"), "run", "recipes/online_rl_distributed.py",
        "--config", "configs/tiny_arith.yaml", f"output_dir={out}", "save_final_model=false", *overrides,
    ]
    start = time.perf_counter()
    if (out / "summary.json").exists():  # finished in an earlier invocation: reuse it
        seconds = json.loads((out / "summary.json").read_text())["wall_seconds"]
    else:
        # torchtune's wheel ships a top-level `recipes` package; PYTHONPATH puts ours first.
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(log_dir / f"{tag}.log", "w") as logf:
            proc = subprocess.run(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"run {tag} failed (exit {proc.returncode}); see {log_dir / f'{tag}.log'}")
        seconds = time.perf_counter() - start
    history = json.loads((out / "history.json").read_text())
    val = [(h["step"], h["val/accuracy"]) for h in history if "val/accuracy" in h]
    return {
        "tag": tag,
        "seconds": round(seconds, 1),
        "val_steps": [s for s, _ in val],
        "val_accuracy": [a for _, a in val],
        "final_accuracy": val[-1][1],
        # Normalised area under the validation curve (trapezoid over steps / step range).
        "auc": _auc(val),
        "entropy": [(h["step"], h["entropy"]) for h in history if "entropy" in h],
        "reward": [(h["step"], h["reward/mean"]) for h in history if "reward/mean" in h],
        "command": shlex.join(cmd),
    }


def _auc(points: list[tuple[int, float]]) -> float:
    if len(points) < 2:
        return points[0][1] if points else 0.0
    area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def machine_info() -> dict:
    """The machine/versions block every benchmark writes, plus torchtune (these runs go through it)."""
    info = environment("cpu")
    info["torchtune"] = version("torchtune")
    return info


def plot(variants: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_val, ax_ent) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, runs in variants.items():
        steps = np.array(runs[0]["val_steps"])
        acc = np.array([r["val_accuracy"] for r in runs])
        mean, std = acc.mean(0), acc.std(0)
        (line,) = ax_val.plot(steps, mean, label=name)
        ax_val.fill_between(steps, mean - std, mean + std, alpha=0.2, color=line.get_color())
        # A step whose groups were all filtered out has no update and no entropy: align by step.
        ent_steps = sorted({s for r in runs for s, _ in r["entropy"]})
        ent = np.full((len(runs), len(ent_steps)), np.nan)
        for i, r in enumerate(runs):
            for s, e in r["entropy"]:
                ent[i, ent_steps.index(s)] = e
        ax_ent.plot(ent_steps, np.nanmean(ent, 0), label=name, color=line.get_color())
    ax_val.set(xlabel="rollout step", ylabel="held-out accuracy (avg@k)", title=title)
    ax_ent.set(xlabel="rollout step", ylabel="policy entropy (nats/token)", title="entropy during training")
    ax_val.legend()
    ax_ent.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=ALL_LOSSES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    parser.add_argument("--ablation", action="store_true", help="NFT epsilon x prompt_weight instead of losses")
    parser.add_argument(
        "--num-minibatches", nargs="+", type=int, default=None,
        help="run each variant with each of these num_minibatches (optimiser steps per rollout)",
    )
    parser.add_argument(
        "--name", default=None,
        help="results file stem (default compare_losses / nft_ablation, + _minibatches with --num-minibatches)",
    )
    parser.add_argument("--runs-dir", default="outputs/compare_losses")
    parser.add_argument("extra", nargs="*", help="extra key=value overrides passed to every run")
    args = parser.parse_args()

    if args.num_minibatches and min(args.num_minibatches) < 1:
        parser.error(f"--num-minibatches must be integers >= 1, got {args.num_minibatches}")
    name = args.name or ("nft_ablation" if args.ablation else "compare_losses")
    if args.name is None and args.num_minibatches:
        name += "_minibatches"  # never overwrite the on-policy results under the plain name
    runs_dir = REPO / args.runs_dir / name
    log_dir = runs_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    common = [*(["max_steps=%d" % args.max_steps] if args.max_steps else []), *args.extra]
    if args.ablation:
        variants = {
            f"nft eps={eps} w={w}": ["loss=nft", f"loss_args.nft.epsilon={eps}", f"loss_args.nft.prompt_weight={w}"]
            for eps in (0.5, 1.0, 2.0)
            for w in ("constant", "dr_grpo", "grpo")
        }
    else:
        variants = {loss: [f"loss={loss}"] for loss in args.losses}
    if args.num_minibatches:
        variants = {
            f"{label} mb={n}": [*overrides, f"num_minibatches={n}"]
            for label, overrides in variants.items()
            for n in args.num_minibatches
        }

    results: dict[str, list[dict]] = {}
    total = len(variants) * len(args.seeds)
    done = 0
    for label, overrides in variants.items():
        for seed in args.seeds:
            tag = label.replace(" ", "_").replace("=", "") + f"_seed{seed}"
            run = run_one(tag, [*overrides, f"seed={seed}", *common], runs_dir, log_dir)
            results.setdefault(label, []).append(run)
            done += 1
            print(f"[{done}/{total}] {label} seed={seed}: final acc {run['final_accuracy']:.3f}, "
                  f"AUC {run['auc']:.3f}, {run['seconds']:.0f}s", flush=True)

    info = machine_info()
    command = "python benchmarks/compare_losses.py " + shlex.join(sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": info, "command": command, "runs": results}, indent=1))
    plot(results, RESULTS / f"{name}.png", title=name.replace("_", " "))
    lines = [
        f"# {name.replace('_', ' ')}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {info['platform']}, {info['cpu_count']} CPUs; Python {info['python']}, torch {info['torch']}, "
        f"torchtune {info['torchtune']}; {info['date']}",
        "",
        f"Seeds: {args.seeds}. Held-out accuracy is avg@k on assets/tiny_arith/val.jsonl with the config's validation "
        "settings (configs/tiny_arith.yaml: k=4, temperature 1.0); AUC is the area under the validation curve divided by its step range.",
        "",
        "| variant | runs | initial acc | final acc (mean ± std) | AUC (mean ± std) | entropy first → last | s/run |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, runs in results.items():
        fa, fs = _mean_std([r["final_accuracy"] for r in runs])
        aa, as_ = _mean_std([r["auc"] for r in runs])
        ia = statistics.fmean(r["val_accuracy"][0] for r in runs)
        e0 = statistics.fmean(r["entropy"][0][1] for r in runs) if runs[0]["entropy"] else float("nan")
        e1 = statistics.fmean(r["entropy"][-1][1] for r in runs) if runs[0]["entropy"] else float("nan")
        secs = statistics.fmean(r["seconds"] for r in runs)
        lines.append(f"| {label} | {len(runs)} | {ia:.3f} | {fa:.3f} ± {fs:.3f} | {aa:.3f} ± {as_:.3f} | "
                     f"{e0:.3f} → {e1:.3f} | {secs:.0f} |")
    lines += ["", f"![validation curves]({name}.png)", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
