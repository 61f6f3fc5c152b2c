"""Where STaR + RPO loses on the arithmetic set: the column sums ("Tens: 4 + 6 + 1 = 11, write 1") that are false in
each run's test outputs, and how many of the rejected rationales' own column sums are true (DPO lowers the
likelihood of the whole rejected rationale, its true steps with its false one).

    python bench/rpo_errors.py --runs runs/rpo/human_seed runs/rpo/human_seed_rpo
"""
import argparse
import json
import os
import re

COLUMN_SUM = re.compile(r"(\d+) \+ (\d+)(?: \+ (\d+))? = (\d+), write")  # one column of the arithmetic scratchpad

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--runs", nargs="+", required=True,
                    help="bench/star_levers.py's run folders: their results/eval_iter{N}.jsonl and pairs files")
parser.add_argument("--iterations", type=int, default=3)


def count_column_sums(texts):
    """(column sums, false ones) over the texts."""
    sums = [(int(a) + int(b) + int(c or 0), int(s)) for t in texts for a, b, c, s in COLUMN_SUM.findall(t)]
    return len(sums), sum(x != s for x, s in sums)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def main(argv=None):
    args = parser.parse_args(argv)
    print("| run | iteration | test accuracy | false column sums in test outputs | false column sums in rejected "
          "rationales |\n|---|---|---|---|---|")
    for run in args.runs:
        for it in range(1, args.iterations + 1):
            outputs = os.path.join(run, "results", f"eval_iter{it}.jsonl")
            if not os.path.exists(outputs):
                continue
            rows = read_jsonl(outputs)
            n, bad = count_column_sums(r["completion"] for r in rows)
            pairs = os.path.join(run, "data", f"star_iter{it}_pairs.jsonl")
            rejected = [p["rejected"] for p in read_jsonl(pairs)] if os.path.exists(pairs) else []
            n_l, bad_l = count_column_sums(rejected)
            accuracy = 100 * sum(r["correct"] for r in rows) / len(rows)
            print(f"| {os.path.basename(run.rstrip('/'))} | {it} | {accuracy:.1f}% (n={len(rows)}) | {bad} of {n} "
                  f"({100 * bad / max(n, 1):.1f}%) | {bad_l} of {n_l} |")


if __name__ == "__main__":
    main()
