"""The cores' matmul rate, the yardstick for training's tokens/s: a 2048x576 @ 576x1536 matmul (the embedded model's
MLP shape at 2,048 tokens) in bf16 and fp32, on the threads torch uses for training. bench/gpu_check.py --tiny divides
train.py's FLOP/s by the same bf16 measurement (matmul_tflops).

    python bench/bench_matmul.py                 # GFLOP/s per dtype
    python bench/bench_matmul.py --threads 2 --shape 4096,576,1536
"""
import argparse
import time

import torch

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shape", default="2048,576,1536", help="M,K,N: (M x K) @ (K x N)")
parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
parser.add_argument("--seconds", type=float, default=2.0, help="time spent multiplying per dtype")


def matmul_tflops(dtype=torch.bfloat16, shape=(2048, 576, 1536), seconds=2.0):
    """Multiply-adds x 2 per second of an (M x K) @ (K x N) product in `dtype`, in TFLOP/s, after one warm-up product."""
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - t0) / 1e12


def main(argv=None):
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(x) for x in args.shape.split(","))
    for dtype in (torch.bfloat16, torch.float32):
        rate = 1000 * matmul_tflops(dtype, shape, args.seconds)
        print(f"matmul {'x'.join(map(str, shape))} {str(dtype).split('.')[1]:8s} {rate:7.0f} GFLOP/s "
              f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
