"""MathVerifier: agreement with labelled data, the scoring convention, and survival of hostile answers."""

import json
import logging
import math
import os
import pickle
import random
import time
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from polopt.verify import (MathVerifier, is_code_like, is_number_literal, last_boxed, score_one, states_a_number,
                           unparseable_gold_answers)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TIMEOUT_S = 1.0
HANG = 10 * TIMEOUT_S  # a generous bound: this detects hangs, it does not time anything


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(timeout_s=TIMEOUT_S, num_workers=2) as v:
        yield v


@pytest.fixture(scope="module")
def default_verifier():
    """The default 5 s timeout: some legitimate answers take > 1 s of sympy on a busy CPU."""
    with MathVerifier(num_workers=2) as v:
        yield v


def _alive(v: MathVerifier) -> bool:
    return len(v._workers) == v.num_workers and all(w.proc.poll() is None for w in v._workers)


# --------------------------------------------------------------------------- agreement with labels
def _jsonl(name):
    return [json.loads(line) for line in (SHARED_DATA / name).open()]


@pytest.mark.skipif(not (SHARED_DATA / "verifier_cases.jsonl").exists(), reason="../shared/data is not present")
def test_agrees_with_labelled_completions(default_verifier):
    rows = _jsonl("verifier_cases.jsonl")
    math_rows = [r for r in rows if r["dataset"] == "MATH"]
    gsm8k = random.Random(0).sample([r for r in rows if r["dataset"] != "MATH"], 400)
    for sample in (math_rows, gsm8k):
        scores = default_verifier([r["completion"] for r in sample], [r["gold"] for r in sample])
        agree = sum(s == float(r["label"]) for s, r in zip(scores, sample)) / len(sample)
        assert agree >= 0.99, (sample[0]["dataset"], agree)


# --------------------------------------------------------------------------- the convention
def test_last_boxed_answer_is_the_one_scored(verifier):
    hedge = "First I got \\boxed{3}, but rechecking, the answer is \\boxed{4}."
    assert verifier([hedge, hedge], ["4", "3"]) == [1.0, 0.0]
    assert last_boxed("\\boxed{\\frac{1}{2}} and \\fbox{x^{2}}") == "x^{2}"
    assert last_boxed("cut off \\boxed{\\frac{1}{2}") is None


def test_issue_13_examples_keep_math_verify_verdict(verifier):
    """The inputs of issue 13 that the pre-processing used to turn from 1 into 0 (or 0 into 1)."""
    cases = [
        ("$\\boxed{2\\lambda}$", "2\\lambda", 1.0),  # LaTeX \lambda is not Python's lambda
        ("We import the identity and get \\boxed{7}", "7", 1.0),
        ("The import of this is that the answer is 12", "12", 1.0),  # unboxed prose with "import"
        ("so \\boxed 42.", "42", 1.0),  # a box without braces drops the full stop
        ("I get \\boxed{6}. Hmm, no: it is \\boxed{8", "6", 0.0),  # a cut-off last box is not the earlier one
        ("I get \\boxed{6}. Hmm, no: it is \\boxed{8", "8", 0.0),
        ("$\\boxed{255}$ So, $10,200 + $255. Final Answer: The final answer is $10,455$. I hope it is correct.", "10455", 1.0),
    ]
    completions, golds, expected = zip(*cases)
    assert verifier(list(completions), list(golds)) == list(expected)


def test_issue_13_answer_lines_score_their_value():
    lines = ["Answer: 42.", "Answer: -7.", "Answer: 1/2.", "Answer: The answer is 5", "Answer: $\\frac{3}{4}$ (in lowest terms)",
             "**Answer:** 12", "Answer:\n$9$", "Answer: 5 cm"]
    golds = ["42", "-7", "\\frac{1}{2}", "5", "\\frac34", "12", "9", "5"]
    with MathVerifier(timeout_s=5.0, num_workers=2, answer_format="answer_line") as v:
        assert v(lines, golds) == [1.0] * len(lines)
        assert v(lines, ["0"] * len(lines)) == [0.0] * len(lines)


@pytest.mark.parametrize("text", [
    "__import__('os').system('ls')", "().__class__.__bases__[0]", "eval(\"1+1\")", "exec ('x=1')",
    "lambda x: x + 1", "f = lambda: 0", "import os", "from subprocess import run", "os.system('ls')",
    "sys.exit(0)", "getattr(obj, 'x')",
])
def test_code_is_code_like(text):
    assert is_code_like(text)


