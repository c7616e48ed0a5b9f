"""A number is answered with a number (``number_answers="literal"``, the default).

When the gold answer is a number literal, the answer math-verify read must state one (a number
literal, or an equation whose last side is one), or it scores 0. "591+734" vs gold 1325 restates
the question, and math-verify would score it 1; "1,325", "1325.0", "\\frac{1}{2}" (vs 0.5),
"50\\%", "x = 1325" and "591+734=1325" still score. See `is_number_literal` and
`states_a_number`; ``number_answers="equivalent"`` keeps math-verify's verdict.
"""

from __future__ import annotations

import math
import re
from typing import Optional

from polopt.verify.parse import _answer_text

NUMBER_ANSWERS = ("literal", "equivalent")

# What surrounds a number without changing it: "$" delimiters, \left/\right, a dollar sign "\$"
_NUMBER_DECORATION = re.compile(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\?\$")
# ... and what may follow it: a unit in \text{}, degrees, a percent sign, spacing, a full stop
_NUMBER_SUFFIX = re.compile(r"(?:\\(?:text|mbox|mathrm)\{[^{}]*\}|\^\s*\{?\\circ\}?|\\?%|\\[,!;: ]|~|\.|\s)+$")
# "=" and "\approx" end an equation's side; "<=", ">=", "!=" and "\=" do not
_EQUATION_SIDES = re.compile(r"(?<![<>!\\])=|\\approx(?![A-Za-z])")
_INTEGER = r"\d{1,3}(?:(?:,|\{,\}|\\,|,\\!)\d{3})+|\d+"  # 1325, or 1,325 / 1{,}325 / 1\,325 / 1,\!325
_DECIMAL_LITERAL = re.compile(rf"[+-]?\s*(?:(?:{_INTEGER})(?:\.\d+)?|\.\d+)")
_SCIENTIFIC_LITERAL = re.compile(r"[+-]?\s*\d(?:\.\d+)?\s*\\(?:times|cdot)\s*10\^(?:\{\s*[+-]?\d+\s*\}|\d)")
_FRACTION_LITERAL = re.compile(
    rf"[+-]?\s*(?:(?P<whole>{_INTEGER})\s*)?"  # a whole part makes a mixed number: 1\frac{1}{2}
    rf"\\[dt]?frac(?:\{{\s*(?P<p>[+-]?(?:{_INTEGER}))\s*\}}|(?P<p1>\d))(?:\{{\s*(?P<q>{_INTEGER})\s*\}}|(?P<q1>\d))"
    rf"|[+-]?\s*(?P<p2>{_INTEGER})\s*/\s*(?P<q2>{_INTEGER})"
)


def _integer_value(text: str) -> int:
    return int(re.sub(r"\D", "", text))


def is_number_literal(text: Optional[str]) -> bool:
    """True if `text` (an extracted answer, as math-verify normalised it) writes a number without
    arithmetic: an integer or decimal, signed or not, with thousands separators or not (``-3``,
    ``1,325``, ``1{,}325``, ``1325.0``, ``.5``); a fraction of two integers in lowest terms
    (``\\frac{1}{2}``, ``\\dfrac{-3}{4}``, ``1/2``) or a mixed number (``1\\frac{1}{2}``); or scientific
    notation (``1.5\\times 10^{3}``). Decoration is ignored: ``$``, ``\\left``/``\\right``, a dollar
    sign, a unit in ``\\text{}``, ``^\\circ``, ``\\%``, spacing, a full stop, and parentheses around
    the number. An equation is not a number literal (see `states_a_number`).

    Lowest terms, because ``\\frac{2650}{2}`` is the question "2650/2" restated, not its answer.
    """
    if not text:
        return False
    text = _NUMBER_DECORATION.sub("", text).strip()
    if text.startswith("\\text{") and text.endswith("}") and "}" not in text[6:-1]:
        text = text[6:-1]
    text = _NUMBER_SUFFIX.sub("", text).strip()
    if text.startswith("(") and text.endswith(")") and "," not in text:
        text = text[1:-1].strip()
    if _DECIMAL_LITERAL.fullmatch(text) or _SCIENTIFIC_LITERAL.fullmatch(text):
        return True
    fraction = _FRACTION_LITERAL.fullmatch(text)
    if fraction is None:
        return False
    p = _integer_value(fraction["p"] or fraction["p1"] or fraction["p2"])
    q = _integer_value(fraction["q"] or fraction["q1"] or fraction["q2"])
    if q == 0 or math.gcd(p, q) != 1:
        return False
    # a mixed number's fraction is proper, and signed only in front: 1\frac{1}{2}, not 1\frac{3}{2}
    return fraction["whole"] is None or (0 < p < q and (fraction["p"] or "").lstrip()[:1] not in "+-")


def states_a_number(answer: Optional[str]) -> bool:
    """True if `answer` is a number literal or ends with one after ``=`` or ``\\approx``: ``x = 5``,
    ``90+63=153`` and ``x \\approx 11`` state their number, ``153 = 90+63`` and ``x \\geq 5`` do not."""
    return answer is not None and is_number_literal(_EQUATION_SIDES.split(answer)[-1])


def restates_a_number(gold_text: str, prediction: str) -> bool:
    """True if the gold answer is a number literal and the prediction's answer does not state a
    number (`is_number_literal`, `states_a_number`): what ``number_answers="literal"`` scores 0.

    Both texts as math-verify gets them (`_gold_text`, `prediction_text`); the answers compared are
    the ones math-verify read from them.
    """
    return is_number_literal(_answer_text(gold_text)) and not states_a_number(_answer_text(prediction))


def _check_number_answers(number_answers: str, where: str) -> None:
    if number_answers not in NUMBER_ANSWERS:
        raise ValueError(f"{where}: number_answers must be one of {NUMBER_ANSWERS}, got {number_answers!r}")
