"""Summarize a STaR loop: one row per iteration (test accuracy, flexible - strict gap, faithful share, Stage-1/2
success, training examples, and how many as pairs where the iteration trained with --objective rpo or step_rpo) from
results/eval_*.json and data/*.stats.json, as a table and a plot.

    python summary.py                       # writes results/summary.md and results/summary.png
    python summary.py --results_dir results --data_dir data
"""
import argparse
import json
import os
import re

from common import StarError, cli_errors, write_text

PREFERENCE = {"rpo": "RPO", "step_rpo": "step RPO"}  # train_stats.json's objective -> the row's label

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--results_dir", default="results", help="where evaluate.py wrote eval_iter{N}.json (and eval_sft.json)")
parser.add_argument("--data_dir", default="data", help="where create_data.py wrote star_iter{N}_train.jsonl.stats.json")
parser.add_argument("--debug", action="store_true")


def read_json(path):
    """The JSON file's contents, or {} when the stage did not write it."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def iteration_rows(results_dir="results", data_dir="data"):
    """One row per evaluated iteration (plus vanilla SFT from eval_sft.json when present): test and dev
    accuracy, faithful share, Stage-1/2 counts, training examples and the minutes the iteration took."""
    rows = []
    for name in sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []:
        m = re.fullmatch(r"eval_(iter(\d+)|sft)\.json", name)
        if not m:
            continue
        ev, dev = read_json(os.path.join(results_dir, name)), read_json(os.path.join(results_dir, f"eval_dev_{m.group(1)}.json"))
        data_name, model = (f"star_iter{m.group(2)}_train", f"model_star_iter{m.group(2)}") if m.group(2) else ("sft_train", "model_sft")
        stats = read_json(os.path.join(data_dir, f"{data_name}.jsonl.stats.json"))
        trained = read_json(os.path.join(results_dir, model, "train_stats.json"))
        phase = read_json(os.path.join(results_dir, model + "_sft", "train_stats.json"))  # a preference run's SFT phase
        seconds = sum(x.get("seconds", 0) for x in (ev, dev, stats, trained, phase))
        rows.append({"label": "vanilla SFT" if m.group(1) == "sft" else m.group(2), "accuracy": ev["accuracy"],
                     "flexible": ev.get("accuracy_flexible"),
                     "dev": dev.get("accuracy"), "dev_n": dev.get("n"),
                     "faithful": ev.get("accuracy_faithful"), "n": ev["n"], "k": ev["k"],
                     "stage1": stats.get("stage1_correct"), "stage2": stats.get("stage2_correct"),
                     "kept1": stats.get("stage1_kept", stats.get("stage1_correct")),
                     "kept2": stats.get("stage2_kept", stats.get("stage2_correct")),
                     "seen": stats.get("questions_seen"), "kept": stats.get("total_kept"), "minutes": seconds / 60,
                     "seed": bool(m.group(2) and stats.get("args", {}).get("human_rationales")),  # run_star --human_seed
                     "rpo": PREFERENCE.get(trained.get("objective")), "pairs": trained.get("pairs", stats.get("pairs")),
                     "trained": trained.get("examples")})
    star = sorted((r for r in rows if r["label"] != "vanilla SFT"), key=lambda r: int(r["label"]))
    return star + [r for r in rows if r["label"] == "vanilla SFT"]


def rpo_examples(row):
    """What an --objective rpo (step_rpo) iteration trained on: '143 (37 pairs)', or '37 pairs' alone (--pairs_only)."""
    unpaired = (row["trained"] or 0) - (row["pairs"] or 0)
    return f"{row['trained']} ({row['pairs']} pairs)" if unpaired > 0 else f"{row['pairs']} pairs"


def summary_table(rows):
    # flexible - strict: right answers (by the last number) whose answer is not stated in the expected form
    lines = ["| iteration | dev accuracy | test accuracy | flexible - strict | change | correct, all steps true "
             "| Stage-1 success | Stage-2 success | training examples | minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
    prev = None
    for r in rows:
        change = "" if prev is None or r["label"] == "vanilla SFT" else f"{100 * (r['accuracy'] - prev):+.1f} pts"
        s1 = f"{r['stage1']}/{r['seen']}" if r["seen"] and r["stage1"] is not None else ""
        s2 = f"{r['stage2']}/{r['seen'] - r['stage1']}" if r["seen"] and r["stage2"] is not None else ""
        shots = f" ({r['k']}-shot)" if r["k"] else " (human seed)" if r["seed"] else f" ({r['rpo']})" if r["rpo"] else ""
        examples = rpo_examples(r) if r["rpo"] else r["kept"] if r["kept"] is not None else ""
        faithful = f"{100 * r['faithful']:.1f}%" if r["faithful"] is not None else ""
        dev = f"{100 * r['dev']:.1f}% (n={r['dev_n']})" if r["dev"] is not None else ""
        gap = f"{100 * (r['flexible'] - r['accuracy']):+.1f} pts" if r["flexible"] is not None else ""
        lines.append(f"| {r['label']}{shots} | {dev} | {100 * r['accuracy']:.1f}% (n={r['n']}) | {gap} | {change} | {faithful} "
                     f"| {s1} | {s2} | {examples} | {r['minutes']:.1f} |")
        prev = r["accuracy"] if r["label"] != "vanilla SFT" else prev
    return "\n".join(lines) + "\n"


def summary_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    star = [r for r in rows if r["label"] != "vanilla SFT"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([int(r["label"]) for r in star], [100 * r["accuracy"] for r in star], "o-",
             label=next((f"STaR + {r['rpo']}" for r in star if r["rpo"]), "STaR"))
    for r in rows:
        if r["label"] in ("0", "vanilla SFT"):
            ax1.axhline(100 * r["accuracy"], ls="--", color="gray" if r["label"] == "0" else "tab:red",
                        label=("human seed" if r["seed"] else "base model") if r["label"] == "0" else "vanilla SFT")
    ax1.set(xlabel="iteration", ylabel="test accuracy (%)", title="Accuracy by iteration")
    ax1.set_xticks([int(r["label"]) for r in star])
    ax1.legend()
    it = [r for r in star if r["kept"] is not None]
    x = [int(r["label"]) for r in it]
    new1, new2 = [r["kept1"] or 0 for r in it], [r["kept2"] or 0 for r in it]  # this iteration's own rationales
    ax2.bar(x, new1, label="Stage 1 (rationale)")
    ax2.bar(x, new2, bottom=new1, label="Stage 2 (rationalization)")
    if any(r["kept"] > a + b for r, a, b in zip(it, new1, new2)):  # --accumulate's carry-over, the human seed
        ax2.bar(x, [r["kept"] - a - b for r, a, b in zip(it, new1, new2)], bottom=[a + b for a, b in zip(new1, new2)],
                label="carried over / human seed", color="tab:gray")
    ax2.set(xlabel="iteration", ylabel="kept rationales (count)", title="Training examples by origin")
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
