"""Binary math rewards: math-verify in worker processes with a hard per-answer timeout.

    verifier = MathVerifier(timeout_s=5.0, num_workers=2)
    rewards = verifier(completions, gold_answers)        # list of 0.0 / 1.0

What math-verify reads (the convention, the same for training and evaluation; docs/data.md lists
every case where it changes math-verify's verdict, with an example):

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
- A number is answered with a number (``number_answers="literal"``, the default): when the gold
  answer is a number literal, the answer math-verify read must state one (a number literal, or an
  equation whose last side is one), or it scores 0. "591+734" vs gold 1325 restates the question,
  and math-verify would score it 1; "1,325", "1325.0", "\\frac{1}{2}" (vs 0.5), "50\\%", "x = 1325"
  and "591+734=1325" still score. See `is_number_literal` and `states_a_number`;
  ``number_answers="equivalent"`` keeps math-verify's verdict.

The gold answer is wrapped in ``\\boxed{}`` (without sentence punctuation at its end) unless it
already holds ``\\boxed`` or ``$``-delimited math, and parsed with the same extraction; ``math_verify.verify`` with its defaults
decides.

Why worker processes: math-verify parses with sympy; a pathological answer (a power tower, 4,000
nested brackets, a megabyte of digits) can take minutes inside a single C call that no signal
interrupts, and sympy's ``parse_expr`` evaluates Python. Each answer therefore runs in a separate
process (started with ``subprocess``, so the trainer's torch threads and ``__main__`` are never
forked or re-imported) under a soft in-worker timer and a hard deadline: a worker still busy at
``timeout_s`` is killed and replaced, and its answer scores 0. A worker that dies scores 0 the same
way; the batch always returns. `MathVerifier.stats()` counts timeouts, worker deaths and answers
filtered as code; training and evaluation log them (`verification_counts`).

Plain integers are decided in the parent, without a worker round-trip: when the gold answer is a
plain integer (``0``, ``-12``, ``1325``; no sign on 0, no leading zeros) and, in ``boxed`` format, the
completion ends with its last box holding one (``... \\boxed{1325}`` and nothing after it but spaces
and full stops), the verdict is whether the two integers are equal — which is what math-verify
decides for them (a property test checks it against math-verify). Everything else goes to the
workers. ``fast_integer_match=False`` sends every answer to math-verify.

Custom verifiers plug in through the recipe config (``verifier._component_``): any callable
``(completions: list[str], answers: list[str]) -> list[float]`` works.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterable, Optional, Sequence

log = logging.getLogger(__name__)

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
_PLAIN_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
_DELIMITED_MATH = re.compile(r"^\s*(\$.*\$|\\\(.*\\\)|\\\[.*\\\])\s*$", re.DOTALL)

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


# --------------------------------------------------------------------------- answer extraction
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


def _extraction_targets():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(), ExprExtractionConfig())


# --------------------------------------------------------------------------- number literals
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


def _parse(text: str, timeout: Optional[int]) -> list:
    from math_verify import parse

    return parse(text, extraction_config=_extraction_targets(), parsing_timeout=timeout)


def _gold_text(answer: str) -> str:
    """The gold answer as math-verify reads it: delimited math as written, a bare answer boxed
    without sentence punctuation at its end (datasets carry "7\\text{ hours}." and "\\text{(E)},")."""
    if "\\boxed" in answer or _DELIMITED_MATH.match(answer):
        return answer
    return "\\boxed{" + _without_sentence_end(answer) + "}"


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

    ``number_answers="literal"``: a number literal as gold answer needs one as the answer (see the
    module docstring); ``"equivalent"``: math-verify's verdict alone. In-process and unguarded: use
    `MathVerifier` for untrusted text. `mv_timeout` is math-verify's own signal timeout (main thread
    only); None disables it.
    """
    _check_number_answers(number_answers, "score_one")
    return _score(completion, answer, answer_format, max_completion_chars, mv_timeout, number_answers)[0]


def _check_number_answers(number_answers: str, where: str) -> None:
    if number_answers not in NUMBER_ANSWERS:
        raise ValueError(f"{where}: number_answers must be one of {NUMBER_ANSWERS}, got {number_answers!r}")


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


def _quiet_math_verify() -> None:
    # math-verify logs the whole offending input on every failure (megabytes for a bad answer).
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)


# --------------------------------------------------------------------------- worker process
class _SoftTimeout(BaseException):
    """Raised by SIGALRM inside a worker. A BaseException so math-verify's `except Exception` lets it through."""


def _worker_main() -> None:
    """Read JSON tasks from stdin, write JSON results to the original stdout; one task at a time."""
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    _quiet_math_verify()
    # Pay the import and sympy's lazy first-use costs before "ready", not on the first deadline.
    score_one("so \\boxed{\\frac{1}{2}}", "0.5")

    def on_alarm(signum, frame):
        raise _SoftTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    proto_out.write('{"ready": true}\n')
    for line in sys.stdin:
        task = json.loads(line)
        result = {"score": 0.0}
        signal.setitimer(signal.ITIMER_REAL, task["soft_timeout_s"])
        try:
            # max_completion_chars=0: the parent already cut the completion
            result["score"], skipped = _score(
                task["completion"], task["answer"], task["answer_format"], 0, None, task["number_answers"]
            )
            if skipped:
                result["skipped"] = skipped
        except _SoftTimeout:
            result["timed_out"] = True
        except Exception:  # noqa: BLE001  (any parser failure means "not verified")
            pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        proto_out.write(json.dumps(result) + "\n")


