"""Unit tests of common.py on real inputs: answer extraction, matching, prompts, the arithmetic set."""
import json
import sys
from pathlib import Path

import pytest

from common import (
    answers_match, arithmetic_example, build_completion, build_prompt, cut_after_answer, extract_last_number,
    extract_stated_answer, load_split, make_arithmetic, pick_exemplars, rationalization_problem, solution_to_rationale,
)
from models import load_tokenizer
from conftest import GSM8K_DIR
from steps import check_steps


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def train():
    return load_split("gsm8k", "train", GSM8K_DIR)


@pytest.mark.parametrize("text, strict, flexible", [
    ("48/2 = 24 clips.\nThe answer is 72.", "72", "72"),
    ("The answer is $1,000.", "1000", "1000"),
    ("The answer is -3.5.", "-3.5", "-3.5"),
    ("The final answer is 18", "18", "18"),
    ("so 5 + 5 = 10\n#### 10", "10", "10"),
    ("She has 3 apples and 4 pears, 7 fruits", None, "7"),  # no stated answer: strict None, flexible the last number
    ("The answer is 12. Then more text with 99.", "12", "99"),  # the answer sentence, not the last number
    ("no numbers here", None, None),
])
def test_strict_and_flexible_answers(text, strict, flexible):
    """evaluate.py's two scores: the stated answer (also create_data.py's keep rule) and the last number."""
    assert extract_stated_answer(text) == strict and extract_last_number(text) == flexible


@pytest.mark.parametrize("pred, gold, same", [
    ("18", "18", True), ("18.0", "18", True), ("$18", "18", True), ("1,000", "1000", True),
    ("-5", "-5", True), ("0.50", "0.5", True), ("18", "19", False), ("-5", "5", False), (None, "5", False),
    ("abc", "5", False),
])
def test_answers_match(pred, gold, same):
    assert answers_match(pred, gold) is same


def test_gsm8k_gold_answers_all_parse(train):
    """The stated-answer rule (keeping and strict scoring) reads the gold of every human solution."""
    assert len(train) == 7473
    as_rationale = sum(answers_match(extract_stated_answer(solution_to_rationale(r["solution"])), r["answer"]) for r in train)
    as_written = sum(answers_match(extract_stated_answer(r["solution"]), r["answer"]) for r in train)  # '#### N'
    # the LAST statement is read: the solution that says "the final answer is 15 gallons * 8 pints / gallon = 120
    # pints" before its "#### 120" is read as 120 (the first one would read 15, as rationale and as written)
    assert as_rationale == as_written == 7473


@pytest.mark.parametrize("text, expected", [
    ("Step 1: 3 * 6 = 18.\n\nThe final answer is $\\boxed{18}$", "18"),  # Llama-3.2-Instruct's own form
    ("She pays $1,250 in all.\n\nThe final answer is: $\\boxed{1250}$", "1250"),
    ("The final answer is: 18", "18"),
    ("**The final answer is 18.**", "18"),
    ("So she has \\boxed{18} apples.", "18"),
    ("3 * 6 = 18", None),  # cut off at --max_new_tokens, or never stated: not kept, not strict-correct
    ("The answer is 12. Then 99.", "12"),
])
def test_stated_answer_forms(text, expected):
    assert extract_stated_answer(text) == expected


def test_keep_rule_is_the_strict_score_rule():
    import create_data

    samples = [("3 * 6 = 18", 4), ("3 * 6 = 18.\nThe final answer is $\\boxed{18}$", 9), ("3 * 6 = 18.\nThe answer is 18.", 9)]
    assert create_data.correct_rationales(samples, "18") == [samples[1][0], samples[2][0]]


def test_solution_to_rationale_drops_annotations(train):
    r = solution_to_rationale(train[0]["solution"])
    assert "<<" not in r and "####" not in r
    assert r.endswith("\nThe final answer is 72")


def test_cut_after_answer():
    assert cut_after_answer("a = 1\nThe answer is 5.\nQuestion: next") == "a = 1\nThe answer is 5."


