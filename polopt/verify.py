"""Binary math rewards: math-verify in worker processes with a hard per-answer timeout.

    verifier = MathVerifier(timeout_s=5.0, num_workers=2)
    rewards = verifier(completions, gold_answers)        # list of 0.0 / 1.0

Which part of a completion is scored (the convention, the same for training and evaluation):

- ``answer_format="boxed"`` (Qwen2.5-Math prompts): the content of the LAST ``\\boxed{...}`` (or
  ``\\fbox{...}``). math-verify on its own reads every ``\\boxed{}`` as a set, so "\\boxed{4} ...
  \\boxed{6}" would match neither 4 nor 6; Qwen2.5-Math's evaluation and verl's math_dapo take the
  last one, and so do we: a model that revises its answer gets the revision scored.
- ``answer_format="answer_line"`` (DAPO prompts, "Answer: $Answer"): the LAST line starting with
  ``Answer:``; a completion without one falls back to the last ``\\boxed{}``.
- A completion with none of the above is handed whole to math-verify's own extraction (LaTeX and
  plain expressions, anchored on "final answer is ..." and similar, else the last expression):
  GSM8K-style completions ending in "A: 18" are scored that way.

The completion is first cut to its last ``max_completion_chars`` characters (the answer is at the
end; parsing cost grows with length). The gold answer is wrapped in ``\\boxed{}`` unless it already
holds ``\\boxed`` or ``$``-delimited math, and parsed with the same extraction.

Why worker processes: math-verify parses with sympy; a pathological answer (a power tower, 4,000
nested brackets, a megabyte of digits) can take minutes inside a single C call that no signal
interrupts, and sympy's ``parse_expr`` evaluates Python. Each answer therefore runs in a separate
process (started with ``subprocess``, so the trainer's torch threads and ``__main__`` are never
forked or re-imported) under a soft in-worker timer and a hard deadline: a worker still busy at
``timeout_s`` is killed and replaced, and its answer scores 0. A worker that dies scores 0 the same
way; the batch always returns.

Custom verifiers plug in through the recipe config (``verifier._component_``): any callable
``(completions: list[str], answers: list[str]) -> list[float]`` works.
"""

from __future__ import annotations

import json
import logging
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

# Text that looks like Python, not math: never handed to sympy (whose parse_expr evaluates).
_CODE_LIKE = re.compile(r"__|\bimport\b|\blambda\b|\beval\b|\bexec\b|\bos\.|\bsys\.")
_BOX_OPENERS = ("\\boxed", "\\fbox")
_ANSWER_LINE = re.compile(r"^\s*\**\s*Answer\s*\**\s*:\s*(.+?)\s*$", re.MULTILINE | re.IGNORECASE)
_PLAIN_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
_DELIMITED_MATH = re.compile(r"^\s*(\$.*\$|\\\(.*\\\)|\\\[.*\\\])\s*$", re.DOTALL)


