"""Iterative RPO (train.py --objective rpo): create_data's pairs, the loss against a direct computation, the reference
log-probs, and a short run through train.main on a tiny random Llama."""
import argparse
import json
import math

import pytest
import torch

import attention
import objectives
import create_data
import generation
import train
from common import StarError, load_split, solution_to_rationale
from models import load_tokenizer
from conftest import GSM8K_DIR


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


def wrong(rationale, answer):
    """The same human rationale with another stated answer: a realistic loser, sharing most tokens with the winner."""
    return rationale.replace(f"The final answer is {answer}", f"The final answer is {int(answer) + 7}")


@pytest.fixture(scope="module")
def pairs():
    rows = load_split("gsm8k", "train", GSM8K_DIR, 6)
    return [{"id": r["id"], "question": r["question"], "answer": r["answer"],
             "chosen": solution_to_rationale(r["solution"]), "rejected": wrong(solution_to_rationale(r["solution"]),
                                                                               r["answer"])} for r in rows]


def test_stage1_pairs_right_with_each_kind_of_loser(monkeypatch, tok):
    """Stage 1's losers are its wrong answers, its unstated ones and, under --check_steps filter, its right answers on
    a wrong step; each distinct loser is paired once with a kept rationale, at most --max_pairs_per_question."""
    rows = [{"id": i, "question": f"Tom has {i + 2} bags of 9 apples and 9 more. How many apples?", "answer": "18",
             "solution": ""} for i in range(3)]
    samples = [["9 + 9 = 18 apples.\nThe final answer is 18", "9 * 2 = 17 apples.\nThe final answer is 17",
                "9 + 9 = 18 apples and then some more", "9 * 2 = 17 apples.\nThe final answer is 17",
                "9 + 9 = 19 apples.\nThe final answer is 18"],           # right, wrong, unstated, duplicate, wrong step
               ["9 * 2 = 17.\nThe final answer is 17"] * 5,                 # no winner: no pair
               ["2 * 9 = 18.\nThe final answer is 18", "9 + 9 = 18.\nThe final answer is 18",
                "3 + 3 = 6.\nThe final answer is 6", "4 + 4 = 8.\nThe final answer is 8", "1 + 1 = 2.\nThe final answer is 2"]]

    def crafted(job, part, prefix, parts, *args, **kwargs):
        return [[(text, 9) for text in s] for s in samples]

    monkeypatch.setattr(create_data, "generate_part", crafted)
    args = argparse.Namespace(check_steps="filter", iteration=1, model_name="m", max_new_tokens=64, batch_size=4,
                              num_samples=5, temperature=0.7, top_p=1.0, seed=0, max_per_question=None)
    stats = {"tokens_generated": 0}
    kept, failed, losers = create_data.stage1(generation.Job(None, tok, "unused.partial", {}, 64, 4), rows, [], args,
                                              stats)
    assert [r["id"] for r in kept] == [0, 2, 2] and [r["id"] for r in failed] == [1]
    assert [why for _, why in losers[0]] == ["wrong_answer", "no_stated_answer", "wrong_answer", "wrong_step"]
    pairs = create_data.make_pairs(kept, losers, 2, 1)
    assert [(p["id"], p["why"]) for p in pairs] == [(0, "wrong_answer"), (0, "no_stated_answer"),
                                                    (2, "wrong_answer"), (2, "wrong_answer")]
    assert [p["chosen"] for p in pairs[2:]] == [kept[1]["rationale"], kept[2]["rationale"]]  # winners in turn
    assert all(p["chosen"] != p["rejected"] and p["answer"] == "18" for p in pairs)
    assert [p["why"] for p in create_data.make_pairs(kept, losers, 9, 1)][:3] == \
        ["wrong_answer", "no_stated_answer", "wrong_step"]  # the duplicate loser counted once
    assert create_data.pairs_path("data/star_iter3_train.jsonl") == "data/star_iter3_pairs.jsonl"


SUM = "What is 623 + 597?"
RIGHT = ("Ones: 3 + 7 = 10, write 0, carry 1.\nTens: 2 + 9 + 1 = 12, write 2, carry 1.\n"
         "Hundreds: 6 + 5 + 1 = 12, write 2, carry 1.\nSo 623 + 597 = 1220.\nThe final answer is 1220")


