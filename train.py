"""STaR fine-tuning: train the ORIGINAL base model M_0 on iteration N's kept rationales.

Always from --base_model, never from the previous iteration's checkpoint (the paper restarts from
the pre-trained model each outer loop to avoid overfitting, Zelikman et al. 2022, Sec. 3.1).
Examples are the zero-shot prompt (the one evaluate.py asks) + the rationale; the loss is on the
rationale tokens only. Examples are packed into one row per micro-batch, each with its own
positions and its own causal attention, so no compute goes to padding and no example attends to another.

Precision (--dtype): auto = bf16 autocast on fp32 master weights on a GPU and on a CPU with AVX-512 BF16 or AMX,
fp32 elsewhere; LoRA keeps the frozen base in bf16 then. The checkpoint is saved in the base model's dtype (bf16 for
Llama 3.2), whatever dtype it was trained in; LoRA is merged into it, or saved alone with --save_adapter (the next
stage loads base + adapter by itself). --lr defaults to 2e-5 for full fine-tuning and 2e-4 for LoRA.

Memory: the examples are tokenized first; before it loads any weight, train.py prints its plan from the base model's
config and the longest packed micro-batch the run will build, one line per term (`memory <term> <GiB> GiB  <what>`).
On a GPU a plan larger than the free memory stops the run with one error line naming a configuration that fits;
--skip_memory_check trains anyway. `python bench/gpu_train.py --plan_only` prints the plan of
meta-llama/Llama-3.2-3B-Instruct on the real GSM8K rows; within 24 GB it trains with LoRA and checkpointing.

--objective rpo adds create_data's pairs file (Iterative RPO, Pang et al. 2024,
https://arxiv.org/abs/2404.19733): -log sigmoid(beta x [log pi(w)/ref(w) - log pi(l)/ref(l)]) + alpha x NLL(w)/|w|
per (chosen w, rejected l) pair, both sequences packed into the micro-batch's row. A kept rationale of --train_file
that is no pair's winner (no loser was generated for it) keeps its alpha x NLL(w)/|w| term, so STaR's training set
is all learned and the pairs add DPO's term; --pairs_only trains on the pairs alone, as the paper (which samples
until every question has a pair). ref is the model training starts from, M_0, as STaR restarts from M_0 (its
log-probabilities computed once, before the first step); --rpo_reference previous takes the paper's reference
instead, the model that generated the pairs (M_{N-1}). --objective step_rpo trains the same loss on create_data's step
pairs (Step-DPO, Lai et al. 2024, https://arxiv.org/abs/2406.18629): the question and the loser's true lines before its
first false step are the prompt, the chosen and rejected steps the two completions. A preference objective runs at
--pref_lr (default 1e-6, 5e-6 with LoRA: DPO recipes run 50-400x below their SFT rate) with 10% warm-up; run_star.sh
trains it as a phase after STaR's SFT, from the SFT model (--base_model results/model_star_iter{N}_sft --pairs_only),
which is then the reference.

Long runs: the training state is saved every --save_minutes (30) and rerunning the same command resumes from it.
Loss (averaged over processes), learning rate and tokens/s go to log.jsonl and to --report_to (tensorboard: under
<output_dir's folder>/runs/, `tensorboard --logdir results/runs`).

    python train.py --iteration 1 --base_model smollm2-135m --epochs 3
    python train.py --iteration 1 --lora_r 16 --gradient_checkpointing --save_adapter
    python train.py --iteration 1 --objective rpo          # DPO + NLL on data/star_iter1_pairs.jsonl
    python train.py --iteration 1 --objective step_rpo --pairs_only --base_model results/model_star_iter1_sft
    accelerate launch --num_processes 4 train.py --iteration 1 --lora_r 16
    accelerate launch --config_file configs/accelerate_fsdp.yaml train.py --iteration 1     # FSDP2, 8 processes
"""
import argparse
import importlib.util
import os
import resource
import shutil
import sys
import time

import torch
from tqdm import tqdm

