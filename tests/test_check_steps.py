"""Tests for check_steps: real GSM8K solutions, mutated solutions, instruct-model-style rationales, edge cases."""
import json
import random
import re
from pathlib import Path

import pytest

from common import answers_match, extract_stated_answer
from steps import check_steps
from conftest import GSM8K_DIR
from instruct_style import LINES, RATIONALES

GSM8K = Path(GSM8K_DIR) / "train.jsonl"
ANNOTATION_RE = re.compile(r"<<[^>]*>>")
# The right-hand number of an `=` (what a mutation changes).
RESULT_RE = re.compile(r"=\s*-?[$€£¢]?\s?(\d[\d,]*(?:\.\d+)?|\.\d+)")

SCRATCHPAD = """Ones: 1 + 9 = 10, write 0, carry 1.
Tens: 2 + 8 + 1 = 11, write 1, carry 1.
Hundreds: 7 + 3 + 1 = 11, write 1, carry 1.
Thousands: 4 + 0 + 1 = 5, write 5, carry 0.
So 4721 + 389 = 5110.
The answer is 5110."""


def clean(answer):
    """Strip calculator annotations and the final `#### N` line, as the checker sees rationales."""
    return ANNOTATION_RE.sub("", answer).rsplit("####", 1)[0]


def mutate(text, rng):
    """Change the right-hand number of one `=` step: add 1 or multiply by 10."""
    matches = list(RESULT_RE.finditer(text))
    m = rng.choice(matches)
    number = m.group(1).replace(",", "")
    value = float(number) if "." in number else int(number)
    new = value + 1 if rng.random() < 0.5 or value == 0 else value * 10
    new_text = f"{new:g}" if isinstance(new, float) else str(new)
    return text[:m.start(1)] + new_text + text[m.end(1):]


@pytest.fixture(scope="module")
def solutions():
    """Cleaned GSM8K train rationales with their (true, found) counts."""
    texts = [clean(json.loads(line)["answer"]) for line in GSM8K.open()]
    return [(text, check_steps(text)) for text in texts]


def test_real_solutions_mostly_all_true(solutions):
    with_steps = [counts for _, counts in solutions if counts[1] > 0]
    share_found = len(with_steps) / len(solutions)
    share_all_true = sum(t == f for t, f in with_steps) / len(with_steps)
    print(f"\nsolutions with >=1 step: {share_found:.4f}; all steps true: {share_all_true:.4f}")
    assert share_found >= 0.85
    assert share_all_true >= 0.99


def test_mutations_are_flagged(solutions):
    """One result changed in each solution: flagged among the solutions whose steps all checked, and among all
    solutions that write a result (a solution in which no step is found cannot be flagged)."""
    rng = random.Random(0)
    flagged = {"all steps true": [], "with a result": []}
    for text, (t, f) in solutions:
        if RESULT_RE.search(text):
            true, found = check_steps(mutate(text, rng))
            flagged["with a result"].append(true < found)
            if 0 < f == t:
                flagged["all steps true"].append(true < found)
    shares = {key: sum(v) / len(v) for key, v in flagged.items()}
    print("\nmutated solutions flagged: " + "; ".join(f"{shares[k]:.4f} of {len(v)} {k}" for k, v in flagged.items()))
    assert shares["all steps true"] >= 0.9
    assert shares["with a result"] >= 0.9


@pytest.mark.parametrize("line, expected", LINES)
def test_instruct_style_lines(line, expected):
    assert check_steps(line) == expected


def test_instruct_style_rationales_mostly_found_and_true():
    """Whole rationales with right answers, written as instruct models write them: the filter must keep them."""
    assert all(answers_match(extract_stated_answer(text), gold) for _, gold, text in RATIONALES)
    counts = [check_steps(text) for _, _, text in RATIONALES]
    with_steps = [(t, f) for t, f in counts if f > 0]
    share_found, share_flagged = len(with_steps) / len(counts), sum(t < f for t, f in with_steps) / len(with_steps)
    print(f"\ninstruct-style rationales ({len(counts)}): >=1 step {share_found:.4f}; flagged {share_flagged:.4f}")
    assert share_found >= 0.9
    assert share_flagged <= 0.02


