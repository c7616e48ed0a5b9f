"""One verdict: `score_one` in this process, and plain integers decided without math-verify's parser.

Plain integers are decided in the parent, without a worker round-trip: when the gold answer is a
plain integer (``0``, ``-12``, ``1325``; no sign on 0, no leading zeros) and, in ``boxed`` format, the
completion ends with its last box holding one (``... \\boxed{1325}`` and nothing after it but spaces
and full stops), the verdict is whether the two integers are equal — which is what math-verify
decides for them (a property test checks it against math-verify). Everything else goes to the
workers (`polopt.verify.verifier`). ``fast_integer_match=False`` sends every answer to math-verify.
"""

from __future__ import annotations

import re
from typing import Optional

from polopt.verify.extract import _prediction, from_last_box
from polopt.verify.gold import _gold_text
from polopt.verify.numbers import _check_number_answers, restates_a_number
from polopt.verify.parse import _parse

_PLAIN_INTEGER = re.compile(r"0|-?[1-9][0-9]{0,30}")
_BOXED_INTEGER_AT_END = re.compile(r"\\boxed\{\s*(0|-?[1-9][0-9]{0,30})\s*\}[\s.]*")


def integer_verdict(completion: str, answer: str, answer_format: str, max_completion_chars: int) -> Optional[float]:
    """1.0 / 0.0 when both the gold answer and the completion's final boxed answer are plain
    integers (the completion ending with that box), else None (math-verify decides). Only linear
    scans of the text: safe to run in the trainer's process."""
    if answer_format != "boxed" or not _PLAIN_INTEGER.fullmatch(answer.strip()):
        return None
    text = from_last_box(completion[-max_completion_chars:])
    match = _BOXED_INTEGER_AT_END.fullmatch(text) if text is not None else None
    return None if match is None else float(match.group(1) == answer.strip())


def score_one(
    completion: str,
    answer: str,
    *,
    answer_format: str = "boxed",
    max_completion_chars: int = 4000,
    mv_timeout: Optional[int] = None,
    number_answers: str = "literal",
) -> float:
    """1.0 if the scored part of `completion` is equivalent to `answer` per math-verify, else 0.0.

    ``number_answers="literal"``: a number literal as gold answer needs one as the answer (see
    `polopt.verify.numbers`); ``"equivalent"``: math-verify's verdict alone. In-process and unguarded:
    use `MathVerifier` for untrusted text. `mv_timeout` is math-verify's own signal timeout (main thread
    only); None disables it.
    """
    _check_number_answers(number_answers, "score_one")
    return _score(completion, answer, answer_format, max_completion_chars, mv_timeout, number_answers)[0]


def _score(completion, answer, answer_format, max_completion_chars, mv_timeout, number_answers) -> tuple[float, Optional[str]]:
    """(score, why it was not parsed: CODE_LIKE, CUT_OFF or None)."""
    from math_verify import verify

    text, skipped = _prediction(completion, answer_format, max_completion_chars)
    if text is None:
        return 0.0, skipped
    gold_text = _gold_text(str(answer))
    gold = _parse(gold_text, mv_timeout)
    if not gold:
        return 0.0, None
    pred = _parse(text, mv_timeout)
    if not pred or not verify(gold, pred, timeout_seconds=mv_timeout):
        return 0.0, None
    # the one place polopt overrules an equivalence: a number answered by an expression for it
    if number_answers == "literal" and restates_a_number(gold_text, text):
        return 0.0, None
    return 1.0, None
