"""How the scripts feed vLLM: whole shares in one call against lock-step batches, on one engine, same prompts.

(a) lock-step: engines.generate in batches of --batch_size questions, one `LLM.generate` call each (what the scripts
    did before: at most a batch of rows in flight, each call waiting for its longest row);
(b) whole: engines.generate with the whole share in one call (what create_data.py and evaluate.py do on vLLM now:
    generation.open_job), vLLM's continuous batching keeping its own max_num_seqs in flight.
Both on the same engine (vLLM's default max_num_seqs, prefix caching on, its prefix cache emptied before each run),
greedy, K-shot GSM8K train prompts, the scripts' stop rule. Prints seconds, calls, new tokens, tokens/s and whether
how many completions and final answers equal the lock-step run's (vLLM's kernels round differently in another batch
mix: in bf16 greedy texts part ways), then the ratio of seconds (lock-step / whole) as its last line.

    python bench/bench_vllm_feed.py                          # 128 questions, K = 4, batches of 32, the embedded model
    python bench/bench_vllm_feed.py --n 1024 --k 10 --model meta-llama/Llama-3.2-3B-Instruct   # on a GPU
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import build_prompts, cut_after_answer, extract_stated_answer, load_split, pick_exemplars  # noqa: E402
from engines import MAX_NEW_TOKENS, generate  # noqa: E402
from vllm_engine import load_vllm, shutdown  # noqa: E402
from models import DTYPES, load_tokenizer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--data_dir", default=os.environ.get("GSM8K_DIR", "../shared/gsm8k"))
parser.add_argument("--n", type=int, default=128, help="train questions")
parser.add_argument("--k", type=int, default=4, help="few-shot exemplars")
parser.add_argument("--batch_size", type=int, default=32, help="questions per call in the lock-step run")
parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS["gsm8k"])
parser.add_argument("--dtype", default="auto", choices=DTYPES)


def timed_run(llm, tok, prefix, parts, args, batch_size):
    """(completions, seconds, calls) of engines.generate on vLLM with this batch size (one call per batch)."""
    llm.reset_prefix_cache()  # neither run starts with the other's prefix cached
    t0 = time.time()
    out = generate(llm, tok, prefix, parts, args.max_new_tokens, batch_size, f"batches of {batch_size}")
    return out, time.time() - t0, math.ceil(len(parts) / batch_size)


def main(argv=None):
    args = parser.parse_args(argv)
    tok = load_tokenizer(args.model)
    train = load_split("gsm8k", "train", args.data_dir)
    exemplars = pick_exemplars(train, args.k, 0)
    ex_ids = {e["id"] for e in exemplars}
    rows = [r for r in train if r["id"] not in ex_ids][:args.n]
    prefix, parts = build_prompts(tok, [r["question"] for r in rows], exemplars)
    t0 = time.time()
    llm = load_vllm(args.model, None, dtype=args.dtype)
    print(f"vllm engine start {time.time() - t0:.1f} s; max_num_seqs "
          f"{llm.llm_engine.vllm_config.scheduler_config.max_num_seqs}; {len(parts)} questions, K={args.k}, "
          f"max_new_tokens {args.max_new_tokens}", flush=True)
    runs = {"lock-step": timed_run(llm, tok, prefix, parts, args, args.batch_size),
            "whole": timed_run(llm, tok, prefix, parts, args, len(parts))}
    shutdown(llm)
    answers = {name: [extract_stated_answer(cut_after_answer(t)) for t, _ in out] for name, (out, _, _) in runs.items()}
    for name, (out, seconds, calls) in runs.items():
        tokens = sum(n for _, n in out)
        same = sum(a == b for a, b in zip(out, runs["lock-step"][0]))
        agree = sum(a == b for a, b in zip(answers[name], answers["lock-step"]))
        print(f"{name:10s} {seconds:7.1f} s  {calls:4d} calls  {tokens:7d} new tokens  {tokens / seconds:7.1f} tok/s  "
              f"{len(parts) / seconds:6.2f} questions/s  equal to lock-step's: {same}/{len(parts)} completions, "
              f"{agree}/{len(parts)} final answers")
    print(f"ratio (seconds, lock-step / whole): {runs['lock-step'][1] / runs['whole'][1]:.2f}x")


if __name__ == "__main__":
    main()
