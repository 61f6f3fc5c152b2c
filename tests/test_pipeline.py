"""End to end on the embedded model: data creation on both datasets, and two STaR iterations by hand."""
import argparse
import json
import os
import subprocess
import sys

import pytest

import create_data
import generation
import train
from common import answers_match, extract_stated_answer, load_split, read_jsonl, solution_to_rationale
from models import load_model, load_tokenizer
from conftest import GSM8K_DIR, ROOT


def read_json(path):
    with open(path) as f:
        return json.load(f)


def check_records(path, iteration, model):
    records = read_jsonl(path)
    assert records, "at least one rationale kept"
    for r in records:
        assert set(r) >= {"id", "question", "rationale", "answer", "stage", "iteration", "model"}
        assert answers_match(extract_stated_answer(r["rationale"]), r["answer"])
        assert r["iteration"] == iteration and r["model"] == model and r["stage"] in (1, 2)
        assert "Hint" not in r["rationale"] + r["question"]  # the Stage-2 hint is never saved
    return records


def test_create_data_gsm8k_keeps_right_rationales_without_the_hint(tmp_path, monkeypatch):
    """create_data.py on GSM8K with the real prompts, files and checks, the generations crafted (the embedded model
    gets about 1% of GSM8K right, too few to test the bookkeeping; test_two_star_iterations_with_run_star runs its
    real generations): Stage 1 answers the even ids with their human rationale and the odd ones wrongly; Stage 2,
    asked with the hint, answers them rightly. Every question is then kept, each at the stage it was right in,
    the hint never saved, one (right, wrong) pair per odd question."""
    rows = {r["question"]: r for r in load_split("gsm8k", "train", GSM8K_DIR, 8)}
    asked = {"stage1": [], "stage2": []}

    def crafted(model, tok, prefix, parts, *args, **kwargs):
        stage = "stage2" if "(Hint: the answer is" in parts[0] else "stage1"
        asked[stage].extend(parts)
        out = []
        for part in parts:
            row = next(r for q, r in rows.items() if q in part)
            right = stage == "stage2" or row["id"] % 2 == 0
            text = solution_to_rationale(row["solution"]) if right else "2 + 2 = 4.\nThe final answer is 4."
            out.append((text, 30))
        return out

    monkeypatch.setattr(generation, "generate", crafted)  # no model is needed: the tokenizer builds the prompts
    monkeypatch.setattr(generation, "load_generator", lambda *args, **kwargs: (None, load_tokenizer("smollm2-135m")))
    out = str(tmp_path / "g.jsonl")
    create_data.main(["--model_name", "smollm2-135m", "--data_dir", GSM8K_DIR, "--max_samples", "8", "--k", "2",
                      "--output", out])
    stats = read_json(out + ".stats.json")
    seen = [r for r in rows.values() if r["id"] not in stats["exemplar_ids"]]
    odd = [r["id"] for r in seen if r["id"] % 2]
    assert stats["questions_seen"] == len(seen) == len(asked["stage1"]) >= 6 and len(asked["stage2"]) == len(odd)
    records = check_records(out, 1, "smollm2-135m")
    assert sorted((r["id"], r["stage"]) for r in records) == sorted((r["id"], 1 + r["id"] % 2) for r in seen)
    assert all(r["rationale"] == solution_to_rationale(rows[r["question"]]["solution"]) for r in records)
    assert stats["stage1_correct"] == len(seen) - len(odd) and stats["stage2_correct"] == len(odd)
    assert stats["tokens_generated"] == 30 * (len(seen) + len(odd))
    pairs = read_jsonl(str(tmp_path / "g_pairs.jsonl"))
    assert sorted(p["id"] for p in pairs) == odd and all("The final answer is 4." in p["rejected"] for p in pairs)
    assert not os.path.exists(out + ".partial")


