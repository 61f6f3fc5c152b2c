"""Generation benchmark: both engines of engines.generate against what a user would otherwise run, same prompts.

(a) `model.generate` on the full K-shot prompts, left padded, in batches of the same size, greedy, with
    the stopping a user would pass: the EOS and end-of-turn ids and `stop_strings=["Question:"]`;
(b) transformers' continuous batching, `model.generate_batch` (paged attention, prefix block sharing), on the
    same prompts, with the same stop ids, its KV cache sized to the workload (left to itself it takes 90% of
    free memory: ~30 s of allocation per call on a CPU);
(c) vLLM as a user calls it: one `LLM.generate` over all the prompts, `max_num_seqs` = the batch size, prefix
    caching on, `stop=["Question:"]` and the stop ids (the engine started once, its start reported apart);
(d) hf: engines.generate with the hf engine (the prefix's KV stored once, shared-prefix attention, per-row
    stop at the answer sentence, finished rows dropped, length-sorted batches);
(e) hf:vllm: engines.generate with the vllm engine (the same scheduler and stop rule around vLLM).
All greedy, the same max_new_tokens, vLLM's prefix cache emptied before each of its runs; the Hugging Face runs
come first, before vLLM's engine starts (its idle worker polls and would take CPU from them). For each K it prints
seconds, new tokens, tokens/s and whether the final answers agree with hf's; then vLLM's start, the number of
questions after which that start is paid back (what --engine auto follows on CPU), and, as its last three lines,
the ratios of seconds (theirs / hf) at each K, for both of our engines.

--dtypes runs hf alone in each precision on the same prompts: seconds, tokens/s, final answers equal to the
first precision's, and right final answers (the questions are train questions: their gold answers are known).

    python bench/bench_generate.py                                 # 16 GSM8K train questions, K = 4 and 10
    python bench/bench_generate.py --n 64 --batch_size 64 --model meta-llama/Llama-3.2-3B-Instruct
    python bench/bench_generate.py --dtypes fp32,bf16 --ks 4       # what bf16 changes, on this machine
"""
import argparse
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import answers_match, build_prompts, cut_after_answer, extract_stated_answer, load_split, pick_exemplars
from models import DTYPES, load_model
from engines import cut_at_stop, final_text, generate, stop_rule, stop_token_ids, truncate_at_stop  # noqa: E402
from vllm_engine import load_vllm, vllm_installed  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--data_dir", default=os.environ.get("GSM8K_DIR", "../shared/gsm8k"))
parser.add_argument("--n", type=int, default=16, help="train questions")
parser.add_argument("--ks", default="4,10", help="few-shot exemplars, one run each")
parser.add_argument("--batch_size", type=int, default=16)
parser.add_argument("--max_new_tokens", type=int, default=160)
parser.add_argument("--dtype", default="auto", choices=DTYPES, help="the model's weights (auto: as the scripts load it)")
parser.add_argument("--dtypes", default=None, help="e.g. fp32,bf16: hf alone in each precision, answers compared")


@torch.no_grad()
def with_generate(model, tok, prefix_ids, rows, max_new_tokens, batch_size):
    """What a user writes with the library's own generate: left padding, greedy, its own stopping."""
    texts, generated = [], 0
    for i in range(0, len(rows), batch_size):
        part = [prefix_ids + r for r in rows[i:i + batch_size]]
        width = max(map(len, part))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in part], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part], device=model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=stop_token_ids(model, tok),
                             stop_strings=["Question:"], tokenizer=tok)
        for row in out[:, width:].tolist():
            row = [t for t in row if t != tok.pad_token_id]
            generated += len(row)
            texts.append(truncate_at_stop(tok.decode(row, skip_special_tokens=True), ["Question:"]).strip())
    return texts, generated


