"""The gold answer as math-verify reads it, and the load-time check of a dataset's gold answers.

The gold answer is wrapped in ``\\boxed{}`` (without sentence punctuation at its end) unless it
already holds ``\\boxed`` or ``$``-delimited math, and parsed with the same extraction as the
completion; ``math_verify.verify`` with its defaults decides (`polopt.verify.score`).
"""

from __future__ import annotations

import re
from typing import Iterable

from polopt.verify.extract import _without_sentence_end, is_code_like
from polopt.verify.parse import _parse, _quiet_math_verify

_PLAIN_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
_DELIMITED_MATH = re.compile(r"^\s*(\$.*\$|\\\(.*\\\)|\\\[.*\\\])\s*$", re.DOTALL)


def _gold_text(answer: str) -> str:
    """The gold answer as math-verify reads it: delimited math as written, a bare answer boxed
    without sentence punctuation at its end (datasets carry "7\\text{ hours}." and "\\text{(E)},")."""
    if "\\boxed" in answer or _DELIMITED_MATH.match(answer):
        return answer
    return "\\boxed{" + _without_sentence_end(answer) + "}"


def unparseable_gold_answers(answers: Iterable[str], *, timeout_s: float = 5.0) -> list[int]:
    """Indices of gold answers math-verify cannot parse (they would score every completion 0).

    Parses in this process with math-verify's signal timeout when on the main thread (a gold that
    takes longer than `timeout_s` counts as unparseable); called once per dataset at load time.
    """
    import threading

    on_main = threading.current_thread() is threading.main_thread()
    timeout = max(1, int(round(timeout_s))) if on_main else None
    _quiet_math_verify()
    verdicts: dict[str, bool] = {}  # training sets repeat answers: parse each distinct one once
    bad = []
    for i, answer in enumerate(answers):
        text = str(answer).strip()
        if _PLAIN_NUMBER.match(text):
            continue  # nearly every DAPO/GSM8K answer: skip the parser
        if text not in verdicts:
            # math-verify falls back to the raw string when sympy fails: then only an identical string matches
            parsed = _parse(_gold_text(text), timeout) if text and not is_code_like(text) else []
            verdicts[text] = any(not isinstance(p, str) for p in parsed)
        if not verdicts[text]:
            bad.append(i)
    return bad
