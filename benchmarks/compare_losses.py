"""A small-scale "Table 1": every loss on the same task, data, rollout settings and step budget.

    python benchmarks/compare_losses.py                      # 6 losses x 3 seeds, the config's 60 steps
    python benchmarks/compare_losses.py --seeds 0 1 2 3 4 --max-steps 40 validation.max_questions=100
                                                             # the committed on-policy run (README table)
    python benchmarks/compare_losses.py --ablation --max-steps 40 validation.max_questions=100
                                                             # NFT: epsilon x prompt_weight (Figs. 9-10)
    python benchmarks/compare_losses.py --losses nft rft --seeds 0 --max-steps 10   # quick look
    python benchmarks/compare_losses.py --num-minibatches 4 8 --seeds 0 1 2 3 4 --max-steps 40 \\
        validation.max_questions=100                         # off-policy regime (issue 16):
                                                             # 4 and 8 optimiser steps per rollout
    python benchmarks/compare_losses.py --config configs/tiny_arith_hard.yaml --name compare_losses_hard \\
        --num-minibatches 4 8 --seeds 0 1 2 3 4 --max-steps 40 validation.max_questions=100   # the hard task
    python benchmarks/compare_losses.py --config configs/tiny_arith_hard.yaml --max-staleness 0 1 2 4 \
        --seeds 0 1 2 --max-steps 20 validation.max_questions=100 num_threads=1   # stale rollouts
                                                             # (issue 25): results/compare_losses_staleness.md
    python benchmarks/compare_losses.py --config configs/tiny_arith_hard.yaml --name compare_losses_staleness_minibatches \
        --num-minibatches 4 --max-staleness 0 2 --seeds 0 1 2 --max-steps 20 validation.max_questions=100 num_threads=1
                                                             # staleness where the clips act

Each run is `tune run recipes/online_rl_distributed.py --config <config> loss=<name> seed=<s> ...`
in its own process with identical overrides apart from the loss (each loss keeps the defaults of
its own paper, nothing is tuned per loss). `--num-minibatches N ...` runs every variant once per N
with `num_minibatches=N`: the rollout is split into N mini-batches of whole groups, one optimiser
step each at the config's learning rate, so all but the first step of a rollout are off-policy
(the paper's regime is 16).
`--max-staleness K ...` runs every variant once per K with `rollout.max_staleness=K`
(polopt/rollout_worker.py): the rollout of step s comes from policy version max(0, s − K) exactly,
generated in a producer process. K = 0 is the synchronous recipe with the config's settings. K > 0
also sets `recompute_old_logprobs=true` (required: the loss's ratio is taken against the proximal
π_old the trainer recomputes) and `rollout_correction.enabled=true` with the section's defaults
(token level, truncate, cap 3): every loss gets the per-token weights min(π_old/π_behav, 3), the
decoupled objective (AReaL) in which the loss's own ratio is against the proximal policy and the
behaviour policy (the stale sampler, whose log-probs come from the engine) enters only through the
truncated importance weight. The report then gives each variant's measured staleness (mean over steps
of `rollout/staleness`), the fraction of tokens whose weight hit the cap and a plot of the final
accuracy against the measured staleness. Both flags together run their product.

Each run saves its final model (HF format, `final/`), which is then evaluated as a user would:
`tune run recipes/evaluate.py --config configs/evaluate.yaml model_dir=<run>/final` on the config's
held-out set (the questions training validation uses: `validation.source`, `validation.max_questions`)
with `--eval-k` samples per question (16) at the validation temperature and answer length, giving
avg@16 and the unbiased pass@1/4/16. The base model is evaluated the same way once. A run whose
summary.json (training) or eval/eval.json (evaluation) exists is reused, so an interrupted
invocation continues where it stopped (`--reuse-results benchmarks/results/<name>.json` reuses the
runs of a committed report whose runs directory is gone, where the command is identical); runs go
seed by seed so that partial results are balanced, and `--max-new-runs N` trains at most N runs and reports every finished one (to take turns between
two comparisons on one machine; `--max-new-runs 0` only rewrites the report).

Reads each run's history.json and eval.json and writes, after every run,

    benchmarks/results/<name>.md    per variant: final held-out avg@k of training validation, AUC,
                                    pass@1/4/16 of the final model, entropy, the off-policy metrics
                                    each loss logs (clip_frac: GRPO family; neg_clip_frac: NFT;
                                    ratio_max: every token-level loss); each loss minus NFT paired
                                    by seed with a 95% Student-t interval; machine, versions, command
    benchmarks/results/<name>.json  every run's curves, per-step metrics and evaluation
    benchmarks/results/<name>.png   validation curves, entropy, clip fractions, max ratio per step

A "## Reading" section already in <name>.md (written by hand from the numbers) is kept when the
file is rewritten.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from _common import REPO, RESULTS, environment, mean_ci95  # benchmarks/ is on sys.path when run as a script

sys.path.insert(0, str(REPO))
from polopt.losses import BUILTIN_LOSSES  # noqa: E402
from polopt.prompts import DEFAULT_TEMPLATE  # noqa: E402

ALL_LOSSES = list(BUILTIN_LOSSES)
# Per-step metrics that show how far each update went off-policy; a loss logs those it defines.
OFF_POLICY_METRICS = ("clip_frac", "neg_clip_frac", "ratio_max")
# With --max-staleness: the policy versions between sampler and learner, and the rollout correction's
# view of the behaviour/proximal mismatch (logged with recompute_old_logprobs, enabled or not).
STALENESS_METRICS = ("rollout/staleness", "rollout_correction/capped_fraction",
                     "rollout_correction/ratio_mean", "rollout_correction/logprob_abs_diff_mean",
                     "time/trainer_wait_s", "time/producer_idle_s")
PASS_K = (1, 4, 16)


def _tune(recipe: str, config: str, overrides: list[str], log_path: Path) -> float:
    """`tune run <recipe> --config <config> ...` in its own process; seconds it took."""
    cmd = [str(Path(sys.executable).parent / "tune"), "run", recipe, "--config", config, *overrides]
    # torchtune's wheel ships a top-level `recipes` package; PYTHONPATH puts ours first.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    with open(log_path, "w") as logf:
        logf.write(shlex.join(cmd) + "\n")
        logf.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{recipe} failed (exit {proc.returncode}); see {log_path}")
    return time.perf_counter() - start


def evaluation_overrides(task: dict, model_dir: Path, out: Path, k: int) -> list[str]:
    """recipes/evaluate.py on the task's held-out set with the task's validation sampling."""
    dataset = {"source": task["source"], "name": "val", "template": task["template"]}
    if task["max_questions"]:
        dataset["max_questions"] = task["max_questions"]
    return [
        f"model_dir={model_dir}", f"output_dir={out}", "overwrite=true",
        f"datasets=[{json.dumps(dataset)}]", f"k={k}", f"pass_k=[{','.join(str(j) for j in PASS_K if j <= k)}]",
        f"temperature={task['temperature']}", f"top_p={task['top_p']}", f"max_new_tokens={task['max_new_tokens']}",
        "save_answers=true",
    ]


def evaluate_model(model_dir: Path, out: Path, task: dict, k: int, log_path: Path) -> dict:
    if not (out / "eval.json").exists():
        _tune("recipes/evaluate.py", "configs/evaluate.yaml", evaluation_overrides(task, model_dir, out, k), log_path)
    result = json.loads((out / "eval.json").read_text())["datasets"]["val"]
    return {**{key: result[key] for key in ("avg_at_k", "pass_at_k", "n_questions", "k", "seconds",
                                            *(f"pass@{j}" for j in PASS_K if j <= k))},
            **answer_forms(out / "answers_val.jsonl")}


def answer_forms(path: Path) -> dict:
    """Of the rewarded answers in an evaluation's answers file, the fraction that are a bare number
    (the whole answer is a number literal, `1325.`) rather than a sentence or an equation ending in
    the number (`591+734=1325`, which the verifier also rewards); an example of each. Empty when the
    file is absent (an evaluation made before answers were saved)."""
    from polopt.verify import MathVerifier, is_number_literal

    if not path.is_file():
        return {}
    answers = [json.loads(line) for line in path.read_text().splitlines()]
    rewarded = [a["answer"].strip() for a in answers if a["reward"] > 0]
    bare = [is_number_literal(a) for a in rewarded]
    # What math-verify's pure equivalence would also have paid for: the question restated, unevaluated.
    unpaid = [a for a in answers if a["reward"] == 0 and not a["truncated"]]
    with MathVerifier(num_workers=1, number_answers="equivalent") as equivalent:
        echoed = [a["answer"] for a, s in zip(unpaid, equivalent([a["answer"] for a in unpaid], [a["gold"] for a in unpaid]))
                  if s > 0]
    return {
        "answers": len(answers),
        "echoed_answers": len(echoed),
        "echoed_example": echoed[0] if echoed else None,
        "rewarded_answers": len(rewarded),
        "rewarded_number_literal_frac": sum(bare) / len(rewarded) if rewarded else None,
        "rewarded_examples": {"number": next((a for a, b in zip(rewarded, bare) if b), None),
                              "other": next((a for a, b in zip(rewarded, bare) if not b), None)},
    }


def _without_output_dir(command: str) -> list[str]:
    return [a for a in shlex.split(command) if not a.startswith("output_dir=")]


def previous_runs(path: Optional[Path]) -> dict[str, dict]:
    """Run records (by tag) of an earlier report's JSON, e.g. the committed one when the runs
    directory that produced it is gone; a record is reused only for the identical command."""
    if path is None:
        return {}
    if not path.is_file():
        sys.exit(f"--reuse-results {path}: no such file")
    return {run["tag"]: run for runs in json.loads(path.read_text())["runs"].values() for run in runs}


def run_one(tag: str, config: str, overrides: list[str], runs_dir: Path, log_dir: Path, task: dict, k: int,
            previous: Optional[dict] = None) -> dict:
    out = runs_dir / tag
    train_overrides = [f"output_dir={out}", "save_final_model=true", "checkpoint_every_n_steps=null", *overrides]
    shown = "tune run recipes/online_rl_distributed.py --config " + shlex.join([config, *train_overrides])
    trained = not (out / "summary.json").exists()  # else finished in an earlier invocation: reuse it
    if (trained and previous is not None and previous["eval"]["k"] == k
            and _without_output_dir(previous["command"]) == _without_output_dir(shown)):
        return {**{key: value for key, value in previous.items() if key not in ("seed", "num_minibatches", "max_staleness")},
                "trained_now": False}
    if trained:
        if out.exists():  # an interrupted earlier attempt: start it again
            train_overrides.append("overwrite=true")
        _tune("recipes/online_rl_distributed.py", config, train_overrides, log_dir / f"{tag}.log")
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "history.json").read_text())
    evaluation = evaluate_model(out / "final", out / "eval", task, k, log_dir / f"{tag}.eval.log")
    val = [(h["step"], h["val/accuracy"]) for h in history if "val/accuracy" in h]
    return {
        "tag": tag,
        "train_seconds": summary["wall_seconds"],  # the recipe's training loop, startup excluded
        "eval_seconds": evaluation["seconds"],
        "val_steps": [s for s, _ in val],
        "val_accuracy": [a for _, a in val],
        "final_accuracy": val[-1][1],
        # Normalised area under the validation curve (trapezoid over steps / step range).
        "auc": _auc(val),
        "entropy": [(h["step"], h["entropy"]) for h in history if "entropy" in h],
        "reward": [(h["step"], h["reward/mean"]) for h in history if "reward/mean" in h],
        "off_policy": {m: [(h["step"], h[m]) for h in history if m in h] for m in OFF_POLICY_METRICS
                       if any(m in h for h in history)},
        **({"staleness": {m: [(h["step"], h[m]) for h in history if m in h] for m in STALENESS_METRICS
                          if any(m in h for h in history)}}
           if any(m in h for h in history for m in STALENESS_METRICS) else {}),
        "eval": evaluation,
        "command": shown,
        "trained_now": trained,
    }


def _auc(points: list[tuple[int, float]]) -> float:
    if len(points) < 2:
        return points[0][1] if points else 0.0
    area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _series_mean(runs: list[dict], metric: str) -> float:
    """Mean over runs of the per-run mean over steps of an off-policy metric (nan if not logged)."""
    per_run = [statistics.fmean(v for _, v in r["off_policy"][metric]) for r in runs if r["off_policy"].get(metric)]
    return statistics.fmean(per_run) if per_run else float("nan")


def machine_info() -> dict:
    """The machine/versions block every benchmark writes, plus torchtune (these runs go through it)."""
    info = environment("cpu")
    info["torchtune"] = version("torchtune")
    return info


def plot(results: dict[str, list[dict]], variants: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stale = any(v.get("max_staleness") is not None for v in variants.values())
    fig, axes = plt.subplots(3 if stale else 2, 2, figsize=(13, 12.6 if stale else 8.4))
    (ax_val, ax_ent), (ax_clip, ax_ratio) = axes[:2]
    bases = list(dict.fromkeys(v["base"] for v in variants.values()))
    settings = list(dict.fromkeys(_setting(v) for v in variants.values()))
    colors = {b: f"C{i}" for i, b in enumerate(bases)}
    styles = {n: s for n, s in zip(settings, ["-", "--", ":", "-."] * 4)}

    def by_step(runs: list[dict], get) -> tuple[list[int], "np.ndarray"]:
        # A step whose groups were all filtered out has no update and no metrics: align by step.
        steps = sorted({s for r in runs for s, _ in get(r)})
        values = np.full((len(runs), len(steps)), np.nan)
        for i, r in enumerate(runs):
            for s, v in get(r):
                values[i, steps.index(s)] = v
        return steps, values

    for label, runs in results.items():
        style = {"color": colors[variants[label]["base"]], "linestyle": styles[_setting(variants[label])]}
        steps, acc = by_step(runs, lambda r: list(zip(r["val_steps"], r["val_accuracy"])))
        mean, std = np.nanmean(acc, 0), np.nanstd(acc, 0)
        ax_val.plot(steps, mean, label=label, **style)
        ax_val.fill_between(steps, mean - std, mean + std, alpha=0.12, color=style["color"])
        steps, ent = by_step(runs, lambda r: r["entropy"])
        ax_ent.plot(steps, np.nanmean(ent, 0), label=label, **style)
        for metric in ("clip_frac", "neg_clip_frac"):
            if any(metric in r["off_policy"] for r in runs):
                steps, frac = by_step(runs, lambda r: r["off_policy"].get(metric, []))
                ax_clip.plot(steps, np.nanmean(frac, 0), label=f"{label} ({metric})", **style)
        if any("ratio_max" in r["off_policy"] for r in runs):
            steps, ratio = by_step(runs, lambda r: r["off_policy"].get("ratio_max", []))
            ax_ratio.plot(steps, np.exp(np.nanmean(np.log(ratio), 0)), label=label, **style)
    ax_val.set(xlabel="rollout step", ylabel="held-out accuracy (avg@k, mean ± std)", title=title)
    ax_ent.set(xlabel="rollout step", ylabel="policy entropy (nats/token)", title="entropy during training")
    ax_clip.set(xlabel="rollout step", ylabel="fraction of tokens",
                title="clip_frac (GRPO family) / neg_clip_frac (NFT)")
    ax_ratio.set(xlabel="rollout step", ylabel="max π/π_old in the batch (geometric mean over seeds)",
                 title="ratio_max", yscale="log")
    if stale:  # final accuracy against the measured staleness, one line per loss (mean, 95% interval)
        for ax, (name, get) in zip(axes[2], [("final avg@k (training validation)", lambda r: r["final_accuracy"]),
                                              ("pass@1 of the final model", lambda r: r["eval"]["pass@1"])]):
            for base in bases:
                points = []
                for label, runs in results.items():
                    if variants[label]["base"] == base:
                        mean, lo, hi = mean_ci95([get(r) for r in runs])
                        x = statistics.fmean(measured_staleness(r) for r in runs)
                        points.append((x, mean, mean - lo if not math.isnan(lo) else 0.0))
                points.sort()
                if points:
                    xs, ys, err = zip(*points)
                    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=colors[base], label=base)
            ax.set(xlabel="measured staleness (mean of rollout/staleness over steps)", ylabel=name,
                   title="against staleness (mean, 95% t interval over seeds)")
    for ax in axes.flat:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _setting(v: dict) -> tuple:
    """What a variant varies besides the loss: (num_minibatches, max_staleness), None where not swept."""
    return v["num_minibatches"], v.get("max_staleness")


def measured_staleness(run: dict) -> float:
    """Mean over steps of `rollout/staleness` (logged only with max_staleness > 0; 0 for a synchronous run)."""
    values = [v for _, v in run.get("staleness", {}).get("rollout/staleness", [])]
    return statistics.fmean(values) if values else 0.0


def _stale_mean(runs: list[dict], metric: str) -> float:
    per_run = [statistics.fmean(v for _, v in r["staleness"][metric]) for r in runs
               if r.get("staleness", {}).get(metric)]
    return statistics.fmean(per_run) if per_run else float("nan")


def _difference_table(diffs: list[dict], pk: list[str], val_k: int) -> list[str]:
    """Markdown rows of paired differences with 95% intervals, and the intervals that exclude 0."""
    lines = [f"| variant | pairs | Δ final avg@{val_k} | " + " | ".join(f"Δ {key}" for key in pk) + " |",
             "|---|---:|---:|" + "---:|" * len(pk)]
    resolved = []
    for row in diffs:
        cells = [_fmt_ci(row["final_accuracy"]), *(_fmt_ci(row[key]) if key in row else "–" for key in pk)]
        lines.append(f"| {row['label']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
        for key in ("final_accuracy", *pk):
            if key in row and len(row[key]) > 1:
                mean, lo, hi = mean_ci95(row[key])
                if lo > 0 or hi < 0:
                    shown = f"final avg@{val_k}" if key == "final_accuracy" else key
                    resolved.append(f"{row['label']} {'above' if mean > 0 else 'below'} {row['reference']} "
                                    f"on {shown} ({mean:+.3f} [{lo:+.3f}, {hi:+.3f}])")
    return lines + ["", "Intervals that exclude 0: " + ("; ".join(resolved) if resolved else "none") + ".", ""]


def _fmt_ci(values: list[float]) -> str:
    mean, lo, hi = mean_ci95(values)
    if math.isnan(lo):
        return f"{mean:+.3f}"
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def difference_rows(results: dict[str, list[dict]], variants: dict[str, dict], reference_base: str,
                    same_loss_at_staleness: Optional[int] = None) -> list[dict]:
    """Each variant minus the reference variant (same num_minibatches and max_staleness), paired by
    seed; with `same_loss_at_staleness=K`, minus the same loss at max_staleness K instead."""
    rows = []
    for label, runs in results.items():
        v = variants[label]
        if same_loss_at_staleness is None:
            ref = next((lab for lab, w in variants.items()
                        if w["base"] == reference_base and _setting(w) == _setting(v)), None)
        else:
            ref = next((lab for lab, w in variants.items()
                        if w["base"] == v["base"] and w["num_minibatches"] == v["num_minibatches"]
                        and w.get("max_staleness") == same_loss_at_staleness), None)
        if ref is None or ref == label or ref not in results:
            continue
        ref_by_seed = {r["seed"]: r for r in results[ref]}
        pairs = [(r, ref_by_seed[r["seed"]]) for r in runs if r["seed"] in ref_by_seed]
        if not pairs:
            continue
        row = {"label": label, "reference": ref, "seeds": [r["seed"] for r, _ in pairs],
               "final_accuracy": [r["final_accuracy"] - q["final_accuracy"] for r, q in pairs]}
        for j in PASS_K:
            key = f"pass@{j}"
            if all(key in r["eval"] for r, _ in pairs):
                row[key] = [r["eval"][key] - q["eval"][key] for r, q in pairs]
        rows.append(row)
    return rows


def write_report(name: str, results: dict[str, list[dict]], variants: dict[str, dict], *, info: dict,
                 command: str, config: str, task: dict, seeds: list[int], total: int, base_eval: dict,
                 eval_k: int, reference_base: str) -> None:
    done = sum(len(r) for r in results.values())
    diffs = difference_rows(results, variants, reference_base)
    stale = any(v.get("max_staleness") is not None for v in variants.values())
    stale_diffs = difference_rows(results, variants, reference_base, same_loss_at_staleness=0) if stale else []
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"machine": info, "command": command, "config": config, "runs_done": done, "runs_planned": total,
         "base_model_eval": base_eval, "differences_to_reference": diffs,
         **({"differences_to_staleness_0": stale_diffs} if stale else {}), "runs": results}, indent=1))
    plot(results, variants, RESULTS / f"{name}.png", title=name.replace("_", " "))
    pk = [f"pass@{j}" for j in PASS_K if j <= eval_k]
    val_k = task["k"]
    lines = [
        f"# {name.replace('_', ' ')}",
        "",
        f"**{done} of {total} runs done.**" + ("" if done == total else " (partial: the table covers the runs done)"),
        "",
        f"Command: `{command}`  ",
        f"Config: `{config}`  ",
        f"Machine: {info['platform']}, {info['cpu_count']} CPUs (shared with other work while these ran: "
        f"wall-clock numbers are upper bounds, accuracies do not depend on load); Python {info['python']}, "
        f"torch {info['torch']}, torchtune {info['torchtune']}; {info['date']}",
        "",
        f"Seeds: {seeds}. **final avg@{val_k}**: the last training validation ({task['source']}, "
        f"{task['max_questions'] or 'all'} questions, k={val_k}, temperature {task['temperature']}); AUC: area under "
        "the validation curve / its step range. "
        f"**{', '.join(pk)}**: the final model (`final/`) through `tune run recipes/evaluate.py` with "
        f"{eval_k} samples per question on the same questions, unbiased estimator (Chen et al. 2021). "
        "**clip**: mean over steps of the fraction of tokens the loss clips (`clip_frac` for the GRPO family, "
        "`neg_clip_frac` for NFT: negative tokens whose (1 − r̂R)/(1 − r̂) falls below ε; RFT and InfoNCA clip "
        "nothing); **max R**: mean over steps of log max π/π_old in the batch, shown as exp (how far the "
        "policy moved off π_old within a rollout). **rewarded: bare number**: of the final model's rewarded "
        "answers, the fraction that are a bare number (`1325`) rather than an equation or sentence ending in "
        "one (`591+734=1325`); expressions that only restate the question (`591+734`) score 0 (docs/data.md). "
        "**echoed**: answers (of all the final model's evaluation answers) that math-verify's pure equivalence "
        "would have rewarded and the number-literal rule did not: the question restated, unevaluated."
        + (" **staleness**: measured, mean over steps of `rollout/staleness` (policy versions between the "
           "sampler and the update; 0 for the synchronous runs); **capped**: mean over steps of the fraction "
           "of tokens whose rollout-correction weight π_old/π_behav hit its cap (`rollout_correction/"
           "capped_fraction`); **|Δ log π|**: mean per-token |log π_old − log π_behav| (how far the sampler "
           "was from the proximal policy)." if stale else ""),
        "",
        f"Base model ({task['model_dir']}): " + ", ".join(f"{key} {base_eval[key]:.3f}" for key in pk),
        "",
        f"| variant | runs | initial avg@{val_k} | final avg@{val_k} (mean ± std) | AUC | "
        + " | ".join(pk) + " | entropy first → last | clip (metric) | max R | "
        + ("staleness | capped | \\|Δ log π\\| | " if stale else "")
        + "rewarded: bare number | echoed | train s/run | eval s/run |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(pk) + "---:|---:|---:|" + ("---:|---:|---:|" if stale else "")
        + "---:|---:|---:|---:|",
    ]
    for label, runs in results.items():
        fa, fs = _mean_std([r["final_accuracy"] for r in runs])
        aa, _ = _mean_std([r["auc"] for r in runs])
        ia = statistics.fmean(r["val_accuracy"][0] for r in runs)
        passes = [f"{statistics.fmean(r['eval'][key] for r in runs):.3f}" for key in pk]
        e0 = statistics.fmean(r["entropy"][0][1] for r in runs) if runs[0]["entropy"] else float("nan")
        e1 = statistics.fmean(r["entropy"][-1][1] for r in runs) if runs[0]["entropy"] else float("nan")
        clip = next((f"{_series_mean(runs, m):.3f} ({m})" for m in ("neg_clip_frac", "clip_frac")
                     if any(m in r["off_policy"] for r in runs)), "–")
        log_ratio = [statistics.fmean(math.log(v) for _, v in r["off_policy"]["ratio_max"])
                     for r in runs if r["off_policy"].get("ratio_max")]
        ratio = f"{math.exp(statistics.fmean(log_ratio)):.2f}" if log_ratio else "–"
        train_s = statistics.fmean(r["train_seconds"] for r in runs)
        eval_s = statistics.fmean(r["eval_seconds"] for r in runs)
        literal = [r["eval"]["rewarded_number_literal_frac"] for r in runs
                   if r["eval"].get("rewarded_number_literal_frac") is not None]
        bare = f"{statistics.fmean(literal):.2f}" if literal else "–"
        echoed = (f"{sum(r['eval']['echoed_answers'] for r in runs)}/{sum(r['eval']['answers'] for r in runs)}"
                  if all("echoed_answers" in r["eval"] for r in runs) else "–")
        if stale:
            ms = statistics.fmean(measured_staleness(r) for r in runs)
            cells = [f"{ms:.2f}", *(f"{x:.4f}" if not math.isnan(x) else "–" for x in
                                    (_stale_mean(runs, "rollout_correction/capped_fraction"),
                                     _stale_mean(runs, "rollout_correction/logprob_abs_diff_mean")))]
            ratio += " | " + " | ".join(cells)
        lines.append(f"| {label} | {len(runs)} | {ia:.3f} | {fa:.3f} ± {fs:.3f} | {aa:.3f} | " + " | ".join(passes)
                     + f" | {e0:.3f} → {e1:.3f} | {clip} | {ratio} | {bare} | {echoed} | {train_s:.0f} | {eval_s:.0f} |")
    lines += [
        "",
        f"## Difference to {reference_base} (paired by seed)",
        "",
        "Each row: this variant's value minus the same seed's NFT run at the same num_minibatches"
        + (" and max_staleness" if stale else "") + "; mean over "
        "seeds [95% Student-t interval, t_{0.975, n−1} from benchmarks/_common.py's table]. An interval that "
        "excludes 0 is a difference these seeds resolve.",
        "",
    ]
    lines += _difference_table(diffs, pk, val_k)
    if stale:
        lines += ["## Difference to the same loss at max_staleness 0 (paired by seed)", "",
                  "Each row: this variant minus the same loss's synchronous run (k=0) at the same seed; "
                  "mean [95% Student-t interval]. What staleness costs or gains each loss.", ""]
        lines += _difference_table(stale_diffs, pk, val_k)
    lines += [f"![curves]({name}.png)", ""]
    md = RESULTS / f"{name}.md"
    if md.exists() and "\n## Reading" in md.read_text():  # the hand-written reading survives a rewrite
        lines.append(md.read_text()[md.read_text().index("\n## Reading") + 1:].rstrip() + "\n")
    md.write_text("\n".join(lines))


def task_settings(config: str, extra: list[str]) -> dict:
    """The held-out set and sampling of the config's validation, after the command-line overrides."""
    cfg = OmegaConf.merge(OmegaConf.load(REPO / config), OmegaConf.from_dotlist(extra))
    v = cfg.validation
    return {
        "model_dir": cfg.model_dir,
        "source": v.source,
        "template": v.get("template") or cfg.dataset.get("template") or DEFAULT_TEMPLATE,
        "max_questions": v.get("max_questions"),
        "k": v.get("k", 1),
        "temperature": v.get("temperature", 1.0),
        "top_p": v.get("top_p", 1.0),
        "max_new_tokens": v.get("max_new_tokens") or cfg.rollout.max_new_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_arith.yaml", help="training config (repo-relative)")
    parser.add_argument("--losses", nargs="+", default=ALL_LOSSES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    parser.add_argument("--ablation", action="store_true", help="NFT epsilon x prompt_weight instead of losses")
    parser.add_argument(
        "--num-minibatches", nargs="+", type=int, default=None,
        help="run each variant with each of these num_minibatches (optimiser steps per rollout)",
    )
    parser.add_argument(
        "--max-staleness", nargs="+", type=int, default=None,
        help="run each variant with each of these rollout.max_staleness (k > 0 also sets recompute_old_logprobs=true "
             "and rollout_correction.enabled=true: the decoupled objective)",
    )
    parser.add_argument("--eval-k", type=int, default=16, help="samples per held-out question for pass@k")
    parser.add_argument("--max-new-runs", type=int, default=None,
                        help="train at most this many runs (finished ones are reused and reported; 0: report only)")
    parser.add_argument(
        "--name", default=None,
        help="results file stem (default compare_losses / nft_ablation, + _minibatches with --num-minibatches, "
             "+ _staleness with --max-staleness)",
    )
    parser.add_argument("--runs-dir", default="outputs/compare_losses")
    parser.add_argument(
        "--reuse-results", type=Path, default=None,
        help="an earlier report's JSON (e.g. benchmarks/results/<name>.json): its runs are reused, not retrained, "
             "where the training command is identical (output_dir aside)",
    )
    parser.add_argument("extra", nargs="*", help="extra key=value overrides passed to every run")
    args = parser.parse_args()

    if args.num_minibatches and min(args.num_minibatches) < 1:
        parser.error(f"--num-minibatches must be integers >= 1, got {args.num_minibatches}")
    if args.max_staleness and min(args.max_staleness) < 0:
        parser.error(f"--max-staleness must be integers >= 0, got {args.max_staleness}")
    if args.eval_k < 1:
        parser.error(f"--eval-k must be >= 1, got {args.eval_k}")
    if not (REPO / args.config).is_file():
        parser.error(f"--config {args.config}: no such file under {REPO}")
    name = args.name or ("nft_ablation" if args.ablation else "compare_losses")
    if args.name is None and args.num_minibatches:
        name += "_minibatches"  # never overwrite the on-policy results under the plain name
    if args.name is None and args.max_staleness:
        name += "_staleness"
    runs_dir = REPO / args.runs_dir / name
    log_dir = runs_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    common = [*(["max_steps=%d" % args.max_steps] if args.max_steps else []), *args.extra]
    task = task_settings(args.config, args.extra)
    if args.ablation:
        reference_base = "nft eps=1.0 w=dr_grpo"
        base_variants = {
            f"nft eps={eps} w={w}": ["loss=nft", f"loss_args.nft.epsilon={eps}", f"loss_args.nft.prompt_weight={w}"]
            for eps in (0.5, 1.0, 2.0)
            for w in ("constant", "dr_grpo", "grpo")
        }
    else:
        reference_base = "nft"
        base_variants = {loss: [f"loss={loss}"] for loss in args.losses}
    variants: dict[str, dict] = {}
    for base, overrides in base_variants.items():
        for n in args.num_minibatches or [None]:
            for k in args.max_staleness or [None]:
                label = base + ("" if n is None else f" mb={n}") + ("" if k is None else f" k={k}")
                extra = [] if n is None else [f"num_minibatches={n}"]
                if k is not None:
                    extra.append(f"rollout.max_staleness={k}")
                if k:  # the decoupled objective: ratio against the recomputed π_old, truncated π_old/π_behav weights
                    extra += ["recompute_old_logprobs=true", "rollout_correction.enabled=true"]
                variants[label] = {"base": base, "num_minibatches": n, "max_staleness": k,
                                   "overrides": [*overrides, *extra]}

    info = machine_info()
    argv = sys.argv[1:]
    if "--max-new-runs" in argv:  # how the runs were scheduled, not what they are
        del argv[argv.index("--max-new-runs"):argv.index("--max-new-runs") + 2]
    command = "python benchmarks/compare_losses.py " + shlex.join(argv)
    base_eval = evaluate_model(REPO / task["model_dir"], runs_dir / "base_eval", task, args.eval_k,
                               log_dir / "base.eval.log")
    previous = previous_runs(args.reuse_results)
    results: dict[str, list[dict]] = {label: [] for label in variants}
    total = len(variants) * len(args.seeds)
    done = new_runs = 0

    def report() -> None:
        write_report(name, {lab: r for lab, r in results.items() if r}, variants, info=info, command=command,
                     config=args.config, task=task, seeds=args.seeds, total=total, base_eval=base_eval,
                     eval_k=args.eval_k, reference_base=reference_base)

    for seed in args.seeds:  # seed-major: a partial result has every variant at the same seeds
        for label, v in variants.items():
            tag = label.replace(" ", "_").replace("=", "") + f"_seed{seed}"
            budget_spent = args.max_new_runs is not None and new_runs >= args.max_new_runs
            if budget_spent and not (runs_dir / tag / "summary.json").exists() and tag not in previous:
                continue  # not trained in this invocation; the report covers the finished runs
            run = run_one(tag, args.config, [*v["overrides"], f"seed={seed}", *common], runs_dir, log_dir, task,
                          args.eval_k, previous.get(tag))
            run.update(seed=seed, num_minibatches=v["num_minibatches"], max_staleness=v["max_staleness"])
            results[label].append(run)
            done += 1
            trained_now = run.pop("trained_now")
            new_runs += trained_now
            ev = run["eval"]
            print(f"[{done}/{total}] {label} seed={seed}: final avg@{task['k']} {run['final_accuracy']:.3f}, "
                  + ", ".join(f"pass@{j} {ev[f'pass@{j}']:.3f}" for j in PASS_K if f"pass@{j}" in ev)
                  + f", train {run['train_seconds']:.0f}s, eval {run['eval_seconds']:.0f}s", flush=True)
            if trained_now:
                report()
    if done:
        report()
        print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