@pytest.mark.parametrize("text", [
    "\\boxed{2\\lambda}", "\\lambda_1 + \\lambda_2 = 3", "the eigenvalue lambda is 2", "We import the lemma",
    "the import of this result", "to evaluate (3+4)", "\\cos x + \\sin x", "this costs 5 dollars", "a__b", "x_{1}__{2}",
])
def test_mathematics_and_prose_are_not_code_like(text):
    assert not is_code_like(text)


def test_gold_is_wrapped_unless_already_math(verifier):
    golds = ["\\frac{1}{2}", "$\\frac{1}{2}$", "\\boxed{\\frac12}", "0.5", "1/2", "0.5.", "\\frac{1}{2},"]
    assert verifier(["so \\boxed{0.5}"] * len(golds), golds) == [1.0] * len(golds)


def test_answer_line_format_scores_the_last_answer_line():
    with MathVerifier(timeout_s=TIMEOUT_S, num_workers=1, answer_format="answer_line") as v:
        text = "Answer: 41\nNo, recount.\nAnswer: $42.0$"
        assert v([text, text, "so \\boxed{42}", "The answer is 42 but no answer line"], ["42", "41", "42", "7"]) == [
            1.0,
            0.0,
            1.0,  # no Answer: line: falls back to the last \boxed{}
            0.0,
        ]


def test_long_completions_are_cut_to_their_tail(verifier):
    early = "\\boxed{5}" + " and so on" * 600  # 6,009 characters, answer at the start
    late = "\\boxed{5}" + " and so on" * 600 + " so \\boxed{7}"
    assert verifier([early, late, late], ["5", "7", "5"]) == [0.0, 1.0, 0.0]
    with MathVerifier(timeout_s=TIMEOUT_S, num_workers=1, max_completion_chars=10_000) as wide:
        assert wide([early], ["5"]) == [1.0]


@given(a=st.integers(-10**6, 10**6), b=st.integers(-10**6, 10**6), wrap=st.sampled_from(["\\boxed{{{}}}", "the answer is ${}$"]))
def test_integers_match_exactly_when_equal(verifier, a, b, wrap):
    completion = "Let me compute. " + wrap.format(a)
    assert verifier([completion, completion], [str(a), str(b)]) == [1.0, float(a == b)]


# --------------------------------------------------------------------------- hostile answers
def _pathological(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    return marker, {
        "nested brackets": "\\boxed{" + "(" * 1500 + "1" + ")" * 1500 + "}",
        "power tower": "\\boxed{9^{9^{9^{9^{9}}}}}",
        "python power tower": "The answer is 9**9**9**9",
        "megabyte of digits": "\\boxed{" + "9" * 1_000_000 + "}",
        "code in boxed": "\\boxed{" + code + "}",
        "bare code": code,
        "code via eval": f"\\boxed{{eval(\"{code}\")}}",
    }


def test_each_pathological_answer_returns_within_a_timeout_and_scores_zero(verifier, tmp_path):
    marker, cases = _pathological(tmp_path)
    for name, completion in cases.items():
        start = time.monotonic()
        assert verifier([completion], ["1"]) == [0.0], name
        assert time.monotonic() - start < HANG, name
    assert not marker.exists(), "a code-like answer was executed"
    assert _alive(verifier)


def test_a_batch_mixing_pathological_answers_finishes_and_scores_the_rest(verifier, tmp_path):
    marker, cases = _pathological(tmp_path)
    hostile = list(cases.values())
    completions = [c for h in hostile for c in (h, "so \\boxed{12}")]
    start = time.monotonic()
    scores = verifier(completions, ["12"] * len(completions))
    assert scores == [0.0, 1.0] * len(hostile)
    assert time.monotonic() - start < HANG * 2
    assert not marker.exists()


def test_megabyte_string_is_parsed_whole_when_asked_and_still_bounded(tmp_path):
    with MathVerifier(timeout_s=TIMEOUT_S, num_workers=1, max_completion_chars=2_000_000) as v:
        start = time.monotonic()
        assert v(["\\boxed{" + "(" * 500_000 + ")" * 500_000 + "}", "\\boxed{2}"], ["1", "2"]) == [0.0, 1.0]
        assert time.monotonic() - start < HANG


def test_a_worker_stuck_past_the_timeout_is_killed_and_replaced(caplog):
    """With the cooperative timer pushed out, only the hard kill can end the power tower."""
    with MathVerifier(timeout_s=TIMEOUT_S, num_workers=1, fast_integer_match=False) as v:
        v.soft_timeout_fraction = 50.0
        v(["\\boxed{1}"], ["1"])
        pid = v._workers[0].proc.pid
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="polopt.verify"):
            scores = v(["The answer is 9**9**9**9", "\\boxed{3}"], ["1", "3"])
        assert scores == [0.0, 1.0]
        assert time.monotonic() - start < HANG
        assert v.num_timeouts == 1 and v._workers[0].proc.pid != pid and _alive(v)
        assert "timed out" in caplog.text and "answer 0" in caplog.text


