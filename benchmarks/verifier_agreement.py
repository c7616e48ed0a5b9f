"""Verifier fidelity on real data: MathVerifier vs labels and vs raw math-verify, before/after a change.

    .venv/bin/python benchmarks/verifier_agreement.py --label after      # this checkout
    cd ../main && .venv/bin/python ../verify/benchmarks/verifier_agreement.py --label before --polopt .
    (--data DIR: the shared data folder, default ../shared/data beside the checkout)

Run it from the root of the checkout measured: before polopt's verifier started its workers in
its own folder, they imported polopt from the working directory.

Three figures for the polopt package found at --polopt (default: this checkout):
1. `verifier_cases.jsonl` (../shared/data, all 6,076 labelled completions, boxed format): agreement
   of MathVerifier with the labels and with raw math-verify (gold wrapped in \\boxed{}, completion
   parsed whole with LaTeX + expression extraction, math-verify's defaults otherwise).
2. math-verify's own test cases (tests/data/math_verify_cases.jsonl): how many verdicts MathVerifier
   shares with the upstream expected verdict (timeout_s=60, so that load does not decide).
3. Gold answers of each benchmark/training file in ../shared/data that `unparseable_gold_answers`
   reports (they can never score 1).
Each run updates its --label entry in benchmarks/results/verifier_agreement.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

from _common import REPO, RESULTS, environment  # benchmarks/ is on sys.path when run as a script

UPSTREAM_CASES = REPO / "tests" / "data" / "math_verify_cases.jsonl"
GOLD_FILES = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench", "dapo_math_17k",
              "math_level3to5_simplerl_train", "gsm8k_train", "gsm8k_test")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def raw_math_verify(completion: str, gold: str) -> float:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    targets = (LatexExtractionConfig(), ExprExtractionConfig())
    gold_parsed = parse("\\boxed{" + gold + "}", extraction_config=targets)
    pred_parsed = parse(completion, extraction_config=targets)
    return float(bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of this run in the results (e.g. before, after)")
    parser.add_argument("--polopt", default=str(REPO), help="checkout whose polopt package is measured")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    args = parser.parse_args()
    data = Path(args.data)
    sys.path.insert(0, str(Path(args.polopt).resolve()))
    verify_module = importlib.import_module("polopt.verify")
    commit = _git_head(Path(args.polopt))
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    run: dict = {"polopt": str(Path(verify_module.__file__).resolve().parents[1]), "commit": commit, "cwd": os.getcwd()}

    rows = jsonl(data / "verifier_cases.jsonl")
    completions, golds = [r["completion"] for r in rows], [r["gold"] for r in rows]
    with verify_module.MathVerifier(num_workers=2) as verifier:  # the defaults training uses
        start = time.perf_counter()
        scores = verifier(completions, golds)
        run["verifier_cases_seconds"] = time.perf_counter() - start
        run["verifier_cases_timeouts"] = verifier.num_timeouts
    suite = jsonl(UPSTREAM_CASES)
    # a generous timeout: the verdicts, not this (shared) machine's load, are compared
    with verify_module.MathVerifier(timeout_s=60.0, num_workers=2) as verifier:
        suite_scores = verifier([c["pred"] for c in suite], [c["gold"] for c in suite])
        run["upstream_suite_timeouts"] = verifier.num_timeouts
    raw = [raw_math_verify(c, g) for c, g in zip(completions, golds)]
    run["verifier_cases"] = {}
    for dataset in ("MATH", "GSM8K-test", "all"):
        idx = [i for i, r in enumerate(rows) if dataset == "all" or r["dataset"] == dataset]
        run["verifier_cases"][dataset] = {
            "rows": len(idx),
            "polopt_vs_label": sum(scores[i] == float(rows[i]["label"]) for i in idx),
            "raw_math_verify_vs_label": sum(raw[i] == float(rows[i]["label"]) for i in idx),
            "polopt_vs_raw_math_verify": sum(scores[i] == raw[i] for i in idx),
        }
    run["verifier_cases_disagreements_with_label"] = [
        {"id": rows[i]["id"], "dataset": rows[i]["dataset"], "gold": rows[i]["gold"], "label": rows[i]["label"], "polopt": scores[i], "raw": raw[i]}
        for i in range(len(rows)) if scores[i] != float(rows[i]["label"])
    ]
    run["upstream_suite"] = {
        "cases": len(suite),
        "polopt_agrees_with_expected": sum(s == float(c["expected"]) for s, c in zip(suite_scores, suite)),
        "differs": [c["source"] for s, c in zip(suite_scores, suite) if s != float(c["expected"])],
    }
    run["unparseable_gold"] = {}
    for name in GOLD_FILES:
        answers = [r["answer"] for r in jsonl(data / f"{name}.jsonl")]
        bad = verify_module.unparseable_gold_answers(answers)
        run["unparseable_gold"][name] = {"rows": len(answers), "unparseable": len(bad), "examples": [answers[i] for i in bad[:10]]}
    write(args.label, run)


def _git_head(root: Path) -> str:
    import subprocess

    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def write(label: str, run: dict) -> None:
    env = environment("cpu")
    path = RESULTS / "verifier_agreement.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    results["runs"][label] = {**run, "date": env["date"], "command": env["command"],
                              "machine": f"{env['cpus_usable']} usable CPUs of {env['cpu_count']}, shared with other jobs",
                              "versions": {p: version(p) for p in ("math-verify", "sympy", "latex2sympy2_extended")}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    lines = ["# Verifier agreement", "",
             "`benchmarks/verifier_agreement.py`: MathVerifier (boxed format, default options) on ../shared/data.", ""]
    for name, r in results["runs"].items():
        lines += [f"## {name}: polopt at {r['commit']} ({r['date']})", "", f"- command: `{r['command']}` in `{r['cwd']}`",
                  f"- machine: {r['machine']}; " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), "",
                  "| verifier_cases.jsonl | rows | polopt = label | raw math-verify = label | polopt = raw math-verify |",
                  "|---|---:|---:|---:|---:|"]
        for dataset, c in r["verifier_cases"].items():
            n = c["rows"]
            lines.append(f"| {dataset} | {n} | {c['polopt_vs_label']} ({c['polopt_vs_label'] / n:.2%}) | "
                         f"{c['raw_math_verify_vs_label']} ({c['raw_math_verify_vs_label'] / n:.2%}) | "
                         f"{c['polopt_vs_raw_math_verify']} ({c['polopt_vs_raw_math_verify'] / n:.2%}) |")
        u = r["upstream_suite"]
        lines += ["", f"math-verify's own test cases: polopt gives the expected verdict on {u['polopt_agrees_with_expected']} of {u['cases']}; "
                  f"differs on {', '.join(u['differs'])}.",
                  "", "| gold answers | rows | unparseable | examples |", "|---|---:|---:|---|"]
        for file, g in r["unparseable_gold"].items():
            examples = ", ".join(f"`{e}`" for e in g["examples"][:5])
            lines.append(f"| {file} | {g['rows']} | {g['unparseable']} | {examples} |")
        lines.append("")
    (RESULTS / "verifier_agreement.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