from attention import use_packed_attention
from checkpoints import SAVE_MINUTES, base_dtype, load_resume_state, save_checkpoint, save_due, save_resume_state
from common import StarError, check_output, check_positive, cli_errors, read_jsonl
from distributed import make_accelerator, reduction
from memory import bound_heap, keep_heap, plan_memory
from models import DEFAULT_BASE_MODEL, DTYPES, device_and_dtype, load_tokenizer, load_weights
from objectives import (
    OBJECTIVES, Example, epoch_loader, example_sizes, longest_micro_batch, reference_logps, reference_model, schedule,
    tokenize_examples, tokenize_pairs, training_loss, unpaired_rationales, PAIR_METRICS,
)

# Learning rates when --lr is not given. Full fine-tuning: 2e-5, a common rate for 1-8B instruction models. LoRA needs
# about 10x more: its best learning rate was about 10x full fine-tuning's across ranks and models in Schulman et al.
# 2025 ("LoRA Without Regret", Thinking Machines Lab), and QLoRA (Dettmers et al. 2023) trained 7B and 13B models at
# 2e-4.
FULL_LR, LORA_LR = 2e-5, 2e-4
# A preference objective's rate when --pref_lr is not given (it takes no --lr): published DPO recipes run 50-400x below
# their SFT rate. 1e-6 is TRL's DPOConfig default and SmolLM2's own DPO rate for its 135M and 360M models (Iterative
# RPO: 7e-7 on Llama-2-70B; Tulu 3: 5e-7); adapters take about 5x more (5e-6), as LoRA does for SFT. Its warm-up:
# 10% of the steps, as those recipes do (SFT keeps 3%).
PREF_FULL_LR, PREF_LORA_LR, PREF_WARMUP = 1e-6, 5e-6, 0.1
TRACKERS = ("tensorboard", "wandb", "none")  # --report_to: accelerate's trackers

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--iteration", type=int, default=1)
parser.add_argument("--train_file", default=None, help="default data/star_iter{N}_train.jsonl")
parser.add_argument("--base_model", default=DEFAULT_BASE_MODEL, help="M_0: hub id, local folder or smollm2-135m")
parser.add_argument("--objective", default="sft", choices=OBJECTIVES,
                    help="sft: the rationales of --train_file (STaR); rpo: DPO + NLL on the (chosen, rejected) pairs of "
                         "--pairs_file (Iterative RPO), NLL alone on --train_file's other rationales; step_rpo: the "
                         "same on step pairs, cut at the loser's first false step (prefix, chosen, rejected)")
parser.add_argument("--pairs_file", default=None,
                    help="default data/star_iter{N}_pairs.jsonl (rpo), data/star_iter{N}_step_pairs.jsonl (step_rpo)")
parser.add_argument("--beta", type=float, default=0.1, help="--objective rpo, step_rpo: DPO's beta (the paper's 0.1)")
parser.add_argument("--dpop_lambda", type=float, default=0.0,
                    help="--objective rpo, step_rpo: DPO-Positive's lambda (Pal et al. 2024: 50), a penalty inside the sigmoid "
                         "when the chosen rationale's log-prob falls below the reference's; 0 = plain DPO")
parser.add_argument("--rpo_alpha", type=float, default=1.0,
                    help="--objective rpo, step_rpo: weight of the chosen rationale's NLL per token (the paper's 1; 0 = plain DPO)")
parser.add_argument("--pairs_only", action="store_true",
                    help="--objective rpo, step_rpo: train on the pairs alone (the paper's set), not also on the kept rationales "
                         "of --train_file that have no loser")
parser.add_argument("--rpo_reference", default="base", choices=("base", "previous"),
                    help="--objective rpo, step_rpo: reference log-probs from M_0 (base, where training starts) or from the model "
                         "that generated the pairs, results/model_star_iter{N-1} (previous, the paper's choice)")