def test_a_worker_that_dies_is_replaced_and_the_batch_survives(caplog):
    with MathVerifier(timeout_s=TIMEOUT_S, num_workers=2, fast_integer_match=False) as v:
        v(["\\boxed{1}"], ["1"])
        for worker in v._workers:
            os.kill(worker.proc.pid, 9)  # processes this test started
            worker.proc.wait()
        with caplog.at_level(logging.WARNING, logger="polopt.verify"):
            scores = v(["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{4}"], ["1", "2", "3", "4"])
        assert len(scores) == 4 and set(scores) <= {0.0, 1.0}
        assert scores[2:] == [1.0, 1.0]  # answers after the deaths are scored normally
        assert v.num_worker_deaths + scores.count(0.0) >= 1 and _alive(v)
        assert v(["\\boxed{5}"], ["5"]) == [1.0]


# --------------------------------------------------------------------------- API
def test_pickles_as_config_and_closes_its_processes():
    v = MathVerifier(timeout_s=2.0, num_workers=1, answer_format="answer_line")
    assert v(["Answer: 3"], ["3"]) == [1.0]
    procs = [w.proc for w in v._workers]
    clone = pickle.loads(pickle.dumps(v))
    assert (clone.timeout_s, clone.num_workers, clone.answer_format, clone._workers) == (2.0, 1, "answer_line", [])
    v.close()
    assert all(p.poll() is not None for p in procs)
    assert clone(["Answer: 3"], ["4"]) == [0.0]
    clone.close()


def test_workers_import_this_polopt_whatever_the_working_directory(tmp_path, monkeypatch):
    """`python -c` puts the working directory first on sys.path; a polopt found there (another
    checkout) must not be the one the workers run."""
    impostor = tmp_path / "polopt"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("")
    (impostor / "verify.py").write_text("def _worker_main():\n    print('{\"ready\": true}')\n    for _ in iter(input, None):\n        print('{\"score\": 1.0}')\n")
    monkeypatch.chdir(tmp_path)
    with MathVerifier(timeout_s=TIMEOUT_S, num_workers=1, fast_integer_match=False) as v:
        assert v(["\\boxed{2}"], ["3"]) == [0.0]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="answer_format"):
        MathVerifier(answer_format="last_number")
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)
    with pytest.raises(ValueError, match="num_workers"):
        MathVerifier(num_workers=0)
    with MathVerifier(num_workers=1) as v:
        with pytest.raises(ValueError, match="2 completions but 1 answers"):
            v(["a", "b"], ["1"])
        assert v([], []) == [] and v._workers == []  # nothing started for an empty batch


def test_unparseable_gold_answers_lists_indices():
    answers = ["3", "\\frac{1}{2}", "\\frac{", "", "x^2+1", "-0.5", "__import__('os')", "2\\lambda", "7\\text{ hours}."]
    assert unparseable_gold_answers(answers) == [2, 3, 6]