def test_human_rationales_for_the_sft_baseline(tmp_path):
    out = str(tmp_path / "sft.jsonl")
    create_data.main(["--human_rationales", "--data_dir", GSM8K_DIR, "--max_samples", "5", "--output", out])
    records = read_jsonl(out)
    assert len(records) == 5 and all(r["model"] == "human" and r["stage"] == 0 for r in records)
    assert records[0]["rationale"] == "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips " \
                                      "altogether in April and May.\nThe final answer is 72"


def test_dev_slice_is_held_out(tmp_path, capsys):
    """--dev_samples D: dev is the train file's last D questions; training and exemplars never see them."""
    for dataset, size in (("arithmetic", 2000), ("gsm8k", 7473)):
        train, dev = (load_split(dataset, split, GSM8K_DIR, dev_samples=200) for split in ("train", "dev"))
        assert [r["id"] for r in train] == list(range(size - 200)) and [r["id"] for r in dev] == list(range(size - 200, size))
    out = str(tmp_path / "sft.jsonl")
    create_data.main(["--human_rationales", "--data_dir", GSM8K_DIR, "--dev_samples", "7000", "--output", out])
    assert [r["id"] for r in read_jsonl(out)] == list(range(473))
    with pytest.raises(SystemExit) as e:
        create_data.main(["--human_rationales", "--data_dir", GSM8K_DIR, "--dev_samples", "7473", "--output", out + "2"])
    assert e.value.code == 2 and "--dev_samples 7473 leaves no train question" in capsys.readouterr().err


def test_accumulate_adds_the_previous_set_once(tmp_path, capsys):
    """--accumulate: the previous iteration's records join this one's; a rationale already there counts once."""
    new = [{"id": 3, "rationale": "3 + 4 = 7.\nThe answer is 7.", "iteration": 2}]
    previous = [{"id": 3, "rationale": "3+4 = 7.\nThe answer is 7. ", "iteration": 1},  # same text, other spacing
                {"id": 3, "rationale": "4 + 3 = 7.\nThe answer is 7.", "iteration": 1},
                {"id": 1, "rationale": "1 + 1 = 2.\nThe answer is 2.", "iteration": 1}]
    merged = create_data.add_previous(new, previous)
    assert [(r["id"], r["iteration"]) for r in merged] == [(1, 1), (3, 2), (3, 1)]
    assert [r["rationale"] for r in create_data.add_previous(new, previous, cap=1)] == [previous[2]["rationale"],
                                                                                           new[0]["rationale"]]
    out = tmp_path / "star_iter2_train.jsonl"
    argv = ["--iteration", "2", "--model_name", "smollm2-135m", "--dataset", "arithmetic", "--max_samples", "4",
            "--k", "2", "--max_new_tokens", "60", "--no_rationalization", "--accumulate", "--output", str(out)]
    with pytest.raises(SystemExit):  # no previous set: refused before any model loads
        create_data.main(argv)
    assert "star_iter1_train.jsonl, which does not exist" in capsys.readouterr().err
    previous = [{"id": 1, "question": "What is 1 + 1?", "rationale": "1 + 1 = 2.\nThe answer is 2.", "answer": "2",
                 "stage": 1, "iteration": 1, "model": "m"}]
    (tmp_path / "star_iter1_train.jsonl").write_text(json.dumps(previous[0]) + "\n")
    create_data.main(argv)
    stats = read_json(str(out) + ".stats.json")
    records = read_jsonl(str(out))
    assert previous[0] in records and stats["carried_over"] == 1 == len(records) - stats["new_kept"]


