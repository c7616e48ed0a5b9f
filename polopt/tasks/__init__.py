"""Synthetic tasks with verifiable answers (the embedded tiny default trains on `arith`)."""

from polopt.tasks.arith import Problem, Solution, make_splits, sample_problem, write_solution

__all__ = ["Problem", "Solution", "make_splits", "sample_problem", "write_solution"]
