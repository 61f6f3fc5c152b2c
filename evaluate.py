"""Evaluate a STaR checkpoint: batched greedy answers on the test split and their accuracy.

Accuracy under two rules, named as in lm-evaluation-harness: strict (the answer sentence
"The answer is N." or "#### N") and flexible (the last number of the completion).
Zero-shot by default (--k 0): the format train.py teaches. --k K > 0 for few-shot base models.

    python evaluate.py --iteration 1 --dataset arithmetic --max_samples 64 --save_results
    python evaluate.py --iteration 0 --base_model smollm2-135m --k 4 --data_dir ../shared/gsm8k --max_samples 100
"""
import argparse
import os
import re
import time
from collections import Counter
from decimal import Decimal

from common import (
    DEFAULT_BASE_MODEL, DEV_SAMPLES, StarError, answers_match, build_prompts, check_output, check_positive,
    cli_errors, dist_state, extract_last_number, extract_stated_answer, load_partial,
    load_split, model_identity, normalize_number, partial_path, pick_exemplars, resume_settings, run_info, write_json, write_jsonl,
)
from engines import ENGINES, MAX_NEW_TOKENS, Sampling, engine_name, generate_resumable, load_generator
from steps import all_steps_true, check_steps

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--iteration", type=int, default=None,
                    help="N: evaluate results/model_star_iter{N} (0 = the base model); default 1, or read from --model")
parser.add_argument("--model", default=None, help="default results/model_star_iter{N} (--base_model for N=0); "
                    "with --model and no --iteration, outputs are named after the model")
parser.add_argument("--base_model", default=DEFAULT_BASE_MODEL)
parser.add_argument("--split", default="test",
                    help="test (report), dev (choose: the train file's last --dev_samples questions), train")
parser.add_argument("--dev_samples", type=int, default=DEV_SAMPLES,
                    help="size of the dev slice; must match create_data.py's (exemplars never come from it)")
parser.add_argument("--batch_size", type=int, default=64)
parser.add_argument("--max_samples", type=int, default=None, help="first N questions (default: all)")
parser.add_argument("--save_results", action="store_true", help="also write per-example details (JSONL)")
parser.add_argument("--k", type=int, default=0, help="few-shot exemplars from the train split (0: zero-shot)")
parser.add_argument("--dataset", default="gsm8k", help="gsm8k | arithmetic")
parser.add_argument("--data_dir", default=None, help="folder with train.jsonl/test.jsonl (else $GSM8K_DIR, else the hub)")
parser.add_argument("--seed", type=int, default=0, help="picks the exemplars when --k > 0")
parser.add_argument("--max_new_tokens", type=int, default=None, help="default: 320 gsm8k, 192 arithmetic")
parser.add_argument("--num_samples", type=int, default=1,
                    help="k > 1: also draw k sampled answers per question and report maj@k and pass@k")
parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for --num_samples")
parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass for --num_samples")
parser.add_argument("--output", default=None, help="default results/eval_iter{N}.json")
parser.add_argument("--engine", default="auto", choices=ENGINES,
                    help="decoding: ours (shared-prefix loop, any HF causal LM), vllm (vLLM's engine, where installed), "
                         "auto = vllm where installed and worth its start, else ours (README \"Speed\")")
parser.add_argument("--overwrite", action="store_true")
parser.add_argument("--debug", action="store_true")


def score(rows, outs):
    details = []
    for row, (text, n) in zip(rows, outs):
        strict, flexible = extract_stated_answer(text), extract_last_number(text)
        details.append({"id": row["id"], "question": row["question"], "gold": row["answer"], "completion": text,
                        "extracted": strict, "flexible_extracted": flexible,
                        "correct": answers_match(strict, row["answer"]),
                        "flexible_correct": answers_match(flexible, row["answer"]), "tokens": n})
        details[-1]["steps_true"], details[-1]["steps_found"] = check_steps(text, row["question"])
        details[-1]["faithful_correct"] = details[-1]["correct"] and all_steps_true(details[-1]["steps_true"],
                                                                                   details[-1]["steps_found"])
    return details


def check_args(args):
    """Refuse out-of-range flags and fill the defaults that depend on other flags."""
    check_positive(vars(args), "num_samples", "temperature", "top_p", "max_samples", "batch_size", "max_new_tokens")
    if args.k < 0 or (args.iteration or 0) < 0 or args.dev_samples < 0:
        raise StarError("--k, --iteration and --dev_samples must be >= 0")
    if args.top_p > 1:
        raise StarError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.model is None:
        args.iteration = 1 if args.iteration is None else args.iteration
        args.model = args.base_model if args.iteration == 0 else f"results/model_star_iter{args.iteration}"
        if args.iteration > 0 and not os.path.isdir(args.model):
            raise StarError(f"{args.model} does not exist: train iteration {args.iteration} first, or pass --model")
    label = f"iter{args.iteration}"
    if args.iteration is None:  # --model alone: name the results after the model, so two models never share a file
        label, args.iteration = model_label(args.model)
    label = label if args.split == "test" else f"{args.split}_{label}"  # results/eval_dev_iter2.json
    args.output = args.output or f"results/eval_{label}.json"
    args.max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS.get(args.dataset, 320)
    check_output(args.output, args.overwrite)
    if args.save_results:
        check_output(details_path(args.output), args.overwrite)


