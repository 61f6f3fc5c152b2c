"""Token lengths of the reference rationales (what --max_new_tokens defaults are sized from).

    python bench/rationale_lengths.py --data_dir ../shared/gsm8k
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import load_split, solution_to_rationale  # noqa: E402
from models import load_tokenizer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--data_dir", default=os.environ.get("GSM8K_DIR", "../shared/gsm8k"))
parser.add_argument("--tokenizer", default="smollm2-135m")

if __name__ == "__main__":
    args = parser.parse_args()
    tok = load_tokenizer(args.tokenizer)
    for dataset in ("gsm8k", "arithmetic"):
        lengths = sorted(len(tok(solution_to_rationale(r["solution"])).input_ids)
                         for r in load_split(dataset, "train", args.data_dir))
        n = len(lengths)
        print(f"{dataset}: {n} train rationales, tokens median {lengths[n // 2]}, "
              f"99th percentile {lengths[int(0.99 * n)]}, longest {lengths[-1]}")
