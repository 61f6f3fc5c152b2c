"""Every text rule the scripts apply to model output (step checking, answer reading, cutting, stop truncation,
de-duplication) returns, without raising, in time linear in the text, on any string up to 100,000 characters:
the degenerate outputs models write (long repeats, huge numbers, deep brackets) included.

Times are CPU time of this process (time.process_time), not wall time, so other jobs on the machine do not count;
the bounds are generous (a linear rule takes well under 0.5 s on 100,000 characters) and the scaling check
compares 10,000 with 100,000 characters: linear is 10x, a quadratic rule 100x.
"""
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import common
import create_data
import engines
import steps

RULES = {
    "check_steps": lambda text: steps.check_steps(text, "What is 4721 + 389?"),
    "extract_stated_answer": common.extract_stated_answer,
    "extract_last_number": common.extract_last_number,
    "cut_after_answer": common.cut_after_answer,
    "rationalization_problem": lambda text: common.rationalization_problem(text, "18"),
    "truncate_at_stop": lambda text: engines.truncate_at_stop(text, ["\n\nQuestion:", "</s>"]),
    "drop_duplicates": lambda text: create_data.drop_duplicates([text]),
    "solution_to_rationale": common.solution_to_rationale,  # GSM8K's own text, read with CALC_RE
}
# What degenerate generations repeat, and what has broken text rules before: sums, chains, brackets, long digit
# runs, runs of spaces after an answer phrase, other scripts' digits, NUL, LaTeX, units, unknowns, scratchpad lines.
PIECES = ["1", "9" * 40, " + ", " = ", "=", "1=", "\n", "\n= ", "(", ")", " ", "  ", "*", "**", "$", "%", " of ",
          "/", "1/2", "x", "2x", " x ", ".", ",", "1,000", "-", "×", "÷", "^", "√", ":", "7:50", "٣", "\x00",
          "\\frac{1}{3}",
          "\\boxed{", "}", "The answer is", "The final answer is: ", "#### ", "answer is 5", "miles/day", "hint",
          "Ones: 1 + 9 = 10, write 0, carry 1.\n", "So 4721 + 389 = 5110.", "The answer is 18.\n"]
# Adversarial texts of a given length, each aimed at a rule that was (or could be) super-linear.
ADVERSARIAL = {
    "sum with =": lambda n: repeat("1 + ", n) + "= 1000",
    "sum without =": lambda n: repeat("1 + ", n),
    "chain of = over lines": lambda n: repeat("1 + 1\n= 2\n", n),
    "one long chain": lambda n: repeat("1=", n),
    "deep brackets": lambda n: "(" * (n // 2) + "1" + ")" * (n // 2) + " = 1",
    "huge number": lambda n: "9" * n + " * 3 = 5",
    "growing fractions": lambda n: repeat("1/7 + 1/3 * ", n) + "1 = 5",
    "unknowns": lambda n: repeat("2x + ", n) + "= 4",
    "spaces after the answer phrase": lambda n: "The answer is" + " " * n + "x",
    "spaces in a box": lambda n: "The final answer is: \\boxed{" + " " * n + "x",
    "spaces after the answer": lambda n: "answer is 5" + " " * n + "x",
    "answer phrases": lambda n: repeat("The answer is **", n),
    "digit run with commas": lambda n: repeat("1,", n),
    "newlines then =": lambda n: "\n" * n + "= 1",
    "annotation brackets": lambda n: repeat("<", n),
    "scratchpad lines": lambda n: repeat("Ones: 1 + 9 = 10, write 0, carry 1.\n", n),
}


def repeat(piece, n):
    return (piece * (n // len(piece) + 1))[:n]


def cpu_seconds(rule, text):
    start = time.process_time()
    rule(text)
    return time.process_time() - start


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=30), st.integers(1, 300))
def test_random_text_never_raises_and_returns_quickly(pieces, times):
    text = "".join(pieces) * times
    for name, rule in RULES.items():
        assert cpu_seconds(rule, text) < 2, name
    true, found = steps.check_steps(text)
    assert 0 <= true <= found
    answer = common.extract_stated_answer(text)
    assert answer is None or common.answers_match(answer, answer)  # a number, or nothing
    assert common.cut_after_answer(text) in text
    assert text.startswith(engines.truncate_at_stop(text, ["\n\nQuestion:"]))
    assert create_data.drop_duplicates([text, text]) == [text]


@pytest.mark.parametrize("case", ADVERSARIAL)
def test_adversarial_text_takes_linear_time(case):
    small_text, large_text = ADVERSARIAL[case](10_000), ADVERSARIAL[case](100_000)
    for name, rule in RULES.items():
        small, large = cpu_seconds(rule, small_text), cpu_seconds(rule, large_text)
        if large > 2 or large > 30 * small + 0.05:
            large = min(large, cpu_seconds(rule, large_text))  # a stray pause (garbage collection): once more
        assert large < 2, f"{name} took {large:.2f} s on 100,000 characters of {case}"
        assert large < 30 * small + 0.05, f"{name}: {small:.4f} s on 10,000 characters, {large:.2f} s on 100,000 " \
                                          f"({case})"


def test_thousand_term_sum_is_checked():
    """A degenerate generation: `1 + 1 + ... = 1000` (about 2,000 tokens) once raised RecursionError."""
    assert steps.check_steps(" + ".join(["1"] * 1000) + " = 1000") == (1, 1)
    assert steps.check_steps(" + ".join(["1"] * 1000) + " = 999") == (0, 1)


def test_huge_numbers_are_not_arithmetic_to_check():
    """A 5,000-digit number once took a minute: past 30 digits a number is not a step (neither true nor false)."""
    assert steps.check_steps("9" * 5000 + " * 3 = 5") == (0, 0)
    assert steps.check_steps("9" * 31 + " + 1 = 1" + "0" * 31) == (0, 0)
    assert steps.check_steps("9" * 29 + " + 1 = 1" + "0" * 29) == (1, 1)