def model_label(model):
    """(label, iteration): ("iter2", 2) for .../model_star_iter2, else (the folder or hub name, None)."""
    name = os.path.basename(model.rstrip("/"))
    m = re.fullmatch(r"model_star_iter(\d+)", name)
    return (f"iter{m.group(1)}", int(m.group(1))) if m else (name, None)


def details_path(output):
    return (output[: -len(".json")] if output.endswith(".json") else output) + ".jsonl"


def majority_answer(answers):
    """The most frequent stated answer (numbers compared as numbers); ties go to the one seen first."""
    stated = [normalize_number(a) for a in answers if a is not None]
    counts = Counter(str(Decimal(a).normalize()) for a in stated)
    return max(stated, key=lambda a: counts[str(Decimal(a).normalize())], default=None)


def score_samples(details, samples):
    """maj@k and pass@k (Wang et al. 2022 self-consistency; Chen et al. 2021), added to each detail."""
    for d, drawn in zip(details, samples):
        answers = [extract_stated_answer(text) for text, _ in drawn]
        d["sample_answers"], d["majority"] = answers, majority_answer(answers)
        d["maj_correct"] = answers_match(d["majority"], d["gold"])
        d["pass_correct"] = any(answers_match(a, d["gold"]) for a in answers)
        d["tokens"] += sum(n for _, n in drawn)


def accuracy_report(details, args, seconds):
    n, tokens = len(details), sum(d["tokens"] for d in details)
    count = {key: sum(d[key] for d in details) for key in ("correct", "flexible_correct", "faithful_correct")}
    return {"accuracy": count["correct"] / n, "accuracy_flexible": count["flexible_correct"] / n,
            "accuracy_faithful": count["faithful_correct"] / n, "correct": count["correct"],
            "correct_no_step_found": sum(d["correct"] and d["steps_found"] == 0 for d in details),
            "correct_flexible": count["flexible_correct"], "n": n, "model": args.model, "iteration": args.iteration,
            "dataset": args.dataset, "split": args.split, "k": args.k, "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1), **run_info(vars(args)),
            **({f"accuracy_maj_at_{args.num_samples}": sum(d["maj_correct"] for d in details) / n,
                f"accuracy_pass_at_{args.num_samples}": sum(d["pass_correct"] for d in details) / n}
               if args.num_samples > 1 else {})}


def main(argv=None):
    args = parser.parse_args(argv)
    with cli_errors(args.debug):
        check_args(args)
        t0 = time.time()
        rows = load_split(args.dataset, args.split, args.data_dir, args.max_samples, args.dev_samples)
        train = load_split(args.dataset, "train", args.data_dir, dev_samples=args.dev_samples) if args.k else []
        exemplars = pick_exemplars(train, args.k, args.seed) if args.k else []
        model, tok = load_generator(args.model, args.engine, len(rows) * args.num_samples, args.batch_size * args.num_samples,
                                    args.seed)
        prefix, parts = build_prompts(tok, [r["question"] for r in rows], exemplars)
        partial = partial_path(args.output)
        settings = resume_settings(vars(args), model_weights=model_identity(args.model))
        finished = load_partial(partial, settings, args.overwrite)
        outs = generate_resumable(model, tok, prefix, parts, args.max_new_tokens, args.batch_size, partial, finished, 0,
                                  f"evaluating {args.split}")
        details = score(rows, outs)
        if args.num_samples > 1:
            sampling = Sampling(args.num_samples, args.temperature, args.top_p, args.seed)
            samples = generate_resumable(model, tok, prefix, parts, args.max_new_tokens, args.batch_size, partial,
                                         finished, 1, f"sampling {args.num_samples} per question", sampling=sampling)
            score_samples(details, samples)
        result, n = accuracy_report(details, args, time.time() - t0), len(details)
        result["engine"] = engine_name(model)
        if not dist_state().is_main_process:
            return  # under a launcher every process has every answer; the main one writes them
        if args.save_results:
            write_jsonl(details_path(args.output), details)
            result["details"] = details_path(args.output)
        write_json(args.output, result)
        os.remove(partial)
        for d in details[:2]:
            print(f"--- example (gold {d['gold']}, extracted {d['extracted']}, correct {d['correct']})\n{d['completion']}")
        also = f" and {details_path(args.output)}" if args.save_results else ""
        k = args.num_samples
        voted = (f", maj@{k} {result[f'accuracy_maj_at_{k}']:.4f}, pass@{k} {result[f'accuracy_pass_at_{k}']:.4f}"
                 if k > 1 else "")
        print(f"accuracy {result['accuracy']:.4f} strict, {result['accuracy_flexible']:.4f} flexible, "
              f"{result['accuracy_faithful']:.4f} correct with all steps true{voted} "
              f"(n={n}, {result['correct']} correct, {result['correct_no_step_found']} of them with no step found); "
              f"wrote {args.output}{also}")


if __name__ == "__main__":
    main()