def test_counters_reach_sampler_metrics_and_evaluation():
    """Timeouts and answers filtered as code show up where a user looks: the sampler's metrics
    and what evaluate_prompts returns (eval.json). The engine is a stand-in that returns fixed text."""
    from polopt.batch import Completion
    from polopt.evaluation import evaluate_prompts, merge_counts
    from polopt.prompts import Prompt
    from polopt.rollout import SamplingParams
    from polopt.rollout.sampler import DynamicSampler

    texts = ["\\boxed{1}", "\\boxed{__import__('os')}", "\\boxed{2}", "The answer is 9**9**9**9"]

    class FixedEngine:
        def generate(self, prompt_ids, num_samples, params):
            return [[Completion([5], [-0.1], truncated=False, text=t) for t in texts[:num_samples]] for _ in prompt_ids]

    class Stream:
        def next_batch(self):
            return [Prompt(text="q", token_ids=[1], answer="1", source="t:1")]

    with MathVerifier(timeout_s=TIMEOUT_S, num_workers=2) as v:
        sampler = DynamicSampler(Stream(), FixedEngine(), v, num_prompts=1, num_samples=4,
                                 params=SamplingParams(max_new_tokens=4), max_gen_batches=1)
        _, metrics = sampler.sample()
        assert metrics["verify/answers"] == 4 and metrics["verify/filtered_as_code"] == 1
        assert metrics["verify/timeouts"] == 1 and metrics["verify/worker_deaths"] == 0
        scores = evaluate_prompts(FixedEngine(), v, [Prompt(text="q", token_ids=[1], answer="2")] * 2, k=3,
                                  params=SamplingParams(max_new_tokens=4), batch_size=64)
        assert scores["verify/answers"] == 6 and scores["verify/filtered_as_code"] == 2 and scores["verify/timeouts"] == 0
        assert scores["avg_at_k"] == pytest.approx(1 / 3)
        assert merge_counts([scores, scores])["verify/filtered_as_code"] == 4
    custom = evaluate_prompts(FixedEngine(), lambda c, a: [0.0] * len(c), [Prompt(text="q", token_ids=[1], answer="2")], k=1,
                              params=SamplingParams(max_new_tokens=4), batch_size=64)
    assert not any(name.startswith("verify/") for name in custom)  # a verifier without stats() adds nothing


class ExactMatchVerifier:
    """A custom verifier, as a user would plug in through `verifier._component_`."""

    def __init__(self, strip: bool = True):
        self.strip = strip

    def __call__(self, completions, answers):
        return [float(c.strip() == a.strip()) for c, a in zip(completions, answers)]


def test_verifiers_are_config_components():
    from omegaconf import OmegaConf
    from torchtune import config

    built = config.instantiate(OmegaConf.create({"_component_": "polopt.verify.MathVerifier", "timeout_s": 2.0, "num_workers": 1}))
    assert isinstance(built, MathVerifier) and built.timeout_s == 2.0
    custom = config.instantiate(OmegaConf.create({"_component_": f"{__name__}.ExactMatchVerifier", "strip": True}))
    assert custom([" 7 ", "8"], ["7", "9"]) == [1.0, 0.0]


# --------------------------------------------------------------------------- plain integers without a worker
integers = st.one_of(st.integers(-10**6, 10**6), st.integers(-10**30, 10**30)).map(str)
box_endings = st.sampled_from(["", ".", " ", "\n", " .", " so", " The final answer is $6$.", "}"])
box_spellings = st.sampled_from(["\\boxed{{{}}}", "\\boxed{{ {} }}", "\\fbox{{{}}}", "\\boxed {}"])


@given(
    gold=st.one_of(integers, st.sampled_from(["007", "-0", "+5", "1,000", "12.0", "1/2"])),
    pred=st.one_of(integers, st.sampled_from(["007", "-0", "+5", "1,000", "12.0", "x"])),
    lead=st.sampled_from(["", "4+4=8,", "The answer is ", "\\boxed{3} no: "]),
    box=box_spellings,
    ending=box_endings,
    same=st.booleans(),
)
def test_integer_fast_path_agrees_with_math_verify(gold, pred, lead, box, ending, same):
    """Wherever `integer_verdict` decides, math-verify (in-process, `score_one`) decides the same."""
    from polopt.verify import integer_verdict, score_one

    pred = gold if same else pred
    completion = lead + box.format(pred) + ending
    verdict = integer_verdict(completion, gold, "boxed", 4000)
    if verdict is not None:
        assert verdict == score_one(completion, gold)


def test_integer_fast_path_decides_the_tiny_task_and_skips_the_workers():
    """The tiny task's completions end in a boxed integer: scored without starting a worker,
    the same as with every answer sent to math-verify."""
    completions = [" 4+4=8,6+9=15,9+4+1=14,\\boxed{1458}", "\\boxed{1457}", "\\boxed{1458} wait, \\boxed{x}"]
    answers = ["1458"] * 3
    with MathVerifier(timeout_s=5.0, num_workers=1) as fast, MathVerifier(timeout_s=5.0, num_workers=1,
                                                                         fast_integer_match=False) as slow:
        assert fast(completions[:2], answers[:2]) == [1.0, 0.0] and fast._workers == []
        assert fast(completions, answers) == slow(completions, answers) == [1.0, 0.0, 0.0]
        assert fast.stats()["verify/answers"] == 5 and len(fast._workers) == 1


