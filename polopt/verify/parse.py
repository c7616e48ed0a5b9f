"""math-verify's parser as polopt calls it: the extraction targets (LaTeX, then plain
expressions), the match `parse` took its answer from (`answer_read`), and math-verify's logger
kept quiet. math-verify is imported on first use, so importing this module does not need it.
"""

from __future__ import annotations

import logging
from typing import Optional


def _extraction_targets():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(), ExprExtractionConfig())


def _parse(text: str, timeout: Optional[int]) -> list:
    from math_verify import parse

    return parse(text, extraction_config=_extraction_targets(), parsing_timeout=timeout)


def answer_read(text: str) -> Optional[tuple[object, str]]:
    """(answer, text) of the match math-verify's `parse` takes its answer from, the text as
    math-verify normalised it (``\\boxed{5\\text{ cm}}`` reads "5"); None if no match parses.

    `parse` also returns a string, but that is the first match it tried, a different one when that
    one failed to parse (``\\boxed{= 5}``); this walks the matches in `parse`'s order (priority,
    then rightmost first) and stops at the first that parses, as `parse` does. Its parsing is
    cached, so repeating it after `parse` is cheap.
    """
    from itertools import groupby

    from math_verify.parser import extract_match, get_extraction_regexes

    patterns = sorted(
        ((pattern, target, priority) for patterns, target in get_extraction_regexes(_extraction_targets())
         for pattern, priority in patterns),
        key=lambda item: item[2],
    )
    for _, group in groupby(patterns, key=lambda item: item[2]):
        matches = sorted(((m, target) for pattern, target, _ in group for m in pattern.finditer(text)),
                         key=lambda item: (item[0].end(), -item[0].start()), reverse=True)
        for match, target in matches:
            parsed, read = extract_match(match, target)
            if parsed is not None:
                return parsed, read
    return None


def _answer_text(text: str) -> Optional[str]:
    read = answer_read(text)
    return None if read is None else read[1]


def _quiet_math_verify() -> None:
    # math-verify logs the whole offending input on every failure (megabytes for a bad answer).
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
