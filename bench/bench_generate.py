"""Generation benchmark: common.generate against what a user would otherwise run, on the same prompts.

(a) `model.generate` on the full K-shot prompts, left padded, in batches of the same size, greedy, with
    the stopping a user would pass: the EOS and end-of-turn ids and `stop_strings=["Question:"]`;
(b) transformers' continuous batching, `model.generate_batch` (paged attention), on the same prompts
    (common.generate with engine="library": the library decodes, our stop rule cuts the rows after);
(c) ours: common.generate with engine="ours" (the prefix's KV stored once, shared-prefix attention,
    per-row stop at the answer sentence, finished rows dropped, length-sorted batches).
All greedy, the same max_new_tokens. For each K it prints seconds, new tokens, tokens/s, and whether
the final answers agree; the last two lines are the ratios of the seconds (theirs / ours) at each K.

--dtypes runs ours alone in each precision on the same prompts: seconds, tokens/s, final answers equal to the
first precision's, and right final answers (the questions are train questions: their gold answers are known).

    python bench/bench_generate.py --dtype fp32                    # 16 GSM8K train questions, K = 4 and 10
    python bench/bench_generate.py --n 64 --batch_size 64 --model meta-llama/Llama-3.2-3B-Instruct
    python bench/bench_generate.py --dtypes fp32,bf16 --ks 4       # what bf16 changes, on this machine
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (  # noqa: E402
    DTYPES, answers_match, build_prompts, cut_after_answer, extract_stated_answer, generate, load_model, load_split,
    pick_exemplars, stop_token_ids, truncate_at_stop,
)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--data_dir", default=os.environ.get("GSM8K_DIR", "../shared/gsm8k"))
parser.add_argument("--n", type=int, default=16, help="train questions")
parser.add_argument("--ks", default="4,10", help="few-shot exemplars, one run each")
parser.add_argument("--batch_size", type=int, default=16)
parser.add_argument("--max_new_tokens", type=int, default=160)
parser.add_argument("--dtype", default="auto", choices=DTYPES, help="the model's weights (auto: as the scripts load it)")
parser.add_argument("--dtypes", default=None, help="e.g. fp32,bf16: ours alone in each precision, answers compared")


@torch.no_grad()
def with_generate(model, tok, prompts, max_new_tokens, batch_size):
    """What a user writes with the library's own generate: left padding, greedy, its own stopping."""
    tok.padding_side = "left"
    texts, generated = [], 0
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=stop_token_ids(model, tok), stop_strings=["Question:"], tokenizer=tok)
        for row in out[:, enc.input_ids.shape[1]:].tolist():
            row = [t for t in row if t != tok.pad_token_id]
            generated += len(row)
            texts.append(truncate_at_stop(tok.decode(row, skip_special_tokens=True), ["Question:"]).strip())
    return texts, generated


def timed(fn):
    t0 = time.time()
    out = fn()
    return out, time.time() - t0


def k_shot(tok, train, k, n):
    """(rows, shared prefix, question parts): the first n train questions that are not among the K exemplars."""
    exemplars = pick_exemplars(train, k, 0)
    ex_ids = {e["id"] for e in exemplars}
    rows = [r for r in train if r["id"] not in ex_ids][:n]
    return (rows, *build_prompts(tok, [r["question"] for r in rows], exemplars))


def run_k(model, tok, train, k, args):
    """Seconds of (generate, generate_batch, ours) at one K, and whether the final answers agree."""
    rows, prefix, parts = k_shot(tok, train, k, args.n)
    print(f"K={k}: {len(rows)} questions, prefix {len(tok(prefix, add_special_tokens=False).input_ids)} tokens, "
          f"batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, {model.device}, "
          f"{torch.get_num_threads()} threads")
    (ref, ref_tokens), ref_s = timed(lambda: with_generate(model, tok, [prefix + p for p in parts],
                                                           args.max_new_tokens, args.batch_size))
    results, seconds = {}, {}
    for engine in ("library", "ours"):
        results[engine], seconds[engine] = timed(lambda: generate(model, tok, prefix, parts, args.max_new_tokens,
                                                                  args.batch_size, engine, engine=engine))
    answers = {name: [extract_stated_answer(cut_after_answer(t)) for t in texts]
               for name, texts in (("generate", ref), *((e, [t for t, _ in r]) for e, r in results.items()))}
    for name, s, tokens in (("generate", ref_s, ref_tokens),
                            *((e, seconds[e], sum(n for _, n in results[e])) for e in ("library", "ours"))):
        same = sum(a == b for a, b in zip(answers[name], answers["ours"]))
        print(f"  {name:9s} {s:7.1f} s  {tokens:6d} new tokens  {tokens / s:7.1f} tok/s  "
              f"final answers equal to ours: {same}/{len(rows)}")
    return ref_s, seconds["library"], seconds["ours"]


def compare_dtypes(args, train, dtypes):
    """Ours in each precision on the same K-shot prompts: speed, answers equal to the first precision's, right answers."""
    for k in map(int, args.ks.split(",")):
        answers, seconds = {}, {}
        for dtype in dtypes:
            model, tok = load_model(args.model, dtype=dtype)
            rows, prefix, parts = k_shot(tok, train, k, args.n)
            out, seconds[dtype] = timed(lambda: generate(model, tok, prefix, parts, args.max_new_tokens,
                                                         args.batch_size, dtype))
            answers[dtype] = [extract_stated_answer(cut_after_answer(text)) for text, _ in out]
            tokens = sum(n for _, n in out)
            same = sum(a == b for a, b in zip(answers[dtype], answers[dtypes[0]]))
            right = sum(answers_match(a, r["answer"]) for a, r in zip(answers[dtype], rows))
            print(f"K={k} {dtype:5s} {seconds[dtype]:7.1f} s  {tokens:6d} new tokens  {tokens / seconds[dtype]:7.1f} tok/s"
                  f"  final answers equal to {dtypes[0]}'s: {same}/{len(rows)}  right: {right}/{len(rows)}  "
                  f"({torch.get_num_threads()} threads)")
        print(f"ratio (seconds, {dtypes[0]} / other) at K={k}: " +
              ", ".join(f"{d} {seconds[dtypes[0]] / seconds[d]:.2f}x" for d in dtypes[1:]))


def main(argv=None):
    args = parser.parse_args(argv)
    train = load_split("gsm8k", "train", args.data_dir)
    if args.dtypes:
        return compare_dtypes(args, train, args.dtypes.split(","))
    model, tok = load_model(args.model, dtype=args.dtype)
    times = {k: run_k(model, tok, train, k, args) for k in map(int, args.ks.split(","))}
    for i, name in ((0, "generate"), (1, "generate_batch")):  # seconds of theirs / seconds of ours
        print(f"ratio vs {name}: " + ", ".join(f"{t[i] / t[2]:.2f}x (K={k})" for k, t in times.items()))


if __name__ == "__main__":
    main()
