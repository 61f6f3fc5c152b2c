"""Evaluate a STaR checkpoint: batched greedy answers on the test split and their accuracy.

Accuracy under two rules, named as in lm-evaluation-harness: strict (the stated answer: the last
"The final answer is N", "\\boxed{N}" or "#### N", the rule create_data.py keeps by) and flexible (the
last number of the completion). A warning line says when flexible exceeds strict by more than 5 points.
Zero-shot by default (--k 0): the format train.py teaches. --k K > 0 for few-shot base models.
--protocol lm_eval_llama runs lm-evaluation-harness's gsm8k_cot_llama task instead (Meta's 8-shot chat
chain-of-thought protocol, read from the installed lm-eval): the model card's GSM8K figure.

    python evaluate.py --iteration 1 --dataset arithmetic --max_samples 64 --save_results
    python evaluate.py --iteration 0 --base_model smollm2-135m --k 4 --data_dir ../shared/gsm8k --max_samples 100
    python evaluate.py --iteration 0 --protocol lm_eval_llama --data_dir ../shared/gsm8k   # vs the card's 77.7
"""
import argparse
import logging
import os
import re
import sys
import time
from collections import Counter
from decimal import Decimal
from typing import NamedTuple

from common import (
    StarError, answers_match, build_prompts, check_output, cli_errors, extract_last_number,
    extract_stated_answer, is_chat, load_split, normalize_number, pick_exemplars, run_info, write_json, write_jsonl,
)
from engines import Sampling
from generation import add_generation_args, check_generation_args, close_engine, close_job, generate_part, open_job
from models import dist_state, load_tokenizer
from steps import all_steps_true, check_steps

PROTOCOLS = ("star", "lm_eval_llama")  # --protocol: our prompts and answer rule, or lm-eval's gsm8k_cot_llama task
LM_EVAL_TASK = "gsm8k_cot_llama"  # Meta's GSM8K protocol for Llama 3 (8-shot chain of thought as chat turns)
GAP_WARNING_POINTS = 5  # flexible above strict by more: right answers are written in a form strict cannot read

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--iteration", type=int, default=None,
                    help="N: evaluate results/model_star_iter{N} (0 = the base model); default 1, or read from --model")
parser.add_argument("--model", default=None, help="default results/model_star_iter{N} (--base_model for N=0); "
                    "with --model and no --iteration, outputs are named after the model")
add_generation_args(parser, k=0, batch_size=64)
parser.add_argument("--split", default="test",
                    help="test (report), dev (choose: the train file's last --dev_samples questions), train")
parser.add_argument("--dev_eval_samples", type=int, default=0,
                    help="with --split test: also score the dev slice's first N questions in the same run, on the same "
                         "engine, written as --split dev writes them (results/eval_dev_iter{N}.json); 0 = none")
parser.add_argument("--save_results", action="store_true", help="also write per-example details (JSONL)")
parser.add_argument("--num_samples", type=int, default=1,
                    help="k > 1: also draw k sampled answers per question and report maj@k and pass@k")
parser.add_argument("--output", default=None, help="default results/eval_iter{N}.json")
parser.add_argument("--protocol", default="star", choices=PROTOCOLS,
                    help="star: our prompts (--k exemplars) and answer rule; lm_eval_llama: lm-evaluation-harness's "
                         f"{LM_EVAL_TASK} task (its 8 exemplars as chat turns, Meta's instruction, its stop sequences, "
                         "max new tokens, strict-match and flexible-extract), comparable with the Llama model cards")


# ============================================================================= the lm-evaluation-harness protocol
class LmEvalProtocol(NamedTuple):
    """What lm-eval's task sets, read from the installed package (nothing here is a copy of it)."""
    instruction: str     # the user turn, "{question}" where the question goes
    exemplars: list      # [{question, rationale}]: the few-shot chat turns
    until: list          # stop sequences
    max_new_tokens: int  # max_gen_toks
    strict: tuple        # (regex, group_select) of the strict-match filter
    flexible: tuple      # (regex, group_select) of the flexible-extract filter
    ignore: list         # exact_match's regexes_to_ignore, removed from both sides before comparing
    ignore_case: bool
    info: dict           # recorded in the results JSON