# --------------------------------------------------------------------------- answer extraction
def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` with balanced braces (None if absent).

    ``\\boxed 5`` (no braces, as some models write) gives "5".
    """
    start = max(text.rfind(opener) for opener in _BOX_OPENERS)
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith(" ", i):
        rest = text[i + 1 :].split("$")[0].strip()
        return rest.split()[0] if rest else None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the answer was cut off


def last_answer_line(text: str) -> Optional[str]:
    """The text after ``Answer:`` on the last such line, without surrounding ``$`` (None if absent)."""
    matches = _ANSWER_LINE.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip()
    if len(answer) >= 2 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip()
    return answer or None


def _extraction_targets():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(), ExprExtractionConfig())


def _parse(text: str, timeout: Optional[int]) -> list:
    from math_verify import parse

    return parse(text, extraction_config=_extraction_targets(), parsing_timeout=timeout)


def _gold_text(answer: str) -> str:
    if "\\boxed" in answer or _DELIMITED_MATH.match(answer):
        return answer
    return "\\boxed{" + answer + "}"


def prediction_text(completion: str, answer_format: str, max_completion_chars: int) -> Optional[str]:
    """The text of `completion` that gets parsed, per the convention in the module docstring.

    None means "scores 0 without parsing" (code-like text).
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    tail = completion[-max_completion_chars:] if max_completion_chars > 0 else completion
    extracted = last_answer_line(tail) if answer_format == "answer_line" else None
    if extracted is None:
        extracted = last_boxed(tail)
    text = tail if extracted is None else "\\boxed{" + extracted + "}"
    if _CODE_LIKE.search(extracted if extracted is not None else tail[-200:]):
        return None
    return text


def score_one(
    completion: str,
    answer: str,
    *,
    answer_format: str = "boxed",
    max_completion_chars: int = 4000,
    mv_timeout: Optional[int] = None,
) -> float:
    """1.0 if the scored part of `completion` is equivalent to `answer` per math-verify, else 0.0.

    In-process and unguarded: use `MathVerifier` for untrusted text. `mv_timeout` is math-verify's
    own signal timeout (main thread only); None disables it.
    """
    from math_verify import verify

    text = prediction_text(completion, answer_format, max_completion_chars)
    if text is None:
        return 0.0
    gold = _parse(_gold_text(str(answer)), mv_timeout)
    if not gold:
        return 0.0
    pred = _parse(text, mv_timeout)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=mv_timeout) else 0.0


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
            parsed = _parse(_gold_text(text), timeout) if text and not _CODE_LIKE.search(text) else []
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
            result["score"] = score_one(
                task["completion"],
                task["answer"],
                answer_format=task["answer_format"],
                max_completion_chars=0,  # the parent already cut it
            )
        except _SoftTimeout:
            result["timed_out"] = True
        except Exception:  # noqa: BLE001  (any parser failure means "not verified")
            pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        proto_out.write(json.dumps(result) + "\n")


class _Worker:
    """One verification subprocess, its pipes, and the task it is working on."""

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
            text=True,
            bufsize=1,
            preexec_fn=_limit_memory(memory_limit_mb) if memory_limit_mb else None,
        )
        self.ready = False
        self.task: Optional[int] = None
        self.deadline = 0.0

    def send(self, index: int, payload: dict, timeout_s: float) -> None:
        self.task = index
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()
        self.deadline = time.monotonic() + timeout_s

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

    The pool starts on the first call and lives until `close()` (or the end of a ``with`` block);
    the object pickles as its config, without the pool.
    """

    # math-verify's cooperative (SIGALRM) timeout, as a fraction of timeout_s: it ends most slow
    # parses without losing the worker; the hard kill at timeout_s covers the rest.
    soft_timeout_fraction = 0.8
    max_failed_starts = 3

    def __init__(
        self,
        timeout_s: float = 5.0,
        num_workers: Optional[int] = None,
        max_completion_chars: int = 4000,
        answer_format: str = "boxed",
        memory_limit_mb: Optional[int] = 4096,
    ):
        if not timeout_s > 0:
            raise ValueError(f"MathVerifier: timeout_s must be > 0, got {timeout_s!r}")
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"MathVerifier: num_workers must be >= 1 or None, got {num_workers!r}")
        if max_completion_chars < 1:
            raise ValueError(f"MathVerifier: max_completion_chars must be >= 1, got {max_completion_chars!r}")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"MathVerifier: answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers or min(8, len(os.sched_getaffinity(0)))
        self.max_completion_chars = max_completion_chars
        self.answer_format = answer_format
        self.memory_limit_mb = memory_limit_mb
        self._workers: list[_Worker] = []
        self._failed_starts = 0
        self.num_timeouts = 0
        self.num_worker_deaths = 0

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

    def __repr__(self) -> str:
        return (
            f"MathVerifier(timeout_s={self.timeout_s}, num_workers={self.num_workers}, "
            f"max_completion_chars={self.max_completion_chars}, answer_format={self.answer_format!r})"
        )

    def __call__(self, completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        if len(completions) != len(answers):
            raise ValueError(
                f"MathVerifier: got {len(completions)} completions but {len(answers)} answers; one answer per completion"
            )
        if not completions:
            return []
        scores = [0.0] * len(completions)
        pending = deque(range(len(completions)))
        payloads = {}
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.memory_limit_mb))
        selector = selectors.DefaultSelector()
        for worker in self._workers:
            selector.register(worker.proc.stdout, selectors.EVENT_READ, worker)
        try:
            while pending or any(w.task is not None for w in self._workers):
                for worker in self._workers:
                    if worker.ready and worker.task is None and pending:
                        i = pending.popleft()
                        payloads[i] = {
                            "completion": str(completions[i])[-self.max_completion_chars :],
                            "answer": str(answers[i]),
                            "answer_format": self.answer_format,
                            "soft_timeout_s": self.soft_timeout_fraction * self.timeout_s,
                        }
                        try:
                            worker.send(i, payloads[i], self.timeout_s)
                        except (BrokenPipeError, OSError):
                            self._replace(selector, worker, reason="died")
                busy = [w.deadline for w in self._workers if w.task is not None]
                wait = max(0.0, min(busy) - time.monotonic()) if busy else self.timeout_s
                for key, _ in selector.select(timeout=wait):
                    self._receive(selector, key.data, scores)
                now = time.monotonic()
                for worker in list(self._workers):
                    if worker.task is not None and now >= worker.deadline:
                        self.num_timeouts += 1
                        self._replace(selector, worker, reason=f"timed out after {self.timeout_s:g}s")
        finally:
            selector.close()
        return scores

    def _receive(self, selector, worker: _Worker, scores: list[float]) -> None:
        line = worker.proc.stdout.readline()
        if not line:
            self.num_worker_deaths += 1
            if not worker.ready:
                self._failed_starts += 1
                if self._failed_starts > self.max_failed_starts:
                    raise RuntimeError(
                        f"MathVerifier: {self._failed_starts} worker processes exited before becoming ready; "
                        f"check that `{sys.executable} -c 'import polopt.verify, math_verify'` works"
                    )
            self._replace(selector, worker, reason=f"died (exit code {worker.proc.poll()})")
            return
        message = json.loads(line)
        if message.get("ready"):
            worker.ready = True
            self._failed_starts = 0
            return
        if message.get("timed_out"):
            self.num_timeouts += 1
            log.warning(f"MathVerifier: answer {worker.task} timed out (cooperative timer); scored 0")
        scores[worker.task] = float(message["score"])
        worker.task = None

    def _replace(self, selector, worker: _Worker, *, reason: str) -> None:
        if worker.task is not None:
            log.warning(f"MathVerifier: worker {reason} on answer {worker.task}; scored 0, worker replaced")
        selector.unregister(worker.proc.stdout)
        worker.kill()
        fresh = _Worker(self.memory_limit_mb)
        self._workers[self._workers.index(worker)] = fresh
        selector.register(fresh.proc.stdout, selectors.EVENT_READ, fresh)


if __name__ == "__main__":
    _worker_main()
