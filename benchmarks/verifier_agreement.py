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
Figures 1 and 2 are measured in both `number_answers` modes where the polopt measured has them:
"literal" (the default: a number gold needs a number literal as the answer) and "equivalent"
(math-verify's equivalence alone), side by side, with every row whose verdict the mode changes.
Each run updates its --label entry in benchmarks/results/verifier_agreement.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
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
    has_modes = "number_answers" in inspect.signature(verify_module.MathVerifier).parameters
    if has_modes:  # the same two runs with math-verify's equivalence alone
        with verify_module.MathVerifier(num_workers=2, number_answers="equivalent") as verifier:
            equivalent = verifier(completions, golds)
            run["verifier_cases_timeouts_equivalent"] = verifier.num_timeouts
        with verify_module.MathVerifier(timeout_s=60.0, num_workers=2, number_answers="equivalent") as verifier:
            suite_equivalent = verifier([c["pred"] for c in suite], [c["gold"] for c in suite])
            run["upstream_suite_timeouts_equivalent"] = verifier.num_timeouts
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
        if has_modes:
            run["verifier_cases"][dataset]["equivalent_vs_label"] = sum(equivalent[i] == float(rows[i]["label"]) for i in idx)
    run["verifier_cases_disagreements_with_label"] = [
        {"id": rows[i]["id"], "dataset": rows[i]["dataset"], "gold": rows[i]["gold"], "label": rows[i]["label"], "polopt": scores[i], "raw": raw[i]}
        for i in range(len(rows)) if scores[i] != float(rows[i]["label"])
    ]
    run["upstream_suite"] = {
        "cases": len(suite),
        "polopt_agrees_with_expected": sum(s == float(c["expected"]) for s, c in zip(suite_scores, suite)),
        "differs": [c["source"] for s, c in zip(suite_scores, suite) if s != float(c["expected"])],
    }
    if has_modes:
        run["upstream_suite"]["equivalent_agrees_with_expected"] = sum(
            s == float(c["expected"]) for s, c in zip(suite_equivalent, suite))
        run["number_answers_changes"] = {
            "verifier_cases": [_change(verify_module, rows[i]["id"], r["gold"], r["completion"], scores[i], equivalent[i],
                                       label=rows[i]["label"])
                               for i, r in enumerate(rows) if scores[i] != equivalent[i]],
            "upstream_suite": [_change(verify_module, c["source"], c["gold"], c["pred"], s, e, expected=c["expected"])
                               for s, e, c in zip(suite_scores, suite_equivalent, suite) if s != e],
        }
    run["unparseable_gold"] = {}
    for name in GOLD_FILES:
        answers = [r["answer"] for r in jsonl(data / f"{name}.jsonl")]
        bad = verify_module.unparseable_gold_answers(answers)
        run["unparseable_gold"][name] = {"rows": len(answers), "unparseable": len(bad), "examples": [answers[i] for i in bad[:10]]}
    write(args.label, run)


def _change(verify_module, name: str, gold: str, completion: str, literal: float, equivalent: float, **truth) -> dict:
    """A row whose verdict the number_answers mode changes: its gold, the answer math-verify read, both verdicts."""
    text = verify_module.prediction_text(completion, "boxed", 4000)
    read = verify_module.answer_read(text) if text is not None else None
    return {"id": name, "gold": gold, "answer_read": read[1] if read else None, "literal": literal,
            "equivalent": equivalent, **truth}


def _git_head(root: Path) -> str:
    import subprocess

    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    changed = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "polopt/verify"]).returncode
    return (out.stdout.strip() or "unknown") + (" with uncommitted changes to polopt/verify/" if changed else "")


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
        modes = "number_answers_changes" in r
        polopt = "polopt (number_answers=literal) = label | polopt (equivalent) = label" if modes else "polopt = label"
        lines += [f"## {name}: polopt at {r['commit']} ({r['date']})", "", f"- command: `{r['command']}` in `{r['cwd']}`",
                  f"- machine: {r['machine']}; " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), "",
                  f"| verifier_cases.jsonl | rows | {polopt} | raw math-verify = label | polopt = raw math-verify |",
                  "|---|---:|---:|---:|---:|" + ("---:|" if modes else "")]
        for dataset, c in r["verifier_cases"].items():
            n = c["rows"]
            equivalent = f"{c['equivalent_vs_label']} ({c['equivalent_vs_label'] / n:.2%}) | " if modes else ""
            lines.append(f"| {dataset} | {n} | {c['polopt_vs_label']} ({c['polopt_vs_label'] / n:.2%}) | {equivalent}"
                         f"{c['raw_math_verify_vs_label']} ({c['raw_math_verify_vs_label'] / n:.2%}) | "
                         f"{c['polopt_vs_raw_math_verify']} ({c['polopt_vs_raw_math_verify'] / n:.2%}) |")
        u = r["upstream_suite"]
        lines += ["", f"math-verify's own test cases: polopt gives the expected verdict on {u['polopt_agrees_with_expected']} of {u['cases']}"
                  + (f" (with number_answers=equivalent: {u['equivalent_agrees_with_expected']})" if modes else "")
                  + f"; differs on {', '.join(u['differs'])}."]
        if modes:
            changes = r["number_answers_changes"]
            lines += ["", f"Verdicts that number_answers changes (literal vs equivalent): {len(changes['verifier_cases'])} of "
                      f"{r['verifier_cases']['all']['rows']} labelled completions, {len(changes['upstream_suite'])} of {u['cases']} "
                      "math-verify test cases."]
            if changes["verifier_cases"] or changes["upstream_suite"]:
                lines += ["", "| row | gold | answer math-verify read | literal | equivalent | label / expected |", "|---|---|---|---:|---:|---:|"]
                for change in changes["verifier_cases"] + changes["upstream_suite"]:
                    truth = change.get("label", change.get("expected"))
                    lines.append(f"| {change['id']} | `{change['gold']}` | `{change['answer_read']}` | {change['literal']:g} | "
                                 f"{change['equivalent']:g} | {truth} |")
        lines += ["", "| gold answers | rows | unparseable | examples |", "|---|---:|---:|---|"]
        for file, g in r["unparseable_gold"].items():
            examples = ", ".join(f"`{e}`" for e in g["examples"][:5])
            lines.append(f"| {file} | {g['rows']} | {g['unparseable']} | {examples} |")
        lines.append("")
    (RESULTS / "verifier_agreement.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
