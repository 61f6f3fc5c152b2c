"""The cores' matmul rate, the yardstick for training's tokens/s: a 2048x576 @ 576x1536 matmul (the embedded model's
MLP shape at 2,048 tokens) in bf16 and fp32, on the threads torch uses for training.

    python bench/bench_matmul.py                 # GFLOP/s per dtype
    python bench/bench_matmul.py --threads 2 --shape 4096,576,1536
"""
import argparse
import time

import torch

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shape", default="2048,576,1536", help="M,K,N: (M x K) @ (K x N)")
parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
parser.add_argument("--repeats", type=int, default=30)


def gflops(m, k, n, dtype, repeats):
    """Multiply-adds x 2 per second, in GFLOP/s, after 3 warm-up products."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - t0) / 1e9


def main(argv=None):
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    m, k, n = (int(x) for x in args.shape.split(","))
    for dtype in (torch.bfloat16, torch.float32):
        print(f"matmul {m}x{k}x{n} {str(dtype).split('.')[1]:8s} {gflops(m, k, n, dtype, args.repeats):7.0f} GFLOP/s "
              f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
