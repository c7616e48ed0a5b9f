"""What math-verify reads of a completion.

- The completion is cut to its last ``max_completion_chars`` characters (the answer is at the end;
  parsing cost grows with length).
- ``answer_format="boxed"`` (Qwen2.5-Math prompts): the text from the LAST ``\\boxed{...}`` (or
  ``\\fbox{...}``) on. math-verify on its own joins nearby boxes into a set, so "\\boxed{3}, no:
  \\boxed{4}" would match neither 3 nor 4; Qwen2.5-Math's evaluation and verl's math_dapo take the
  last box, and so do we: a model that revises its answer gets the revision scored. What follows
  the box stays, so math-verify's own priorities still apply ("... The final answer is $6$" after
  the box wins, as in math-verify). A last box cut off before its closing brace scores 0: the
  answer is incomplete, and an earlier box is not the last answer.
- ``answer_format="answer_line"`` (DAPO prompts, "Answer: $Answer"): the LAST line starting with
  ``Answer:`` (or the next line, if that one is empty). Delimited math on it goes to math-verify as
  written; a bare answer is boxed without sentence punctuation, a lead-in ("The answer is") or
  words after the value ("5 cm"). A completion without such a line falls back to the box rule.
- A completion with none of the above is handed whole to math-verify's own extraction (LaTeX and
  plain expressions, anchored on "final answer is ..." and similar, else the last expression):
  GSM8K-style completions ending in "A: 18" are scored that way.
- Text that contains Python (``__import__``, ``eval(``, ``lambda x:``, ``import os``, ``os.system``)
  is never parsed and scores 0; LaTeX such as ``\\lambda`` and prose such as "import" are not code.

`prediction_text` is the text handed to math-verify; `_prediction` also says why a completion
scores 0 unparsed (`CODE_LIKE`, `CUT_OFF`).
"""

from __future__ import annotations

import re
from typing import Optional

ANSWER_FORMATS = ("boxed", "answer_line")

# Python, not mathematics: never handed to the parser (sympy's parse_expr evaluates Python). Each
# pattern is a code construct that LaTeX and prose do not produce: `\lambda`, and the words "lambda",
# "import" or "eval" in a sentence, pass; `lambda x: ...`, `import os`, `eval(`, `__class__`, `os.system` do not.
_CODE_LIKE = re.compile(
    r"__[A-Za-z]\w*__"  # dunder names: __import__, __class__, __globals__, __builtins__
    r"|(?<![\\\w])(?:eval|exec|compile|getattr|setattr|delattr|globals|breakpoint)\s*\("  # builtin calls
    r"|(?<![\\\w])lambda(?:\s+[A-Za-z_*][\w\s,*]*)?:"  # a Python lambda (LaTeX's \lambda has a backslash)
    r"|^[ \t]*(?:from[ \t]+[\w.]+[ \t]+import[ \t]+[\w.*]|import[ \t]+[\w.]+(?:[ \t]+as[ \t]+\w+)?[ \t]*$)"  # import statement
    r"|(?<![\\\w])(?:os|sys|subprocess|shutil|builtins|importlib)\.[A-Za-z_]",  # module attribute access
    re.MULTILINE,
)
_BOX_OPENER = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# "Answer: 5", "**Answer:** 5", "### Answer: 5"; the answer may also stand on the next non-empty line
_ANSWER_LINE = re.compile(r"^[ \t]*(?:[*#]+[ \t]*)?Answer[ \t]*(?:\*+[ \t]*)?:[ \t]*\**([^\n]*)(?:\n\s*([^\n]+))?", re.MULTILINE | re.IGNORECASE)
_MATH_DELIMITER = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed|\\fbox")
# "The answer is 5", "x equals 5": plain words ending in is/are/equals/":" before the value
_LEAD_IN = re.compile(r"^(?:[A-Za-z]+[ \t]+)*?(?:[A-Za-z]+[ \t]+(?:is|are|equals)|[A-Za-z]+[ \t]*:)[ \t]+")
# "5 cm", "42 dollars", "\frac{3}{4} (in lowest terms)": words after a finished value (a digit, "}" or ")")
_TRAILING_WORDS = re.compile(r"(?<=[\d})\]])(?:[ \t]+(?:[A-Za-z]{2,}|\([A-Za-z ,]+\)))(?:[ \t]+(?:[A-Za-z]+|\([A-Za-z ,]+\)))*$")