parser.add_argument("--output_dir", default=None, help="default results/model_star_iter{N}")
parser.add_argument("--epochs", type=float, default=3)
parser.add_argument("--steps", type=int, default=0,
                    help="optimizer steps at iteration 1 instead of --epochs (the paper: 40 at batch 8); 0 = use --epochs")
parser.add_argument("--steps_growth", type=float, default=0.0,
                    help="with --steps: iteration N trains steps x (1 + growth)^(N-1) (the paper: 0.2)")
parser.add_argument("--batch_size", type=int, default=8, help="examples per device per micro-step")
parser.add_argument("--max_tokens_per_batch", type=int, default=None,
                    help="also cap each micro-batch at this many tokens (a pair counts both sequences): examples are "
                         "packed first-fit by length up to it and --batch_size (on a GPU: --batch_size 64 "
                         "--max_tokens_per_batch 16384 makes rows of about 16k tokens); default: --batch_size alone")
parser.add_argument("--grad_accum", type=int, default=1)
parser.add_argument("--lr", type=float, default=None,
                    help=f"the SFT rate: default {FULL_LR} (full fine-tuning), {LORA_LR} with --lora_r")
parser.add_argument("--pref_lr", type=float, default=None,
                    help=f"the rate of --objective rpo and step_rpo (which take no --lr): default {PREF_FULL_LR} (full "
                         f"fine-tuning), {PREF_LORA_LR} with --lora_r")
parser.add_argument("--lr_scheduler", default="cosine", help="any transformers scheduler name: cosine, linear, constant...")
parser.add_argument("--warmup_ratio", type=float, default=None,
                    help=f"share of the steps the rate warms up over: default 0.03 (sft), {PREF_WARMUP} (rpo, step_rpo)")
parser.add_argument("--weight_decay", type=float, default=0.0)
parser.add_argument("--max_length", type=int, default=1024, help="longer examples are dropped and reported, never cut")
parser.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="bf16: autocast on fp32 master weights (LoRA: bf16 frozen base); auto = bf16 on a GPU and on "
                         "a CPU with AVX-512 BF16 or AMX, else fp32")