def load_lm_eval_task(rows):
    """lm-eval's gsm8k_cot_llama task, built by its own TaskManager from its own YAML, with these GSM8K rows as
    its documents: lm-eval would fetch openai/gsm8k from the hub, so the local rows are handed to it."""
    try:
        import datasets
        import lm_eval.tasks
    except ImportError:
        raise StarError("--protocol lm_eval_llama needs lm-eval: pip install lm-eval (make install does)") from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # it warns that a custom dataset takes --metadata kwargs
    folder = os.path.join(os.path.dirname(lm_eval.tasks.__file__), "gsm8k")  # index this folder: 0.01 s, all tasks: 10 s
    manager = lm_eval.tasks.TaskManager(include_path=folder, include_defaults=False)
    entry = manager.task_index.get(LM_EVAL_TASK)
    if entry is None or not entry.cfg:
        raise StarError(f"the installed lm-eval has no {LM_EVAL_TASK} task in {folder}")
    docs = datasets.Dataset.from_list([{"question": r["question"], "answer": r["solution"]} for r in rows])
    config = {**entry.cfg, "custom_dataset": lambda **_: datasets.DatasetDict({"test": docs})}
    return manager.load(config)["tasks"][LM_EVAL_TASK]


def lm_eval_protocol(task):
    """LmEvalProtocol from the task's config; a StarError if the task is no longer the protocol reproduced here."""
    import lm_eval
    from lm_eval.models.utils import normalize_gen_kwargs

    c = task.config
    generation = normalize_gen_kwargs(dict(c.generation_kwargs))  # with lm-eval's own default max_gen_toks (256)
    filters = {f["name"]: f["filter"] for f in c.filter_list}
    metric = c.metric_list[0] if len(c.metric_list) == 1 else {}
    reproduced = (c.doc_to_text.count("{{") == 1 and "{{question}}" in c.doc_to_text
                  and c.fewshot_config.sampler == "first_n" and not generation["do_sample"] and sorted(filters) == ["flexible-extract", "strict-match"]
                  and all([f["function"] for f in pipeline] == ["regex", "take_first"] for pipeline in filters.values())
                  and metric.get("metric") == "exact_match" and not metric.get("ignore_punctuation")
                  and not metric.get("ignore_numbers"))
    if not reproduced:
        raise StarError(f"lm-eval {lm_eval.__version__}'s {LM_EVAL_TASK} is not the protocol this script reproduces "
                        "(prompt template, first_n exemplars, greedy, regex + take_first filters, exact_match)")
    regex = {name: (steps[0]["regex_pattern"], steps[0].get("group_select", 0)) for name, steps in filters.items()}
    exemplars = [{"question": d["question"], "rationale": task.doc_to_target(d)}
                 for d in c.fewshot_config.samples[:c.num_fewshot]]
    info = {"task": LM_EVAL_TASK, "task_version": c.metadata.get("version"), "lm_eval_version": lm_eval.__version__,
            "num_fewshot": len(exemplars), "until": list(generation["until"]), "max_gen_toks": generation["max_gen_toks"],
            "strict_regex": regex["strict-match"][0], "flexible_regex": regex["flexible-extract"][0]}
    return LmEvalProtocol(c.doc_to_text.replace("{{question}}", "{question}"), exemplars, list(generation["until"]),
                          generation["max_gen_toks"], regex["strict-match"], regex["flexible-extract"],
                          list(metric.get("regexes_to_ignore") or []), bool(metric.get("ignore_case")), info)


def lm_eval_extract(text, regex, group_select):
    """lm-eval's regex filter then take_first: the selected match (its first non-empty group), stripped; None for
    no match (lm-eval's "[invalid]")."""
    found = re.findall(regex, text)
    if not found:
        return None
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((g for g in match if g), None)
    return match.strip() if match is not None else None


def lm_eval_correct(pred, gold, protocol):
    """exact_match as the task sets it: strings, with regexes_to_ignore removed from both (and lowercased), equal.
    Not numbers: "18.00" is not "18" there."""
    if pred is None:
        return False
    for r in protocol.ignore:
        pred, gold = re.sub(r, "", pred), re.sub(r, "", gold)
    if protocol.ignore_case:
        pred, gold = pred.lower(), gold.lower()
    return pred == gold


# ============================================================================= scoring


def read_answers(text, row, protocol=None):
    """(strict answer, flexible answer, strict right, flexible right): our rule (common.extract_stated_answer, the last
    number, compared as numbers), or under an LmEvalProtocol its filters and exact_match."""
    if protocol is None:
        strict, flexible = extract_stated_answer(text), extract_last_number(text)
        return strict, flexible, answers_match(strict, row["answer"]), answers_match(flexible, row["answer"])
    gold = row["solution"].split("####")[-1].strip()  # the task's doc_to_target
    strict, flexible = lm_eval_extract(text, *protocol.strict), lm_eval_extract(text, *protocol.flexible)
    return strict, flexible, lm_eval_correct(strict, gold, protocol), lm_eval_correct(flexible, gold, protocol)


