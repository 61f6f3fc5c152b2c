"""End to end on the embedded model: data creation on both datasets, and two STaR iterations by hand."""
import json
import os

import pytest

import create_data
import evaluate
import train
from common import answers_match, extract_answer, read_jsonl
from conftest import GSM8K_DIR


def read_json(path):
    with open(path) as f:
        return json.load(f)


def check_records(path, iteration, model):
    records = read_jsonl(path)
    assert records, "at least one rationale kept"
    for r in records:
        assert set(r) >= {"id", "question", "rationale", "answer", "stage", "iteration", "model"}
        assert answers_match(extract_answer(r["rationale"]), r["answer"])
        assert r["iteration"] == iteration and r["model"] == model and r["stage"] in (1, 2)
        assert "Hint" not in r["rationale"] + r["question"]  # the Stage-2 hint is never saved
    return records


def test_create_data_gsm8k(tmp_path):
    out = str(tmp_path / "g.jsonl")
    create_data.main(["--model_name", "smollm2-135m", "--data_dir", GSM8K_DIR, "--max_samples", "6", "--k", "2",
                      "--max_new_tokens", "120", "--output", out])
    stats = read_json(out + ".stats.json")
    assert stats["questions_seen"] == 6 and stats["tokens_generated"] > 0
    assert stats["total_kept"] == stats["stage1_correct"] + stats["stage2_correct"]
    if stats["total_kept"]:
        check_records(out, 1, "smollm2-135m")
    else:
        assert not os.path.exists(out)  # nothing kept: stats only, and a clear error (tested elsewhere)


def test_two_star_iterations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default paths: data/star_iter{N}_train.jsonl, results/...
    common = ["--dataset", "arithmetic", "--max_samples", "16", "--k", "4"]
    create_data.main(["--iteration", "1", "--model_name", "smollm2-135m"] + common)
    kept1 = check_records("data/star_iter1_train.jsonl", 1, "smollm2-135m")
    stats1 = read_json("data/star_iter1_train.jsonl.stats.json")
    assert stats1["stage1_correct"] + stats1["stage2_correct"] == len(kept1)

    train_args = ["--base_model", "smollm2-135m", "--epochs", "3", "--batch_size", "4", "--lr", "1e-4"]
    train.main(["--iteration", "1"] + train_args)
    ts1 = read_json("results/model_star_iter1/train_stats.json")
    assert ts1["final_loss"] < ts1["first_loss"], "the loss fell during training"
    assert read_json("results/model_star_iter1/args.json")["args"]["base_model"] == "smollm2-135m"

    evaluate.main(["--iteration", "1", "--dataset", "arithmetic", "--max_samples", "8", "--save_results"])
    ev = read_json("results/eval_iter1.json")
    details = read_jsonl("results/eval_iter1.jsonl")
    assert ev["n"] == len(details) == 8
    assert ev["correct"] == sum(d["correct"] for d in details)
    assert ev["accuracy"] == pytest.approx(ev["correct"] / 8)

    # Iteration 2 generates with M_1 by default and trains the BASE model again.
    create_data.main(["--iteration", "2"] + common)
    assert read_json("data/star_iter2_train.jsonl.stats.json")["args"]["model_name"] == "results/model_star_iter1"
    check_records("data/star_iter2_train.jsonl", 2, "results/model_star_iter1")
    train.main(["--iteration", "2"] + train_args)
    ts2 = read_json("results/model_star_iter2/train_stats.json")
    assert ts2["init_fingerprint"] == ts1["init_fingerprint"], "iteration 2 started from the base weights"
    m1 = train.weight_fingerprint(__import__("common").load_model("results/model_star_iter1")[0])
    assert m1 != ts2["init_fingerprint"], "and not from iteration 1's"
    evaluate.main(["--iteration", "2", "--dataset", "arithmetic", "--max_samples", "8"])
    assert read_json("results/eval_iter2.json")["n"] == 8
