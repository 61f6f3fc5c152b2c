"""Training benchmark: naive padded batches against train.py's packed path, side by side.

The same rationales (real GSM8K human solutions), the same order, optimizer, lr and number of
optimizer steps through (a) naive: right-padded batches of --batch_size, full logits, loss on the
prompt and padding masked; (b) ours: train.py's packing (no padding, per-example positions and
causal attention, logits only where a rationale token is learned, the prompt opening that a row's
examples share computed once); --paths unshared,ours adds (c) unshared: ours with each example's
prompt whole in the row, and (d) flash_bwd: ours with the CPU flash kernel's own attention backward in place of
attention.attention_backward. All use the same per-example-mean loss, so their losses are comparable.
Each path runs in its own process, so that its peak memory is its own. Prints real (non-pad, every
example's whole) tokens/s of each, the ratios, the final training loss and peak memory.

--dtypes compares train.py's path (ours) in several precisions instead, on the same batches: fp32; bf16 = bf16
autocast on fp32 master weights and fp32 AdamW (train.py --dtype bf16, accelerate's mixed precision); pure_bf16 =
weights, gradients and AdamW states all in bf16 (half the memory, but updates smaller than a bf16 weight's rounding
step are lost). It prints each one's line, the loss every few steps side by side, and tokens/s relative to the first.

    python bench/bench_train.py                 # 200 examples, batch 8, 1 epoch, smollm2-135m, CPU
    python bench/bench_train.py --n 64 --steps 8
    python bench/bench_train.py --paths unshared,ours,unshared,ours --dtype bf16 --n 64   # the shared prefix
    python bench/bench_train.py --dtypes fp32,bf16,pure_bf16 --n 64 --lr 1e-4
    python bench/bench_train.py --paths flash_bwd,ours,flash_bwd,ours --dtype bf16 --n 64 --lr 1e-4
    python bench/bench_train.py --profile --dtype bf16 --n 48   # where a step of ours spends its time

--profile runs ours for the batches after a warm-up one under torch.profiler and prints each kind of op's share of
the CPU time (matmuls with their rate beside bench_matmul.py's, attention, casts, optimizer, the rest) and the
20 ops that took longest.
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
from common import load_split, solution_to_rationale  # noqa: E402
from memory import keep_heap  # noqa: E402
from models import load_tokenizer, resolve_model  # noqa: E402
import attention  # noqa: E402
from attention import use_packed_attention  # noqa: E402
from objectives import pack, packed_loss, tokenize_examples  # noqa: E402

# precision -> (weights' dtype, autocast dtype or None)
PRECISIONS = {"fp32": (torch.float32, None), "bf16": (torch.float32, torch.bfloat16),
              "pure_bf16": (torch.bfloat16, None)}

PATHS = ["naive", "ours", "unshared", "flash_bwd"]  # --paths' names (above)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--data_dir", default=os.environ.get("GSM8K_DIR", os.path.join(ROOT, "..", "shared", "gsm8k")))
parser.add_argument("--n", type=int, default=200, help="GSM8K train solutions")
parser.add_argument("--batch_size", type=int, default=8)
parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
parser.add_argument("--lr", type=float, default=1e-5)
parser.add_argument("--dtypes", default=None, help="e.g. fp32,bf16,pure_bf16: compare ours in these precisions")
parser.add_argument("--paths", default="naive,ours", help="paths to compare, in turns (PATHS)")
parser.add_argument("--path", choices=PATHS, default=None, help="run one path (used internally)")
parser.add_argument("--dtype", choices=list(PRECISIONS), default="fp32",
                    help="of the paths compared, or of --profile")
parser.add_argument("--profile", action="store_true", help="ours in --dtype under torch.profiler (see above)")

# --profile's groups: an op belongs to the first group whose words its name contains
OP_GROUPS = {"matmul": ("aten::mm", "aten::bmm", "aten::addmm"), "attention": ("scaled_dot_product",),
             "casts": ("aten::copy_", "aten::_to_copy"),
             "optimizer": ("lerp_", "addcdiv_", "addcmul_", "aten::sqrt", "_foreach")}  # AdamW's (not rsqrt)


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


def load_path(args, path):
    """(model, batches, a function doing one optimizer step on a batch and returning its loss) for a path."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    rows = load_split("gsm8k", "train", args.data_dir, args.n)
    records = [{"question": r["question"], "rationale": solution_to_rationale(r["solution"])} for r in rows]
    examples, _ = tokenize_examples(tok, records, 1024)
    batches = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    batches = batches[: args.steps] if args.steps else batches
    weights, autocast = PRECISIONS[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=weights).train()
    if path == "flash_bwd":
        attention.attention_backward = attention.flash_backward  # PackedFlashCPU's backward looks it up per call
    if path != "naive":
        use_packed_attention(model)  # what train.py's load_base does
        if not torch.cuda.is_available():
            keep_heap()  # and what train.py does on CPU before it loads the weights (the model is small beside them)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def step(batch):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = padded_loss(model, batch, tok.pad_token_id) if path == "naive" else \
                packed_loss(model, pack(batch, share_prefix=path != "unshared"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return model, batches, step


def run_path(args):
    model, batches, step = load_path(args, args.path)
    losses, real_tokens, t0 = [], 0, time.time()
    for batch in batches:
        losses.append(step(batch))
        real_tokens += sum(len(x) for x, _ in batch)
    seconds = time.time() - t0
    print(json.dumps({"seconds": seconds, "real_tokens": real_tokens, "steps": len(batches),
                      "padded_tokens": sum(len(b) * max(len(x) for x, _ in b) for b in batches),
                      "final_loss": sum(losses[-5:]) / len(losses[-5:]), "first_loss": losses[0], "losses": losses,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def matmul_flops(model, batches):
    """The matmuls' work in ours (FLOPs, multiply-adds x 2): forward and backward (x 3) of every linear layer on
    every token, the vocabulary projection only on learned tokens; attention's score products are not counted."""
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight  # tied: the same
    linear = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embedding and p is not head)
    tokens = sum(len(x) for b in batches for x, _ in b)
    learned = sum(sum(t != -100 for t in y) for b in batches for _, y in b)
    return 6 * (linear * tokens + head.numel() * learned)


def profile(args):
    """--profile: each group's share of the profiled steps' CPU time (self time: one op on 2 threads counts once), the
    matmuls' rate while they run against bench_matmul.py's, the top ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from bench_matmul import matmul_tflops

    model, batches, step = load_path(args, "ours")
    step(batches[0])  # warm-up: first-call allocations and kernel choices
    with torch_profile(activities=[ProfilerActivity.CPU]) as torch_profiler:
        t0 = time.time()
        for batch in batches[1:]:
            step(batch)
        seconds = time.time() - t0
    ops = torch_profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in ops)
    shares = dict.fromkeys([*OP_GROUPS, "the rest"], 0.0)
    for e in ops:
        group = next((g for g, words in OP_GROUPS.items() if any(w in e.key for w in words)), "the rest")
        shares[group] += e.self_cpu_time_total
    tokens = sum(len(x) for b in batches[1:] for x, _ in b)
    print(f"ours, {args.dtype}: {len(batches) - 1} steps in {seconds:.1f} s, {tokens / seconds:.1f} real tok/s")
    print("share of CPU time: " + ", ".join(f"{g} {100 * t / total:.1f}%" for g, t in shares.items()))
    flops = matmul_flops(model, batches[1:])
    rate, whole = flops / (shares["matmul"] / 1e6) / 1e12, flops / seconds / 1e12  # self times are in microseconds
    peak = matmul_tflops(torch.bfloat16 if args.dtype != "fp32" else torch.float32)
    print(f"matmuls: {1e3 * rate:.0f} GFLOP/s while they run, {1e3 * peak:.0f} GFLOP/s in bench_matmul.py's product "
          f"({100 * rate / peak:.0f}%); over the whole step {1e3 * whole:.0f} GFLOP/s ({100 * whole / peak:.0f}%)")
    print(ops.table(sort_by="self_cpu_time_total", row_limit=20))


def run_subprocess(args, path, dtype):
    """One path in its own process (its peak RSS is its own); its JSON result."""
    flags = ["--model", args.model, "--data_dir", args.data_dir, "--n", str(args.n), "--batch_size",
             str(args.batch_size), "--lr", str(args.lr)] + (["--steps", str(args.steps)] if args.steps else [])
    cmd = [sys.executable, os.path.abspath(__file__), "--path", path, "--dtype", dtype] + flags
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_result(name, r, width=5):
    print(f"{name:{width}s}: {r['steps']} steps in {r['seconds']:6.1f} s, {r['real_tokens'] / r['seconds']:6.1f} real tok/s "
          f"({r['real_tokens']} real of {r['padded_tokens']} padded tokens), loss {r['first_loss']:.4f} -> "
          f"{r['final_loss']:.4f} (mean of last 5 steps), peak RSS {r['peak_rss_gib']:.2f} GiB")


def compare_dtypes(args, dtypes):
    """Ours in each precision on the same batches: one line each, the loss curves side by side, speed ratios."""
    res = {}
    for dtype in dtypes:
        res[dtype] = run_subprocess(args, "ours", dtype)
        print_result(dtype, res[dtype], max(map(len, dtypes)))
    steps = len(res[dtypes[0]]["losses"])
    print("step  " + "  ".join(f"{d:>9s}" for d in dtypes))
    for i in sorted(set(range(0, steps, max(1, steps // 8))) | {steps - 1}):
        print(f"{i + 1:4d}  " + "  ".join(f"{res[d]['losses'][i]:9.4f}" for d in dtypes))
    speed = {d: res[d]["real_tokens"] / res[d]["seconds"] for d in dtypes}
    print(f"ratio (real tokens/s vs {dtypes[0]}): " + ", ".join(f"{d} {speed[d] / speed[dtypes[0]]:.2f}x"
                                                             for d in dtypes[1:]))


def main(argv=None):
    args = parser.parse_args(argv)
    if args.profile:
        return profile(args)
    if args.path:
        return run_path(args)
    if args.dtypes:
        return compare_dtypes(args, args.dtypes.split(","))
    paths = args.paths.split(",")  # a path named twice runs twice (in turns, against the cores' drift)
    if not set(paths) <= set(PATHS):
        parser.error(f"--paths: {args.paths!r}: name {', '.join(PATHS)}")
    res = [run_subprocess(args, path, args.dtype) for path in paths]
    for path, r in zip(paths, res):
        print_result(path, r, max(5, *map(len, paths)))
    runs = {}  # path -> its runs, in order
    for path, r in zip(paths, res):
        runs.setdefault(path, []).append(r)
    speed = {p: sum(r["real_tokens"] for r in rs) / sum(r["seconds"] for r in rs) for p, rs in runs.items()}
    first, *others = runs
    for path in others:
        print(f"ratio (real tokens/s, {path} / {first}): {speed[path] / speed[first]:.2f}x; final loss {path} "
              f"{runs[path][0]['final_loss']:.4f} vs {first} {runs[first][0]['final_loss']:.4f}")


if __name__ == "__main__":
    main()
