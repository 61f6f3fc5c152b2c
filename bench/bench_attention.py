"""Packed causal attention on CPU, forward + backward of one layer: train.py's kernel against two batched layouts.

    python bench/bench_attention.py                       # the demo's rows: 8 sequences of 169-214 tokens, bf16
    python bench/bench_attention.py --dtype fp32 --repeats 50

per_seq      train.py's attention.PackedFlashCPU: SDPA's CPU flash kernel per sequence, and attention_backward
             (explicit matmuls recomputing the probabilities from the kernel's log-sum-exp) for its backward
flash_bwd    the same forward with the flash kernel's own backward (train.py's kernel until 2026-12-08)
padded_flash the sequences right-padded into one [batch, heads, longest, dim] batch, one flash call and one backward
             (a causal query never sees the padding after it, so no mask is needed)
padded_math  the same batch as explicit bf16 matmuls with an fp32 softmax, saving only the output and the
             log-sum-exp and recomputing the probabilities in the backward (no [T, T] matrix kept between passes)

Each is checked against fp32 SDPA per sequence (largest difference of the output and of each gradient), then
timed in turns on the same tensors: milliseconds per layer for the forward and the backward together, and for the
forward alone. The 135M model has 30 layers, 9 query heads of 64 (its 3 kv heads repeated to them, as train.py does).
"""
import argparse
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from attention import PackedFlashCPU, flash_backward  # noqa: E402

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--lengths", default="176,190,214,183,201,169,195,188", help="the packed row's sequence lengths")
parser.add_argument("--heads", type=int, default=9)
parser.add_argument("--dim", type=int, default=64)
parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
parser.add_argument("--repeats", type=int, default=30, help="layers timed per variant and round")
parser.add_argument("--rounds", type=int, default=3)


@functools.lru_cache(maxsize=8)
def padding(bounds):
    """Once per packed row, as a kernel would for its 30 layers: (batch, longest, gather [batch * longest] packed
    positions with each sequence's last repeated as padding, scatter [T] the packed positions' places in the padded
    batch)."""
    spans = list(zip(bounds, bounds[1:]))
    longest = max(b - a for a, b in spans)
    gather = torch.tensor([min(a + t, b - 1) for a, b in spans for t in range(longest)])
    scatter = torch.tensor([i * longest + t for i, (a, b) in enumerate(spans) for t in range(b - a)])
    return len(spans), longest, gather, scatter


def to_padded(t, batch, longest, gather):  # [1, H, T, D] -> [batch, H, longest, D]
    return t[0].index_select(1, gather).view(t.shape[1], batch, longest, t.shape[3]).transpose(0, 1)


def to_packed(t, scatter):  # [batch, H, longest, D] -> [1, H, T, D]
    return t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[3]).index_select(1, scatter)[None]


def grad_to_padded(grad, batch, longest, scatter):  # zeros at the padding
    padded = grad.new_zeros(grad.shape[1], batch * longest, grad.shape[3])
    padded.index_copy_(1, scatter, grad[0])
    return padded.view(grad.shape[1], batch, longest, grad.shape[3]).transpose(0, 1)


def padded_forward(ctx, q, k, v, bounds, scale, kernel):
    """Pad q, k, v, run kernel(qp, kp, vp, scale) -> (out, lse), save what the backward needs, unpad the output."""
    batch, longest, gather, scatter = padding(bounds)
    qp, kp, vp = (to_padded(t, batch, longest, gather) for t in (q, k, v))
    out, lse = kernel(qp, kp, vp, scale)
    ctx.save_for_backward(qp, kp, vp, out, lse, scatter)
    ctx.scale, ctx.batch, ctx.longest = scale, batch, longest
    return to_packed(out, scatter)


class PaddedFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bounds, scale):
        return padded_forward(ctx, q, k, v, bounds, scale, lambda *a: FLASH(*a[:3], 0.0, True, scale=a[3])[:2])

    @staticmethod
    def backward(ctx, grad):
        qp, kp, vp, out, lse, scatter = ctx.saved_tensors
        g = grad_to_padded(grad, ctx.batch, ctx.longest, scatter)
        grads = FLASH_BACKWARD(g, qp, kp, vp, out, lse, 0.0, True, scale=ctx.scale)
        return (*(to_packed(t, scatter) for t in grads), None, None)


