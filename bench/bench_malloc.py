"""train.py's glibc setting on CPU, side by side: its heap that keeps what is freed (memory.keep_heap: no block mapped,
none handed back) against its earlier ways, a trim of the heap after each optimizer step and before that a fixed mmap
threshold of 128 KiB, and glibc's default, on the same rows and steps.
Prints wall time, user and system CPU time, peak RSS and minor page faults of each run, each in its own process, and
its RSS after each optimizer step (how the kept heap grows).

    python bench/bench_malloc.py --train_file runs/rpo/human_seed/data/star_iter1_train.jsonl --steps 8
    python bench/bench_malloc.py --train_file data/sft_train.jsonl --steps 36 --variants trim,heap,trim,heap
    python bench/bench_malloc.py --train_file ... --variants 128,4096,32768,glibc_default,128   # thresholds in KiB
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
parser.add_argument("--variants", default="heap,trim,glibc_default,heap",
                    help="in order, each in its own process: heap (train.py's: M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB), "
                         "trim (train.py's earlier: glibc's default, malloc_trim after each optimizer step), an mmap "
                         "threshold in KiB (before that: 128), glibc_default, "
                         "arenaN (glibc's default threshold with at most N malloc arenas), or thp<one of those> (torch's "
                         "THP_MEM_ALLOC_ENABLE: huge pages for its large blocks); the first again at the end shows the machine did not drift")
parser.add_argument("--variant", help="run one variant in this process")


def run_variant(args):
    label = args.variant
    if args.variant.startswith("thp"):  # torch's CPU allocator advises huge pages for its large blocks: 2 MiB faults
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # read once, at torch's first allocation
        args.variant = args.variant[3:] or "glibc_default"
    import memory
    import train

    if args.variant != "heap":  # train.py's own (memory.keep_heap): every block from the heap, kept there
        train.keep_heap = lambda: None  # the variant decides
    if args.variant == "trim":  # train.py's earlier: glibc's default, free heap pages handed back after each step
        loss = train.training_loss
        train.training_loss = lambda *a: (memory.LIBC.malloc_trim(0), loss(*a))[1]  # before each step's forward
    elif args.variant.startswith("arena"):  # glibc's dynamic threshold, at most N malloc arenas (M_ARENA_MAX)
        memory.LIBC.mallopt(-8, int(args.variant[5:]))
    elif args.variant not in ("heap", "glibc_default"):  # a threshold in KiB, set before anything is allocated
        memory.set_mmap_threshold(int(args.variant) * 1024)
    rss, bound = [], train.bound_heap
    train.bound_heap = lambda plan: (rss.append(memory.rss_gib()), bound(plan))  # after each optimizer step
    t0 = time.time()
    train.main(["--train_file", args.train_file, "--base_model", args.base_model, "--steps", str(args.steps),
                "--lr", "1e-4", "--batch_size", str(args.batch_size), "--report_to", "none", "--overwrite",
                "--output_dir", os.path.join(args.output_dir, args.variant)])
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"RESULT {label:13s} wall {time.time() - t0:6.1f} s | user {ru.ru_utime:6.1f} s | sys "
          f"{ru.ru_stime:5.1f} s | peak RSS {ru.ru_maxrss / 2**20:.2f} GiB | minor faults {ru.ru_minflt}")
    print(f"RSS    {label:13s} after each step (GiB): {' '.join(f'{r:.2f}' for r in rss)}")


def main(argv=None):
    args = parser.parse_args(argv)
    if args.variant:
        return run_variant(args)
    for variant in args.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--train_file", args.train_file, "--base_model",
                              args.base_model, "--steps", str(args.steps), "--batch_size", str(args.batch_size),
                              "--output_dir", args.output_dir, "--variant", variant], capture_output=True, text=True)
        plan = next((line for line in out.stdout.splitlines() if line.startswith("memory total")), "")
        result = next((line for line in out.stdout.splitlines() if line.startswith("RESULT")), out.stderr[-500:])
        heap = next((line.split()[2] for line in out.stdout.splitlines() if line.startswith("memory heap")), "?")
        print(f"{result} | plan {plan.split()[2] if plan else '?'} GiB (heap {heap})", flush=True)
        print(next((line for line in out.stdout.splitlines() if line.startswith("RSS ")), ""), flush=True)


if __name__ == "__main__":
    main()
