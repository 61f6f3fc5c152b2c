"""STaR data creation: rationale generation (Stage 1) and rationalization (Stage 2) on a train split.

Stage 1: few-shot greedy rationales from M_{N-1}; keep those whose final answer is right.
Stage 2: for the failures, show the right final answer as a hint, generate again, keep the
rationale if it is now right and really derives the answer; it is saved WITHOUT the hint.
(Zelikman et al. 2022, Algorithm 1, https://arxiv.org/abs/2203.14465)
Pairs: beside the training set, star_iter{N}_pairs.jsonl pairs a kept rationale (chosen) with one of the Stage-1
rationales that lost (rejected), for train.py --objective rpo (Pang et al. 2024, https://arxiv.org/abs/2404.19733);
star_iter{N}_step_pairs.jsonl cuts each loser at its first false step (prefix, chosen step, rejected step), for
--objective step_rpo (Step-DPO, Lai et al. 2024, https://arxiv.org/abs/2406.18629).

    python create_data.py --iteration 1 --model_name smollm2-135m --dataset arithmetic --max_samples 64 --k 4
    python create_data.py --iteration 1 --model_name smollm2-135m --data_dir ../shared/gsm8k --max_samples 16 --k 4
"""
import argparse
import os
import re
import time

from common import (
    StarError, answers_match, build_prompts, check_output, check_positive, cli_errors, cut_after_answer,
    extract_last_number, extract_stated_answer, load_split, pick_exemplars, rationalization_problem, read_jsonl,
    run_info, solution_to_rationale, write_json, write_jsonl,
)
from engines import Sampling
from generation import add_generation_args, check_generation_args, close_engine, close_job, generate_part, open_job
from models import dist_state
from steps import all_steps_true, check_steps, first_false_line, written_equations

# Pairs per question for train.py --objective rpo: each of a question's distinct losers is paired once (with its
# kept rationales in turn) up to this cap, so that a question the model gets wrong in many ways does not outweigh
# the others in the DPO loss.
MAX_PAIRS_PER_QUESTION = 4

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--iteration", type=int, default=1, help="STaR iteration N (generates with M_{N-1})")
parser.add_argument("--model_name", default=None,
                    help="generator: default --base_model for N=1, results/model_star_iter{N-1} for N>=2")
add_generation_args(parser, k=10, batch_size=32)
parser.add_argument("--output", default=None, help="default data/star_iter{N}_train.jsonl")
parser.add_argument("--no_rationalization", action="store_true", help="skip Stage 2 (the paper's ablation)")
parser.add_argument("--num_samples", type=int, default=1,
                    help="Stage-1 rationales drawn per question: 1 = greedy (STaR); S > 1 samples (RFT / ReST-EM)")
parser.add_argument("--max_per_question", type=int, default=None, help="cap on distinct right rationales kept per question")
parser.add_argument("--max_pairs_per_question", type=int, default=MAX_PAIRS_PER_QUESTION,
                    help="cap on (chosen, rejected) pairs per question in the pairs file (train.py --objective rpo)")
parser.add_argument("--check_steps", default="report", choices=["off", "report", "filter"],
                    help="check each written step: report it in the records and stats, or filter: keep only "
                         "rationales with at least one step and every step true")
parser.add_argument("--accumulate", action="store_true",
                    help="also keep the previous iteration's training set (star_iter{N-1}_train.jsonl beside --output), "
                         "duplicates removed; at iteration 1, a human seed star_iter0_train.jsonl if there is one "
                         "(run_star.sh --human_seed); off by default, as in the paper")
parser.add_argument("--human_rationales", action="store_true",
                    help="write the human solutions as rationales instead (the vanilla SFT baseline)")


def make_record(row, rationale, stage, args):
    record = {"id": row["id"], "question": row["question"], "rationale": rationale, "answer": row["answer"],
              "stage": stage, "iteration": args.iteration, "model": args.model_name}
    if args.check_steps != "off":
        record["steps_true"], record["steps_found"] = check_steps(rationale, row["question"])
    return record


def keep_faithful(records, args, stats, stage):
    """Under --check_steps filter, drop right answers that sit on a wrong (or no) step."""
    if args.check_steps == "off":
        return records
    stats[f"stage{stage}_all_steps_true"] = sum(all_steps_true(r["steps_true"], r["steps_found"]) for r in records)
    stats[f"stage{stage}_no_step_found"] = sum(r["steps_found"] == 0 for r in records)  # what the filter drops unread
    if args.check_steps != "filter":
        return records
    kept = [r for r in records if all_steps_true(r["steps_true"], r["steps_found"])]
    stats[f"stage{stage}_dropped_by_step_check"] = len(records) - len(kept)
    return kept


