"""Make assets/data/addition_chat_{train,val}.jsonl: 2-digit additions asked in words, for chat models.

    python scripts/make_addition_chat.py      # the committed files (deterministic, < 1 s)

`configs/smollm2_addition.yaml` trains SmolLM2-135M-Instruct on them through its chat template. The
question asks for the bare number; the verifier's number-literal rule (docs/data.md) then refuses
an answer that restates the sum ("47 + 85") instead of giving it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from polopt.tasks.arith import make_splits  # noqa: E402

QUESTION = "What is {a} + {b}? Answer with just the number."
SIZES = {"train": 3000, "val": 200}


def main() -> None:
    out = REPO / "assets" / "data"
    for split, problems in make_splits(seed=2026, digits=2, sizes=SIZES).items():
        path = out / f"addition_chat_{split}.jsonl"
        with open(path, "w") as f:
            for i, p in enumerate(problems):
                f.write(json.dumps({"id": f"addition-{split}-{i}", "question": QUESTION.format(a=p.a, b=p.b),
                                    "answer": p.answer}) + "\n")
        print(f"wrote {path} ({len(problems)} rows)")


if __name__ == "__main__":
    main()