def test_instruct_style_rationales_with_a_planted_error_are_flagged():
    rng = random.Random(0)
    flagged = [check_steps(mutate(text, rng)) for _, _, text in RATIONALES if RESULT_RE.search(text)]
    share = sum(t < f for t, f in flagged) / len(flagged)
    print(f"\ninstruct-style rationales with one result changed, flagged: {share:.4f} of {len(flagged)}")
    assert share >= 0.9


def test_gsm8k_style_with_one_wrong_step():
    text = ("Natalia sold 48/2 = 24 clips in May.\n"
            "Natalia sold 48+24 = 70 clips altogether in April and May.\n"
            "She earns 12/60 = $0.2 per minute.")
    assert check_steps(text) == (2, 3)


def test_correct_scratchpad():
    assert check_steps(SCRATCHPAD) == (5, 5)


def test_scratchpad_wrong_digit_with_right_sum():
    text = SCRATCHPAD.replace("Tens: 2 + 8 + 1 = 11, write 1, carry 1.",
                              "Tens: 3 + 8 + 1 = 12, write 2, carry 1.")
    assert check_steps(text) == (4, 5)


def test_scratchpad_wrong_carry():
    # Tens should carry 1; writing carry 0 is wrong, and Hundreds then follows the wrong carry
    # (so its own sum is off by one against the operands, but its carry-in matches the line above).
    text = SCRATCHPAD.replace("Tens: 2 + 8 + 1 = 11, write 1, carry 1.",
                              "Tens: 2 + 8 + 1 = 11, write 1, carry 0.")
    text = text.replace("Hundreds: 7 + 3 + 1 = 11, write 1, carry 1.",
                        "Hundreds: 7 + 3 + 0 = 10, write 0, carry 1.")
    text = text.replace("So 4721 + 389 = 5110.", "So 4721 + 389 = 5010.")
    assert check_steps(text) == (3, 5)  # Ones, Hundreds, Thousands true; Tens and So false


def test_scratchpad_carry_in_must_follow_previous_line():
    text = SCRATCHPAD.replace("Hundreds: 7 + 3 + 1 = 11", "Hundreds: 7 + 3 + 0 = 10")
    text = text.replace("10, write 1, carry 1.\nThousands", "10, write 0, carry 1.\nThousands")
    assert check_steps(text) == (4, 5)  # Hundreds ignores the incoming carry 1


def test_scratchpad_without_so_line_checks_own_arithmetic():
    text = "Ones: 5 + 7 = 12, write 2, carry 1.\nTens: 1 + 2 + 1 = 4, write 4, carry 0.\n"
    assert check_steps(text) == (2, 2)
    assert check_steps(text.replace("write 2", "write 3")) == (1, 2)


def test_five_column_scratchpad():
    text = ("Ones: 9 + 3 = 12, write 2, carry 1.\nTens: 9 + 0 + 1 = 10, write 0, carry 1.\n"
            "Hundreds: 9 + 0 + 1 = 10, write 0, carry 1.\nThousands: 9 + 0 + 1 = 10, write 0, carry 1.\n"
            "Ten-thousands: 1 + 0 + 1 = 2, write 2, carry 0.\nSo 19999 + 3 = 20002.\nThe answer is 20002.")
    assert check_steps(text) == (6, 6)
    assert check_steps(text.replace("So 19999 + 3", "So 19999 + 13")) == (4, 6)  # Tens digit and sum


def test_step_free_rationale():
    assert check_steps("She left at 3:00 on 12/25.\nThe answer is 18.") == (0, 0)