def human_records(rows, args):
    """The vanilla SFT baseline's training set: the train split's own human solutions."""
    args.model_name = "human"
    return [make_record(r, solution_to_rationale(r["solution"]), 0, args) for r in rows]


def correct_rationales(samples, gold):
    """The rationales (cut after their answer sentence) among (text, tokens) samples that state the right
    answer. A rationale that never states its answer (cut off, or only a last number) is not kept: the
    same rule as evaluate.py's strict score, so training never teaches the model to drop the answer."""
    cut = [cut_after_answer(text) for text, _ in samples]
    return [r for r in cut if answers_match(extract_stated_answer(r), gold)]


def unkept_forms(samples, gold, max_new_tokens):
    """{right_unstated, cut_at_max_new_tokens} among (text, tokens) samples: right answers that state no answer (right
    by their last number only, so not kept) and rationales that ran into --max_new_tokens. Counted per stage, so no
    right answer is dropped for its form without a trace."""
    return {"right_unstated": sum(extract_stated_answer(text) is None and answers_match(extract_last_number(text), gold)
                                  for text, _ in samples),
            "cut_at_max_new_tokens": sum(n >= max_new_tokens for _, n in samples)}


def count_unkept_forms(stats, stage, rows, outs, max_new_tokens, sampled=False):
    """Add each question's unkept_forms to stats["stage{N}_..."] (0 when none); outs[i] is a (text, tokens) or,
    sampled, a list of them."""
    for key in ("right_unstated", "cut_at_max_new_tokens"):
        stats.setdefault(f"stage{stage}_{key}", 0)
    for row, out in zip(rows, outs):
        for key, count in unkept_forms(out if sampled else [out], row["answer"], max_new_tokens).items():
            stats[f"stage{stage}_{key}"] += count


def wrong_rationales(samples, gold):
    """(rationale, why) for the (text, tokens) samples that lost: a wrong stated answer ("wrong_answer") or none
    ("no_stated_answer": cut off, or only a last number), each cut after its answer sentence as a kept one is."""
    lost = []
    for text, _ in samples:
        rationale = cut_after_answer(text)
        stated = extract_stated_answer(rationale)
        if rationale.strip() and not answers_match(stated, gold):
            lost.append((rationale, "no_stated_answer" if stated is None else "wrong_answer"))
    return lost


def make_pairs(records, losers, cap, iteration):
    """Iterative RPO's preference pairs (Pang et al. 2024): for each question with a kept rationale (the training
    set's, carried-over ones included) and a Stage-1 rationale that lost, one pair per distinct loser, at most `cap`,
    the question's kept rationales taken in turn as the chosen. Questions in id order: a seed gives the same file."""
    winners = {}
    for r in records:
        winners.setdefault(r["id"], []).append(r)
    pairs = []
    for qid in sorted(q for q in losers if q in winners):
        why = {}
        for text, reason in losers[qid]:
            why.setdefault(text, reason)
        for i, text in enumerate(drop_duplicates(list(why), cap)):
            chosen = winners[qid][i % len(winners[qid])]
            pairs.append({"id": qid, "question": chosen["question"], "answer": chosen["answer"],
                          "chosen": chosen["rationale"], "rejected": text, "why": why[text],
                          "chosen_stage": chosen["stage"], "iteration": iteration})
    return pairs


def make_step_pairs(records, losers, cap, iteration):
    """Step-level pairs (Step-DPO, Lai et al. 2024, https://arxiv.org/abs/2406.18629): each distinct loser whose first
    false step the checker locates (steps.first_false_line) is cut at that line. prefix = its lines before it (every
    step in them true), rejected = the false line, chosen = the same line of a kept rationale of the question that
    shares the prefix (the first in the training set's order). At most `cap` per question. Returns (pairs, {why a
    loser made none: "no_false_step" (wrong answer, no false step found), "no_shared_prefix": count})."""
    winners, pairs, missed = {}, [], {"no_false_step": 0, "no_shared_prefix": 0}
    for r in records:
        winners.setdefault(r["id"], []).append(r)
    for qid in sorted(q for q in losers if q in winners):
        question, seen = winners[qid][0]["question"], set()
        for text in dict.fromkeys(t for t, _ in losers[qid]):  # the same pair from two losers counts once
            pair = cut_at_false_step(text, question, [w["rationale"] for w in winners[qid]])
            if isinstance(pair, str):
                missed[pair] += 1
            elif pair not in seen and len(seen) < cap:
                seen.add(pair)
                pairs.append({"id": qid, "question": question, "answer": winners[qid][0]["answer"], "prefix": pair[0],
                              "chosen": pair[1], "rejected": pair[2], "why": "first_false_step",
                              "step_line": pair[0].count("\n"), "iteration": iteration})
    return pairs, missed


