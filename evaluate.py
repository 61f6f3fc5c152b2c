"""Evaluate a STaR checkpoint: batched greedy answers on the test split and their accuracy.

Accuracy under two rules, named as in lm-evaluation-harness: strict (the answer sentence
"The answer is N." or "#### N") and flexible (the last number of the completion).
Zero-shot by default (--k 0): the format train.py teaches. --k K > 0 for few-shot base models.

    python evaluate.py --iteration 1 --dataset arithmetic --max_samples 64 --save_results
    python evaluate.py --iteration 0 --base_model smollm2-135m --k 4 --data_dir ../shared/gsm8k --max_samples 100
"""
import argparse
import json
import os
import re
import time

from common import (
    DEFAULT_BASE_MODEL, MAX_NEW_TOKENS, StarError, all_steps_true, answers_match, build_prompt,
    check_output_free, check_positive, check_steps, cli_errors, dist_state, extract_last_number, extract_stated_answer,
    generate_resumable, load_model, load_partial, load_split, partial_path, pick_exemplars, run_info, write_json, write_jsonl,
)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--iteration", type=int, default=1, help="0 = the base model")
parser.add_argument("--model", default=None, help="default results/model_star_iter{N} (--base_model for N=0)")
parser.add_argument("--base_model", default=DEFAULT_BASE_MODEL)
parser.add_argument("--split", default="test", help="test | train")
parser.add_argument("--batch_size", type=int, default=64)
parser.add_argument("--max_samples", type=int, default=None, help="first N questions (default: all)")
parser.add_argument("--save_results", action="store_true", help="also write per-example details (JSONL)")
parser.add_argument("--k", type=int, default=0, help="few-shot exemplars from the train split (0: zero-shot)")
parser.add_argument("--dataset", default="gsm8k", help="gsm8k | arithmetic")
parser.add_argument("--data_dir", default=None, help="folder with train.jsonl/test.jsonl (else $GSM8K_DIR, else the hub)")
parser.add_argument("--seed", type=int, default=0, help="picks the exemplars when --k > 0")
parser.add_argument("--max_new_tokens", type=int, default=None, help="default: 320 gsm8k, 192 arithmetic")
parser.add_argument("--output", default=None, help="default results/eval_iter{N}.json")
parser.add_argument("--overwrite", action="store_true")
parser.add_argument("--summary", action="store_true",
                    help="only summarize results/eval_iter*.json and data/*.stats.json into results/summary.{md,png}")
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


def iteration_rows(results_dir="results", data_dir="data"):
    """One row per evaluated iteration (plus vanilla SFT from eval_sft.json when present)."""
    rows = []
    for name in sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []:
        m = re.fullmatch(r"eval_(iter(\d+)|sft)\.json", name)
        if not m:
            continue
        with open(os.path.join(results_dir, name)) as f:
            ev = json.load(f)
        stats_path = os.path.join(data_dir, f"star_iter{m.group(2)}_train.jsonl.stats.json")
        stats = {}
        if m.group(2) and os.path.exists(stats_path):
            with open(stats_path) as f:
                stats = json.load(f)
        rows.append({"label": "vanilla SFT" if m.group(1) == "sft" else m.group(2), "accuracy": ev["accuracy"],
                     "faithful": ev.get("accuracy_faithful"), "n": ev["n"], "k": ev["k"], "stage1": stats.get("stage1_correct"), "stage2": stats.get("stage2_correct"),
                     "kept1": stats.get("stage1_kept", stats.get("stage1_correct")),
                     "kept2": stats.get("stage2_kept", stats.get("stage2_correct")),
                     "seen": stats.get("questions_seen"), "kept": stats.get("total_kept")})
    star = sorted((r for r in rows if r["label"] != "vanilla SFT"), key=lambda r: int(r["label"]))
    return star + [r for r in rows if r["label"] == "vanilla SFT"]


def summary_table(rows):
    lines = ["| iteration | accuracy | change | correct, all steps true | Stage-1 success | Stage-2 success "
             "| training examples |", "|---|---|---|---|---|---|---|"]
    prev = None
    for r in rows:
        change = "" if prev is None or r["label"] == "vanilla SFT" else f"{100 * (r['accuracy'] - prev):+.1f} pts"
        s1 = f"{r['stage1']}/{r['seen']}" if r["seen"] else ""
        s2 = f"{r['stage2']}/{r['seen'] - r['stage1']}" if r["seen"] and r["stage2"] is not None else ""
        shots = f" ({r['k']}-shot)" if r["k"] else ""
        faithful = f"{100 * r['faithful']:.1f}%" if r["faithful"] is not None else ""
        lines.append(f"| {r['label']}{shots} | {100 * r['accuracy']:.1f}% (n={r['n']}) | {change} | {faithful} | {s1} | {s2} | "
                     f"{r['kept'] if r['kept'] is not None else ''} |")
        prev = r["accuracy"] if r["label"] != "vanilla SFT" else prev
    return "\n".join(lines) + "\n"


