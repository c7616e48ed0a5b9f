"""Binary math rewards: math-verify in worker processes with a hard per-answer timeout.

    verifier = MathVerifier(timeout_s=5.0, num_workers=2)
    rewards = verifier(completions, gold_answers)        # list of 0.0 / 1.0

The convention (the same for training and evaluation; docs/data.md lists every case where it
changes math-verify's verdict, with an example), one part per module:

    extract.py   what math-verify reads of a completion: the last ``\\boxed{}``, the last
                 ``Answer:`` line, or the whole tail; text holding Python is never parsed
    parse.py     math-verify's parser as polopt calls it, and which match it took its answer from
    numbers.py   a number is answered with a number (``number_answers="literal"``)
    gold.py      how a gold answer is read, and the load-time check for unparseable ones
    score.py     one verdict in this process (`score_one`), and plain integers decided without a worker
    worker.py    the worker process and the parent's handle on it (JSON lines over pipes)
    verifier.py  `MathVerifier`: the pool of workers, its deadlines and counters; `verification_counts`

Custom verifiers plug in through the recipe config (``verifier._component_``): any callable
``(completions: list[str], answers: list[str]) -> list[float]`` works.
"""

from polopt.verify.extract import (
    ANSWER_FORMATS,
    CODE_LIKE,
    CUT_OFF,
    from_last_box,
    is_code_like,
    last_answer_line,
    last_boxed,
    prediction_text,
)
from polopt.verify.gold import _gold_text, unparseable_gold_answers
from polopt.verify.numbers import NUMBER_ANSWERS, is_number_literal, restates_a_number, states_a_number
from polopt.verify.parse import _parse, _quiet_math_verify, answer_read
from polopt.verify.score import integer_verdict, score_one
from polopt.verify.verifier import MathVerifier, verification_counts

__all__ = [
    "ANSWER_FORMATS", "CODE_LIKE", "CUT_OFF", "NUMBER_ANSWERS", "MathVerifier", "answer_read", "from_last_box",
    "integer_verdict", "is_code_like", "is_number_literal", "last_answer_line", "last_boxed", "prediction_text",
    "restates_a_number", "score_one", "states_a_number", "unparseable_gold_answers", "verification_counts",
]
