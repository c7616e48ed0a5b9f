"""Rebuild `math_verify_cases.jsonl` from math-verify's upstream test files (read as data, never run).

    python tests/data/make_math_verify_cases.py [--git-dir /work/.mirror/huggingface+Math-Verify/repo]

Each `@pytest.mark.parametrize` table whose argument names include `gold` and `pred` gives one row
per literal tuple: gold, prediction, the verdict math-verify's test expects, how that test calls
math-verify (`harness`), and where the tuple is (`source`: path:line:column at `upstream`). Tuples are read
with `ast.literal_eval`, so only literal text comes over; the one f-string (`f"{math.sqrt(17):.15f}"`)
is formatted from its `math` call on a literal, anything else that is not literal is reported and
left out. A `compare_strings(<literal>, <literal>, ...) == <literal>` assertion outside a table
(test_precision) is a case too. The harness is read from the test function's call: `compare_strings(...,
match_types=..., precision=..., strict=..., allow_set_relation_comp=...)` with the helper's defaults
for anything not passed, or `verify(parse(gold), parse(pred))` with math-verify's defaults.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_GIT_DIR = "/work/.mirror/huggingface+Math-Verify/repo"
UPSTREAM = "huggingface/Math-Verify"
# compare_strings' own defaults in upstream tests/test_all.py (its signature, read once)
COMPARE_STRINGS_DEFAULTS = {"match_types": ["latex", "expr"], "precision": 6, "strict": True, "allow_set_relation_comp": False}
HARNESS_KEYS = tuple(COMPARE_STRINGS_DEFAULTS)


def git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True, text=True).stdout


def parametrize_tables(tree: ast.Module):
    """(function, argnames, list of tuple nodes) for each parametrize decorator with gold and pred."""
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "parametrize":
                names = [n.strip() for n in ast.literal_eval(deco.args[0]).split(",")]
                if "gold" in names and "pred" in names:
                    yield node, names, deco.args[1].elts


def literal(node: ast.AST):
    """ast.literal_eval, plus f-strings whose fields are `math.<function>(<literals>)`."""
    if isinstance(node, ast.Tuple):
        return tuple(literal(e) for e in node.elts)
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                call = value.value
                if not (isinstance(call, ast.Call) and getattr(call.func.value, "id", "") == "math"):
                    raise ValueError("f-string field is not a math.<function> call")
                number = getattr(math, call.func.attr)(*map(ast.literal_eval, call.args))
                parts.append(format(number, literal(value.format_spec) if value.format_spec else ""))
            else:
                parts.append(value.value)
        return "".join(parts)
    return ast.literal_eval(node)


def compare_strings_asserts(tree: ast.Module):
    """`assert compare_strings(<gold>, <pred>, ...) == <expected>` outside parametrize tables."""
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.decorator_list:
            continue
        for stmt in ast.walk(node):
            if isinstance(stmt, ast.Assert) and isinstance(stmt.test, ast.Compare):
                call = stmt.test.left
                if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "compare_strings":
                    yield node, call, ast.literal_eval(stmt.test.comparators[0])


def harness_of(function: ast.FunctionDef) -> dict:
    """How the test function calls math-verify: compare_strings' keywords or plain parse/verify."""
    for call in ast.walk(function):
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "compare_strings":
            harness = {"call": "compare_strings", **COMPARE_STRINGS_DEFAULTS}
            for kw in call.keywords:
                # a keyword bound to a parametrize argument is filled in per row (precision, strict, ...)
                harness[kw.arg] = {"param": kw.value.id} if isinstance(kw.value, ast.Name) else ast.literal_eval(kw.value)
            return harness
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "verify":
            return {"call": "verify(parse(gold), parse(pred))"}
    raise ValueError(f"{function.name}: no compare_strings or verify call")


def cases_in(path: str, text: str, commit: str) -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    tree = ast.parse(text)
    for function, names, tuples in parametrize_tables(tree):
        harness = harness_of(function)
        for node in tuples:
            where = f"tests/{path}:{node.lineno}:{node.col_offset + 1}"
            try:
                values = dict(zip(names, literal(node)))
            except ValueError:
                skipped.append(f"{where} ({function.name}: not a literal tuple)")
                continue
            expected = values.get("expected", values.get("result"))
            row_harness = {k: (values[v["param"]] if isinstance(v, dict) else v) for k, v in harness.items()}
            rows.append({
                "gold": values["gold"], "pred": values["pred"], "expected": int(expected),
                "harness": row_harness, "test": function.name, "source": where,
                "upstream": f"{UPSTREAM}@{commit}",
            })
    for function, call, expected in compare_strings_asserts(tree):
        harness = {"call": "compare_strings", **COMPARE_STRINGS_DEFAULTS}
        harness.update({kw.arg: ast.literal_eval(kw.value) for kw in call.keywords})
        gold, pred = map(ast.literal_eval, call.args[:2])
        rows.append({
            "gold": gold, "pred": pred, "expected": int(expected), "harness": harness, "test": function.name,
            "source": f"tests/{path}:{call.lineno}:{call.col_offset + 1}", "upstream": f"{UPSTREAM}@{commit}",
        })
    return rows, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--git-dir", default=DEFAULT_GIT_DIR)
    parser.add_argument("--out", default=str(HERE / "math_verify_cases.jsonl"))
    args = parser.parse_args()
    commit = git(args.git_dir, "rev-parse", "HEAD").strip()
    files = [f for f in git(args.git_dir, "ls-tree", "--name-only", "HEAD", "tests/").split() if f.endswith(".py")]
    rows, skipped = [], []
    for path in sorted(files):
        found, left_out = cases_in(Path(path).name, git(args.git_dir, "show", f"HEAD:{path}"), commit)
        rows += found
        skipped += left_out
    with open(args.out, "w") as out:
        for i, row in enumerate(rows):
            out.write(json.dumps({"id": i, **row}, ensure_ascii=False) + "\n")
    print(f"{len(rows)} cases from {UPSTREAM}@{commit[:7]} -> {args.out}")
    for line in skipped:
        print("left out:", line)


if __name__ == "__main__":
    main()