parser.add_argument("--gradient_checkpointing", action="store_true", help="trade ~30%% speed for activation memory")
parser.add_argument("--lora_r", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
parser.add_argument("--lora_alpha", type=int, default=32)
parser.add_argument("--lora_dropout", type=float, default=0.05)
parser.add_argument("--lora_target_modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
parser.add_argument("--save_adapter", action="store_true",
                    help="with --lora_r: save the adapter alone (MBs), not the merged model; the next stage loads both")
parser.add_argument("--logging_steps", type=int, default=1, help="optimizer steps between log lines")
parser.add_argument("--report_to", default="tensorboard", choices=TRACKERS,
                    help="also log loss, lr and tokens/s to tensorboard (<output_dir's folder>/runs/) or wandb")
parser.add_argument("--save_minutes", type=float, default=SAVE_MINUTES,
                    help="save the training state every M minutes of training (0 = never); rerunning the same command "
                         "resumes from it")
parser.add_argument("--save_steps", type=int, default=0, help="also save it every N optimizer steps (0 = off)")
parser.add_argument("--skip_memory_check", action="store_true",
                    help="on a GPU, train even when the memory plan says the run does not fit in free memory")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--overwrite", action="store_true")
parser.add_argument("--debug", action="store_true")


def weight_fingerprint(model):
    """A cheap number that tells which weights a model started from (tests compare it); None for a process that holds
    no weights yet (FSDP's RAM-efficient loading reads them on the main process only, meta tensors elsewhere)."""
    weights = [p for p in model.parameters() if p.dim() == 2]
    if any(p.is_meta for p in weights):
        return None
    return float(sum(p.detach().float().abs().sum() for p in weights) / 1e3)


def load_base(args, dtype):
    model = use_packed_attention(load_weights(args.base_model, dtype))
    if args.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
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


def train_loop(acc, model, opt, sched, examples, args, start, log, total, steps_per_epoch, plan_gib):
    """Optimizer steps from `start` (0, or a resume point) to `total`; returns (log, real tokens seen by all
    processes, seconds). plan_gib: the memory plan's total, which bounds the heap on CPU."""
    step, state_dir = start, args.output_dir + ".state"
    params = [p for p in model.parameters() if p.requires_grad]
    tokens, losses, pairs, t0 = 0, [], torch.zeros(len(PAIR_METRICS), dtype=torch.float64), time.time()
    last_save = t0
    bar = tqdm(total=total, initial=step, desc="training", disable=not acc.is_main_process, dynamic_ncols=True)
    model.train()
    while step < total:
        epoch = step // steps_per_epoch
        loader = acc.prepare(epoch_loader(examples, args, epoch))
        trained = (step - epoch * steps_per_epoch) * args.grad_accum  # micro-batches of this epoch already trained
        for batch in acc.skip_first_batches(loader, trained) if trained else loader:
            with acc.accumulate(model):
                # autocast around the loss too, not only inside the model's forward (accelerate's wrapper returns its
                # outputs in fp32): the head's matmuls in TokenNLL run in bf16, as in the reference pass
                with acc.autocast():
                    loss, metrics = training_loss(model, batch, args)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            tokens += batch["tokens"]
            losses.append(loss.item())
            pairs += metrics
            if not acc.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if acc.device.type == "cpu":
                bound_heap(plan_gib)  # fragments of the kept heap trimmed only past the plan's bound
            if step % args.logging_steps == 0 or step == total:
                log.append(log_step(acc, step, total, steps_per_epoch, losses, sched, tokens, t0, pairs))
                losses, pairs = [], torch.zeros_like(pairs)
            if step < total and save_due(acc, args, step, last_save):
                save_resume_state(acc, state_dir, args, step, log)
                last_save = time.time()
            if step >= total:
                break
    bar.close()
    return log, int(acc.reduce(torch.tensor(tokens, device=acc.device), "sum")), time.time() - t0


def log_step(acc, step, total, steps_per_epoch, losses, sched, tokens, t0, pairs):
    """One fixed-format line per logged optimizer step: the loss of every process's micro-batches since the last line
    (their mean), the learning rate, all processes' tokens/s, and with pairs (--objective rpo) their means of
    PAIR_METRICS (objectives.pair_metrics); the same numbers go to log.jsonl and --report_to."""
    summed = acc.reduce(torch.cat([torch.tensor([sum(losses), len(losses), tokens], dtype=torch.float64), pairs])
                        .to(acc.device), "sum").cpu()
    row = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": round(float(summed[0] / summed[1]), 4),
           "lr": sched.get_last_lr()[0], "tokens_per_s": round(float(summed[2]) / (time.time() - t0), 1)}
    if summed[3] > 0:  # the pairs' means over every pair of these steps, on every process
        row.update({name: round(float(v / summed[3]), 4) for name, v in zip(PAIR_METRICS[1:], summed[4:])})
    if torch.cuda.is_available():
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    acc.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)  # the main process's trackers
    if acc.is_main_process:
        pairs_line = (f" | margin {row['reward_margin']:7.4f} | acc {row['reward_accuracy']:.2f} | logp chosen "
                      f"{row['logp_chosen']:8.2f}" if "reward_margin" in row else "")
        tqdm.write(f"step {step:5d}/{total} | epoch {row['epoch']:6.3f} | loss {row['loss']:.4f} | "
                   f"lr {row['lr']:.2e} | tok/s {row['tokens_per_s']:8.1f}{pairs_line}", file=sys.stdout)
        sys.stdout.flush()  # a log line is out as soon as its step is done, also into a pipe
    return row


# ============================================================================= the run
def check_token_budget(examples, args):
    """--max_tokens_per_batch must hold the longest example whole (rows are packed, never cut)."""
    longest = max((size for size, _ in example_sizes(examples)), default=0)
    if args.max_tokens_per_batch and longest > args.max_tokens_per_batch:
        raise StarError(f"--max_tokens_per_batch {args.max_tokens_per_batch} is below the longest example ({longest} "
                        "tokens; a pair counts both sequences): raise it, or lower --max_length")


