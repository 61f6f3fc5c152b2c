"""GPU generation check: a random-weight model with the Llama-3.2-3B-Instruct architecture in bf16,
real GSM8K K=10 prompts through common.generate's batch path, every row forced to the same length.
Prints generated tokens/s, peak memory, and the projected time of a full create_data pass
(7,473 questions x ~250 new tokens). Needs no download: the config is written out below, and the
tokenizer is any small local one (the embedded model's by default).

    python bench/gpu_generate.py --data_dir ../shared/gsm8k                    # batch 64 and 256
    python bench/gpu_generate.py --data_dir ../shared/gsm8k --tiny             # a CPU smoke run
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import build_prompt, generate_batch, load_split, load_tokenizer, pick_exemplars, prefix_cache  # noqa: E402

# meta-llama/Llama-3.2-3B-Instruct's config.json (the shapes that matter for speed and memory)
LLAMA_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")
TINY = dict(LLAMA_3B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_dir", default=os.environ.get("GSM8K_DIR", "../shared/gsm8k"))
parser.add_argument("--tokenizer", default="smollm2-135m", help="any local tokenizer (ids fit the 128k vocab)")
parser.add_argument("--batch_sizes", default="64,256")
parser.add_argument("--k", type=int, default=10)
parser.add_argument("--new_tokens", type=int, default=256)
parser.add_argument("--tiny", action="store_true", help="a 2-layer model: check the script on CPU")


def random_model(tiny):
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**(TINY if tiny else LLAMA_3B)), dtype=torch.bfloat16)
    return model.eval()


def main(argv=None):
    args = parser.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    model = random_model(args.tiny)
    train = load_split("gsm8k", "train", args.data_dir)
    exemplars = pick_exemplars(train, args.k, 0)
    prefix = build_prompt(tok, "", exemplars).prefix
    prefix_ids = tok(prefix, add_special_tokens=False).input_ids
    kv = prefix_cache(model, prefix_ids)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, bf16, {model.device}; "
          f"K={args.k} prefix {len(prefix_ids)} tokens; {args.new_tokens} new tokens per row, no early stop")
    for bs in map(int, args.batch_sizes.split(",")):
        rows = [tok(build_prompt(tok, r["question"], exemplars).question, add_special_tokens=False).input_ids
                for r in train[100:100 + bs]]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        out = generate_batch(model, tok, kv, len(prefix_ids), rows, args.new_tokens, [], ())  # no stop: fixed length
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.time() - t0
        tokens = sum(len(o) for o in out)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        full = 7473 * 250 / (tokens / seconds)
        print(f"batch {bs:4d}: {tokens} tokens in {seconds:6.1f} s = {tokens / seconds:8.0f} tok/s, peak {peak:6.1f} GiB; "
              f"projected create_data Stage 1 over 7,473 questions x 250 tokens: {full / 60:5.1f} min")


if __name__ == "__main__":
    main()
