"""Make the chat addition tasks for real chat models (assets/data/addition_*chat_{train,val}.jsonl).

    python scripts/make_addition_chat.py      # the committed files (deterministic, < 1 s)

Two tasks, asked in words ("What is 47 + 85? Answer with just the number."):

- `addition_upto20_chat_{train,val}`: both operands from 1 to 20, all 400 ordered pairs, 100 held out
  (`configs/smollm2_addition.yaml`: SmolLM2-135M-Instruct's base pass@1 sits inside 0.1-0.6 here).
- `addition_chat_{train,val}`: two 2-digit operands, 3,000 + 200 (a harder set; the committed SmolLM2
  rollout and step figures were measured on its prompts, docs/smollm2.md).

The question asks for the bare number; the verifier's number-literal rule (docs/data.md) then refuses
an answer that restates the sum ("47 + 85") instead of giving it.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from polopt.tasks.arith import Problem, make_splits  # noqa: E402

QUESTION = "What is {a} + {b}? Answer with just the number."
TWO_DIGIT_SIZES = {"train": 3000, "val": 200}
UP_TO, UP_TO_HELD_OUT = 20, 100


def up_to_splits(seed: int) -> dict[str, list[Problem]]:
    """Every ordered pair a, b in 1..UP_TO, shuffled; the first UP_TO_HELD_OUT are the validation set."""
    pairs = [Problem(a, b) for a in range(1, UP_TO + 1) for b in range(1, UP_TO + 1)]
    random.Random(seed).shuffle(pairs)
    return {"train": pairs[UP_TO_HELD_OUT:], "val": pairs[:UP_TO_HELD_OUT]}


def write(name: str, splits: dict[str, list[Problem]]) -> None:
    for split, problems in splits.items():
        path = REPO / "assets" / "data" / f"{name}_chat_{split}.jsonl"
        with open(path, "w") as f:
            for i, p in enumerate(problems):
                f.write(json.dumps({"id": f"{name.replace('_', '-')}-{split}-{i}", "question": QUESTION.format(a=p.a, b=p.b),
                                    "answer": p.answer}) + "\n")
        print(f"wrote {path} ({len(problems)} rows)")


def main() -> None:
    write("addition", make_splits(seed=2026, digits=2, sizes=TWO_DIGIT_SIZES))
    write("addition_upto20", up_to_splits(seed=2026))


if __name__ == "__main__":
    main()
