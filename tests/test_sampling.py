"""Several rationales per question: dedup, cap, seeded sampling, and S = 1 being plain STaR."""
import json

import torch

import create_data
from engines import Sampling, pick_tokens
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


def test_pick_tokens_draws_from_the_tempered_nucleus():
    """20,000 draws from fixed logits: frequencies follow softmax(logits / T) restricted to the top-p nucleus."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20_000

    def frequencies(temperature, top_p):
        gen = torch.Generator().manual_seed(0)
        draws = pick_tokens(logits.expand(n, -1), Sampling(1, temperature, top_p, 0), gen)
        return torch.bincount(draws, minlength=5).float() / n

    assert torch.allclose(frequencies(0.5, 1.0), torch.softmax(logits / 0.5, -1), atol=0.01)
    # top_p = 0.8: probabilities .563 .207 .126 .076 .028; the smallest top set holding >= 0.8 is the first three
    p = torch.softmax(logits, -1)
    nucleus = torch.cat([p[:3] / p[:3].sum(), torch.zeros(2)])
    freq = frequencies(1.0, 0.8)
    assert torch.allclose(freq, nucleus, atol=0.01) and freq[3:].sum() == 0


def run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    create_data.main(["--model_name", "smollm2-135m", "--dataset", "arithmetic", "--max_samples", "10", "--k", "4",
                      "--batch_size", "10", "--no_rationalization", "--output", out, *extra])
    return open(out).read(), json.load(open(out + ".stats.json"))


def rationales(jsonl):
    return [json.loads(line)["rationale"] for line in jsonl.splitlines()]


def test_sampling_is_seeded_and_capped(tmp_path):
    # --seed 2: exemplars under which the base model's greedy Stage 1 keeps some rationales (2 of these 10 when
    # measured; with seed 0's exemplars it keeps none, and there would be no greedy rationale to compare with)
    greedy, _ = run(tmp_path, "greedy.jsonl", "--seed", "2", "--dtype", "fp32")  # compared exactly below: fp32
    assert rationales(greedy), "the greedy run keeps some rationales to compare with"
    a, stats = run(tmp_path, "a.jsonl", "--num_samples", "3", "--max_per_question", "2", "--seed", "3", "--top_p", "0.9")
    b, _ = run(tmp_path, "b.jsonl", "--num_samples", "3", "--max_per_question", "2", "--seed", "3", "--top_p", "0.9")
    assert a == b, "the same seed gives the same file"
    assert set(rationales(a)) != set(rationales(greedy)), "sampling at T = 0.7 is not the greedy decode"
    ids = [json.loads(line)["id"] for line in a.splitlines()]
    assert all(ids.count(i) <= 2 for i in ids)  # --max_per_question (test_cap_per_question checks it binds)
    assert stats["samples_drawn"] == 3 * stats["questions_seen"]
    assert stats["correct_samples"] >= len(ids) and sum(stats["kept_per_question_histogram"].values()) == stats["questions_seen"]
    assert 0 < stats["pass_at_S"] <= 1
    # near-zero temperature: every sample is the greedy continuation, reusing one prefill per question
    cold, _ = run(tmp_path, "cold.jsonl", "--num_samples", "2", "--temperature", "1e-4", "--seed", "2", "--dtype", "fp32")
    assert rationales(cold) == rationales(greedy)


def test_evaluate_majority_vote_and_pass_at_k(tmp_path):
    import evaluate

    def run_eval(name):
        out = str(tmp_path / name)
        evaluate.main(["--model", "smollm2-135m", "--dataset", "arithmetic", "--max_samples", "4", "--k", "4",
                       "--max_new_tokens", "100", "--num_samples", "3", "--save_results", "--output", out])
        return json.load(open(out)), [json.loads(x) for x in open(out[:-5] + ".jsonl")]

    result, details = run_eval("a.json")
    assert (result, details)[1] == run_eval("b.json")[1], "the same seed gives the same draws"
    for d in details:
        assert len(d["sample_answers"]) == 3
        votes = [a for a in d["sample_answers"] if a is not None]
        if votes:
            assert votes.count(d["majority"]) == max(votes.count(a) for a in votes)
        assert d["pass_correct"] == any(a is not None and float(a) == float(d["gold"]) for a in d["sample_answers"])
    assert result["accuracy_maj_at_3"] == sum(d["maj_correct"] for d in details) / 4
    assert result["accuracy_maj_at_3"] <= result["accuracy_pass_at_3"]