def test_step_pairs_cut_at_the_first_false_step():
    """create_data.make_step_pairs: a loser is cut at the line of its first false step; the chosen step is the same
    line of a kept rationale with the same true lines before it and a true line there (kept without --check_steps
    filter, one may have false steps). Losers with no false step, or whose true lines no kept rationale shares, make
    no pair and are counted; duplicates count once; at most `cap` per question."""
    tens = RIGHT.replace("2 + 9 + 1 = 12, write 2", "2 + 9 + 1 = 13, write 3").replace("1220", "1230")
    hundreds = RIGHT.replace("6 + 5 + 1 = 12, write 2, carry 1", "6 + 5 + 1 = 12, write 2, carry 0")
    reworded = "Let us add.\n" + tens  # its first line is in no kept rationale
    no_false = RIGHT.replace("The final answer is 1220", "The final answer is 1221")  # wrong answer, steps all true
    gsm = "Time = 150 miles / 75 mph\nTime = 2 hours\nThe final answer is 2"
    gsm_loser = "Time = 150 miles / 75 mph\nTime = 3 hours\nThe final answer is 3"
    records = [{"id": 0, "question": SUM, "answer": "1220", "rationale": RIGHT.replace("= 12, write 2", "= 14, write 4", 1)},  # a false tens line
               {"id": 0, "question": SUM, "answer": "1220", "rationale": RIGHT},
               {"id": 1, "question": "How long?", "answer": "2", "rationale": gsm}]
    losers = {0: [(tens, "wrong_answer"), (tens, "wrong_answer"), (hundreds, "wrong_step"), (reworded, "wrong_answer"),
                  (no_false, "wrong_answer")], 1: [(gsm_loser, "wrong_answer")], 2: [(tens, "wrong_answer")]}
    pairs, missed = create_data.make_step_pairs(records, losers, 4, 3)
    assert missed == {"no_false_step": 1, "no_shared_prefix": 1}
    assert [(p["id"], p["step_line"]) for p in pairs] == [(0, 1), (0, 2), (1, 1)]
    assert pairs[0]["prefix"] == "Ones: 3 + 7 = 10, write 0, carry 1.\n"
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("Tens: 2 + 9 + 1 = 12, write 2, carry 1.\n",
                                                          "Tens: 2 + 9 + 1 = 13, write 3, carry 1.\n")
    assert pairs[1]["rejected"] == "Hundreds: 6 + 5 + 1 = 12, write 2, carry 0.\n" and pairs[1]["why"] == "first_false_step"
    assert (pairs[2]["prefix"], pairs[2]["chosen"], pairs[2]["rejected"]) == \
        ("Time = 150 miles / 75 mph\n", "Time = 2 hours\n", "Time = 3 hours\n")  # a chain down the lines
    assert all(any(r["rationale"].startswith(p["prefix"] + p["chosen"]) for r in records[1:]) for p in pairs)
    assert len(create_data.make_step_pairs(records, losers, 1, 3)[0]) == 2  # the cap: one for question 0
    assert create_data.pairs_path("data/star_iter3_train.jsonl", "step_pairs") == "data/star_iter3_step_pairs.jsonl"