@pytest.mark.parametrize("text, expected", [
    ("9 * 2 = $18", (1, 1)),
    ("1,200 x 0.25 = 300", (1, 1)),
    ("48/2 = 24", (1, 1)),
    ("(3 + 4) * 2 = 14", (1, 1)),
    ("20% * 50 = 10", (1, 1)),
    ("50% of 80 = 40", (1, 1)),
    ("10 / 3 = 3.33", (1, 1)),
    ("10 / 3 = 3.5", (0, 1)),
    ("16 - 3 - 4 = 9", (1, 1)),
    ("12 ÷ 4 = 3 and 6 × 7 = 42", (2, 2)),
    ("Steve has (1/2)(20)=10 berries", (1, 1)),
    ("8 x 1 1/2 = 12 rolls", (1, 1)),
    ("He paid 5 / 0 = 3", (0, 1)),
    ("4080 + 4080 / 2 = 4080 + 2040 = 6120", (2, 2)),
    ("4080 + 4080 / 2 = 4000 + 2040 = 6120", (0, 2)),  # 6120 = 6040 = 6120: both links break
    ("Let x be the number. 2x + 3 = 9, so x = 3.", (0, 0)),
    ("0.25 * 100 = 25%", (1, 1)),
])
def test_edge_formats(text, expected):
    assert check_steps(text) == expected


def test_filter_drops_unfaithful_rationales_and_keeps_true_ones():
    import argparse

    import create_data

    args = argparse.Namespace(check_steps="filter", iteration=1, model_name="m")
    row = {"id": 0, "question": "What is 4721 + 389?", "answer": "5110"}
    good = SCRATCHPAD
    wrong_digit = SCRATCHPAD.replace("Tens: 2 + 8 + 1 = 11", "Tens: 3 + 8 + 1 = 12").replace("write 1, carry 1.\nHundreds", "write 2, carry 1.\nHundreds", 1)
    wrong_carry = SCRATCHPAD.replace("Ones: 1 + 9 = 10, write 0, carry 1.", "Ones: 1 + 9 = 10, write 0, carry 0.")
    wrong_step = "She has 3 * 4 = 13 apples.\nSo 5110 in all.\nThe answer is 5110."
    no_steps = "It is a big sum.\nThe answer is 5110."
    records = [create_data.make_record(row, r, 1, args) for r in (good, wrong_digit, wrong_carry, wrong_step, no_steps)]
    stats = {}
    kept = create_data.keep_faithful(records, args, stats, 1)
    assert [r["rationale"] for r in kept] == [good]
    assert stats == {"stage1_all_steps_true": 1, "stage1_no_step_found": 1, "stage1_dropped_by_step_check": 4}
    args.check_steps = "report"
    assert create_data.keep_faithful(records, args, {}, 1) == records


def test_long_sum_without_equals_is_rejected_at_once():
    """A degenerate generation seen from the embedded model: a sum that runs on with no `=`. The number pattern
    once let the space after each `+` go either way, and rejecting 30 terms took minutes (2^terms paths)."""
    import signal

    def too_slow(*_):
        raise TimeoutError("check_steps took more than 10 s on a 199-term sum")

    text = "Ones: " + " + ".join(str(i) for i in range(1, 200))
    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(10)  # a deadline, not a speed figure: the exponential version never returns
    try:
        assert check_steps(text, "What is 14525 + 72944?") == (0, 0)
        assert check_steps(text + " = 19900.", "What is 14525 + 72944?")[1] == 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_evaluate_counts_right_answers_with_no_step_found():
    """evaluate.py reports how many right answers the step filter would drop for having no step to read."""
    import argparse

    import evaluate

    rows = [{"id": i, "question": "q", "answer": "18"} for i in range(3)]
    outs = [("9 eggs/day * $2/egg = $18/day.\nThe answer is 18.", 20),  # right, a true step
            ("She makes eighteen dollars.\nThe answer is 18.", 10),  # right, no step found
            ("9 * 2 = 20.\nThe answer is 20.", 10)]  # wrong
    args = argparse.Namespace(model="m", iteration=0, dataset="gsm8k", split="test", k=0, num_samples=1, protocol="star")
    result = evaluate.accuracy_report(evaluate.score(rows, outs), args, 1.0)
    assert (result["correct"], result["correct_no_step_found"], result["accuracy_faithful"]) == (2, 1, 1 / 3)
