"""Generation benchmark: the naive path against common.generate on the same few-shot prompts.

(a) naive: model.generate on the full K-shot prompts, one batch, left padding, no stop strings,
    the same max_new_tokens; (b) ours: shared-prefix KV cache, per-row stop, dropped finished rows,
    length-sorted batches. Both greedy. Prints seconds, tokens, useful tokens/s (tokens up to each
    answer's end, the same for both when the answers agree), the ratio, and whether the kept answers
    are identical.

    python bench/bench_generate.py                       # 32 GSM8K train questions, K=4, smollm2-135m, CPU
    python bench/bench_generate.py --n 64 --batch_size 64 --model meta-llama/Llama-3.2-3B-Instruct --k 10
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (  # noqa: E402
    MAX_NEW_TOKENS, build_prompts, cut_after_answer, extract_answer, generate, load_model, load_split,
    pick_exemplars, stop_strings, stop_token_ids, truncate_at_stop,
)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--data_dir", default=os.environ.get("GSM8K_DIR", "../shared/gsm8k"))
parser.add_argument("--n", type=int, default=32, help="train questions")
parser.add_argument("--k", type=int, default=4)
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS["gsm8k"])


@torch.no_grad()
def naive(model, tok, prompts, max_new_tokens, batch_size):
    tok.padding_side = "left"
    texts, generated = [], 0
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=None)  # no stopping: every row runs to max_new_tokens
        new = out[:, enc.input_ids.shape[1]:]
        generated += new.numel()
        texts += [tok.decode(t, skip_special_tokens=False) for t in new]
    return texts, generated


def main(argv=None):
    args = parser.parse_args(argv)
    model, tok = load_model(args.model)
    train = load_split("gsm8k", "train", args.data_dir)
    exemplars = pick_exemplars(train, args.k, 0)
    ex_ids = {e["id"] for e in exemplars}
    rows = [r for r in train if r["id"] not in ex_ids][: args.n]
    prefix, parts = build_prompts(tok, [r["question"] for r in rows], exemplars)
    print(f"{args.n} questions, K={args.k}, prefix {len(tok(prefix).input_ids)} tokens, model {args.model} on "
          f"{model.device}, {torch.get_num_threads()} threads, max_new_tokens {args.max_new_tokens}")

    t0 = time.time()
    raw, naive_tokens = naive(model, tok, [prefix + p for p in parts], args.max_new_tokens, args.batch_size)
    naive_s = time.time() - t0
    # What the naive path would keep: cut at end of turn / EOS / stop string, as ours does.
    stops = stop_strings(tok)
    ends = [tok.decode(i) for i in stop_token_ids(model, tok)]
    naive_kept = [cut_after_answer(truncate_at_stop(t, tuple(stops) + tuple(ends)).strip()) for t in raw]

    t0 = time.time()
    ours = generate(model, tok, prefix, parts, args.max_new_tokens, args.batch_size, "ours")
    ours_s = time.time() - t0
    ours_kept = [cut_after_answer(t) for t, _ in ours]
    useful = sum(len(tok(k, add_special_tokens=False).input_ids) for k in ours_kept)
    same = sum(a == b for a, b in zip(naive_kept, ours_kept))
    same_answers = sum(extract_answer(a) == extract_answer(b) for a, b in zip(naive_kept, ours_kept))

    print(f"naive: {naive_s:7.1f} s, {naive_tokens:6d} new tokens ({naive_tokens / naive_s:6.1f} tok/s), "
          f"{useful / naive_s:6.1f} useful tok/s")
    print(f"ours:  {ours_s:7.1f} s, {sum(n for _, n in ours):6d} new tokens ({sum(n for _, n in ours) / ours_s:6.1f} tok/s), "
          f"{useful / ours_s:6.1f} useful tok/s")
    print(f"ratio (useful tokens/s, ours / naive): {naive_s / ours_s:.2f}x")
    print(f"kept rationales identical: {same}/{len(rows)}; final answers identical: {same_answers}/{len(rows)}")


if __name__ == "__main__":
    main()