def test_step_rpo_learns_the_step_alone(tmp_path, tiny_llama, capsys):
    """train.main --objective step_rpo: the prefix is read as prompt and only the step is learned (no end of turn); the
    preference rate and warm-up are the defaults; DPO's term is log 2 at step 1. A pairs file without the step fields,
    or a rate <= 0, is one error line and exit 2 before any model loads."""
    tok = load_tokenizer(tiny_llama)
    pair = {"id": 0, "question": SUM, "answer": "1220", "prefix": "Ones: 3 + 7 = 10, write 0, carry 1.\n",
            "chosen": "Tens: 2 + 9 + 1 = 12, write 2, carry 1.\n", "rejected": "Tens: 2 + 9 + 1 = 13, write 3, carry 1.\n"}
    (example,), _ = objectives.tokenize_pairs(tok, [pair], 1024)
    for (ids, labels), step in zip(example.sequences, (pair["chosen"], pair["rejected"])):
        assert tok.decode([t for t in labels if t != -100]) == step
        assert tok.decode(ids).endswith(pair["prefix"] + step)  # the prefix right before the step, in the prompt
    path = tmp_path / "star_iter1_step_pairs.jsonl"
    path.write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "id": 1, "rejected": "Tens: 2 + 9 = 11.\n"}) + "\n")
    common = ["--base_model", tiny_llama, "--objective", "step_rpo", "--batch_size", "2", "--dtype", "fp32",
              "--report_to", "none", "--rpo_alpha", "0", "--pairs_only"]
    train.main(common + ["--pairs_file", str(path), "--output_dir", str(tmp_path / "m"), "--epochs", "1"])
    out = capsys.readouterr().out
    assert "on 2 step pairs (DPO + NLL, beta 0.1, alpha 0) and 0 rationales (NLL)" in out and "lr 1e-06" in out
    stats = json.loads((tmp_path / "m" / "train_stats.json").read_text())
    assert stats["objective"] == "step_rpo" and stats["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    args = json.loads((tmp_path / "m" / "args.json").read_text())["args"]
    assert (args["lr"], args["warmup_ratio"], args["pairs_file"]) == (1e-6, 0.1, str(path))
    whole = tmp_path / "pairs.jsonl"
    whole.write_text(json.dumps({k: v for k, v in pair.items() if k != "prefix"}) + "\n")
    for flags in (["--pairs_file", str(whole)], ["--pairs_file", str(path), "--pref_lr", "0"],
                  ["--pairs_file", str(path), "--lr", "1e-4"]):  # --lr is SFT's: never the preference rate by mistake
        with pytest.raises(SystemExit) as e:
            train.main(common + flags + ["--output_dir", str(tmp_path / "n")])
        assert e.value.code == 2 and not (tmp_path / "n").exists()
    with pytest.raises(SystemExit) as e:  # and --pref_lr is the preference rate: SFT refuses it rather than ignore it
        train.main(["--base_model", tiny_llama, "--pref_lr", "1e-6", "--output_dir", str(tmp_path / "n")])
    assert e.value.code == 2 and not (tmp_path / "n").exists()
    err = capsys.readouterr().err
    assert "prefix" in err and "--pref_lr must be > 0" in err and "error: --lr is the SFT rate" in err
    assert "error: --pref_lr is the rate of --objective rpo and step_rpo" in err


def direct_logp(model, tok, question, rationale):
    """Summed log-probability of the rationale tokens after train.py's prompt: HF's own attention on one unpadded
    sequence, no packing."""
    x, y = objectives.tokenize_examples(tok, [{"question": question, "rationale": rationale}], 10**6)[0][0]
    logits = model(input_ids=torch.tensor([x])).logits[0, :-1].float()
    target = torch.tensor(y[1:])
    keep = target != -100
    logp = torch.log_softmax(logits[keep], -1).gather(1, target[keep][:, None]).sum()
    return logp, int(keep.sum())


def test_rpo_loss_and_gradients_equal_a_direct_computation(tok, pairs, tiny_llama):
    from transformers import AutoModelForCausalLM

    direct_model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    packed_model = attention.use_packed_attention(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    # pairs, and between them a kept rationale with no loser (its NLL term alone)
    records = pairs[:2] + [{"question": pairs[4]["question"], "rationale": pairs[4]["chosen"]}] + pairs[2:4]
    examples, too_long = objectives.tokenize_pairs(tok, records, 1024)
    assert not too_long and len(examples) == 5 and examples[2].rejected is None
    # references near the model's own log-probs: margins of about 1 (the sigmoid matters), and the chosen rationale
    # below its reference in pairs 0 and 3 (DPO-Positive's penalty on), above it in the others
    with torch.no_grad():
        reference = [(direct_logp(direct_model, tok, p["question"], p["chosen"])[0].item() + (1.0 if i in (0, 3) else -1.0),
                      direct_logp(direct_model, tok, p["question"], p["rejected"])[0].item() - 0.5)
                     if "rejected" in p else (0.0, 0.0) for i, p in enumerate(records)]
    batch = objectives.pack_examples([objectives.Example(e.chosen, e.rejected, ref if e.rejected else None)
                                      for e, ref in zip(examples, reference)])
    tokens = sum(len(x) for e in examples for x, _ in e.sequences)  # one row, the shared prompt opening held once
    assert batch["prefix"] > 20 and batch["input_ids"].shape[1] == tokens - (9 - 1) * batch["prefix"]
    assert batch["chosen"].tolist() == [0, 2, 4, 5, 7] and batch["rejected"].tolist() == [1, 3, 6, 8]
    beta, alpha, lam = 0.1, 1.0, 5.0  # lam: DPO-Positive's (it scales float error in log-probs: a small one here)
    terms, logps = [], []
    for p, (ref_w, ref_l) in zip(records, reference):
        logp_w, n_w = direct_logp(direct_model, tok, p["question"], p.get("chosen", p.get("rationale")))
        terms.append(alpha * (-logp_w) / n_w)
        if "rejected" in p:
            logp_l, _ = direct_logp(direct_model, tok, p["question"], p["rejected"])
            penalty = lam * torch.clamp(ref_w - logp_w, min=0)
            terms[-1] = terms[-1] - torch.nn.functional.logsigmoid(beta * ((logp_w - ref_w) - (logp_l - ref_l) - penalty))
            logps.append((logp_w.item(), logp_l.item(), ref_w, ref_l))
    expected = torch.stack(terms).mean()
    expected.backward()
    loss, metrics = objectives.rpo_loss(packed_model, batch, beta, alpha, lam)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for (name, a), b in zip(packed_model.named_parameters(), direct_model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
    # the pair metrics (sums over the 4 pairs): rewards beta x (log pi - ref), their margin and accuracy, log-probs
    chosen, rejected = ([beta * (x[i] - x[i + 2]) for x in logps] for i in (0, 1))
    want = [4, sum(chosen), sum(rejected), sum(chosen) - sum(rejected), sum(c > r for c, r in zip(chosen, rejected)),
            sum(x[0] for x in logps), sum(x[1] for x in logps)]
    assert dict(zip(objectives.PAIR_METRICS, metrics.tolist())) == pytest.approx(
        dict(zip(objectives.PAIR_METRICS, want)), rel=1e-4, abs=1e-3)  # log-probs of ~-1000 in float32
    assert objectives.rpo_loss(packed_model, batch, beta, alpha)[0].item() < loss.item()  # the penalty is on
    # the reference pass gives each pair's own log-probs
    acc = argparse.Namespace(process_index=0, num_processes=1, device="cpu", is_main_process=True,
                             autocast=lambda: torch.autocast("cpu", enabled=False))
    examples = [e for e in examples if e.rejected is not None]
    refs = objectives.reference_logps(acc, packed_model, examples, argparse.Namespace(batch_size=3))
    with torch.no_grad():
        first = [direct_logp(direct_model, tok, pairs[0]["question"], pairs[0][k])[0].item() for k in ("chosen", "rejected")]
    assert refs[0] == pytest.approx(first, rel=1e-5) and len(refs) == 4


def test_rpo_trains_from_m0_against_its_own_reference(tmp_path, pairs, tiny_llama, capsys):
    """train.main --objective rpo: at the first step the policy is the reference, so DPO's term is log 2 exactly; the
    loss then falls, the checkpoint loads, and the memory plan counts both sequences of each pair."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    common = ["--base_model", tiny_llama, "--pairs_file", str(path), "--objective", "rpo", "--batch_size", "2",
              "--dtype", "fp32", "--report_to", "none", "--warmup_ratio", "0"]
    train.main(common + ["--output_dir", str(tmp_path / "model_star_iter1"), "--rpo_alpha", "0", "--epochs", "4",
                "--pref_lr", "3e-3", "--beta", "0.5"])
    stats = json.loads((tmp_path / "model_star_iter1" / "train_stats.json").read_text())
    assert stats["objective"] == "rpo" and stats["examples"] == 6 and stats["steps"] == 12
    assert stats["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert stats["final_loss"] < 0.8 * math.log(2)  # the margins grew: the winner gained on the loser
    log = [json.loads(x) for x in (tmp_path / "model_star_iter1" / "log.jsonl").read_text().splitlines()]
    assert all(set(objectives.PAIR_METRICS[1:]) <= set(r) for r in log)  # the pair metrics, logged every step
    assert log[0]["reward_margin"] == 0 and log[0]["rewards_chosen"] == 0  # policy = reference at step 1
    assert log[-1]["reward_margin"] > 0 and log[-1]["reward_accuracy"] > 0.5
    tok = load_tokenizer(tiny_llama)
    examples, _ = objectives.tokenize_pairs(tok, pairs, 1024)
    sizes = [len(e.chosen[0]) + len(e.rejected[0]) for e in examples]
    args = argparse.Namespace(batch_size=6, grad_accum=1, epochs=1, steps=0, seed=0, iteration=1,
                              max_tokens_per_batch=None)
    shared = objectives.shared_prefix([seq for e in examples for seq in e.sequences])  # the prompts' opening
    assert shared > 20 and train.longest_micro_batch(examples, args, 1)[0] == sum(sizes) - (12 - 1) * shared
    # 2 pairs, 4 sequences of 976 tokens, the opening held once
    assert f"{976 - 3 * shared} tokens (the longest packed micro-batch" in capsys.readouterr().out
    # --rpo_reference previous: the model that generated iteration 2's pairs (M_1) is the reference, not M_0
    train.main(common + ["--output_dir", str(tmp_path / "model_star_iter2"), "--rpo_alpha", "0", "--epochs", "1",
                         "--iteration", "2", "--rpo_reference", "previous"])
    assert f"reference log-probs of 6 pairs from {tmp_path / 'model_star_iter1'}" in capsys.readouterr().out
    first = json.loads((tmp_path / "model_star_iter2" / "train_stats.json").read_text())["first_loss"]
    assert first > math.log(2) + 0.05  # M_0 prefers the loser less than M_1 does: a positive DPO loss above log 2
    # in bf16 too the policy at step 1 is its reference to the last bit (both passes take the head's matmul under
    # autocast), so DPO-Positive's penalty starts at 0, not at the passes' rounding difference x lambda
    train.main(common + ["--dtype", "bf16", "--output_dir", str(tmp_path / "bf16"), "--steps", "1", "--dpop_lambda",
                         "50", "--pairs_only", "--rpo_alpha", "0"])  # the last --dtype counts
    row = json.loads((tmp_path / "bf16" / "log.jsonl").read_text().splitlines()[0])
    assert row["rewards_chosen"] == row["rewards_rejected"] == 0
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # by default the training set's rationales that won no pair are learned too, by their NLL term alone
    train_file = tmp_path / "train.jsonl"
    rows = [{"id": p["id"], "question": p["question"], "rationale": p["chosen"], "answer": p["answer"]} for p in pairs]
    rows += [{**rows[0], "id": "extra"}, {**rows[1], "rationale": rows[1]["rationale"] + " "}]  # no pair's winner
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.main(common + ["--output_dir", str(tmp_path / "mixed"), "--train_file", str(train_file), "--epochs", "1"])
    assert "on 6 pairs (DPO + NLL, beta 0.1, alpha 1) and 2 rationales (NLL)" in capsys.readouterr().out
    stats = json.loads((tmp_path / "mixed" / "train_stats.json").read_text())
    assert (stats["examples"], stats["pairs"]) == (8, 6)
    with pytest.raises(SystemExit) as e:  # a missing pairs file: one error line, exit 2
        train.main(common + ["--output_dir", str(tmp_path / "n"), "--pairs_file", str(tmp_path / "none.jsonl")])
    assert e.value.code == 2 and not (tmp_path / "n").exists()
    with pytest.raises(StarError):
        train.check_args(train.parser.parse_args(common + ["--output_dir", str(tmp_path / "o"), "--beta", "0"]))
    with pytest.raises(StarError, match="--dpop_lambda >= 0"):
        train.check_args(train.parser.parse_args(common + ["--output_dir", str(tmp_path / "o"), "--dpop_lambda", "-1"]))