def check_args(args):
    """Refuse bad flags before anything loads and fill the defaults that depend on others."""
    check_positive(vars(args), "epochs", "batch_size", "grad_accum", "lr", "pref_lr", "max_length", "logging_steps",
                   "iteration", "max_tokens_per_batch")
    preference = args.objective != "sft"
    if args.warmup_ratio is None:
        args.warmup_ratio = PREF_WARMUP if preference else 0.03
    if args.lora_r < 0 or args.save_steps < 0 or args.save_minutes < 0 or not 0 <= args.warmup_ratio <= 1 \
            or not 0 <= args.lora_dropout < 1:
        raise StarError("--lora_r, --save_steps and --save_minutes must be >= 0, --warmup_ratio in [0, 1], "
                        "--lora_dropout in [0, 1)")
    if args.steps < 0 or args.steps_growth < 0 or (args.steps_growth and not args.steps):
        raise StarError("--steps and --steps_growth must be >= 0, and --steps_growth needs --steps")
    if args.save_adapter and not args.lora_r:
        raise StarError("--save_adapter saves a LoRA adapter: it needs --lora_r")
    if args.lora_r and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise StarError("--lora_r under FSDP (an accelerate config with distributed_type: FSDP) is not supported: "
                        "launch LoRA with plain `accelerate launch --num_processes N` (DDP)")
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        raise StarError(f"--report_to {args.report_to} needs the package {args.report_to} (pip install "
                        f"{args.report_to}), or pass --report_to none")
    if args.beta <= 0 or args.rpo_alpha < 0 or args.dpop_lambda < 0:
        raise StarError(f"--beta must be > 0, --rpo_alpha and --dpop_lambda >= 0 (got {args.beta}, {args.rpo_alpha}, "
                        f"{args.dpop_lambda})")
    if not preference and args.pref_lr is not None:
        raise StarError("--pref_lr is the rate of --objective rpo and step_rpo; --objective sft trains at --lr")
    if preference and args.lr is not None:
        raise StarError(f"--lr is the SFT rate: --objective {args.objective} trains at --pref_lr (default "
                        f"{PREF_FULL_LR:g}, {PREF_LORA_LR:g} with --lora_r)")
    if preference:  # the rate the optimizer runs at
        args.lr = args.pref_lr or (PREF_LORA_LR if args.lora_r else PREF_FULL_LR)
    args.lr = args.lr or (LORA_LR if args.lora_r else FULL_LR)
    args.train_file = args.train_file or f"data/star_iter{args.iteration}_train.jsonl"
    kind = "step_pairs" if args.objective == "step_rpo" else "pairs"
    args.pairs_file = args.pairs_file or f"data/star_iter{args.iteration}_{kind}.jsonl"
    args.output_dir = (args.output_dir or f"results/model_star_iter{args.iteration}").rstrip("/")
    check_output(args.output_dir, args.overwrite)
    if preference:
        reference_model(args)  # a missing --rpo_reference previous model stops the run here, before anything loads


def read_records(args):
    """The records --objective trains on: --train_file's rationales (sft); --pairs_file's pairs and the rationales of
    --train_file that won no pair (rpo). None is one error line."""
    if args.objective == "sft":
        records = read_jsonl(args.train_file, required=("question", "rationale", "answer"))
    else:  # a step pair has the true lines before its step too (create_data.make_step_pairs)
        fields = ("question", "prefix", "chosen", "rejected") if args.objective == "step_rpo" else \
            ("question", "chosen", "rejected")
        pairs = read_jsonl(args.pairs_file, required=fields)
        records = pairs + unpaired_rationales(args, pairs)
    if not records:
        raise StarError(f"{training_files(args)} holds no records: nothing to train on")
    return records