@torch.no_grad()
def generate_batch_rows(model, tok, prefix_ids, rows, max_new_tokens, stop=True):
    """New token ids per row by transformers' continuous batching, as a user runs it at its best: prefix block
    sharing, the cache sized to the workload (every row fits: its scheduler batches them all); rows then cut at our
    stop (it stops at stop ids only). stop=False: every row max_new_tokens long."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    rule = stop_rule(model, tok, stop)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=rule.ids or None,
                              pad_token_id=tok.pad_token_id, do_sample=False)
    blocks = sum(-(-(len(prefix_ids) + len(r) + max_new_tokens) // 256) for r in rows) + 1  # 256-token blocks
    # A token budget of one prompt makes the first forward prefill one whole prompt; later rows reuse its blocks.
    cb = ContinuousBatchingConfig(allow_block_sharing=True, num_blocks=blocks,
                                  max_batch_tokens=max(256, len(prefix_ids) + max(map(len, rows))))
    out = model.generate_batch(inputs=[prefix_ids + r for r in rows], generation_config=config,
                               continuous_batching_config=cb, progress_bar=False)
    got = {int(re.fullmatch(r"req_(\d+)", key)[1]): result.generated_tokens for key, result in out.items()}
    return [cut_at_stop(tok, list(got[i][:max_new_tokens]), rule) for i in range(len(rows))]


def with_generate_batch(model, tok, prefix_ids, rows, max_new_tokens):
    cut = generate_batch_rows(model, tok, prefix_ids, rows, max_new_tokens)
    rule = stop_rule(model, tok)
    return [final_text(tok.decode(t, skip_special_tokens=True), rule) for t in cut], sum(map(len, cut))


def with_vllm(llm, tok, prefix_ids, rows, max_new_tokens):
    """vLLM's own call: every prompt at once, its scheduler batching them, its stop strings and ids."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_new_tokens, stop=["Question:"],
                            stop_token_ids=stop_token_ids(llm, tok))
    outs = llm.generate([{"prompt_token_ids": prefix_ids + r} for r in rows], params, use_tqdm=False)
    return [o.outputs[0].text.strip() for o in outs], sum(len(o.outputs[0].token_ids) for o in outs)


def timed(fn, llm=None):
    if llm is not None:
        llm.reset_prefix_cache()  # no run starts with another's prefix already cached
    t0 = time.time()
    out = fn()
    return out, time.time() - t0


def k_shot(tok, train, k, n):
    """(rows, shared prefix, question parts): the first n train questions that are not among the K exemplars."""
    exemplars = pick_exemplars(train, k, 0)
    ex_ids = {e["id"] for e in exemplars}
    rows = [r for r in train if r["id"] not in ex_ids][:n]
    return (rows, *build_prompts(tok, [r["question"] for r in rows], exemplars))


def run_k(model, llm, tok, train, k, args, names):
    """{name: ((texts, new tokens), seconds)} of the runs in `names` at one K, on the same prompts."""
    rows, prefix, parts = k_shot(tok, train, k, args.n)
    prefix_ids = tok(prefix, add_special_tokens=False).input_ids
    ids = [tok(p, add_special_tokens=False).input_ids for p in parts]
    new = args.max_new_tokens

    def star_generate(m):
        out = generate(m, tok, prefix, parts, new, args.batch_size, "hf")
        return [t for t, _ in out], sum(n for _, n in out)
    calls = {"generate": lambda: timed(lambda: with_generate(model, tok, prefix_ids, ids, new, args.batch_size)),
             "generate_batch": lambda: timed(lambda: with_generate_batch(model, tok, prefix_ids, ids, new)),
             "hf": lambda: timed(lambda: star_generate(model)),
             "vllm": lambda: timed(lambda: with_vllm(llm, tok, prefix_ids, ids, new), llm),
             "hf:vllm": lambda: timed(lambda: star_generate(llm), llm)}
    return {name: calls[name]() for name in names}, len(rows), len(prefix_ids)