# --------------------------------------------------------------------------- a number is answered with a number
# (completion, gold, score with number_answers="literal" (default), score with "equivalent")
NUMBER_ANSWER_CASES = [
    # an expression for the number restates the question: math-verify scores it, polopt does not
    ("591+734", "1325", 0.0, 1.0),
    ("\\boxed{591+734}", "1325", 0.0, 1.0),
    ("Answer: 591+734", "1325", 0.0, 1.0),
    ("The answer is 90 + 63", "153", 0.0, 1.0),
    ("\\boxed{3^4-2}", "79", 0.0, 1.0),
    ("\\boxed{2\\times 3}", "6", 0.0, 1.0),
    ("\\boxed{\\sqrt{4}}", "2", 0.0, 1.0),
    ("\\boxed{10^3}", "1000", 0.0, 1.0),
    ("\\boxed{153=90+63}", "153", 0.0, 1.0),
    ("\\boxed{2650/2}", "1325", 0.0, 1.0),  # a fraction not in lowest terms
    ("\\boxed{\\frac{2}{4}}", "0.5", 0.0, 1.0),
    # equivalent forms of the number still score
    ("\\boxed{1325}", "1325", 1.0, 1.0),
    ("\\boxed{1,325}", "1325", 1.0, 1.0),
    ("\\boxed{1{,}325}", "1325", 1.0, 1.0),
    ("\\boxed{1325.0}", "1325", 1.0, 1.0),
    ("\\boxed{\\$1,325.00}", "1325", 1.0, 1.0),
    ("\\boxed{1325 \\text{ dollars}}", "1325", 1.0, 1.0),
    ("\\boxed{-3}", "-3", 1.0, 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0, 1.0),
    ("\\boxed{\\dfrac{-3}{8}}", "-0.375", 1.0, 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0, 1.0),
    ("\\boxed{1\\frac{1}{2}}", "1.5", 1.0, 1.0),
    ("\\boxed{1.5\\times 10^{3}}", "1500", 1.0, 1.0),
    ("\\boxed{30^\\circ}", "30", 1.0, 1.0),
    ("\\boxed{5\\%}", "5", 1.0, 1.0),
    ("\\boxed{\\left(5\\right)}", "5", 1.0, 1.0),
    ("\\boxed{= 5}", "5", 1.0, 1.0),
    ("A: 18", "18", 1.0, 1.0),
    # an equation (or approximation) counts by its last side
    ("\\boxed{90+63=153}", "153", 1.0, 1.0),
    ("\\boxed{x = 153}", "153", 1.0, 1.0),
    ("$x\\approx 11$", "11", 1.0, 1.0),
    # a gold answer that is not a number literal: math-verify's equivalence alone
    ("\\boxed{\\frac{\\sqrt{12}}{4}}", "\\frac{\\sqrt{3}}{2}", 1.0, 1.0),
    ("\\boxed{1+x^2}", "x^2+1", 1.0, 1.0),
    ("\\boxed{2\\pi}", "2\\pi", 1.0, 1.0),
    ("\\boxed{[1, 3)}", "[1,3)", 1.0, 1.0),
    ("\\boxed{\\{2, 1\\}}", "\\{1, 2\\}", 1.0, 1.0),
    ("\\boxed{y = -x/2 + 3/4}", "2x+4y-3=0", 1.0, 1.0),  # an equation as gold is not a number
    ("$x = 1 + 2$", "x = 3", 1.0, 1.0),
]


@pytest.fixture(scope="module")
def equivalent_verifier():
    with MathVerifier(timeout_s=5.0, num_workers=1, number_answers="equivalent") as v:
        yield v


@pytest.mark.parametrize("completion,gold,literal,equivalent", NUMBER_ANSWER_CASES)
def test_a_number_answered_by_an_expression_scores_zero_unless_switched_back(completion, gold, literal, equivalent):
    assert score_one(completion, gold) == literal
    assert score_one(completion, gold, number_answers="equivalent") == equivalent