def cut_at_false_step(text, question, kept):
    """(prefix, chosen step, rejected step) for a loser `text` against the question's kept rationales, or why there is
    none: "no_false_step", or "no_shared_prefix" (no kept rationale has the same lines before it and a true line at
    the loser's false one). A step is its
    line, with its newline when more lines follow."""
    i = first_false_line(text, question)
    if i is None:
        return "no_false_step"
    lines = text.split("\n")

    def step(ls):
        return ls[i] + ("\n" if len(ls) > i + 1 else "")
    for other in kept:  # its line i must be true too: without --check_steps filter a kept rationale may have false steps
        others = other.split("\n")
        if len(others) > i and others[:i] == lines[:i] and others[i] != lines[i] \
                and first_false_line(other, question) not in range(i + 1):
            return "".join(line + "\n" for line in lines[:i]), step(others), step(lines)
    return "no_shared_prefix"


def pairs_path(output, kind="pairs"):
    """A pairs file beside a training set: data/star_iter1_train.jsonl -> data/star_iter1_pairs.jsonl (kind "pairs")
    or data/star_iter1_step_pairs.jsonl (kind "step_pairs")."""
    root, ext = os.path.splitext(output)
    return root.removesuffix("_train") + "_" + kind + (ext or ".jsonl")


def drop_duplicates(rationales, cap=None):
    """Distinct reasoning only: the same normalized text, or the same sequence of written equations
    (RFT, Yuan et al. 2023), counts once; at most `cap` kept (ReST-EM caps at 10 per problem)."""
    kept, seen = [], set()
    for r in rationales:
        keys = {("text", re.sub(r"[^a-z0-9]", "", r.lower()))}
        equations = tuple(written_equations(r))
        if equations:
            keys.add(("equations", equations))
        if not keys & seen:
            kept.append(r)
        seen |= keys
    return kept[:cap]


def stage1(job, rows, exemplars, args, stats):
    """Greedy (or --num_samples draws per question); keep the distinct right rationales. Returns (kept records, the
    rows with none, {question id: [(rationale, why it lost)]}: the losers of train.py --objective rpo's pairs)."""
    S = args.num_samples
    prefix, parts = build_prompts(job.tok, [r["question"] for r in rows], exemplars)
    sampling = Sampling(S, args.temperature, args.top_p, args.seed) if S > 1 else None
    questions_done = questions_right = 0
    running = {}

    def success_rate(indices, results):  # running Stage-1 success and unkept forms shown on the progress bar
        nonlocal questions_done, questions_right
        questions_done += len(indices)
        questions_right += sum(bool(correct_rationales(r if S > 1 else [r], rows[i]["answer"]))
                               for i, r in zip(indices, results))
        count_unkept_forms(running, 1, [rows[i] for i in indices], results, args.max_new_tokens, S > 1)
        return {"stage1_correct": f"{questions_right / questions_done:.1%}",
                "right_unstated": running["stage1_right_unstated"], "cut": running["stage1_cut_at_max_new_tokens"]}

    outs = generate_part(job, "stage1", prefix, parts, "stage 1", success_rate, sampling)
    count_unkept_forms(stats, 1, rows, outs, args.max_new_tokens, S > 1)  # all batches, resumed ones too
    kept, failed, per_question, correct_samples, losers = [], [], [], 0, {}
    for row, out in zip(rows, outs):
        samples = out if S > 1 else [out]
        stats["tokens_generated"] += sum(n for _, n in samples)
        losers[row["id"]] = wrong_rationales(samples, row["answer"])
        right = correct_rationales(samples, row["answer"])
        correct_samples += len(right)
        distinct = drop_duplicates(right, args.max_per_question)
        per_question.append(len(distinct))
        kept += [make_record(row, r, 1, args) for r in distinct]
        if not distinct:
            failed.append(row)
    stats["stage1_correct"] = len(rows) - len(failed)  # questions solved
    if S > 1:
        stats.update(samples_drawn=S * len(rows), correct_samples=correct_samples, stage1_rationales=len(kept),
                     pass_at_S=(len(rows) - len(failed)) / max(len(rows), 1),
                     kept_per_question_mean=sum(per_question) / max(len(rows), 1),
                     kept_per_question_histogram={str(k): per_question.count(k) for k in sorted(set(per_question))})
    faithful = keep_faithful(kept, args, stats, 1)
    if args.check_steps == "filter":  # a right answer on a wrong step loses too (not one with no step to read)
        ok = {id(r) for r in faithful}
        for r in kept:
            if id(r) not in ok and r["steps_found"]:
                losers[r["id"]].append((r["rationale"], "wrong_step"))
    return faithful, failed, losers


