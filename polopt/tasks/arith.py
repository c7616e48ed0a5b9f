"""Synthetic addition with a digit-by-digit chain of thought and a \\boxed{} answer.

    question  "Q: 347+285=? A:"
    solution  " 7+5=12,4+8+1=13,3+2+1=6,\\boxed{632}"

One step per digit column, least significant first; a column after a two-digit result adds the
carry as "+1". The answer is read off the steps: the ones digit of each result, most significant
first, with the last step's tens digit in front.

Noisy solutions (the pretraining corpus of the tiny model) corrupt each step independently with
probability `q`: the step drops the incoming carry (writes "4+8=12" instead of "4+8+1=13") or
slips by one ("4+8+1=14"). Later steps stay faithful to what was written, so a corrupted step
moves the final answer by exactly ±10^column: the answer is wrong exactly when a step was
corrupted. A model trained on such text samples a right answer with probability about
(1 − q)^digits — the skill is in the model, and reinforcement learning can sharpen it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PROMPT_TEMPLATE = "Q: {a}+{b}=? A:"


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def question(self) -> str:
        return PROMPT_TEMPLATE.format(a=self.a, b=self.b)

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


@dataclass(frozen=True)
class Solution:
    text: str
    final_answer: int
    num_errors: int


def sample_problem(rng: random.Random, digits: int) -> Problem:
    """Two operands with exactly `digits` digits each."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    low, high = 10 ** (digits - 1), 10**digits - 1
    return Problem(rng.randint(low, high), rng.randint(low, high))


def make_splits(
    seed: int, digits: int, sizes: dict[str, int]
) -> dict[str, list[Problem]]:
    """Disjoint problem sets (e.g. {"train": 4000, "val": 200, "test": 200}), deterministic in `seed`."""
    space = (9 * 10 ** (digits - 1)) ** 2
    if sum(sizes.values()) > space // 2:
        raise ValueError(f"{sum(sizes.values())} problems requested but only {space} exist with {digits} digits")
    rng = random.Random(seed)
    seen: set[Problem] = set()
    splits: dict[str, list[Problem]] = {}
    for name, size in sizes.items():
        split: list[Problem] = []
        while len(split) < size:
            problem = sample_problem(rng, digits)
            if problem not in seen:
                seen.add(problem)
                split.append(problem)
        splits[name] = split
    return splits


def write_solution(problem: Problem, rng: random.Random | None = None, q: float = 0.0) -> Solution:
    """The chain of thought for `problem`; with `rng` and q > 0, each step is corrupted with probability q."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"error probability q must be in [0, 1], got {q}")
    if q > 0 and rng is None:
        raise ValueError("a noisy solution (q > 0) needs an rng")
    a_digits = str(problem.a)[::-1]
    b_digits = str(problem.b)[::-1]
    width = max(len(a_digits), len(b_digits))
    steps, ones, carry, errors = [], [], 0, 0
    for i in range(width):
        x = int(a_digits[i]) if i < len(a_digits) else 0
        y = int(b_digits[i]) if i < len(b_digits) else 0
        shown_carry, result = carry, x + y + carry
        if q > 0 and rng.random() < q:
            errors += 1
            if carry and rng.random() < 0.5:
                shown_carry, result = 0, x + y  # forgot the carry
            else:
                slip = rng.choice([-1, 1]) if result > 0 else 1  # slip by one
                # 9+9+1 slipping up to 20 would carry 2, which a step cannot show (`+1`).
                result += -1 if result + slip > 19 else slip
        steps.append(f"{x}+{y}{'+1' if shown_carry else ''}={result}")
        ones.append(result % 10)
        carry = result // 10
    digits_out = ([carry] if carry else []) + ones[::-1]
    final = int("".join(map(str, digits_out)))
    text = " " + ",".join(steps) + ",\\boxed{" + str(final) + "}"
    return Solution(text=text, final_answer=final, num_errors=errors)
