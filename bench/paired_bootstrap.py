"""Paired bootstrap of two models' accuracies on the same questions (evaluate.py --save_results files).

Resamples the questions (with replacement) and recomputes both accuracies on each draw, so the spread of the
difference counts that the two models saw the same questions (Efron & Tibshirani 1993, ch. 16; as in
Koehn 2004 for MT). Prints each accuracy with its standard error, the difference, its 95% interval and the
share of draws where B is not above A (a one-sided p for "B beats A").

    python bench/paired_bootstrap.py results/eval_iter3.jsonl runs/step/results/eval_iter3.jsonl
    python bench/paired_bootstrap.py A.jsonl B.jsonl --field faithful_correct --draws 10000
"""
import argparse
import json
import math
import random
import sys

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("a", help="per-question results of model A (evaluate.py --save_results: results/eval_X.jsonl)")
parser.add_argument("b", help="per-question results of model B, on the same questions")
parser.add_argument("--field", default="correct", help="the per-question boolean compared: correct (strict), "
                    "flexible_correct or faithful_correct (right with all steps true)")
parser.add_argument("--draws", type=int, default=10_000, help="bootstrap resamples")
parser.add_argument("--seed", type=int, default=0)


def read_outcomes(path, field):
    """{question id: 0 or 1} from an evaluate.py per-question file."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows or field not in rows[0]:
        raise SystemExit(f"error: {path} holds no '{field}' field (an evaluate.py --save_results .jsonl is needed)")
    return {row["id"]: int(bool(row[field])) for row in rows}


def paired_bootstrap(a, b, draws, seed):
    """(differences B - A in accuracy, one per resample of the questions), sorted."""
    rng, n = random.Random(seed), len(a)
    diffs = []
    for _ in range(draws):
        picks = [rng.randrange(n) for _ in range(n)]
        diffs.append(sum(b[i] - a[i] for i in picks) / n)
    return sorted(diffs)


def main(argv=None):
    args = parser.parse_args(argv)
    if args.draws < 100:
        sys.exit("error: --draws must be at least 100")
    a, b = read_outcomes(args.a, args.field), read_outcomes(args.b, args.field)
    if a.keys() != b.keys():
        sys.exit(f"error: the two files score different questions ({len(a)} and {len(b)} ids, "
                 f"{len(a.keys() & b.keys())} shared)")
    ids = sorted(a)
    a, b = [a[i] for i in ids], [b[i] for i in ids]
    n = len(ids)
    diffs = paired_bootstrap(a, b, args.draws, args.seed)
    acc_a, acc_b = sum(a) / n, sum(b) / n
    se = lambda p: math.sqrt(p * (1 - p) / n)  # noqa: E731  (binomial standard error, one model)
    low, high = diffs[int(0.025 * args.draws)], diffs[int(0.975 * args.draws) - 1]
    p = sum(d <= 0 for d in diffs) / args.draws
    print(f"{args.field} on {n} questions: A {100 * acc_a:.1f}% (se {100 * se(acc_a):.1f}), "
          f"B {100 * acc_b:.1f}% (se {100 * se(acc_b):.1f})")
    print(f"B - A {100 * (acc_b - acc_a):+.1f} pts, 95% interval [{100 * low:+.1f}, {100 * high:+.1f}], "
          f"P(B - A <= 0) = {p:.3f} ({args.draws} paired resamples, seed {args.seed}); "
          f"only A right {sum(x > y for x, y in zip(a, b))}, only B right {sum(y > x for x, y in zip(a, b))}")
    return acc_b - acc_a, low, high, p


if __name__ == "__main__":
    main()