def summary_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    star = [r for r in rows if r["label"] != "vanilla SFT"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([int(r["label"]) for r in star], [100 * r["accuracy"] for r in star], "o-", label="STaR")
    for r in rows:
        if r["label"] in ("0", "vanilla SFT"):
            ax1.axhline(100 * r["accuracy"], ls="--", color="gray" if r["label"] == "0" else "tab:red",
                        label="base model" if r["label"] == "0" else "vanilla SFT")
    ax1.set(xlabel="iteration", ylabel="test accuracy (%)", title="Accuracy by iteration")
    ax1.set_xticks([int(r["label"]) for r in star])
    ax1.legend()
    it = [r for r in star if r["kept"] is not None]
    x = [int(r["label"]) for r in it]
    ax2.bar(x, [r["kept1"] for r in it], label="Stage 1 (rationale)")
    ax2.bar(x, [r["kept2"] or 0 for r in it], bottom=[r["kept1"] for r in it], label="Stage 2 (rationalization)")
    ax2.set(xlabel="iteration", ylabel="kept rationales (count)", title="Training examples by stage")
    ax2.set_xticks(x)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(results_dir="results", data_dir="data"):
    rows = iteration_rows(results_dir, data_dir)
    if not rows:
        raise StarError(f"no {results_dir}/eval_iter*.json to summarize")
    table = summary_table(rows)
    with open(os.path.join(results_dir, "summary.md"), "w") as f:
        f.write(table)
    summary_plot(rows, os.path.join(results_dir, "summary.png"))
    print(table + f"wrote {results_dir}/summary.md and {results_dir}/summary.png")


def settings_of(args):
    keys = ("model", "split", "batch_size", "max_samples", "k", "dataset", "data_dir", "seed", "max_new_tokens")
    return {k: getattr(args, k) for k in keys}


def check_args(args):
    """Refuse out-of-range flags and fill the defaults that depend on other flags."""
    check_positive(args, "max_samples", "batch_size", "max_new_tokens")
    if args.k < 0 or args.iteration < 0:
        raise StarError("--k and --iteration must be >= 0")
    if args.model is None:
        args.model = args.base_model if args.iteration == 0 else f"results/model_star_iter{args.iteration}"
        if args.iteration > 0 and not os.path.isdir(args.model):
            raise StarError(f"{args.model} does not exist: train iteration {args.iteration} first, or pass --model")
    args.output = args.output or f"results/eval_iter{args.iteration}.json"
    args.max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS.get(args.dataset, 320)
    check_output_free(args.output, args.overwrite)
    if args.save_results:
        check_output_free(details_path(args.output), args.overwrite)


def details_path(output):
    return (output[: -len(".json")] if output.endswith(".json") else output) + ".jsonl"


def accuracy_report(details, args, seconds):
    n, tokens = len(details), sum(d["tokens"] for d in details)
    count = {key: sum(d[key] for d in details) for key in ("correct", "flexible_correct", "faithful_correct")}
    return {"accuracy": count["correct"] / n, "accuracy_flexible": count["flexible_correct"] / n,
            "accuracy_faithful": count["faithful_correct"] / n, "correct": count["correct"],
            "correct_flexible": count["flexible_correct"], "n": n, "model": args.model, "iteration": args.iteration,
            "dataset": args.dataset, "split": args.split, "k": args.k, "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1), **run_info(args)}


def main(argv=None):
    args = parser.parse_args(argv)
    with cli_errors(args.debug):
        if args.summary:
            return write_summary()
        check_args(args)
        t0 = time.time()
        rows = load_split(args.dataset, args.split, args.data_dir, args.max_samples)
        exemplars = pick_exemplars(load_split(args.dataset, "train", args.data_dir), args.k, args.seed) if args.k else []
        model, tok = load_model(args.model)
        prefix = build_prompt(tok, "", exemplars)[0]
        parts = [build_prompt(tok, r["question"], exemplars)[1] for r in rows]
        partial = partial_path(args.output)
        done = load_partial(partial, settings_of(args), args.overwrite)
        outs = generate_resumable(model, tok, prefix, parts, args, partial, done, 0, f"evaluating {args.split}")
        details = score(rows, outs)
        result, n = accuracy_report(details, args, time.time() - t0), len(details)
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
        print(f"accuracy {result['accuracy']:.4f} strict, {result['accuracy_flexible']:.4f} flexible, "
              f"{result['accuracy_faithful']:.4f} correct with all steps true "
              f"(n={n}, {result['correct']} correct); wrote {args.output}{also}")


if __name__ == "__main__":
    main()