def score(rows, outs, protocol=None):
    details = []
    for row, (text, n) in zip(rows, outs):
        strict, flexible, right, flexible_right = read_answers(text, row, protocol)
        details.append({"id": row["id"], "question": row["question"], "gold": row["answer"], "completion": text,
                        "extracted": strict, "flexible_extracted": flexible, "correct": right,
                        "flexible_correct": flexible_right, "tokens": n})
        details[-1]["steps_true"], details[-1]["steps_found"] = check_steps(text, row["question"])
        details[-1]["faithful_correct"] = details[-1]["correct"] and all_steps_true(details[-1]["steps_true"],
                                                                                   details[-1]["steps_found"])
    return details


def check_args(args):
    """Refuse out-of-range flags and fill the defaults that depend on other flags."""
    check_generation_args(args, fill_max_new_tokens=args.protocol == "star")  # lm_eval_llama: the task's, once read
    if (args.iteration or 0) < 0:
        raise StarError(f"--iteration must be >= 0, got {args.iteration}")
    if args.protocol != "star" and (args.dataset != "gsm8k" or args.k or args.num_samples > 1):
        raise StarError(f"--protocol {args.protocol} is GSM8K with the task's own exemplars, greedy: it takes no "
                        f"--dataset {args.dataset}, --k {args.k} or --num_samples {args.num_samples}")
    if args.model is None:
        args.iteration = 1 if args.iteration is None else args.iteration
        args.model = args.base_model if args.iteration == 0 else f"results/model_star_iter{args.iteration}"
        if args.iteration > 0 and not os.path.isdir(args.model):
            raise StarError(f"{args.model} does not exist: train iteration {args.iteration} first, or pass --model")
    label = f"iter{args.iteration}"
    if args.iteration is None:  # --model alone: name the results after the model, so two models never share a file
        label, args.iteration = model_label(args.model)
    label = label if args.protocol == "star" else f"{args.protocol}_{label}"  # results/eval_lm_eval_llama_iter0.json
    label = label if args.split == "test" else f"{args.split}_{label}"  # results/eval_dev_iter2.json
    args.output = args.output or f"results/eval_{label}.json"
    args.dev_output = dev_output(args.output) if args.dev_eval_samples else None
    if args.dev_eval_samples < 0 or (args.dev_eval_samples and (args.split != "test" or not args.dev_samples)):
        raise StarError(f"--dev_eval_samples {args.dev_eval_samples}: a count >= 0, with --split test and a dev "
                        f"slice (--dev_samples > 0)")
    for output in filter(None, (args.output, args.dev_output)):
        check_output(output, args.overwrite)
        if args.save_results:
            check_output(details_path(output), args.overwrite)


def dev_output(output):
    """Where --dev_eval_samples writes: results/eval_iter2.json -> results/eval_dev_iter2.json (what --split dev
    names it), another name -> <name>_dev.json."""
    folder, name = os.path.split(output)
    root = name[: -len(".json")] if name.endswith(".json") else name
    return os.path.join(folder, "eval_dev_" + root[len("eval_"):] + ".json" if root.startswith("eval_")
                        else root + "_dev.json")


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


def accuracy_report(details, args, seconds, protocol=None):
    n, tokens = len(details), sum(d["tokens"] for d in details)
    count = {key: sum(d[key] for d in details) for key in ("correct", "flexible_correct", "faithful_correct")}
    return {"accuracy": count["correct"] / n, "accuracy_flexible": count["flexible_correct"] / n,
            "accuracy_faithful": count["faithful_correct"] / n, "correct": count["correct"],
            "correct_no_step_found": sum(d["correct"] and d["steps_found"] == 0 for d in details),
            "correct_flexible": count["flexible_correct"], "n": n, "model": args.model, "iteration": args.iteration,
            "dataset": args.dataset, "split": args.split, "protocol": args.protocol,
            "k": len(protocol.exemplars) if protocol else args.k, "seconds": round(seconds, 1),
            **({"lm_eval": protocol.info} if protocol else {}),
            "tokens_per_s": round(tokens / seconds, 1), **run_info(vars(args)),
            **({f"accuracy_maj_at_{args.num_samples}": sum(d["maj_correct"] for d in details) / n,
                f"accuracy_pass_at_{args.num_samples}": sum(d["pass_correct"] for d in details) / n}
               if args.num_samples > 1 else {})}


