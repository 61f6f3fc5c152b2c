"""Training benchmark: naive padded batches against train.py's packed path, side by side.

The same rationales (real GSM8K human solutions), the same order, optimizer, lr and number of
optimizer steps through (a) naive: right-padded batches of --batch_size, full logits, loss on the
prompt and padding masked; (b) ours: train.py's packing (no padding, per-example positions and
causal attention, logits only where a rationale token is learned). Both use the same
per-example-mean loss, so their losses are comparable. Each path runs in its own process, so
that its peak memory is its own. Prints real (non-pad) tokens/s of each, the ratio, the final
training loss and peak memory.

    python bench/bench_train.py                 # 200 examples, batch 8, 1 epoch, smollm2-135m, CPU
    python bench/bench_train.py --n 64 --steps 8
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import load_split, load_tokenizer, resolve_model, solution_to_rationale  # noqa: E402
from train import pack, packed_loss, tokenize_examples, use_packed_attention  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--data_dir", default=os.environ.get("GSM8K_DIR", os.path.join(ROOT, "..", "shared", "gsm8k")))
parser.add_argument("--n", type=int, default=200, help="GSM8K train solutions")
parser.add_argument("--batch_size", type=int, default=8)
parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
parser.add_argument("--lr", type=float, default=1e-5)
parser.add_argument("--path", choices=["naive", "ours"], default=None, help="run one path (used internally)")


def padded_loss(model, batch, pad_id):
    """Naive: pad to the longest example, compute every logit, mask prompt and padding in the loss."""
    L = max(len(x) for x, _ in batch)
    ids = torch.tensor([x + [pad_id] * (L - len(x)) for x, _ in batch])
    labels = torch.tensor([y + [-100] * (L - len(y)) for _, y in batch])
    mask = torch.tensor([[1] * len(x) + [0] * (L - len(x)) for x, _ in batch])
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    tok_loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels[:, 1:], reduction="none")
    learned = (labels[:, 1:] != -100).float()
    return ((tok_loss * learned).sum(1) / learned.sum(1)).mean()


def run_path(args):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    rows = load_split("gsm8k", "train", args.data_dir, args.n)
    records = [{"question": r["question"], "rationale": solution_to_rationale(r["solution"])} for r in rows]
    examples, _ = tokenize_examples(tok, records, 1024)
    batches = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    batches = batches[: args.steps] if args.steps else batches
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32).train()
    if args.path == "ours":
        use_packed_attention(model)  # what train.py's load_base does
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses, real_tokens, t0 = [], 0, time.time()
    for batch in batches:
        loss = packed_loss(model, pack(batch)) if args.path == "ours" else padded_loss(model, batch, tok.pad_token_id)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        real_tokens += sum(len(x) for x, _ in batch)
    seconds = time.time() - t0
    print(json.dumps({"seconds": seconds, "real_tokens": real_tokens, "steps": len(batches),
                      "padded_tokens": sum(len(b) * max(len(x) for x, _ in b) for b in batches),
                      "final_loss": sum(losses[-5:]) / len(losses[-5:]), "first_loss": losses[0],
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main(argv=None):
    args = parser.parse_args(argv)
    if args.path:
        return run_path(args)
    res = {}
    for path in ("naive", "ours"):
        cmd = [sys.executable, os.path.abspath(__file__), "--path", path] + (argv if argv is not None else sys.argv[1:])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res[path] = json.loads(out.strip().splitlines()[-1])
        r = res[path]
        print(f"{path:5s}: {r['steps']} steps in {r['seconds']:6.1f} s, {r['real_tokens'] / r['seconds']:6.1f} real tok/s "
              f"({r['real_tokens']} real of {r['padded_tokens']} padded tokens), loss {r['first_loss']:.4f} -> "
              f"{r['final_loss']:.4f} (mean of last 5 steps), peak RSS {r['peak_rss_gib']:.2f} GiB")
    ratio = (res["ours"]["real_tokens"] / res["ours"]["seconds"]) / (res["naive"]["real_tokens"] / res["naive"]["seconds"])
    print(f"ratio (real tokens/s, ours / naive): {ratio:.2f}x; final loss ours {res['ours']['final_loss']:.4f} "
          f"vs naive {res['naive']['final_loss']:.4f}")


if __name__ == "__main__":
    main()