def test_the_number_convention_holds_in_the_workers_and_for_every_answer_format(verifier, equivalent_verifier):
    completions, golds, literal, equivalent = map(list, zip(*NUMBER_ANSWER_CASES))
    assert verifier(completions, golds) == literal
    assert equivalent_verifier(completions, golds) == equivalent
    lines = ["Answer: 591+734", "Answer: 1,325", "Answer: $\\frac{2650}{2}$", "Answer: 1325.", "Answer: x = 1325"]
    with MathVerifier(timeout_s=5.0, num_workers=1, answer_format="answer_line") as v:
        assert v(lines, ["1325"] * len(lines)) == [0.0, 1.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("text", [
    "1325", "-3", "+5", "1,325", "1{,}325", "1\\,325", "29,\\!322,\\!216", "1325.0", ".5", "-0.375", "\\frac{1}{2}",
    "\\dfrac{-3}{4}", "-\\tfrac{3}{4}", "\\frac12", "14/3", "1\\frac{1}{2}", "1.5\\times 10^{3}", "2 \\cdot 10^{-4}",
    "$5$", "\\$5", "5\\text{ cm}", "\\text{5}", "30^\\circ", "30^{\\circ}", "5\\%", "5%", "(5)", "\\left(5\\right)", "5.",
])
def test_number_literals(text):
    assert is_number_literal(text)


@pytest.mark.parametrize("text", [
    "591+734", "90 + 63", "3^4-2", "2\\times 3", "\\sqrt{4}", "10^3", "2650/2", "\\frac{2650}{2}", "\\frac{0}{5}",
    "\\frac{1}{0}", "1\\frac{3}{2}", "\\frac{1.5}{2}", "12,34", "1,22", "(1,234)", "x", "\\pi", "x = 5", "5!", "",
    "15\\times 10^2", "1e3", None,
])
def test_not_number_literals(text):
    assert not is_number_literal(text)


@pytest.mark.parametrize("answer,states", [
    ("153", True), ("90+63=153", True), ("x = 153", True), ("x\\approx 11", True), ("a = b = \\frac{1}{2}", True),
    ("153 = 90+63", False), ("x \\geq 5", False), ("x >= 5", False), ("x != 5", False), ("x = 5 + 1", False), (None, False),
])
def test_an_equation_states_the_number_on_its_last_side(answer, states):
    assert states_a_number(answer) == states


def test_the_answer_read_is_the_one_math_verify_parses():
    """`answer_read` finds the match `parse` answers from, also when the first match it tries fails."""
    from polopt.verify import _parse, answer_read

    for text in ["\\boxed{= 5}", "\\boxed{5\\text{ cm}}", "\\boxed{5} The final answer is $6$.", "A: 18", "so 90 + 63",
                 "\\boxed{\\frac{2650}{2}}", "no number here", "\\boxed{1325.}"]:
        parsed, read = _parse(text, None), answer_read(text)
        if read is None:
            assert all(isinstance(p, str) for p in parsed), text
        else:
            assert parsed[0] == read[0], text
    assert answer_read("\\boxed{= 5}")[1] == "5" and answer_read("\\boxed{5\\text{ cm}}")[1] == "5"


def test_number_answers_is_validated_and_survives_pickling():
    with pytest.raises(ValueError, match=r"number_answers must be one of \('literal', 'equivalent'\), got 'exact'"):
        MathVerifier(number_answers="exact")
    with pytest.raises(ValueError, match="number_answers must be one of"):
        score_one("\\boxed{1}", "1", number_answers="equivalence")
    v = MathVerifier(timeout_s=5.0, num_workers=1, number_answers="equivalent")
    clone = pickle.loads(pickle.dumps(v))
    assert clone.number_answers == "equivalent" and "number_answers='equivalent'" in repr(clone)
    with clone:
        assert clone(["\\boxed{591+734}"], ["1325"]) == [1.0]


def test_number_answers_is_a_config_key():
    """`verifier.number_answers` in a recipe config, built the way the recipes build the verifier."""
    from omegaconf import OmegaConf

    from polopt.errors import ConfigError
    from polopt.recipe_config import instantiate_component

    section = {"_component_": "polopt.verify.MathVerifier", "num_workers": 1}
    built = instantiate_component(OmegaConf.create({**section, "number_answers": "equivalent"}), "verifier")
    assert built.number_answers == "equivalent" and instantiate_component(OmegaConf.create(section), "verifier").number_answers == "literal"
    with pytest.raises(ConfigError, match=r"verifier \(polopt.verify.MathVerifier\): MathVerifier: number_answers must be one of"):
        instantiate_component(OmegaConf.create({**section, "number_answers": "exact"}), "verifier")


@st.composite
def echoed_answers(draw):
    """(completion, gold): the tiny-task echo "Q: a+b=? A: \\boxed{a+b}" for any a, b, also a-b and a×b,
    boxed, in $...$ or as plain text ("\\times" only as LaTeX: plain text reads its last number)."""
    a, b = draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))
    template, value = draw(st.sampled_from([("{}+{}", a + b), ("{} + {}", a + b), ("{}-{}", a - b), ("{}\\times {}", a * b)]))
    wraps = ["\\boxed{{{}}}", "The answer is ${}$.", "\\boxed{{{}}} is the answer"] + (["So {}"] if "times" not in template else [])
    return draw(st.sampled_from(wraps)).format(template.format(a, b)), str(value)