def main(argv=None):
    args = parser.parse_args(argv)
    with cli_errors(args.debug):
        check_args(args)
        rows = load_split(args.dataset, args.split, args.data_dir, args.max_samples, args.dev_samples)
        dev = load_split(args.dataset, "dev", args.data_dir, args.dev_eval_samples, args.dev_samples) \
            if args.dev_eval_samples else []
        train = load_split(args.dataset, "train", args.data_dir, dev_samples=args.dev_samples) if args.k else []
        exemplars = pick_exemplars(train, args.k, args.seed) if args.k else []
        protocol = None if args.protocol == "star" else lm_eval_protocol(load_lm_eval_task(rows))
        if protocol:
            exemplars, args.max_new_tokens = protocol.exemplars, args.max_new_tokens or protocol.max_new_tokens
            if not is_chat(load_tokenizer(args.model)):  # before the weights load
                raise StarError(f"--protocol {args.protocol} asks in chat turns: {args.model} has no chat template")
        job = open_job(args, args.model, len(rows) + len(dev))  # one engine for both splits
        runs = [(args, rows, "")] + ([(dev_args(args), dev, "dev_")] if dev else [])
        results = []
        for run_args, split_rows, part in runs:
            t0 = time.time()
            details = score_split(job, split_rows, exemplars, protocol, run_args, part)
            result = accuracy_report(details, run_args, time.time() - t0, protocol)
            result["engine"] = job.engine
            results.append((details, result, run_args))
        close_engine(job)
        if not dist_state().is_main_process:
            return  # under a launcher every process has every answer; the main one writes them
        for details, result, run_args in reversed(results):  # the test split's file last: it says the run finished
            if args.save_results:
                write_jsonl(details_path(run_args.output), details)
                result["details"] = details_path(run_args.output)
            write_json(run_args.output, result)
        close_job(job)
        for details, result, run_args in results:
            report(details, result, run_args)


def dev_args(args):
    """The flags a --split dev run of --dev_eval_samples questions would have had: its results say so."""
    return argparse.Namespace(**{**vars(args), "split": "dev", "max_samples": args.dev_eval_samples,
                                 "output": args.dev_output, "dev_eval_samples": 0, "dev_output": None})


def score_split(job, rows, exemplars, protocol, args, part):
    """The details of one split's rows: greedy answers scored, and with --num_samples k > 1 sampled ones voted.
    part: "" (the split asked) or "dev_" (--dev_eval_samples), so their batches are kept apart in the partial file."""
    prefix, parts = build_prompts(job.tok, [r["question"] for r in rows], exemplars,
                                  **({"instruction": protocol.instruction} if protocol else {}))
    # lm_eval_llama: lm-eval's own stop rule (its `until` strings and EOS, nothing else), as its HF backend decodes
    outs = generate_part(job, part + "greedy", prefix, parts, f"evaluating {args.split}",
                         until=protocol.until if protocol else None)
    details = score(rows, outs, protocol)
    if args.num_samples > 1:
        sampling = Sampling(args.num_samples, args.temperature, args.top_p, args.seed)
        samples = generate_part(job, part + "sampled", prefix, parts, f"sampling {args.num_samples} per question",
                                sampling=sampling)
        score_samples(details, samples)
    return details


def report(details, result, args):
    """Two example answers, the accuracy line (what was written where), and the strict/flexible gap warning."""
    for d in details[:2]:
        print(f"--- example (gold {d['gold']}, extracted {d['extracted']}, correct {d['correct']})\n{d['completion']}")
    also = f" and {details_path(args.output)}" if args.save_results else ""
    k = args.num_samples
    voted = (f", maj@{k} {result[f'accuracy_maj_at_{k}']:.4f}, pass@{k} {result[f'accuracy_pass_at_{k}']:.4f}"
             if k > 1 else "")
    print(f"accuracy {result['accuracy']:.4f} strict, {result['accuracy_flexible']:.4f} flexible, "
          f"{result['accuracy_faithful']:.4f} correct with all steps true{voted} "
          f"(n={result['n']}, {result['correct']} correct, {result['correct_no_step_found']} of them with no step "
          f"found); wrote {args.output}{also}")
    warn_unstated(result)


def warn_unstated(result):
    """One line when flexible beats strict by more than GAP_WARNING_POINTS: right answers lost to their form."""
    points = round(100 * (result["accuracy_flexible"] - result["accuracy"]), 6)  # 55% - 50% is 5 points, not 5.000001
    if points > GAP_WARNING_POINTS:
        print(f"warning: flexible accuracy is {points:.1f} points above strict: the model does not state its answers "
              "in the expected form", file=sys.stderr)


if __name__ == "__main__":
    main()