def test_exemplars_are_train_rows_fixed_by_seed(train):
    a, b = pick_exemplars(train, 4, 0), pick_exemplars(train, 4, 0)
    assert a == b and a != pick_exemplars(train, 4, 1)
    assert all(e in train for e in a)


def test_prompt_holds_exemplars_but_not_the_hint(tok, train):
    ex = pick_exemplars(train, 3, 0)
    q = train[10]
    prefix, part = build_prompt(tok, q["question"], ex)
    assert all(e["question"] in prefix for e in ex) and q["question"] in part
    assert "Hint" not in prefix + part
    hprefix, hpart = build_prompt(tok, q["question"], ex, hint=q["answer"])
    assert f"the answer is {q['answer']}" in hpart and all(f"the answer is {e['answer']}" in hprefix for e in ex)
    zero = "".join(build_prompt(tok, q["question"]))
    assert zero.endswith(part) and not any(e["question"] in zero for e in ex)  # zero-shot = same question turn


def test_completion_ends_with_end_of_turn(tok):
    assert build_completion(tok, "x = 1\nThe answer is 1.").endswith(tok.eos_token)


def test_arithmetic_set_is_deterministic_and_disjoint():
    train, test = make_arithmetic("train"), make_arithmetic("test")
    assert train == make_arithmetic("train") and len(train) == 2000 and len(test) == 500
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    digits = {len(r["question"].split()[2]) for r in train}
    assert digits == {1, 2, 3, 4, 5}
    for r in train[:200]:  # each scratchpad is right and checks out step by step
        a, b = map(int, r["question"][len("What is "):-1].split(" + "))
        rationale = solution_to_rationale(r["answer"])
        assert extract_stated_answer(rationale) == str(a + b)
        true, found = check_steps(rationale, r["question"])
        assert true == found > 0


def test_arithmetic_example_carries():
    ex = arithmetic_example(4721, 389)
    assert ex["answer"].splitlines()[:2] == ["Ones: 1 + 9 = 10, write 0, carry 1.", "Tens: 2 + 8 + 1 = 11, write 1, carry 1."]
    assert ex["answer"].endswith("So 4721 + 389 = 5110.\n#### 5110")


@pytest.mark.parametrize("rationale, problem", [
    ("The answer is 18.", "no_reasoning"),
    ("Using the hint, 9 * 2 = 18.\nThe answer is 18.", "mentions_hint"),
    ("She buys 3 apples and 4 pears.\nThe answer is 18.", "answer_not_derived"),
    ("9 * 2 = 18 dollars.\nThe answer is 18.", None),
])
def test_rationalization_filter(rationale, problem):
    assert rationalization_problem(rationale, "18") == problem


def test_paired_bootstrap_on_crafted_results(tmp_path, capsys):
    """bench/paired_bootstrap.py: B right on 40 more of 200 questions gives +20 pts with the interval of a mean of
    200 paired differences (sd 0.4: 1.96 x 0.4 / sqrt(200) = 5.5 pts each side); the same file twice gives 0 and p = 1;
    files over different questions or without the field are one error line."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import paired_bootstrap

    def write(name, right):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"id": i, "correct": i in right}) + "\n" for i in range(200)))
        return str(path)
    a, b = write("a.jsonl", set(range(100, 200))), write("b.jsonl", set(range(60, 200)))
    diff, low, high, p = paired_bootstrap.main([a, b, "--draws", "4000"])
    assert diff == pytest.approx(0.2) and p == 0.0
    assert 0.2 - 0.055 * 1.15 < low < 0.2 - 0.055 * 0.85 and 0.2 + 0.055 * 0.85 < high < 0.2 + 0.055 * 1.15
    assert "B - A +20.0 pts" in capsys.readouterr().out
    assert paired_bootstrap.main([a, a, "--draws", "200"]) == (0.0, 0.0, 0.0, 1.0)
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": 999, "correct": True}) + "\n")
    with pytest.raises(SystemExit, match="different questions"):
        paired_bootstrap.main([a, str(tmp_path / "c.jsonl")])
    with pytest.raises(SystemExit, match="no 'faithful_correct' field"):
        paired_bootstrap.main([a, b, "--field", "faithful_correct"])