@given(echo=echoed_answers())
def test_an_echoed_sum_scores_zero_and_one_when_switched_back(verifier, equivalent_verifier, echo):
    completion, gold = echo
    assert score_one(completion, gold) == 0.0 and score_one(completion, gold, number_answers="equivalent") == 1.0
    assert verifier([completion], [gold]) == [0.0] and equivalent_verifier([completion], [gold]) == [1.0]


@st.composite
def integer_forms(draw):
    """(an integer, a completion writing it as a number: separators, decimals, a unit, delimiters)."""
    n = draw(st.integers(-10**12, 10**12))
    digits = f"{abs(n):,}".replace(",", draw(st.sampled_from([",", "{,}", ",\\!"])))
    text = ("-" if n < 0 else "") + draw(st.sampled_from([digits, str(abs(n))]))
    text += draw(st.sampled_from(["", ".0", ".00"]))
    text += draw(st.sampled_from(["", "\\text{ apples}", " \\text{cm}", "^\\circ", "\\%"]))
    return n, draw(st.sampled_from(["\\boxed{{{}}}", "The final answer is ${}$.", "Answer: ${}$"])).format(text)


@given(form=integer_forms())
def test_an_integer_written_as_a_number_keeps_math_verify_verdict(verifier, equivalent_verifier, form):
    """The convention takes nothing from a number written as a number; with separators, decimals
    and units math-verify scores it 1 (with degrees or percent it does not always: "1,000^\\circ"
    reads as a set, "5.0\\%" as 0.05)."""
    n, completion = form
    literal = score_one(completion, str(n))
    assert literal == score_one(completion, str(n), number_answers="equivalent")
    assert verifier([completion], [str(n)]) == [literal] == equivalent_verifier([completion], [str(n)])
    if "circ" not in completion and "%" not in completion:
        assert literal == 1.0


@st.composite
def terminating_fractions(draw):
    """(p, q) in lowest terms with a decimal expansion of at most 6 places, and their decimal."""
    q = draw(st.sampled_from([2, 4, 5, 8, 10, 16, 20, 25, 32, 40, 50, 64, 80, 125, 250, 625]))
    p = draw(st.integers(-999, 999).filter(lambda p: p != 0 and math.gcd(p, q) == 1))
    return p, q, str(Decimal(p) / Decimal(q))


@given(fraction=terminating_fractions(), k=st.integers(2, 9),
       spelling=st.sampled_from(["\\frac{{{}}}{{{}}}", "\\dfrac{{{}}}{{{}}}", "{}/{}"]))
def test_a_reduced_fraction_scores_against_its_decimal_and_an_unreduced_one_only_when_switched_back(
        verifier, equivalent_verifier, fraction, k, spelling):
    p, q, decimal = fraction
    reduced, unreduced = (f"\\boxed{{{spelling.format(p * m, q * m)}}}" for m in (1, k))
    assert score_one(reduced, decimal) == 1.0 and score_one(unreduced, decimal) == 0.0
    assert score_one(unreduced, decimal, number_answers="equivalent") == 1.0
    assert verifier([reduced, unreduced], [decimal] * 2) == [1.0, 0.0]
    assert equivalent_verifier([reduced, unreduced], [decimal] * 2) == [1.0, 1.0]