def stage2(job, rows, exemplars, args, stats):
    """Rationalization: the hint is the final number only, in the question and in every exemplar."""
    prefix, parts = build_prompts(job.tok, [r["question"] for r in rows], exemplars, [r["answer"] for r in rows])
    running = {}

    def unkept(indices, results):  # shown on the progress bar
        count_unkept_forms(running, 2, [rows[i] for i in indices], results, args.max_new_tokens)
        return {"right_unstated": running["stage2_right_unstated"], "cut": running["stage2_cut_at_max_new_tokens"]}

    outs = generate_part(job, "stage2", prefix, parts, "stage 2", unkept)
    count_unkept_forms(stats, 2, rows, outs, args.max_new_tokens)
    kept, rejected = [], {}
    for row, (text, n) in zip(rows, outs):
        stats["tokens_generated"] += n
        rationale = cut_after_answer(text)
        if not answers_match(extract_stated_answer(rationale), row["answer"]):
            continue
        problem = rationalization_problem(rationale, row["answer"])
        if problem:
            rejected[problem] = rejected.get(problem, 0) + 1
        else:
            kept.append(make_record(row, rationale, 2, args))
    stats["stage2_rejected"], stats["stage2_correct"] = rejected, len(kept)
    return keep_faithful(kept, args, stats, 2)


def previous_path(args):
    """--accumulate's source: the previous iteration's training set, beside this one's output."""
    return os.path.join(os.path.dirname(args.output), f"star_iter{args.iteration - 1}_train.jsonl")


def carries_previous(args):
    """--accumulate carries star_iter{N-1}_train.jsonl: always from iteration 2; at iteration 1 only a human
    seed set (star_iter0_train.jsonl) when there is one."""
    return args.accumulate and (args.iteration > 1 or os.path.isfile(previous_path(args)))


def add_previous(records, previous, cap=None, train_ids=None):
    """--accumulate: this iteration's records plus the previous training set's, one copy of each distinct
    rationale per question (the new ones first, at most `cap` per question); sorted by question id. A previous
    record whose question is not in train_ids (a dev question, under another --dev_samples) is left out."""
    by_question = {}
    for r in records + [r for r in previous if train_ids is None or r["id"] in train_ids]:
        by_question.setdefault(r["id"], []).append(r)
    merged = []
    for _, group in sorted(by_question.items()):
        distinct = drop_duplicates([r["rationale"] for r in group], cap)
        merged += [next(r for r in group if r["rationale"] == text) for text in distinct]
    return merged


def check_args(args):
    """Refuse out-of-range flags and fill the defaults that depend on other flags."""
    check_generation_args(args)
    check_positive(vars(args), "iteration", "max_per_question", "max_pairs_per_question")
    if args.model_name is None and not args.human_rationales:
        args.model_name = args.base_model if args.iteration == 1 else f"results/model_star_iter{args.iteration - 1}"
        if args.iteration > 1 and not os.path.isdir(args.model_name):
            raise StarError(f"iteration {args.iteration} generates with {args.model_name}, which does not exist: "
                            f"train iteration {args.iteration - 1} first, or pass --model_name")
    args.output = args.output or f"data/star_iter{args.iteration}_train.jsonl"
    if args.accumulate and args.iteration > 1 and not os.path.isfile(previous_path(args)):
        raise StarError(f"--accumulate needs the previous training set {previous_path(args)}, which does not exist")
    check_output(args.output, args.overwrite)


