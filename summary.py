"""Summarize a STaR loop: one row per iteration (test accuracy, faithful share, Stage-1/2 success,
training examples) from results/eval_*.json and data/*.stats.json, as a table and a plot.

    python summary.py                       # writes results/summary.md and results/summary.png
    python summary.py --results_dir results --data_dir data
"""
import argparse
import json
import os
import re

from common import StarError, cli_errors, write_text

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--results_dir", default="results", help="where evaluate.py wrote eval_iter{N}.json (and eval_sft.json)")
parser.add_argument("--data_dir", default="data", help="where create_data.py wrote star_iter{N}_train.jsonl.stats.json")
parser.add_argument("--debug", action="store_true")


def iteration_rows(results_dir="results", data_dir="data"):
    """One row per evaluated iteration (plus vanilla SFT from eval_sft.json when present)."""
    rows = []
    for name in sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []:
        m = re.fullmatch(r"eval_(iter(\d+)|sft)\.json", name)
        if not m:
            continue
        with open(os.path.join(results_dir, name)) as f:
            ev = json.load(f)
        stats_path = os.path.join(data_dir, f"star_iter{m.group(2)}_train.jsonl.stats.json")
        stats = {}
        if m.group(2) and os.path.exists(stats_path):
            with open(stats_path) as f:
                stats = json.load(f)
        rows.append({"label": "vanilla SFT" if m.group(1) == "sft" else m.group(2), "accuracy": ev["accuracy"],
                     "faithful": ev.get("accuracy_faithful"), "n": ev["n"], "k": ev["k"], "stage1": stats.get("stage1_correct"), "stage2": stats.get("stage2_correct"),
                     "kept1": stats.get("stage1_kept", stats.get("stage1_correct")),
                     "kept2": stats.get("stage2_kept", stats.get("stage2_correct")),
                     "seen": stats.get("questions_seen"), "kept": stats.get("total_kept")})
    star = sorted((r for r in rows if r["label"] != "vanilla SFT"), key=lambda r: int(r["label"]))
    return star + [r for r in rows if r["label"] == "vanilla SFT"]


def summary_table(rows):
    lines = ["| iteration | accuracy | change | correct, all steps true | Stage-1 success | Stage-2 success "
             "| training examples |", "|---|---|---|---|---|---|---|"]
    prev = None
    for r in rows:
        change = "" if prev is None or r["label"] == "vanilla SFT" else f"{100 * (r['accuracy'] - prev):+.1f} pts"
        s1 = f"{r['stage1']}/{r['seen']}" if r["seen"] else ""
        s2 = f"{r['stage2']}/{r['seen'] - r['stage1']}" if r["seen"] and r["stage2"] is not None else ""
        shots = f" ({r['k']}-shot)" if r["k"] else ""
        faithful = f"{100 * r['faithful']:.1f}%" if r["faithful"] is not None else ""
        lines.append(f"| {r['label']}{shots} | {100 * r['accuracy']:.1f}% (n={r['n']}) | {change} | {faithful} | {s1} | {s2} | "
                     f"{r['kept'] if r['kept'] is not None else ''} |")
        prev = r["accuracy"] if r["label"] != "vanilla SFT" else prev
    return "\n".join(lines) + "\n"


def summary_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    star = [r for r in rows if r["label"] != "vanilla SFT"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([int(r["label"]) for r in star], [100 * r["accuracy"] for r in star], "o-", label="STaR")
    for r in rows:
        if r["label"] in ("0", "vanilla SFT"):
            ax1.axhline(100 * r["accuracy"], ls="--", color="gray" if r["label"] == "0" else "tab:red",
                        label="base model" if r["label"] == "0" else "vanilla SFT")
    ax1.set(xlabel="iteration", ylabel="test accuracy (%)", title="Accuracy by iteration")
    ax1.set_xticks([int(r["label"]) for r in star])
    ax1.legend()
    it = [r for r in star if r["kept"] is not None]
    x = [int(r["label"]) for r in it]
    ax2.bar(x, [r["kept1"] for r in it], label="Stage 1 (rationale)")
    ax2.bar(x, [r["kept2"] or 0 for r in it], bottom=[r["kept1"] for r in it], label="Stage 2 (rationalization)")
    ax2.set(xlabel="iteration", ylabel="kept rationales (count)", title="Training examples by stage")
    ax2.set_xticks(x)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parser.parse_args(argv)
    with cli_errors(args.debug):
        rows = iteration_rows(args.results_dir, args.data_dir)
        if not rows:
            raise StarError(f"no {args.results_dir}/eval_iter*.json to summarize")
        table = summary_table(rows)
        write_text(os.path.join(args.results_dir, "summary.md"), table)
        summary_plot(rows, os.path.join(args.results_dir, "summary.png"))
        print(table + f"wrote {args.results_dir}/summary.md and {args.results_dir}/summary.png")


if __name__ == "__main__":
    main()