class _Worker:
    """One verification subprocess, its pipes, and the answers sent to it (in order, head first)."""

    def __init__(self, memory_limit_mb: Optional[int]):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from polopt.verify import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=root,  # `python -c` puts the working directory first on sys.path: import this polopt, not one found there
            text=True,
            bufsize=1,
            preexec_fn=_limit_memory(memory_limit_mb) if memory_limit_mb else None,
        )
        self.ready = False
        self.tasks: deque[int] = deque()
        self.deadline = 0.0  # for the head of `tasks`
        self._unread = b""

    def send(self, index: int, payload: dict, timeout_s: float) -> None:
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()
        self.tasks.append(index)
        if len(self.tasks) == 1:
            self.deadline = time.monotonic() + timeout_s

    def read_lines(self) -> Optional[list[str]]:
        """The complete lines the worker has written since the last call; None once it has exited.

        Reads the pipe directly: a buffered reader could hold a second result that select() would
        then never report.
        """
        data = os.read(self.proc.stdout.fileno(), 1 << 16)
        if not data:
            return None
        *lines, self._unread = (self._unread + data).split(b"\n")
        return [line.decode() for line in lines]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def _limit_memory(mb: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (mb << 20, mb << 20))

    return apply


# --------------------------------------------------------------------------- public verifier
class MathVerifier:
    """``verifier(completions, answers) -> list[float]`` in {0.0, 1.0}; see the module docstring.

    Args:
        timeout_s: hard limit per answer; an answer not scored by then scores 0 and its worker is
            killed and replaced. math-verify's cooperative timeout fires earlier (0.8 × timeout_s).
        num_workers: worker processes (default: CPUs available to this process, at most 8).
        max_completion_chars: completions are cut to this many trailing characters before parsing.
        answer_format: "boxed" or "answer_line" (DAPO's "Answer: X").
        memory_limit_mb: address-space cap per worker (a runaway parse fails instead of swapping).
        fast_integer_match: decide plain-integer answers in this process (`integer_verdict`)
            instead of in a worker; the verdicts are math-verify's either way.
        number_answers: "literal" (default): where the gold answer is a number literal, an answer
            that does not state one scores 0 ("591+734" vs gold 1325; "1,325", "1325.0",
            "x = 1325" score 1; see `restates_a_number`). "equivalent": math-verify's equivalence
            alone, any expression for the number scores 1. Config key ``verifier.number_answers``.

    The pool starts on the first call and lives until `close()` (or the end of a ``with`` block);
    the object pickles as its config, without the pool.
    """

    # math-verify's cooperative (SIGALRM) timeout, as a fraction of timeout_s: it ends most slow
    # parses without losing the worker; the hard kill at timeout_s covers the rest.
    soft_timeout_fraction = 0.8
    max_failed_starts = 3
    # answers queued per worker: the next one is already in its pipe when it finishes one, so a
    # worker never waits for the parent to be scheduled (a busy machine delays that by milliseconds)
    tasks_per_worker = 2

    def __init__(
        self,
        timeout_s: float = 5.0,
        num_workers: Optional[int] = None,
        max_completion_chars: int = 4000,
        answer_format: str = "boxed",
        memory_limit_mb: Optional[int] = 4096,
        fast_integer_match: bool = True,
        number_answers: str = "literal",
    ):
        if not timeout_s > 0:
            raise ValueError(f"MathVerifier: timeout_s must be > 0, got {timeout_s!r}")
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"MathVerifier: num_workers must be >= 1 or None, got {num_workers!r}")
        if max_completion_chars < 1:
            raise ValueError(f"MathVerifier: max_completion_chars must be >= 1, got {max_completion_chars!r}")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"MathVerifier: answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
        _check_number_answers(number_answers, "MathVerifier")
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers or min(8, len(os.sched_getaffinity(0)))
        self.max_completion_chars = max_completion_chars
        self.answer_format = answer_format
        self.memory_limit_mb = memory_limit_mb
        self.fast_integer_match = fast_integer_match
        self.number_answers = number_answers
        self._workers: list[_Worker] = []
        self._failed_starts = 0
        self.num_verified = 0
        self.num_timeouts = 0
        self.num_worker_deaths = 0
        self.num_filtered_as_code = 0

    # pickles as config only: a pool of live processes cannot cross a process boundary
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_workers"] = []
        return state

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def stats(self) -> dict[str, float]:
        """Counts since construction, under the metric names training and evaluation log them with.

        `verify/timeouts`, `verify/worker_deaths` and `verify/filtered_as_code` are answers that
        scored 0 without math-verify's verdict (see `verification_counts`).
        """
        return {
            "verify/answers": float(self.num_verified),
            "verify/timeouts": float(self.num_timeouts),
            "verify/worker_deaths": float(self.num_worker_deaths),
            "verify/filtered_as_code": float(self.num_filtered_as_code),
        }

    def __repr__(self) -> str:
        return (
            f"MathVerifier(timeout_s={self.timeout_s}, num_workers={self.num_workers}, "
            f"max_completion_chars={self.max_completion_chars}, answer_format={self.answer_format!r}, "
            f"number_answers={self.number_answers!r})"
        )

    def __call__(self, completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        if len(completions) != len(answers):
            raise ValueError(
                f"MathVerifier: got {len(completions)} completions but {len(answers)} answers; one answer per completion"
            )
        if not completions:
            return []
        self.num_verified += len(completions)
        scores = [0.0] * len(completions)
        pending = deque()
        for i, (completion, answer) in enumerate(zip(completions, answers)):
            verdict = None
            if self.fast_integer_match:
                verdict = integer_verdict(str(completion), str(answer), self.answer_format, self.max_completion_chars)
            if verdict is None:
                pending.append(i)
            else:
                scores[i] = verdict
        if not pending:
            return scores
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.memory_limit_mb))
        selector = selectors.DefaultSelector()
        for worker in self._workers:
            selector.register(worker.proc.stdout, selectors.EVENT_READ, worker)
        try:
            while pending or any(w.tasks for w in self._workers):
                for worker in self._workers:
                    while worker.ready and len(worker.tasks) < self.tasks_per_worker and pending:
                        i = pending.popleft()
                        payload = {
                            "completion": str(completions[i])[-self.max_completion_chars :],
                            "answer": str(answers[i]),
                            "answer_format": self.answer_format,
                            "number_answers": self.number_answers,
                            "soft_timeout_s": self.soft_timeout_fraction * self.timeout_s,
                        }
                        try:
                            worker.send(i, payload, self.timeout_s)
                        except (BrokenPipeError, OSError):  # it died between answers: answer i scores 0
                            log.warning(f"MathVerifier: worker died before answer {i}; scored 0, worker replaced")
                            self.num_worker_deaths += 1
                            self._replace(selector, worker, pending, reason="died")
                            break
                busy = [w.deadline for w in self._workers if w.tasks]
                wait = max(0.0, min(busy) - time.monotonic()) if busy else self.timeout_s
                for key, _ in selector.select(timeout=wait):
                    self._receive(selector, key.data, scores, pending)
                now = time.monotonic()
                for worker in list(self._workers):
                    if worker.tasks and now >= worker.deadline:
                        self.num_timeouts += 1
                        self._replace(selector, worker, pending, reason=f"timed out after {self.timeout_s:g}s")
        finally:
            selector.close()
        return scores

    def _receive(self, selector, worker: _Worker, scores: list[float], pending: deque) -> None:
        lines = worker.read_lines()
        if lines is None:
            self.num_worker_deaths += 1
            if not worker.ready:
                self._failed_starts += 1
                if self._failed_starts > self.max_failed_starts:
                    raise RuntimeError(
                        f"MathVerifier: {self._failed_starts} worker processes exited before becoming ready; "
                        f"check that `{sys.executable} -c 'import polopt.verify, math_verify'` works"
                    )
            self._replace(selector, worker, pending, reason=f"died (exit code {worker.proc.poll()})")
            return
        for line in lines:
            message = json.loads(line)
            if message.get("ready"):
                worker.ready = True
                self._failed_starts = 0
                continue
            task = worker.tasks.popleft()
            if message.get("timed_out"):
                self.num_timeouts += 1
                log.warning(f"MathVerifier: answer {task} timed out (cooperative timer); scored 0")
            if message.get("skipped") == CODE_LIKE:
                self.num_filtered_as_code += 1
            scores[task] = float(message["score"])
            worker.deadline = time.monotonic() + self.timeout_s  # for the next answer, if one was sent

    def _replace(self, selector, worker: _Worker, pending: deque, *, reason: str) -> None:
        """Kill `worker` and start another: its current answer scores 0, the ones queued behind it go back to `pending`."""
        if worker.tasks:
            log.warning(f"MathVerifier: worker {reason} on answer {worker.tasks[0]}; scored 0, worker replaced")
            pending.extendleft(reversed(list(worker.tasks)[1:]))
        selector.unregister(worker.proc.stdout)
        worker.kill()
        fresh = _Worker(self.memory_limit_mb)
        self._workers[self._workers.index(worker)] = fresh
        selector.register(fresh.proc.stdout, selectors.EVENT_READ, fresh)


def verification_counts(verifier, since: Optional[dict[str, float]] = None) -> dict[str, float]:
    """`verifier.stats()` minus `since` (an earlier `stats()`), or {} for a verifier without `stats()`.

    How callers see that verification, not the model, failed: training logs the counts of each
    rollout (polopt.rollout.sampler), evaluation writes them beside avg@k (polopt.evaluation).
    """
    stats = getattr(verifier, "stats", None)
    if stats is None:
        return {}
    now = stats()
    return {name: value - (since or {}).get(name, 0.0) for name, value in now.items()}


if __name__ == "__main__":
    _worker_main()
