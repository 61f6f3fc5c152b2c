"""Which STaR levers help on the embedded model: each configuration runs the whole loop (bash run_star.sh,
3 iterations, the arithmetic set) in its own folder under runs/levers/; the choice is made on the dev slice
and the test split is only reported. Writes docs/levers.md (one table) and docs/levers.png.

    python bench/star_levers.py                       # every configuration below, then the table
    python bench/star_levers.py --only star,accumulate --table_only
    python bench/star_levers.py --only human_seed,human_seed_rpo --runs runs/rpo --run_star_args "--eval_samples 500" \
        --section rpo                                  # STaR against STaR + RPO, its own section of docs/levers.md
    python bench/star_levers.py --only human_seed_rpo_beta --runs runs/rpo \
        --run_star_args "--eval_samples 500 --iterations 1"  # one iteration of a variant

A configuration that shares its first stages with `star` (the same commands, so the same files: greedy runs
are deterministic) starts from hard links to them instead of computing them again: every configuration
shares the base model's evaluations and the vanilla SFT reference, `accumulate` (a no-op at iteration 1)
shares all of iteration 1, and `human_seed`'s iteration-0 model is star's vanilla SFT model; an `_rpo`
configuration shares iteration 0 and iteration 1's data with the configuration it changes (the same generations).
Each --section is one table of docs/levers.md, replaced when the same section is written again.
"""
import argparse
import glob
import os
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from summary import iteration_rows, rpo_examples  # noqa: E402

BASE = ["results/eval*_iter0.*"]  # the base model's evaluations: the same in every configuration
SFT = ["data/sft_train.*", "results/eval*_sft.*", "results/model_sft"]  # the same where training flags are
HUMAN_SEED = ["--human_seed", "96", "--max_samples", "192", "--tuned_k", "0", "--create_args",
              "--accumulate --check_steps filter"]