def training_files(args):
    """The files --objective trains on, as lines name them: --train_file (sft), or --pairs_file (rpo) and, unless
    --pairs_only, --train_file."""
    if args.objective == "sft":
        return args.train_file
    return args.pairs_file if args.pairs_only or not args.rpo_alpha else f"{args.pairs_file} + {args.train_file}"


def runs_dir(args):
    """Where --report_to tensorboard writes: <output_dir's folder>/runs/<output name> (results/runs/model_star_iter1),
    outside the checkpoint folder that is renamed into place, so that one `tensorboard --logdir` shows every run."""
    return os.path.join(os.path.dirname(args.output_dir) or ".", "runs")


def start_tracking(acc, args, fresh):
    """--report_to: accelerate's tracker (main process) under runs_dir; a fresh start clears the run's old curves."""
    if args.report_to == "none":
        return
    name = os.path.basename(args.output_dir)
    if fresh and acc.is_main_process:
        shutil.rmtree(os.path.join(runs_dir(args), name), ignore_errors=True)
    if args.report_to == "tensorboard":  # the flags are in args.json: no hparams folders beside the curves
        acc.init_trackers(name)
    else:
        acc.init_trackers("star", {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in
                                   vars(args).items()}, init_kwargs={"wandb": {"name": name}})


def training_examples(acc, tok, records, args):
    """([Example], ids dropped as too long): needs the tokenizer only, so the memory plan is made from them before any
    weight loads."""
    if args.objective != "sft":
        examples, too_long = tokenize_pairs(tok, records, args.max_length)
    else:
        sequences, too_long = tokenize_examples(tok, records, args.max_length)
        examples = [Example(s) for s in sequences]
    if too_long:
        acc.print(f"warning: {len(too_long)} examples longer than --max_length {args.max_length} tokens were "
                  f"dropped (ids {too_long[:10]}{'...' if len(too_long) > 10 else ''})")
    if not examples:
        raise StarError(f"no example of {training_files(args)} fits in --max_length {args.max_length}")
    return examples, too_long


def with_references(acc, model, examples, args, dtype):
    """The examples, the pairs with their reference log-probs: from the model being trained, before its first step
    (M_0, --rpo_reference base), or from the model that generated the pairs (previous), loaded for this and freed."""
    name, pairs = reference_model(args), [e for e in examples if e.rejected is not None]
    if not pairs:
        return examples
    if name == args.base_model:
        refs = reference_logps(acc, model, pairs, args)
    else:
        other = use_packed_attention(load_weights(name, dtype)).to(acc.device)
        refs = reference_logps(acc, other, pairs, args)
        del other
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # its memory back to the device before the optimizer states take theirs
    acc.print(f"reference log-probs of {len(pairs)} pairs from {name}")
    refs = iter(refs)
    return [Example(e.chosen, e.rejected, tuple(next(refs))) if e.rejected is not None else e for e in examples]


def make_optimizer(acc, model, args, total, device):
    """AdamW, fused (one kernel for all its per-tensor ops: on CPU 64 against 218 ms a step for the embedded model's
    134.5M parameters) except under FSDP on CPU, whose sharded DTensors it does not take; and the --lr_scheduler
    schedule over `total` optimizer steps."""
    from transformers import get_scheduler

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay,
                            fused=device == "cuda" or acc.distributed_type.name != "FSDP")
    # accelerate steps a prepared scheduler once per process per optimizer step
    sched = get_scheduler(args.lr_scheduler, opt, num_warmup_steps=int(args.warmup_ratio * total) * acc.num_processes,
                          num_training_steps=total * acc.num_processes)
    return opt, sched


