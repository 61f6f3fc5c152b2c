"""Several rationales per question: dedup, cap, seeded sampling, and S = 1 being plain STaR."""
import json

import create_data
from create_data import drop_duplicates

A = "She buys 3 * 4 = 12 apples.\nThen 12 + 6 = 18.\nThe answer is 18."


def test_dedup_drops_reformatted_copies_keeps_different_reasoning():
    reformatted = "she buys 3*4 = 12 apples. then 12+6 = 18.  The answer is 18"
    same_equations = "First, 3 * 4 = 12.\nAdding, 12 + 6 = 18.\nThe answer is 18."
    different = "6 + 12 = 18 from 2 * 6 = 12 first.\nThe answer is 18."
    assert drop_duplicates([A, reformatted, same_equations, different]) == [A, different]


def test_cap_per_question():
    many = [f"{i} + {18 - i} = 18.\nThe answer is 18." for i in range(1, 8)]
    assert len(drop_duplicates(many)) == 7
    assert drop_duplicates(many, cap=3) == many[:3]


def run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    create_data.main(["--model_name", "smollm2-135m", "--dataset", "arithmetic", "--max_samples", "16", "--k", "4",
                      "--batch_size", "8", "--no_rationalization", "--output", out, *extra])
    return open(out).read(), json.load(open(out + ".stats.json"))


def test_sampling_is_seeded_capped_and_s1_is_greedy(tmp_path):
    greedy, _ = run(tmp_path, "greedy.jsonl")
    s1, _ = run(tmp_path, "s1.jsonl", "--num_samples", "1", "--temperature", "0.7")
    assert s1 == greedy  # S = 1 is the greedy STaR default
    a, stats = run(tmp_path, "a.jsonl", "--num_samples", "3", "--max_per_question", "2", "--seed", "3")
    b, _ = run(tmp_path, "b.jsonl", "--num_samples", "3", "--max_per_question", "2", "--seed", "3")
    assert a == b, "the same seed gives the same file"
    ids = [json.loads(line)["id"] for line in a.splitlines()]
    assert all(ids.count(i) <= 2 for i in ids)
    assert stats["samples_drawn"] == 3 * stats["questions_seen"]
    assert stats["correct_samples"] >= len(ids) and sum(stats["kept_per_question_histogram"].values()) == stats["questions_seen"]
    assert 0 < stats["pass_at_S"] <= 1
    # near-zero temperature: every sample is the greedy continuation, reusing one prefill per question
    cold, _ = run(tmp_path, "cold.jsonl", "--num_samples", "2", "--temperature", "1e-4")
    assert [json.loads(x)["rationale"] for x in cold.splitlines()] == [json.loads(x)["rationale"] for x in greedy.splitlines()]