def probabilities(qp, kp, lse, scale):
    """fp32 softmax probabilities [batch, H, L, L] from the scores and the rows' log-sum-exp."""
    s = torch.matmul(qp, kp.transpose(-1, -2)).float().mul_(scale)
    s.masked_fill_(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return s if lse is None else torch.exp_(s.sub_(lse))


def softmax_attention(qp, kp, vp, scale):
    """(out, lse) by explicit matmuls: bf16 products, fp32 softmax."""
    s = probabilities(qp, kp, None, scale)
    lse = torch.logsumexp(s, -1, keepdim=True)
    return torch.matmul(torch.exp_(s.sub_(lse)).to(qp.dtype), vp), lse


class PaddedMath(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bounds, scale):
        return padded_forward(ctx, q, k, v, bounds, scale, softmax_attention)

    @staticmethod
    def backward(ctx, grad):
        qp, kp, vp, out, lse, scatter = ctx.saved_tensors
        do = grad_to_padded(grad, ctx.batch, ctx.longest, scatter)
        p = probabilities(qp, kp, lse, ctx.scale)
        dv = torch.matmul(p.to(do.dtype).transpose(-1, -2), do)
        delta = (do.float() * out.float()).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        ds = p.mul_(torch.matmul(do, vp.transpose(-1, -2)).float().sub_(delta)).mul_(ctx.scale).to(qp.dtype)
        dq, dk = torch.matmul(ds, kp), torch.matmul(ds.transpose(-1, -2), qp)
        return to_packed(dq, scatter), to_packed(dk, scatter), to_packed(dv, scatter), None, None


VARIANTS = {"per_seq": PackedFlashCPU.apply,
            "flash_bwd": lambda q, k, v, bounds, scale: PackedFlashCPU.apply(q, k, v, bounds, scale, 0, flash_backward),
            "padded_flash": PaddedFlash.apply, "padded_math": PaddedMath.apply}


def reference(q, k, v, grad, bounds, scale):
    """fp32 SDPA per sequence: the output and the gradients of q, k, v."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                                      is_causal=True, scale=scale)
                     for a, b in zip(bounds, bounds[1:])], 2)
    out.backward(grad.float())
    return out.detach(), q.grad, k.grad, v.grad


def run(fn, q, k, v, grad, bounds, scale):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, bounds, scale)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def main(argv=None):
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    bounds = (0, *torch.tensor(lengths).cumsum(0).tolist())
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(1, args.heads, bounds[-1], args.dim, dtype=dtype) for _ in range(4))
    scale = args.dim ** -0.5
    print(f"{len(lengths)} sequences of {min(lengths)}-{max(lengths)} tokens, {args.heads} heads of {args.dim}, "
          f"{args.dtype}, {torch.get_num_threads()} threads")
    expected = reference(q, k, v, grad, bounds, scale)
    for name, fn in VARIANTS.items():
        got = run(fn, q, k, v, grad, bounds, scale)
        errors = ", ".join(f"{what} {(a.float() - b).abs().max().item():.4f}"
                           for what, a, b in zip(("out", "dq", "dk", "dv"), got, expected))
        print(f"{name:13s} largest difference from fp32: {errors}")
    for r in range(args.rounds):
        for name, fn in VARIANTS.items():
            start = time.perf_counter()
            for _ in range(args.repeats):
                run(fn, q, k, v, grad, bounds, scale)
            middle = time.perf_counter()
            with torch.no_grad():
                for _ in range(args.repeats):
                    fn(q, k, v, bounds, scale)
            end = time.perf_counter()
            print(f"round {r + 1} {name:13s} forward + backward {(middle - start) / args.repeats * 1e3:6.2f} ms, "
                  f"forward {(end - middle) / args.repeats * 1e3:6.2f} ms per layer")


if __name__ == "__main__":
    main()