def test_two_star_iterations_with_run_star(tmp_path, monkeypatch):
    """run_star.sh: M_0 evaluated, then twice create (with M_{i-1}) -> train (from M_0) -> evaluate on test and
    dev (one evaluate.py run each, --dev_eval_samples); a summary (the vanilla SFT reference's stages:
    test_run_star_without_pairs_takes_the_sft_phase, on the random 2-layer model)."""
    cmd = ["bash", str(ROOT / "run_star.sh"), "--iterations", "2", "--max_samples", "16", "--eval_samples", "4",
           "--dev_eval_samples", "2", "--k", "4", "--epochs", "2", "--train_batch_size", "4", "--lr", "1e-4",
           "--max_new_tokens", "120"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1500,
                         env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stderr[-2000:]
    monkeypatch.chdir(tmp_path)
    kept = {i: check_records(f"data/star_iter{i}_train.jsonl", i, model)
            for i, model in ((1, "smollm2-135m"), (2, "results/model_star_iter1"))}
    for i in (1, 2):  # iteration 2 generated with M_1 (checked by check_records above) ...
        stats = read_json(f"data/star_iter{i}_train.jsonl.stats.json")
        assert stats["stage1_correct"] + stats["stage2_correct"] == len(kept[i])
    ts = {i: read_json(f"results/model_star_iter{i}/train_stats.json") for i in (1, 2)}
    assert ts[1]["final_loss"] < ts[1]["first_loss"], "the loss fell during training"
    # ... and trained the BASE weights again, not M_1's
    assert ts[2]["init_fingerprint"] == ts[1]["init_fingerprint"]
    assert train.weight_fingerprint(load_model("results/model_star_iter1")[0]) != ts[2]["init_fingerprint"]
    assert read_json("results/model_star_iter2/args.json")["args"]["base_model"] == "smollm2-135m"

    summary = open("results/summary.md").read().splitlines()[2:]
    assert len(summary) == 3 and os.path.getsize("results/summary.png") > 10_000
    for i, line in enumerate(summary):
        label = f"iter{i}"
        ev, details = read_json(f"results/eval_{label}.json"), read_jsonl(f"results/eval_{label}.jsonl")
        dev, dev_details = read_json(f"results/eval_dev_{label}.json"), read_jsonl(f"results/eval_dev_{label}.jsonl")
        assert ev["n"] == len(details) == 4 and ev["correct"] == sum(d["correct"] for d in details)
        assert ev["accuracy"] == pytest.approx(ev["correct"] / 4)
        assert dev["split"] == "dev" and len(dev_details) == 2
        assert [d["id"] for d in dev_details] == [1800, 1801]  # the train file's last 200 questions
        assert f"| {100 * dev['accuracy']:.1f}% (n=2) | {100 * ev['accuracy']:.1f}% (n=4) |" in line  # the files' numbers
        data = f"data/star_iter{i}_train.jsonl"
        if i:
            stats = read_json(f"{data}.stats.json")
            assert max(r["id"] for r in read_jsonl(data)) < 1800  # never a dev question
            assert f"| {stats['total_kept']} |" in line
            assert f"| {stats['stage1_correct']}/{stats['questions_seen']} |" in line

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHON": sys.executable})
    assert again.returncode == 0 and again.stdout.count("exists, skipped") == 7  # 1 eval + 3 stages x 2


def test_run_star_with_a_human_seed(tmp_path, monkeypatch, tiny_llama):
    """--human_seed N, on a random 2-layer model (the bookkeeping: test_two_star_iterations_with_run_star runs the
    embedded model end to end; 2 samples a question, so the random model writes text that loses): M_0 trained on N
    human rationales is iteration 0 (scored zero-shot, as trained) and generates iteration 1's data (zero-shot under
    --tuned_k 0); --accumulate carries the seed into iteration 1's training set;
    training restarts from M_0, here with --objective rpo: STaR's SFT from M_0, then the preference phase on the pairs
    (the seed's rationales against iteration 1's wrong ones) from the SFT model, at the preference rate, the reference
    log-probs shared out between the processes. Every stage runs in 2 CPU processes under
    --launcher (torchrun, as a cluster would run `accelerate launch`), and --eval_args reaches evaluate.py; a launcher
    that is not a command stops the loop before any stage."""
    cmd = ["bash", str(ROOT / "run_star.sh"), "--base_model", tiny_llama, "--iterations", "1", "--human_seed", "4",
           "--max_samples", "8", "--eval_samples", "4", "--dev_eval_samples", "0", "--k", "2", "--epochs", "1",
           "--train_batch_size", "4", "--lr", "1e-3", "--max_new_tokens", "100", "--tuned_k", "0",
           "--create_args", "--accumulate --num_samples 2", "--eval_args", "--batch_size 3", "--objective", "rpo"]
    env = {**os.environ, "PYTHON": sys.executable}
    bad = subprocess.run(cmd + ["--launcher", "no-such-launcher --nproc 2"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env=env)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "run_star.sh: --launcher: 'no-such-launcher' is not a command on this machine" and not os.listdir(tmp_path)
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"
    run = subprocess.run(cmd + ["--launcher", launcher], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    monkeypatch.chdir(tmp_path)
    for output in ("data/star_iter0_train.jsonl.stats.json", "results/model_star_iter0/train_stats.json",
                   "results/eval_iter0.json", "data/star_iter1_train.jsonl.stats.json",
                   "results/model_star_iter1_sft/train_stats.json", "results/model_star_iter1/train_stats.json",
                   "results/eval_iter1.json"):
        assert read_json(output)["processes"] == 2, output  # every stage ran under the launcher
    assert read_json("results/eval_iter1.json")["args"]["batch_size"] == 3  # --eval_args, after run_star's own
    seed = read_jsonl("data/star_iter0_train.jsonl")
    assert [r["id"] for r in seed] == [0, 1, 2, 3] and {r["model"] for r in seed} == {"human"}
    ev0 = read_json("results/eval_iter0.json")
    assert ev0["model"] == "results/model_star_iter0" and ev0["k"] == 0 and ev0["n"] == 4
    records, stats = read_jsonl("data/star_iter1_train.jsonl"), read_json("data/star_iter1_train.jsonl.stats.json")
    assert stats["previous_file"] == "data/star_iter0_train.jsonl" and stats["args"]["k"] == 0  # --tuned_k 0
    assert stats["new_kept"] + stats["carried_over"] == len(records) and stats["carried_over"] >= 1
    assert stats["args"]["model_name"] == "results/model_star_iter0"  # iteration 1 generated with the seed model
    assert {r["model"] for r in records} <= {"human", "results/model_star_iter0"}
    assert {0, 1, 2, 3} <= {r["id"] for r in records}  # every seed question is still taught
    ts0, sft, ts1 = (read_json(f"results/model_star_iter{i}/train_stats.json") for i in (0, "1_sft", 1))
    assert sft["init_fingerprint"] == ts0["init_fingerprint"] != ts1["init_fingerprint"]  # the SFT phase from M_0
    assert (ts0["objective"], sft["objective"], sft["examples"]) == ("sft", "sft", len(records))  # STaR's step
    pairs = read_jsonl("data/star_iter1_pairs.jsonl")
    assert stats["pairs"] == len(pairs) == ts1["pairs"] == ts1["examples"] >= 1 and ts1["objective"] == "rpo"
    assert all(p["chosen"] in {r["rationale"] for r in records if r["id"] == p["id"]} for p in pairs)
    phase = read_json("results/model_star_iter1/args.json")["args"]  # from the SFT model, at the preference rate
    assert (phase["base_model"], phase["lr"], phase["pairs_only"]) == ("results/model_star_iter1_sft", 1e-6, True)
    assert len(read_jsonl("data/star_iter1_step_pairs.jsonl")) == stats["step_pairs"]  # beside them, for step_rpo
    summary = open("results/summary.md").read()
    assert "| 0 (human seed) |" in summary and "| 1 (RPO) |" in summary and f"| {len(pairs)} pairs |" in summary
    assert os.path.getsize("results/summary.png") > 10_000


def test_run_star_without_pairs_takes_the_sft_phase(tmp_path, monkeypatch, tiny_llama):
    """--objective rpo where an iteration finds no pair (the random 2-layer model's greedy text is dots: no loser):
    results/model_star_iter1 links to the SFT phase, which is then evaluated as the iteration's model; --sft adds the
    vanilla SFT reference (M_0 on the human rationales of all the questions) as the summary's last line; a rerun
    skips every stage, the link included."""
    cmd = ["bash", str(ROOT / "run_star.sh"), "--base_model", tiny_llama, "--iterations", "1", "--human_seed", "2",
           "--max_samples", "4", "--eval_samples", "2", "--dev_eval_samples", "0", "--epochs", "1", "--lr", "1e-3",
           "--max_new_tokens", "16", "--tuned_k", "0", "--create_args", "--accumulate", "--objective", "rpo", "--sft"]
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    monkeypatch.chdir(tmp_path)
    assert read_json("data/star_iter1_train.jsonl.stats.json")["pairs"] == 0
    assert os.path.getsize("data/star_iter1_pairs.jsonl") == 0
    assert "data/star_iter1_pairs.jsonl holds no pair: the iteration's model is its SFT phase" in run.stdout
    assert os.readlink("results/model_star_iter1") == "model_star_iter1_sft"
    assert read_json("results/eval_iter1.json")["model"] == "results/model_star_iter1"
    assert read_json("results/model_star_iter1/train_stats.json")["objective"] == "sft"
    sft_data, ev = read_jsonl("data/sft_train.jsonl"), read_json("results/eval_sft.json")
    assert [r["id"] for r in sft_data] == [0, 1, 2, 3] and {r["model"] for r in sft_data} == {"human"}
    assert read_json("results/model_sft/args.json")["args"]["train_file"] == "data/sft_train.jsonl"
    assert read_json("results/model_sft/train_stats.json")["examples"] == 4
    assert ev["model"] == "results/model_sft" and ev["n"] == len(read_jsonl("results/eval_sft.jsonl")) == 2
    summary = open("results/summary.md").read().splitlines()[2:]
    assert len(summary) == 3 and summary[2].startswith("| vanilla SFT |")
    assert f"| {100 * ev['accuracy']:.1f}% (n=2) |" in summary[2] and "| 4 |" in summary[2]  # test, examples
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "holds no pair" not in again.stdout
    # seed data and model, eval 0, create, both phases, eval 1, SFT data, model and eval
    assert again.stdout.count("exists, skipped") == 10


def test_stage2_rejection_counts_on_crafted_outputs(monkeypatch):
    """Stage 2 keeps a right rationale that derives the answer; each other kind is counted under its reason."""
    tok = load_tokenizer("smollm2-135m")
    train_rows = load_split("arithmetic", "train")
    rows = [{"id": i, "question": f"Tom has {i} bags of 9 apples and 9 more. How many apples?", "answer": "18",
             "solution": ""} for i in range(6)]
    outputs = ["The answer is 18.",                                        # no_reasoning
               "Using the hint, 9 * 2 = 18.\nThe answer is 18.",            # mentions_hint
               "She buys 3 apples and 4 pears.\nThe answer is 18.",         # answer_not_derived
               "9 * 2 = 17 apples.\nThe answer is 17.",                     # wrong: not counted, not kept
               "9 + 9 = 18 apples.\nThe answer is 18.\nQuestion: next",     # kept, cut after its answer
               "2 * 9 = 18.\nThe answer is 18."]                            # kept
    asked = []

    def crafted(job, part, prefix, parts, *args, **kwargs):
        asked.extend(prefix + p for p in parts)
        return [(text, 7) for text in outputs]

    monkeypatch.setattr(create_data, "generate_part", crafted)
    args = argparse.Namespace(check_steps="report", iteration=1, model_name="m", max_new_tokens=64, batch_size=4)
    stats = {"tokens_generated": 0}
    kept = create_data.stage2(generation.Job(None, tok, "unused.partial", {}, 64, 4), rows, train_rows[:2], args, stats)
    assert stats["stage2_rejected"] == {"no_reasoning": 1, "mentions_hint": 1, "answer_not_derived": 1}
    assert stats["stage2_correct"] == 2 and stats["tokens_generated"] == 42
    assert [r["rationale"] for r in kept] == ["9 + 9 = 18 apples.\nThe answer is 18.", "2 * 9 = 18.\nThe answer is 18."]
    assert all("(Hint: the answer is 18.)" in a for a in asked)  # the hint was asked ...
    assert all("Hint" not in r["question"] + r["rationale"] and r["stage"] == 2 for r in kept)  # ... never saved
