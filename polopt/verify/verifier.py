"""`MathVerifier`: math-verify in worker processes with a hard per-answer timeout.

Why worker processes: math-verify parses with sympy; a pathological answer (a power tower, 4,000
nested brackets, a megabyte of digits) can take minutes inside a single C call that no signal
interrupts, and sympy's ``parse_expr`` evaluates Python. Each answer therefore runs in a separate
process (`polopt.verify.worker`, started with ``subprocess``, so the trainer's torch threads and
``__main__`` are never forked or re-imported) under a soft in-worker timer and a hard deadline: a
worker still busy at ``timeout_s`` is killed and replaced, and its answer scores 0. A worker that
dies scores 0 the same way; the batch always returns. `MathVerifier.stats()` counts timeouts,
worker deaths and answers filtered as code; training and evaluation log them (`verification_counts`).
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import sys
import time
from collections import deque
from typing import Optional, Sequence

from polopt.verify.extract import ANSWER_FORMATS, CODE_LIKE
from polopt.verify.numbers import _check_number_answers
from polopt.verify.score import integer_verdict
from polopt.verify.worker import _Worker

log = logging.getLogger(__name__)


class MathVerifier:
    """``verifier(completions, answers) -> list[float]`` in {0.0, 1.0}; see `polopt.verify` and this module's docstring.

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