def report(k, runs, n, prefix_tokens, model, args):
    """One line per run at one K: seconds, new tokens, tokens/s, final answers equal to hf'."""
    print(f"K={k}: {n} questions, prefix {prefix_tokens} tokens, batch {args.batch_size}, max_new_tokens "
          f"{args.max_new_tokens}, {model.device}, {model.dtype}, {torch.get_num_threads()} threads", flush=True)
    answers = {name: [extract_stated_answer(cut_after_answer(t)) for t in texts] for name, ((texts, _), _) in runs.items()}
    for name, ((_, tokens), s) in runs.items():
        same = sum(a == b for a, b in zip(answers[name], answers["hf"]))
        print(f"  {name:14s} {s:7.1f} s  {tokens:6d} new tokens  {tokens / s:7.1f} tok/s  "
              f"final answers equal to hf: {same}/{n}", flush=True)


def compare_dtypes(args, train, dtypes):
    """Ours in each precision on the same K-shot prompts: speed, answers equal to the first precision's, right answers."""
    for k in map(int, args.ks.split(",")):
        answers, seconds = {}, {}
        for dtype in dtypes:
            model, tok = load_model(args.model, dtype=dtype)
            rows, prefix, parts = k_shot(tok, train, k, args.n)
            out, seconds[dtype] = timed(lambda: generate(model, tok, prefix, parts, args.max_new_tokens,
                                                         args.batch_size, f"hf {dtype}"))
            answers[dtype] = [extract_stated_answer(cut_after_answer(text)) for text, _ in out]
            tokens = sum(n for _, n in out)
            same = sum(a == b for a, b in zip(answers[dtype], answers[dtypes[0]]))
            right = sum(answers_match(a, r["answer"]) for a, r in zip(answers[dtype], rows))
            print(f"K={k} {dtype:5s} {seconds[dtype]:7.1f} s  {tokens:6d} new tokens  {tokens / seconds[dtype]:7.1f} tok/s"
                  f"  final answers equal to {dtypes[0]}'s: {same}/{len(rows)}  right: {right}/{len(rows)}  "
                  f"({torch.get_num_threads()} threads)", flush=True)
        print(f"ratio (seconds, {dtypes[0]} / other) at K={k}: " +
              ", ".join(f"{d} {seconds[dtypes[0]] / seconds[d]:.2f}x" for d in dtypes[1:]))


def main(argv=None):
    args = parser.parse_args(argv)
    train = load_split("gsm8k", "train", args.data_dir)
    if args.dtypes:
        return compare_dtypes(args, train, args.dtypes.split(","))
    model, tok = load_model(args.model, dtype=args.dtype)
    ks = list(map(int, args.ks.split(",")))
    # Hugging Face runs first, with no vLLM engine alive: its idle worker process polls and takes a share of the CPU.
    runs = {k: run_k(model, None, tok, train, k, args, ("generate", "generate_batch", "hf")) for k in ks}
    start = None
    if vllm_installed():
        t0 = time.time()
        llm = load_vllm(args.model, args.batch_size, dtype=args.dtype)
        start = time.time() - t0
        for k in ks:
            runs[k][0].update(run_k(model, llm, tok, train, k, args, ("vllm", "hf:vllm"))[0])
    for k in ks:
        report(k, *runs[k], model, args)
    if start is not None:
        print(f"vllm engine start: {start:.1f} s (once per run of a script; not in the seconds above)")
        for k in ks:  # rows after which vLLM's start is paid back: start / (hf's seconds per row - vLLM's)
            t, n = {name: s for name, (_, s) in runs[k][0].items()}, runs[k][1]
            gain = (t["hf"] - t["hf:vllm"]) / n
            print(f"break-even at K={k}: vLLM's start is paid back after "
                  + (f"{start / gain:.0f} questions" if gain > 0 else "no number of questions"))
    times = {k: {name: s for name, (_, s) in runs[k][0].items()} for k in ks}
    mine = [name for name in ("hf", "hf:vllm") if name in times[ks[0]]]
    for theirs in ("generate", "generate_batch", "vllm"):  # seconds of theirs / seconds of hf
        if theirs in times[ks[0]]:
            print(f"ratio vs {theirs}: " + "; ".join(
                ", ".join(f"{o} {t[theirs] / t[o]:.2f}x" for o in mine) + f" (K={k})" for k, t in times.items()))


if __name__ == "__main__":
    main()
