"""train.py's glibc setting on CPU, side by side: its mmap threshold of 128 KiB (memory.lower_mmap_threshold, which keeps the
host's peak near the memory plan) against glibc's default, on the same rows for the same steps. Prints wall time,
user and system CPU time, peak RSS and minor page faults of each run, each in its own process.

    python bench/bench_malloc.py --train_file runs/rpo/human_seed/data/star_iter1_train.jsonl --steps 8
"""
import argparse
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--train_file", required=True)
parser.add_argument("--base_model", default="smollm2-135m")
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--batch_size", type=int, default=8)
parser.add_argument("--output_dir", default="/tmp/bench_malloc")
parser.add_argument("--variant", choices=("threshold", "glibc_default"), help="run one variant in this process")


def run_variant(args):
    import train

    if args.variant == "glibc_default":
        train.lower_mmap_threshold = lambda: None
    t0 = time.time()
    train.main(["--train_file", args.train_file, "--base_model", args.base_model, "--steps", str(args.steps),
                "--lr", "1e-4", "--batch_size", str(args.batch_size), "--report_to", "none", "--overwrite",
                "--output_dir", os.path.join(args.output_dir, args.variant)])
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"RESULT {args.variant:13s} wall {time.time() - t0:6.1f} s | user {ru.ru_utime:6.1f} s | sys "
          f"{ru.ru_stime:5.1f} s | peak RSS {ru.ru_maxrss / 2**20:.2f} GiB | minor faults {ru.ru_minflt}")


def main(argv=None):
    args = parser.parse_args(argv)
    if args.variant:
        return run_variant(args)
    for variant in ("threshold", "glibc_default", "threshold"):  # the first again: the machine did not drift
        out = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                              "--variant", variant], capture_output=True, text=True)
        print(next((line for line in out.stdout.splitlines() if line.startswith("RESULT")), out.stderr[-500:]),
              flush=True)


if __name__ == "__main__":
    main()