def star_records(job, train, rows, exemplars, args, stats):
    """Stage 1, Stage 2 on its failures, --accumulate's carry-over: (the training set's records, the pairs)."""
    kept1, failed, losers = stage1(job, rows, exemplars, args, stats)
    kept2 = [] if args.no_rationalization else stage2(job, failed, exemplars, args, stats)
    records = sorted(kept1 + kept2, key=lambda r: r["id"])
    if carries_previous(args):
        previous = read_jsonl(previous_path(args), required=("id", "question", "rationale", "answer", "stage"))
        merged = add_previous(records, previous, args.max_per_question, {r["id"] for r in train})
        stats.update(new_kept=len(records), carried_over=len(merged) - len(records), previous_file=previous_path(args))
        records = merged
    pairs = make_pairs(records, losers, args.max_pairs_per_question, args.iteration)
    step_pairs, missed = make_step_pairs(records, losers, args.max_pairs_per_question, args.iteration)
    stats.update(pairs=len(pairs), questions_with_pairs=len({p["id"] for p in pairs}),
                 pairs_why={w: sum(p["why"] == w for p in pairs) for w in sorted({p["why"] for p in pairs})},
                 step_pairs=len(step_pairs), questions_with_step_pairs=len({p["id"] for p in step_pairs}),
                 losers_without_step_pair=missed)
    attempted = 0 if args.no_rationalization else len(failed)
    stats.update(stage1_rate=stats["stage1_correct"] / max(len(rows), 1), stage2_attempted=attempted,
                 stage2_rate=stats.get("stage2_correct", 0) / max(attempted, 1),
                 stage1_kept=len(kept1), stage2_kept=len(kept2))
    return records, pairs, step_pairs


def main(argv=None):
    args = parser.parse_args(argv)
    with cli_errors(args.debug):
        check_args(args)
        t0 = time.time()
        train = load_split(args.dataset, "train", args.data_dir, dev_samples=args.dev_samples)
        rows = train[: args.max_samples]
        stats = {"questions_seen": len(rows), "tokens_generated": 0}
        job = None
        if args.human_rationales:
            records = human_records(rows, args)
        else:
            exemplars = pick_exemplars(train, args.k, args.seed)
            ex_ids = {e["id"] for e in exemplars}
            rows = [r for r in rows if r["id"] not in ex_ids]  # a question never sees its own solution
            stats.update(questions_seen=len(rows), exemplars_skipped=stats["questions_seen"] - len(rows),
                         exemplar_ids=sorted(ex_ids))
            job = open_job(args, args.model_name, len(rows))
            stats["engine"] = job.engine
            records, pairs, step_pairs = star_records(job, train, rows, exemplars, args, stats)
            close_engine(job)
        seconds = time.time() - t0
        stats.update(total_kept=len(records), kept_rate=len(records) / max(len(rows), 1), seconds=round(seconds, 1),
                     tokens_per_s=round(stats["tokens_generated"] / seconds, 1), **run_info(vars(args)))
        if not dist_state().is_main_process:
            return  # under a launcher every process has every record; the main one writes them
        write_json(args.output + ".stats.json", stats)
        if records:
            write_jsonl(args.output, records)
            if job:
                write_jsonl(pairs_path(args.output), pairs)
                write_jsonl(pairs_path(args.output, "step_pairs"), step_pairs)
        if job:
            close_job(job)
        if not records:
            raise StarError(f"no rationale was kept out of {len(rows)} questions, so {args.output} was not written "
                            f"(stats in {args.output}.stats.json)")
        report(records, rows, stats, args)


def report(records, rows, stats, args):
    """Two example rationales, then what was kept and written where."""
    for r in records[:2]:
        print(f"--- example (stage {r['stage']}, id {r['id']}, gold {r['answer']})\n{r['rationale']}")
    carried = f", {stats['carried_over']} carried over from {stats['previous_file']}" if "carried_over" in stats else ""
    print(f"kept {len(records)}/{len(rows)} rationales (stage 1: {sum(r['stage'] == 1 for r in records)}, "
          f"stage 2: {sum(r['stage'] == 2 for r in records)}{carried}); wrote {args.output} and "
          f"{args.output}.stats.json")
    if not args.human_rationales:
        print("not kept for their form (stage 1, stage 2): right but no stated answer "
              f"{stats['stage1_right_unstated']}, {stats.get('stage2_right_unstated', 0)}; cut at --max_new_tokens "
              f"{stats['stage1_cut_at_max_new_tokens']}, {stats.get('stage2_cut_at_max_new_tokens', 0)}")
        print(f"{stats['pairs']} (chosen, rejected) pairs on {stats['questions_with_pairs']} questions "
              f"{stats['pairs_why']}; wrote {pairs_path(args.output)} (train.py --objective rpo)")
        print(f"{stats['step_pairs']} step pairs cut at the first false step on {stats['questions_with_step_pairs']} "
              f"questions (losers with none: {stats['losers_without_step_pair']}); wrote "
              f"{pairs_path(args.output, 'step_pairs')} (train.py --objective step_rpo)")


if __name__ == "__main__":
    main()
