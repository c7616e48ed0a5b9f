"""The verification worker: a subprocess that scores one answer at a time, and the parent's handle on it.

Protocol: JSON lines. The worker writes ``{"ready": true}`` once math-verify is imported and warm,
then reads one task per line from stdin (``completion``, ``answer``, ``answer_format``,
``number_answers``, ``soft_timeout_s``) and writes one result per line to its original stdout
(``score``, and ``timed_out`` or ``skipped`` when they apply). Anything a library prints goes to
stderr. Started with ``subprocess`` (`_Worker`), never forked: the trainer's torch threads and
``__main__`` stay out of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Optional

from polopt.verify.parse import _quiet_math_verify
from polopt.verify.score import _score, score_one


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
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from polopt.verify.worker import _worker_main; _worker_main()"],
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