# Why a completion scores 0 without being parsed (counted by MathVerifier, see `stats()`).
CODE_LIKE = "code_like"
CUT_OFF = "cut_off"


def _without_sentence_end(text: str) -> str:
    """`text` without trailing sentence punctuation or bold markers: "42." "42!" "42 **" -> "42".

    LaTeX's spacing commands "\\," "\\;" "\\!" stay (a loop, not a regex: linear on any input).
    """
    while True:
        text = text.rstrip()
        if text.endswith("**"):
            text = text[:-2]
        elif text and text[-1] in ".,;!?" and text[-2:-1] != "\\":
            text = text[:-1]
        else:
            return text


def is_code_like(text: str) -> bool:
    """True if `text` contains a Python construct (see `_CODE_LIKE`); such text is never parsed."""
    return _CODE_LIKE.search(text) is not None


def _box_content_end(text: str, open_brace: int) -> Optional[int]:
    """Index of the "}" closing the "{" at `open_brace` (None if the text ends first)."""
    depth = 0
    for j in range(open_brace, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


def from_last_box(text: str) -> Optional[str]:
    """`text` from its last ``\\boxed``/``\\fbox`` on, as math-verify should read it.

    Returns `text` unchanged when it has no box, and None when the last box was cut off (no
    closing brace: the answer is incomplete). ``\\fbox`` is spelt ``\\boxed`` (math-verify's
    patterns look for ``\\boxed``); a box without braces (``\\boxed 42.``, as some models write)
    gets them around its first word, without sentence punctuation.
    """
    openers = list(_BOX_OPENER.finditer(text))
    if not openers:
        return text
    last = openers[-1]
    rest = text[last.end() :]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        brace = len(text) - len(stripped)
        if _box_content_end(text, brace) is None:
            return None
        return "\\boxed" + text[brace:]
    word = re.match(r"[^\s$]*", stripped).group()
    value = _without_sentence_end(word)
    return "\\boxed{" + value + "}" + stripped[len(word) :] if value else None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` (None if there is none or it was cut off)."""
    cut = from_last_box(text) if _BOX_OPENER.search(text) else None
    if cut is None:
        return None
    return cut[len("\\boxed{") : _box_content_end(cut, len("\\boxed"))]


def last_answer_line(text: str) -> Optional[str]:
    """What follows ``Answer:`` on the last such line, as math-verify should read it (None if absent).

    Delimited math (``$...$``, ``\\(...\\)``, ``\\boxed{}``) goes to math-verify's own extraction as
    written, words around it included. A bare answer is boxed, without what is not part of the
    value: sentence punctuation at the end ("42."), a lead-in ("The answer is 5") and words after a
    finished value ("5 cm", "(in lowest terms)").
    """
    matches = _ANSWER_LINE.findall(text)
    if not matches:
        return None
    same_line, next_line = (part.strip() for part in matches[-1])
    answer = same_line or next_line
    if _MATH_DELIMITER.search(answer):
        return from_last_box(answer)
    value = _LEAD_IN.sub("", _without_sentence_end(answer), count=1)
    value = _without_sentence_end(_TRAILING_WORDS.sub("", value))
    return "\\boxed{" + value + "}" if value else None


def _prediction(completion: str, answer_format: str, max_completion_chars: int) -> tuple[Optional[str], Optional[str]]:
    """(text to parse, None) or (None, why it scores 0 unparsed: CODE_LIKE or CUT_OFF)."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    tail = completion[-max_completion_chars:] if max_completion_chars > 0 else completion
    if answer_format == "answer_line" and _ANSWER_LINE.search(tail):
        text = last_answer_line(tail)
    else:
        text = from_last_box(tail)
    if text is None:
        return None, CUT_OFF
    if is_code_like(text):
        return None, CODE_LIKE
    return text, None


def prediction_text(completion: str, answer_format: str, max_completion_chars: int) -> Optional[str]:
    """The text of `completion` that math-verify parses, per the convention in the module docstring.

    None means "scores 0 without parsing" (code-like text, or a last answer that was cut off).
    """
    return _prediction(completion, answer_format, max_completion_chars)[0]