FIRST = ["data/star_iter0_*", "results/model_star_iter0", "results/eval*_iter0.*", "data/star_iter1_*"]
# name: (what it changes, run_star.sh arguments, stages shared with `star` or, as (config, stages), with another)
CONFIGS = {
    "star": ("the paper's STaR: greedy, Stage 2, 3 epochs on M_0's kept rationales", [], []),
    "accumulate": ("+ the previous iteration's kept rationales (duplicates removed)", ["--create_args", "--accumulate"],
                   BASE + SFT + ["data/star_iter1_*", "results/model_star_iter1", "results/eval*_iter1.*"]),
    "schedule": ("the paper's schedule: 40 steps at iteration 1, +20% each iteration",
                 ["--train_args", "--steps 40 --steps_growth 0.2"], BASE + ["data/star_iter1_*"]),
    "sample_filter": ("4 samples per question (T = 0.7), 2 kept at most, only all-steps-true rationales",
                      ["--create_args", "--num_samples 4 --max_per_question 2 --check_steps filter"], BASE + SFT),
    # iteration 0 is star's vanilla SFT model (the same command: 96 human rationales, the same training flags)
    "human_seed": ("a warm start: M_0 trained on 96 human rationales generates iteration 1; fine-tuned generators "
                   "prompted zero-shot; 192 train questions per iteration; only all-steps-true rationales kept, "
                   "carried over with the seed",
                   HUMAN_SEED,
                   [("data/sft_train.jsonl", "data/star_iter0_train.jsonl"),
                    ("data/sft_train.jsonl.stats.json", "data/star_iter0_train.jsonl.stats.json"),
                    ("results/model_sft", "results/model_star_iter0")]),
    "human_seed_rpo": ("human_seed, each iteration STaR's SFT of M_0, then a preference phase from that model at "
                       "--pref_lr: DPO + NLL (Iterative RPO) on the pairs of a kept rationale and a Stage-1 rationale "
                       "that lost (before f79ba5f's successor: one phase from M_0 at the SFT rate)",
                       HUMAN_SEED + ["--objective", "rpo"], ("human_seed", FIRST)),
    "human_seed_rpo_pairs_only": ("human_seed_rpo on the pairs alone (train.py --pairs_only, the paper's set): "
                                  "the kept rationales with no loser are not trained on",
                                  HUMAN_SEED + ["--objective", "rpo", "--train_args", "--pairs_only"],
                                  ("human_seed", FIRST)),
    "human_seed_rpo_beta": ("human_seed_rpo with DPO's beta 0.01 instead of 0.1: a tenth of its gradient",
                            HUMAN_SEED + ["--objective", "rpo", "--train_args", "--beta 0.01"], ("human_seed", FIRST)),
    "star_rpo": ("star, each iteration STaR's SFT, then a preference phase (DPO + NLL, Iterative RPO) on its pairs "
                 "(before f79ba5f's successor: one phase from M_0 at the SFT rate)", ["--objective", "rpo"],
                 BASE + ["data/star_iter1_*"]),
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations, in this order")
parser.add_argument("--runs", default="runs/levers", help="one folder per configuration")
parser.add_argument("--table_only", action="store_true", help="write the table from the runs already there")
parser.add_argument("--run_star_args", default="--sft", help="arguments every configuration passes to run_star.sh")
parser.add_argument("--section", default="levers",
                    help="the section of docs/levers.md (and docs/levers_<section>.png) this command writes")


def link_shared(src, dst, patterns):
    """Hard links (no copy) of the stages `dst` shares with `src`: a glob pattern keeps the path, a
    (path, new path) pair renames it."""
    for pattern in patterns:
        pattern, rename = pattern if isinstance(pattern, tuple) else (pattern, None)
        for path in glob.glob(os.path.join(src, pattern)):
            target = os.path.join(dst, rename or os.path.relpath(path, src))
            if os.path.exists(target):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.isdir(path):
                shutil.copytree(path, target, copy_function=os.link)
            else:
                os.link(path, target)


def run_config(name, args):
    folder = os.path.join(args.runs, name)
    os.makedirs(folder, exist_ok=True)
    shared = CONFIGS[name][2]
    source, shared = shared if isinstance(shared, tuple) and isinstance(shared[1], list) else ("star", shared)
    if name != source:
        link_shared(os.path.join(args.runs, source), folder, shared)
    cmd = ["bash", os.path.join(ROOT, "run_star.sh"), *args.run_star_args.split(), *CONFIGS[name][1]]
    print(f"== {name}: (cd {folder} && {' '.join(cmd)})", flush=True)
    t0 = time.time()
    with open(os.path.join(folder, "run.log"), "a") as log:
        code = subprocess.call(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    print(f"   exit {code} after {(time.time() - t0) / 60:.1f} min (log: {folder}/run.log)", flush=True)
    return code


def pct(x):
    return "" if x is None else f"{100 * x:.1f}%"


def examples(row):
    """What an iteration trained on: its kept examples, and how many of them as pairs under --objective rpo."""
    return rpo_examples(row) if row["rpo"] else "" if row["kept"] is None else row["kept"]


def levers_table(names, args, iterations):
    """One row per (configuration, iteration); the dev-chosen row of each configuration in bold (none without
    dev scores); a configuration that stopped early says after which iteration."""
    lines = ["| configuration | iteration | dev accuracy | test accuracy | correct, all steps true (test) "
             "| training examples (of them pairs) | minutes |", "|---|---|---|---|---|---|---|"]
    curves = {}
    for name in names:
        folder = os.path.join(args.runs, name)
        rows = iteration_rows(os.path.join(folder, "results"), os.path.join(folder, "data"))
        star = [r for r in rows if r["label"] != "vanilla SFT"]
        scored = [r for r in star if r["dev"] is not None]
        best = max(scored, key=lambda r: (r["dev"], -int(r["label"])), default=None)
        curves[name] = star
        sft, star_sft = (os.path.join(f, "results", "eval_sft.json") for f in (folder, os.path.join(args.runs, "star")))
        linked = name != "star" and os.path.exists(sft) and os.path.exists(star_sft) and os.path.samefile(sft, star_sft)
        for r in star if linked else rows:  # an SFT row linked from star's is shown once, under star
            mark = "**" if r is best else ""
            lines.append(f"| {name} | {mark}{r['label']}{mark} | {pct(r['dev'])} | {pct(r['accuracy'])} (n={r['n']}) | "
                         f"{pct(r['faithful'])} | {examples(r)} | {r['minutes']:.1f} |")
        if len(star) < iterations + 1:
            done = f"stopped after iteration {len(star) - 1}" if star else "did not run"
            lines.append(f"| {name} | {done} | | | | | see {folder}/run.log |")
    return "\n".join(lines) + "\n", curves


def levers_plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, rows in curves.items():
        scored = [r for r in rows if r["dev"] is not None]
        ax1.plot([int(r["label"]) for r in scored], [100 * r["dev"] for r in scored], "o-", label=name)
        ax2.plot([int(r["label"]) for r in rows], [100 * r["accuracy"] for r in rows], "o-", label=name)
    ax1.set(xlabel="iteration", ylabel="accuracy (%)", title="dev (choose)")
    ax2.set(xlabel="iteration", title="test (report)")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parser.parse_args(argv)
    names = args.only.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"error: unknown configuration {unknown[0]!r} (choose from {', '.join(CONFIGS)})")
    t0 = time.time()
    if not args.table_only:
        for name in names:
            run_config(name, args)
    words = args.run_star_args.split()
    iterations = int(words[words.index("--iterations") + 1]) if "--iterations" in words else 3  # run_star.sh's default
    table, curves = levers_table(names, args, iterations)
    configs = "\n".join(f"- `{n}`: {CONFIGS[n][0]} (`bash run_star.sh {args.run_star_args} {shlex.join(CONFIGS[n][1])}`)"
                        for n in names)
    plot = "levers.png" if args.section == "levers" else f"levers_{args.section}.png"
    command = shlex.join(["python", "bench/star_levers.py", *(argv if argv is not None else sys.argv[1:])])
    write_section(os.path.join(ROOT, "docs", "levers.md"), args.section,
                  f"Written by `{command}`. Configurations:\n\n{configs}\n\n{table}\n"
                  f"![dev and test accuracy by iteration]({plot})\n")
    levers_plot(curves, os.path.join(ROOT, "docs", plot))
    print(table + f"wrote section {args.section} of docs/levers.md and docs/{plot} ({(time.time() - t0) / 60:.1f} min)")


def write_section(path, name, text):
    """Put `text` into docs/levers.md between its section's markers, replacing the section's old text; a new section
    goes at the end. The other sections stay as their own commands wrote them."""
    begin, end = f"<!-- section {name} -->\n", f"<!-- end section {name} -->\n"
    doc = open(path).read() if os.path.exists(path) else "# STaR levers on the embedded model\n"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        doc = head + begin + text + end + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + begin + text + end
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(doc)


if __name__ == "__main__":
    main()
