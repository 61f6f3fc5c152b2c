"""STaR fine-tuning: train the ORIGINAL base model M_0 on iteration N's kept rationales.

Always from --base_model, never from the previous iteration's checkpoint (the paper restarts from
the pre-trained model each outer loop to avoid overfitting, Zelikman et al. 2022, Sec. 3.1).
Examples are the zero-shot prompt (the one evaluate.py asks) + the rationale; the loss is on the
rationale tokens only. Examples are packed into one row per micro-batch, each with its own
positions, so no compute goes to padding and no example attends to another.

    python train.py --iteration 1 --base_model smollm2-135m --epochs 3
    accelerate launch --num_processes 4 train.py --iteration 1 --lora_r 16
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
from tqdm import tqdm

from common import (
    DEFAULT_BASE_MODEL, StarError, build_completion, build_prompt, check_output_free, check_positive, cli_errors,
    device_and_dtype, load_tokenizer, read_jsonl, resolve_model, run_info, write_json,
)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--iteration", type=int, default=1)
parser.add_argument("--train_file", default=None, help="default data/star_iter{N}_train.jsonl")
parser.add_argument("--base_model", default=DEFAULT_BASE_MODEL, help="M_0: hub id, local folder or smollm2-135m")
parser.add_argument("--output_dir", default=None, help="default results/model_star_iter{N}")
parser.add_argument("--epochs", type=float, default=3)
parser.add_argument("--batch_size", type=int, default=8, help="examples per device per micro-step")
parser.add_argument("--grad_accum", type=int, default=1)
parser.add_argument("--lr", type=float, default=2e-5)
parser.add_argument("--lr_scheduler", default="cosine", help="any transformers scheduler name: cosine, linear, constant...")
parser.add_argument("--warmup_ratio", type=float, default=0.03)
parser.add_argument("--weight_decay", type=float, default=0.0)
parser.add_argument("--max_length", type=int, default=1024, help="longer examples are dropped and reported, never cut")
parser.add_argument("--gradient_checkpointing", action="store_true", help="trade ~30%% speed for activation memory")
parser.add_argument("--lora_r", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
parser.add_argument("--lora_alpha", type=int, default=32)
parser.add_argument("--lora_dropout", type=float, default=0.05)
parser.add_argument("--lora_target_modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
parser.add_argument("--logging_steps", type=int, default=1, help="optimizer steps between log lines")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--overwrite", action="store_true")
parser.add_argument("--debug", action="store_true")


def tokenize_examples(tok, records, max_length):
    """[(input_ids, labels)]: labels are -100 on the prompt, so only rationale tokens are learned."""
    examples, too_long = [], []
    for r in records:
        prompt = "".join(build_prompt(tok, r["question"]))
        p = tok(prompt, add_special_tokens=False).input_ids
        c = tok(build_completion(tok, r["rationale"]), add_special_tokens=False).input_ids
        if len(p) + len(c) > max_length:
            too_long.append(r.get("id"))
            continue
        examples.append((p + c, [-100] * len(p) + c))
    return examples, too_long


def pack(batch):
    """Examples -> one row [1, T]: positions restart at 0 for each example, which makes the attention
    block-diagonal (transformers reads packed sequences from position_ids when no mask is given)."""
    ids = torch.tensor([[t for x, _ in batch for t in x]])
    labels = torch.tensor([[t for _, y in batch for t in y]])
    pos = torch.tensor([[p for x, _ in batch for p in range(len(x))]])
    seq = torch.tensor([[i for i, (x, _) in enumerate(batch) for _ in x]])
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "example": seq}


def packed_loss(model, batch):
    """Mean over examples of each example's mean token loss (each rationale weighs the same).

    Logits are computed only where the next token is a rationale token (logits_to_keep), which
    skips the vocabulary projection and softmax for prompt tokens. A row's last token of one
    example would predict the next example's first token, but that is a prompt token (-100).
    """
    labels = batch["labels"][0, 1:]
    keep = (labels != -100).nonzero().squeeze(1)  # positions t whose token t+1 is learned
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                logits_to_keep=keep)
    tok_loss = torch.nn.functional.cross_entropy(out.logits[0].float(), labels[keep], reduction="none")
    seq = batch["example"][0, 1:][keep]
    n_ex = int(batch["example"].max()) + 1
    per_ex_sum = torch.zeros(n_ex, device=tok_loss.device).index_add(0, seq, tok_loss)
    per_ex_cnt = torch.bincount(seq, minlength=n_ex).clamp(min=1)
    return (per_ex_sum / per_ex_cnt).mean()


def weight_fingerprint(model):
    """A cheap number that tells which weights a model started from (tests compare it)."""
    return float(sum(p.detach().float().abs().sum() for p in model.parameters() if p.dim() == 2) / 1e3)


def load_base(args, dtype):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(args.base_model), dtype=dtype)
    except OSError as e:
        raise StarError(f"cannot load model {args.base_model!r}: {str(e).splitlines()[0]}") from None
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         target_modules=args.lora_target_modules.split(","), task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def save_checkpoint(model, tok, out, args, log, stats):
    """Write to <out>.tmp, then rename: a killed run never leaves a folder that looks finished."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if args.lora_r:
        model = model.merge_and_unload()  # a plain checkpoint: the next stage needs no extra flags
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    write_json(os.path.join(tmp, "args.json"), run_info(args))
    write_json(os.path.join(tmp, "train_stats.json"), stats)
    with open(os.path.join(tmp, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main(argv=None):
    args = parser.parse_args(argv)
    with cli_errors(args.debug):
        check_positive(args, "epochs", "batch_size", "grad_accum", "lr", "max_length", "logging_steps", "iteration")
        args.train_file = args.train_file or f"data/star_iter{args.iteration}_train.jsonl"
        args.output_dir = args.output_dir or f"results/model_star_iter{args.iteration}"
        check_output_free(args.output_dir, args.overwrite)
        records = read_jsonl(args.train_file, required=("question", "rationale", "answer"))
        if not records:
            raise StarError(f"{args.train_file} holds no records: nothing to train on")

        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        device, _ = device_and_dtype()
        bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
        acc = Accelerator(mixed_precision="bf16" if bf16 else "no", gradient_accumulation_steps=args.grad_accum,
                          cpu=device == "cpu")
        set_seed(args.seed)
        tok = load_tokenizer(args.base_model)
        examples, too_long = tokenize_examples(tok, records, args.max_length)
        if too_long:
            acc.print(f"warning: {len(too_long)} examples longer than --max_length {args.max_length} tokens were "
                      f"dropped (ids {too_long[:10]}{'...' if len(too_long) > 10 else ''})")
        if not examples:
            raise StarError(f"no example of {args.train_file} fits in --max_length {args.max_length}")
        # LoRA keeps frozen base weights in bf16 on GPU (what makes 3B fit in 24 GB); full FT keeps fp32 master weights.
        model = load_base(args, torch.bfloat16 if (bf16 and args.lora_r) else torch.float32)
        init_fingerprint = weight_fingerprint(model)
        gen = torch.Generator().manual_seed(args.seed)
        loader = torch.utils.data.DataLoader(examples, batch_size=args.batch_size, shuffle=True, collate_fn=pack,
                                             generator=gen)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=device == "cuda")
        steps_per_epoch = math.ceil(len(loader) / acc.num_processes / args.grad_accum)
        total = max(1, math.ceil(steps_per_epoch * args.epochs))
        sched = get_scheduler(args.lr_scheduler, opt, num_warmup_steps=int(args.warmup_ratio * total),
                              num_training_steps=total)
        model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
        acc.print(f"training {args.base_model} on {len(examples)} examples of {args.train_file}: {total} steps, "
                  f"effective batch {args.batch_size} x {acc.num_processes} processes x {args.grad_accum} accum "
                  f"= {args.batch_size * acc.num_processes * args.grad_accum}")
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model.train()
        log, step, tokens, t0 = [], 0, 0, time.time()
        bar = tqdm(total=total, desc="training", disable=not acc.is_main_process, dynamic_ncols=True)
        losses = []
        while step < total:
            for batch in loader:
                with acc.accumulate(model):
                    loss = packed_loss(model, batch)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                tokens += int(batch["input_ids"].numel())
                losses.append(loss.item())
                if not acc.sync_gradients:
                    continue
                step += 1
                bar.update(1)
                if step % args.logging_steps == 0 or step == total:
                    elapsed = time.time() - t0
                    row = {"step": step, "epoch": round(step / steps_per_epoch, 3),
                           "loss": round(sum(losses) / len(losses), 4), "lr": sched.get_last_lr()[0],
                           "tokens_per_s": round(tokens * acc.num_processes / elapsed, 1)}
                    log.append(row)
                    losses = []
                    if acc.is_main_process:
                        tqdm.write(f"step {step:5d}/{total} | epoch {row['epoch']:6.3f} | loss {row['loss']:.4f} | "
                                   f"lr {row['lr']:.2e} | tok/s {row['tokens_per_s']:8.1f}", file=sys.stdout)
                if step >= total:
                    break
        bar.close()
        seconds = time.time() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if acc.device.type == "cuda" else None
        stats = {"examples": len(examples), "dropped_too_long": too_long, "steps": total, "seconds": round(seconds, 1),
                 "tokens_per_s": round(tokens * acc.num_processes / seconds, 1), "peak_memory_gib": peak,
                 "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
                 "init_fingerprint": init_fingerprint, "processes": acc.num_processes}
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_checkpoint(acc.unwrap_model(model), tok, args.output_dir, args, log, stats)
            print(f"trained {total} steps in {seconds:.0f} s (loss {stats['first_loss']} -> {stats['final_loss']}); "
                  f"wrote {args.output_dir}")


if __name__ == "__main__":
    main()
