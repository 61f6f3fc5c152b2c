"""GPU training check: a random-weight model with the Llama-3.2-3B-Instruct architecture, full
fine-tuning (fp32 master weights, bf16 autocast, fused AdamW) and LoRA (bf16 base, r=16), examples
packed to --max_length 512 through train.py's packed_loss. Prints tokens/s, model FLOP utilization
(6 x params x tokens / time / 989e12, the H100/H200 dense bf16 peak) and peak memory, and whether
LoRA stays under 24 GB.

    python bench/gpu_train.py --data_dir ../shared/gsm8k
    python bench/gpu_train.py --data_dir ../shared/gsm8k --tiny --steps 2     # a CPU smoke run
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import load_split, load_tokenizer, solution_to_rationale  # noqa: E402
from gpu_generate import LLAMA_3B, TINY  # noqa: E402
from train import pack, packed_loss, tokenize_examples, use_packed_attention  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_dir", default=os.environ.get("GSM8K_DIR", "../shared/gsm8k"))
parser.add_argument("--tokenizer", default="smollm2-135m")
parser.add_argument("--max_length", type=int, default=512)
parser.add_argument("--batch_size", type=int, default=8, help="examples per packed micro-batch")
parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after 2 warm-up steps)")
parser.add_argument("--gradient_checkpointing", action="store_true")
parser.add_argument("--tiny", action="store_true")


def build(mode, tiny, checkpointing):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if mode == "lora" else torch.float32
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**(TINY if tiny else LLAMA_3B)), dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    use_packed_attention(model)  # as train.py does
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM", target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        if checkpointing:
            model.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=cuda)
    return model.train(), opt, n_params


def run(mode, batches, args):
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, opt, n_params = build(mode, args.tiny, args.gradient_checkpointing)
    tokens, t0 = 0, None
    for i, batch in enumerate(batches[: args.steps + 2]):
        if i == 2:  # warm-up done
            torch.cuda.synchronize() if cuda else None
            t0, tokens = time.time(), 0
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = packed_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch["input_ids"].numel()
    torch.cuda.synchronize() if cuda else None
    seconds = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    mfu = 6 * n_params * tokens / seconds / 989e12
    print(f"{mode:4s}: {tokens / seconds:8.0f} tok/s, MFU {100 * mfu:5.1f}%, peak {peak:6.1f} GiB, loss {loss.item():.3f}"
          + (f", under 24 GB: {peak < 24}" if mode == "lora" else ""))
    del model, opt


def main(argv=None):
    args = parser.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    rows = load_split("gsm8k", "train", args.data_dir, (args.steps + 2) * args.batch_size)
    records = [{"question": r["question"], "rationale": solution_to_rationale(r["solution"])} for r in rows]
    examples, _ = tokenize_examples(tok, records, args.max_length)
    batches = [pack(examples[i:i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]
    print(f"{len(batches)} packed batches of {args.batch_size} GSM8K examples, "
          f"{sum(b['input_ids'].numel() for b in batches) / len(batches):.0f} tokens each")
    for mode in ("full", "lora"):
        try:
            run(mode, batches, args)
        except torch.cuda.OutOfMemoryError:
            print(f"{mode}: out of memory")


if __name__ == "__main__":
    main()