def finish(acc, model, tok, args, log, stats, config):
    """Gather the weights (a collective call under FSDP), write the checkpoint on the main process, close trackers."""
    acc.wait_for_everyone()
    state_dict = None if args.lora_r else acc.get_state_dict(model)
    if acc.is_main_process:
        save_checkpoint(acc.unwrap_model(model), state_dict, tok, args.output_dir, args, log, stats, base_dtype(config))
        shutil.rmtree(args.output_dir + ".state", ignore_errors=True)
        peak = stats["peak_memory_gib"]
        memory = f"peak GPU memory {peak:.1f} GiB" if peak else f"peak RSS {stats['peak_rss_gib']} GiB"
        print(f"trained {stats['steps']} steps in {stats['seconds']:.0f} s ({stats['tokens_per_s']} tok/s, {memory}; "
              f"loss {stats['first_loss']} -> {stats['final_loss']}); wrote {args.output_dir}")
    acc.end_training()


def main(argv=None):
    args = parser.parse_args(argv)
    with cli_errors(args.debug):
        check_args(args)
        records = read_records(args)
        device, dtype = device_and_dtype(args.dtype)
        bf16 = dtype == torch.bfloat16  # auto on an older GPU gives fp16 for generation; training stays fp32 there
        acc = make_accelerator(device, bf16, args.grad_accum, args.report_to, runs_dir(args))
        from accelerate.utils import set_seed

        set_seed(args.seed)
        tok = load_tokenizer(args.base_model)
        examples, too_long = training_examples(acc, tok, records, args)
        check_token_budget(examples, args)
        # before any weight is loaded, from the rows this run builds: stops in seconds if it cannot fit
        config, plan = plan_memory(acc, args, bf16, lambda a: longest_micro_batch(examples, a, acc.num_processes))
        if acc.device.type == "cpu":
            keep_heap()  # freed blocks stay in glibc's heap for the next step to reuse: no page faults each step
        # LoRA under bf16 keeps the frozen base in bf16 (what makes 3B fit in 24 GB); full FT keeps fp32 master weights.
        model = load_base(args, torch.bfloat16 if bf16 and args.lora_r else torch.float32)
        init_fingerprint = weight_fingerprint(model) if acc.is_main_process else None
        steps_per_epoch, total = schedule(args, examples, acc.num_processes)
        model, opt, sched = acc.prepare(model, *make_optimizer(acc, model, args, total, device))
        pairs = sum(e.rejected is not None for e in examples)
        what = f"{pairs} {'step ' * (args.objective == 'step_rpo')}pairs (DPO + NLL, beta {args.beta:g}, alpha " \
               f"{args.rpo_alpha:g}) and {len(examples) - pairs} rationales (NLL)" if args.objective != "sft" \
            else f"{len(examples)} examples"
        acc.print(f"training {args.base_model} on {what} of {training_files(args)}: {total} steps, "
                  f"effective batch {args.batch_size} x {acc.num_processes} processes x {args.grad_accum} accum "
                  f"= {args.batch_size * acc.num_processes * args.grad_accum}, lr {args.lr:g}, "
                  f"{'bf16 autocast' if bf16 else 'fp32'}, distributed: {acc.distributed_type.name}"
                  f"{reduction(acc)}")
        if args.objective != "sft":  # with the weights training starts from: before a resume loads later ones
            examples = with_references(acc, model, examples, args, dtype)
        step, log = load_resume_state(acc, args.output_dir + ".state", args)
        start_tracking(acc, args, fresh=step == 0)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        log, tokens, seconds = train_loop(acc, model, opt, sched, examples, args, step, log, total, steps_per_epoch,
                                            plan["total"])
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        stats = {"examples": len(examples), "dropped_too_long": too_long, "steps": total, "seconds": round(seconds, 1),
                 "tokens_per_s": round(tokens / seconds, 1), "peak_memory_gib": peak,
                 "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),  # host memory
                 "memory_plan_gib": {name: round(gib, 2) for name, gib in plan.items()},
                 "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
                 "init_fingerprint": init_fingerprint, "processes": acc.num_processes,
                 "dtype": "bf16" if bf16 else "fp32", "distributed": acc.distributed_type.name,
                 "objective": args.objective, "pairs": pairs if args.objective != "sft" else None}
        finish(acc, model, tok, args, log, stats, config)


if __name__ == "__main__":
    main()
