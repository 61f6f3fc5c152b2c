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
instead, the model that generated the pairs (M_{N-1}).

Long runs: the training state is saved every --save_minutes (30) and rerunning the same command resumes from it.
Loss (averaged over processes), learning rate and tokens/s go to log.jsonl and to --report_to (tensorboard: under
<output_dir's folder>/runs/, `tensorboard --logdir results/runs`).

    python train.py --iteration 1 --base_model smollm2-135m --epochs 3
    python train.py --iteration 1 --lora_r 16 --gradient_checkpointing --save_adapter
    python train.py --iteration 1 --objective rpo          # DPO + NLL on data/star_iter1_pairs.jsonl
    accelerate launch --num_processes 4 train.py --iteration 1 --lora_r 16
    accelerate launch --config_file configs/accelerate_fsdp.yaml train.py --iteration 1     # FSDP2, 8 processes
"""
import argparse
import ctypes
import importlib.util
import json
import math
import os
import random
import resource
import shutil
import sys
import time

import torch
from tqdm import tqdm

from common import (
    DEFAULT_BASE_MODEL, DTYPES, StarError, build_completion, build_prompt, check_output, check_positive, cli_errors,
    device_and_dtype, from_pretrained, load_tokenizer, load_weights, move_into_place, read_jsonl, resume_settings,
    run_info, write_json, write_jsonl,
)

# Learning rates when --lr is not given. Full fine-tuning: 2e-5, a common rate for 1-8B instruction models. LoRA needs
# about 10x more: its best learning rate was about 10x full fine-tuning's across ranks and models in Schulman et al.
# 2025 ("LoRA Without Regret", Thinking Machines Lab), and QLoRA (Dettmers et al. 2023) trained 7B and 13B models at
# 2e-4.
FULL_LR, LORA_LR = 2e-5, 2e-4
# The training state (weights, AdamW states, RNG) is saved every SAVE_MINUTES of training, not every N steps: the cost
# of a save grows with the model like the time of a step does, so a fixed interval keeps it a small share of any run
# (the 3B model's state is 16 B x 3.21e9 = 51 GB: about a minute every 30 at 1 GB/s), and short runs (the tests, the
# demo's 8-10 minute trainings) never save at all.
SAVE_MINUTES = 30
TRACKERS = ("tensorboard", "wandb", "none")  # --report_to: accelerate's trackers
OBJECTIVES = ("sft", "rpo")  # --objective: STaR's fine-tuning on the kept rationales, or DPO + NLL on the pairs

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--iteration", type=int, default=1)
parser.add_argument("--train_file", default=None, help="default data/star_iter{N}_train.jsonl")
parser.add_argument("--base_model", default=DEFAULT_BASE_MODEL, help="M_0: hub id, local folder or smollm2-135m")
parser.add_argument("--objective", default="sft", choices=OBJECTIVES,
                    help="sft: the rationales of --train_file (STaR); rpo: DPO + NLL on the (chosen, rejected) pairs of "
                         "--pairs_file (Iterative RPO), NLL alone on --train_file's other rationales")
parser.add_argument("--pairs_file", default=None, help="--objective rpo: default data/star_iter{N}_pairs.jsonl")
parser.add_argument("--beta", type=float, default=0.1, help="--objective rpo: DPO's beta (the paper's 0.1)")
parser.add_argument("--rpo_alpha", type=float, default=1.0,
                    help="--objective rpo: weight of the chosen rationale's NLL per token (the paper's 1; 0 = plain DPO)")
parser.add_argument("--pairs_only", action="store_true",
                    help="--objective rpo: train on the pairs alone (the paper's set), not also on the kept rationales "
                         "of --train_file that have no loser")
parser.add_argument("--rpo_reference", default="base", choices=("base", "previous"),
                    help="--objective rpo: reference log-probs from M_0 (base, where training starts) or from the model "
                         "that generated the pairs, results/model_star_iter{N-1} (previous, the paper's choice)")
parser.add_argument("--output_dir", default=None, help="default results/model_star_iter{N}")
parser.add_argument("--epochs", type=float, default=3)
parser.add_argument("--steps", type=int, default=0,
                    help="optimizer steps at iteration 1 instead of --epochs (the paper: 40 at batch 8); 0 = use --epochs")
parser.add_argument("--steps_growth", type=float, default=0.0,
                    help="with --steps: iteration N trains steps x (1 + growth)^(N-1) (the paper: 0.2)")
parser.add_argument("--batch_size", type=int, default=8, help="examples per device per micro-step")
parser.add_argument("--grad_accum", type=int, default=1)
parser.add_argument("--lr", type=float, default=None,
                    help=f"default {FULL_LR} (full fine-tuning), {LORA_LR} with --lora_r")
parser.add_argument("--lr_scheduler", default="cosine", help="any transformers scheduler name: cosine, linear, constant...")
parser.add_argument("--warmup_ratio", type=float, default=0.03)
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


def tokenize_pairs(tok, records, max_length):
    """[(chosen (ids, labels), rejected (ids, labels) or None, None)]: a pair, or a kept rationale with no loser (its
    NLL term alone), each sequence as tokenize_examples makes it; the last slot takes the pair's reference log-probs
    (with_references). A record with a sequence over max_length is dropped and reported."""
    examples, too_long = [], []
    for r in records:
        texts = [r["chosen"], r["rejected"]] if "rejected" in r else [r["rationale"]]
        seqs, _ = tokenize_examples(tok, [{**r, "rationale": t} for t in texts], 10**9)
        if max(len(x) for x, _ in seqs) > max_length:
            too_long.append(r.get("id"))
        else:
            examples.append((seqs[0], seqs[1] if len(seqs) > 1 else None, None))
    return examples, too_long


def sequences(example):
    """The token sequences of a training example: one (ids, labels) for SFT, chosen then rejected for a pair."""
    return [s for s in example[:2] if s is not None] if isinstance(example[0], tuple) else [example]


def pack(batch):
    """Examples -> one row [1, T]: positions restart at 0 for each example, which makes the attention
    block-diagonal (transformers reads packed sequences from position_ids when no mask is given)."""
    ids = torch.tensor([[t for x, _ in batch for t in x]])
    labels = torch.tensor([[t for _, y in batch for t in y]])
    pos = torch.tensor([[p for x, _ in batch for p in range(len(x))]])
    seq = torch.tensor([[i for i, (x, _) in enumerate(batch) for _ in x]])
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "example": seq}


def pack_pairs(batch):
    """--objective rpo's examples -> one packed row of chosen_0, rejected_0, chosen_1, ..., with the index in the row of
    each example's chosen sequence [examples] and of each pair's rejected one [pairs], which examples are pairs
    [pairs] and, once computed, the pairs' reference log-probs [pairs, 2] (reference_logps)."""
    chosen, rejected, paired = [], [], []
    for j, (c, r, _) in enumerate(batch):
        chosen.append(len(chosen) + len(rejected))
        if r is not None:
            rejected.append(chosen[-1] + 1)
            paired.append(j)
    row = pack([seq for example in batch for seq in sequences(example)])
    row.update(chosen=torch.tensor(chosen), rejected=torch.tensor(rejected),
               paired=torch.tensor(paired, dtype=torch.long))
    if paired and batch[paired[0]][2] is not None:
        row["reference"] = torch.tensor([batch[j][2] for j in paired], dtype=torch.float32)
    return row


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None, **kw):
    """Causal attention within each example of a packed row ([1, heads, T, dim] in, [1, T, heads, dim] out).

    Positions restart at 0 where an example starts. Attending per example costs the sum of the
    squared example lengths, not the square of the row length, and builds no [T, T] mask.
    """
    starts = (position_ids[0] == 0).nonzero().squeeze(1).tolist() + [query.shape[2]]
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each kv head serves `groups` heads
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = [torch.nn.functional.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                            is_causal=True, scale=scaling, dropout_p=dropout)
           for a, b in zip(starts, starts[1:])]
    return torch.cat(out, 2).transpose(1, 2).contiguous(), None


def use_packed_attention(model):
    """Register packed_attention with transformers and switch the model to it (no mask is built)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register("star_packed", packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("star_packed", lambda *args, **kwargs: None)
    model.set_attn_implementation("star_packed")
    return model


def example_nll(model, batch):
    """(summed token NLL [examples], rationale tokens [examples]) of each example of a packed row.

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
    return per_ex_sum, torch.bincount(seq, minlength=n_ex).clamp(min=1)


def packed_loss(model, batch):
    """Mean over examples of each example's mean token loss (each rationale weighs the same)."""
    nll, count = example_nll(model, batch)
    return (nll / count).mean()


def rpo_loss(model, batch, beta, alpha):
    """Iterative RPO's loss (Pang et al. 2024, eq. 1), mean over the examples of a packed row: alpha x the chosen
    rationale's NLL per token, plus for a pair DPO on the log-probability ratios to the reference,
    -log sigmoid(beta x [(log pi(w) - ref(w)) - (log pi(l) - ref(l))]). Log-probabilities are sums over rationale
    tokens; a kept rationale with no loser has the NLL term alone, as in STaR."""
    nll, count = example_nll(model, batch)
    w, l, paired = batch["chosen"], batch["rejected"], batch["paired"]
    loss = alpha * nll[w] / count[w]  # [examples]
    if len(paired):
        logp = -torch.stack([nll[w[paired]], nll[l]], 1)  # [pairs, (chosen, rejected)]
        margin = (logp - batch["reference"].to(nll.device)) @ torch.tensor([beta, -beta], device=nll.device)
        loss = loss.index_add(0, paired, -torch.nn.functional.logsigmoid(margin))
    return loss.mean()


def training_loss(model, batch, args):
    """The loss --objective trains on."""
    return rpo_loss(model, batch, args.beta, args.rpo_alpha) if args.objective == "rpo" else packed_loss(model, batch)


def reference_logps(acc, model, examples, args):
    """Each pair's reference log-probs [pairs, 2] (chosen, rejected), in eval mode without gradients, computed once
    before training. The micro-batches are dealt to the processes in turn and summed across them; a process with
    none left runs a spare one, so that every process makes the same forward calls (FSDP gathers in each)."""
    chunks = [list(range(i, min(i + args.batch_size, len(examples)))) for i in range(0, len(examples), args.batch_size)]
    mine = chunks[acc.process_index::acc.num_processes]
    out = torch.zeros(len(examples), 2, device=acc.device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), acc.autocast():
        for r in tqdm(range(math.ceil(len(chunks) / acc.num_processes)), desc="reference log-probs",
                      disable=not acc.is_main_process, dynamic_ncols=True):
            chunk = mine[r] if r < len(mine) else chunks[0]
            batch = {k: v.to(acc.device) for k, v in pack_pairs([examples[i] for i in chunk]).items()}
            nll, _ = example_nll(model, batch)
            if r < len(mine):
                out[chunk] = -nll.view(-1, 2).float()
    model.train(was_training)
    return acc.reduce(out, "sum").cpu().tolist() if acc.num_processes > 1 else out.cpu().tolist()


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


# ============================================================================= memory plan
# Peak training memory from the config and the run's own rows, printed before the weights are loaded. Units are bytes
# unless a name says GiB. What lives where: full fine-tuning keeps fp32 master weights (under bf16 autocast each
# matmul also makes a bf16 copy of its weight); LoRA under bf16 keeps the frozen base in bf16 and the adapters in
# fp32 (peft's default); in fp32 everything is fp32. Gradients and AdamW states exist for trainable weights only.
GIB = 2**30
ADAMW_BYTES = 8  # exp_avg + exp_avg_sq, fp32 each, per trainable parameter (torch.optim.AdamW)
# Per learned position x vocabulary entry: the fp32 log-probabilities cross_entropy saves (4 B), and at the start of
# backward their fp32 gradient and the logits' gradient (4 + 4 B); the bf16 logits of a GPU forward (2 B) are gone
# by then. Only rationale positions get logits (packed_loss: logits_to_keep).
LOGIT_BYTES = 12
# Measured on CPU: train.py's peak RSS before it loads any weight (Python, torch, transformers, accelerate, the
# tokenizer) is 0.41-0.44 GiB, about 10% of a small run's peak, so it is a line of the plan there. On a GPU the CUDA
# context is already outside torch.cuda.mem_get_info's free memory when the plan is checked.
CPU_RUNTIME_GIB = 0.45


def model_shape(config):
    """The sizes the memory plan needs, from a decoder config (Llama names; GPT-2's are aliased by transformers)."""
    c = config.get_text_config()
    h, heads = c.hidden_size, c.num_attention_heads
    return {"hidden": h, "intermediate": getattr(c, "intermediate_size", None) or 4 * h, "layers": c.num_hidden_layers,
            "heads": heads, "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
            "head_dim": getattr(c, "head_dim", None) or h // heads, "vocab": c.vocab_size}


def count_parameters(config, target_modules=()):
    """(parameters, LoRA parameters per unit of rank): exact, from the model built on the meta device (no memory,
    no weights read, ~1 s for 3B). A LoRA pair on a Linear in -> out adds r x (in + out) parameters."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    per_rank = sum(m.in_features + m.out_features for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in set(target_modules))
    return sum(p.numel() for p in model.parameters()), per_rank  # parameters() counts tied weights once


def layer_activation_bytes(shape, args, bf16, cpu=False):
    """Bytes one decoder layer keeps for backward, per token. The count of what autograd saves in a Llama layer, as
    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", Sec. 4.1) counted it
    for GPT, checked tensor by tensor with torch.autograd.graph.saved_tensors_hooks (tests/test_memory.py).
    bf16: under bf16 autocast matmul outputs are bf16 (2 B); RMSNorm computes in fp32 (4 B) either way. cpu: LoRA's
    dropout keeps a 4 B noise tensor there, a 1 B mask on a GPU."""
    h, i, a = shape["hidden"], shape["intermediate"], shape["heads"] * shape["head_dim"]  # a: attention width
    c = 2 if bf16 else 4
    attention = 4 * a * c + 4 * shape["heads"]  # SDPA: q, k, v (k, v repeated to every head), output; fp32 logsumexp
    mlp = 3 * i * c  # SiLU's input (gate), its output and up: what act(gate) * up needs
    if not args.lora_r:
        norms = 2 * (8 * h + 4)  # each RMSNorm: its fp32 input, x * rsqrt(mean x^2) (for the weight's gradient), rsqrt
        # inputs of the matmuls, for the weight gradients: the normed input (autocast casts it once per projection:
        # q, k, v, gate, up), attention output (o_proj), act(gate) * up (down_proj)
        return norms + (5 if bf16 else 2) * h * c + a * c + i * c + attention + mlp
    widths = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": a, "gate_proj": h, "up_proj": h, "down_proj": i}
    # frozen projections save nothing; each adapter saves its dropout mask (GPU: 1 B bool; CPU: a 4 B noise tensor,
    # measured the same under bf16 autocast) and lora_A's input (bf16 under autocast, else the fp32 dropped input),
    # and lora_A's output (r wide)
    mask = 4 if cpu or not bf16 else 1
    per_input = (2 if bf16 else 4) + (mask if args.lora_dropout else 0)
    targets = inputs = args.lora_target_modules.split(",")
    if not bf16 and not args.lora_dropout:  # lora_A saves its very input: one tensor for q, k, v, one for gate, up
        inputs = {{"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(t, t) for t in targets}
    adapters = sum(per_input * widths.get(t, h) for t in inputs) + len(targets) * args.lora_r * c  # + lora_A outputs
    return 2 * (4 * h + 4) + adapters + attention + mlp  # norms: fp32 input and rsqrt (frozen norm weights)


def estimate_memory(config, n_params, args, device, lora_per_rank=0, tokens=None, learned=None, bf16=None):
    """Peak training memory per process in GiB, term by term, and their sum ("total": an upper bound, the terms need
    not peak together). device: "cuda" or "cpu" (where the runtime is a line); bf16: bf16 autocast (default: on
    "cuda"), else fp32 throughout. tokens: tokens of the longest packed micro-batch (longest_micro_batch), by default
    --batch_size x --max_length (an upper bound: a row holds at most that many); learned: the most rationale tokens
    of a micro-batch (the logits' positions), by default all of them."""
    shape, lora = model_shape(config), args.lora_r > 0
    bf16 = device == "cuda" if bf16 is None else bf16
    tokens = tokens or args.batch_size * args.max_length
    trainable = args.lora_r * lora_per_rank if lora else n_params
    # LoRA: frozen base in bf16 under bf16 (else fp32) and fp32 adapters; full fine-tuning: fp32 master weights
    weights = ((2 if bf16 else 4) * n_params + 4 * trainable) if lora else 4 * n_params
    copies = 2 * n_params if bf16 and not lora else 0  # autocast's bf16 casts of the matmul weights, kept for backward
    layer = layer_activation_bytes(shape, args, bf16, cpu=device == "cpu")
    if args.gradient_checkpointing:  # each layer keeps its input; backward recomputes one layer at a time
        per_token = shape["layers"] * shape["hidden"] * (2 if bf16 and lora else 4) + layer
    else:
        per_token = shape["layers"] * layer
    per_token += 8 * shape["hidden"] + 4 + shape["hidden"] * (2 if bf16 else 4)  # final norm, lm_head input
    terms = {"weights": weights, "weight copies": copies, "gradients": 4 * trainable,
             "optimizer states": ADAMW_BYTES * trainable, "activations": tokens * per_token,
             "logits/loss": (learned or tokens) * shape["vocab"] * LOGIT_BYTES}
    plan = {name: value / GIB for name, value in terms.items() if value or name != "weight copies"}
    if device == "cpu":
        plan["runtime"] = CPU_RUNTIME_GIB
    plan["total"] = sum(plan.values())
    return plan


def fsdp_gathered_bytes(config, n_params, bf16):
    """Bytes of the full (unsharded) units FSDP2 holds at once, in the compute dtype (bf16 under mixed precision): the
    embedding unit, which accelerate keeps gathered from forward to backward (with lm_head when it is untied), two
    decoder layers (the one computing and the one prefetched) and one layer's gradients before their reduce-scatter."""
    shape = model_shape(config)
    embedding = shape["vocab"] * shape["hidden"] * (1 if config.get_text_config().tie_word_embeddings else 2)
    layer = (n_params - embedding - shape["hidden"]) / shape["layers"]  # minus the final norm
    return (embedding + 3 * layer) * (2 if bf16 else 4)


def per_process(plan, strategy, processes, gathered=0):
    """The plan of one process of a distributed run: FSDP (full shard) splits weights, their bf16 copies, gradients
    and optimizer states over the processes and adds the units it gathers (`gathered` bytes, fsdp_gathered_bytes);
    DDP keeps a second copy of the gradients in its all-reduce buckets (gradient_as_bucket_view=False, accelerate's
    default)."""
    plan = dict(plan)
    if strategy == "FSDP":
        for name in ("weights", "weight copies", "gradients", "optimizer states"):
            if name in plan:
                plan[name] /= processes
        plan = {**{k: v for k, v in plan.items() if k != "total"}, "gathered": gathered / GIB}
    elif strategy in ("MULTI_GPU", "MULTI_CPU"):
        plan["gradients"] *= 2
    plan["total"] = sum(v for k, v in plan.items() if k != "total")
    return plan


def memory_notes(n_params, args, device, lora_per_rank, vocab, tokens=None, learned=None, bf16=None):
    """One short explanation per line of the plan: what is counted, in which dtype (estimate_memory's arguments)."""
    bf16 = device == "cuda" if bf16 is None else bf16
    trainable = args.lora_r * lora_per_rank if args.lora_r else n_params
    weights = f"fp32 master weights, {n_params / 1e9:.3g}B"
    if args.lora_r:
        weights = (f"{'bf16' if bf16 else 'fp32'} frozen base, {n_params / 1e9:.3g}B + fp32 LoRA r={args.lora_r}, "
                   f"{trainable / 1e6:.3g}M")
    rows = (f"{tokens} tokens (the longest packed micro-batch of {args.batch_size} examples)" if tokens else
            f"{args.batch_size} x {args.max_length} tokens")
    learned = learned or tokens or args.batch_size * args.max_length
    return {"weights": weights, "weight copies": "bf16 casts autocast makes for the matmuls, kept for backward",
            "gradients": f"fp32, {trainable / 1e6:.4g}M trainable",
            "optimizer states": "AdamW exp_avg + exp_avg_sq, fp32",
            "activations": f"{rows}, {'bf16 autocast' if bf16 else 'fp32'}"
                           + (", gradient checkpointing" if args.gradient_checkpointing else ""),
            "logits/loss": f"<= {learned} rationale tokens x {vocab} vocabulary: fp32 log-probs and gradients",
            "runtime": "Python, torch, transformers, tokenizer (measured)",
            "gathered": "FSDP: embedding unit + 2 layers + 1 layer's gradients, unsharded",
            "total": "upper bound: the terms need not peak together"}


def print_memory_plan(plan, notes, print_=print):
    """One fixed-format line per term: `memory <term> <GiB> GiB  <what>`."""
    for name, gib in plan.items():
        print_(f"memory {name:17s} {gib:8.2f} GiB  {notes.get(name, '')}")


def smaller_configurations(args, lora=True):
    """(flags, args) to try when a run does not fit, in the order they are suggested: gradient checkpointing, LoRA
    r=16 (not under FSDP, which train.py refuses it with: lora=False), both, then halving --batch_size with
    --grad_accum doubled (the same effective batch)."""
    steps = [{"gradient_checkpointing": True}] if not args.gradient_checkpointing else []
    if not args.lora_r and lora:
        steps += [{"lora_r": 16}, {"lora_r": 16, "gradient_checkpointing": True}]
    last = steps[-1] if steps else {}
    batch = args.batch_size // 2
    while batch >= 1:
        steps.append({**last, "batch_size": batch, "grad_accum": args.grad_accum * args.batch_size // batch})
        batch //= 2
    out = []
    for step in steps:
        step = {k: v for k, v in step.items() if getattr(args, k) != v}
        flags = " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in step.items())
        out.append((flags, argparse.Namespace(**{**vars(args), **step})))
    return out


def check_gpu_memory(plan, estimate, args, free_gib, lora=True):
    """Raise StarError, before any weight is loaded, when the plan's total exceeds the free GPU memory, naming the
    first smaller configuration that fits (lora=False: none with LoRA). estimate(args) -> plan of another
    configuration."""
    if plan["total"] <= free_gib:
        return
    head = f"training needs about {plan['total']:.1f} GiB (memory plan above) but the GPU has {free_gib:.1f} GiB free"
    for flags, other in smaller_configurations(args, lora):
        total = estimate(other)["total"]
        if total <= free_gib:
            raise StarError(f"{head}: add {flags} (about {total:.1f} GiB), or pass --skip_memory_check to try anyway")
    raise StarError(f"{head}, and neither LoRA nor gradient checkpointing nor --batch_size 1 fits: use a smaller "
                    "--max_length, a GPU with more memory, or FSDP over several (or pass --skip_memory_check)")


def process_plan(config, counts, args, device, bf16, strategy="NO", processes=1, longest=None):
    """One process's plan for these flags: estimate_memory at the longest packed micro-batch longest(args) builds (by
    default the bound --batch_size x --max_length), split as `strategy` (accelerate's name) splits it over `processes`.
    counts: count_parameters(config, the LoRA targets)."""
    n_params, per_rank = counts
    tokens, learned = longest(args) if longest else (None, None)
    gathered = fsdp_gathered_bytes(config, n_params, bf16) if strategy == "FSDP" else 0
    plan = estimate_memory(config, n_params, args, device, per_rank, tokens, learned, bf16)
    return per_process(plan, strategy, processes, gathered)


def plan_memory(acc, args, bf16, longest=None):
    """Load the base model's config (no weights), print the memory plan and, on a GPU, stop when it does not fit.
    longest(args) -> (tokens, learned tokens) of the longest packed micro-batch a run with those flags builds
    (longest_micro_batch). Returns (config, plan): save_checkpoint writes the checkpoint in the config's dtype;
    train_stats.json keeps the plan beside the measured peak."""
    from transformers import AutoConfig

    config = from_pretrained(AutoConfig, args.base_model)
    counts = count_parameters(config, args.lora_target_modules.split(","))
    device, strategy = "cuda" if torch.cuda.is_available() else "cpu", acc.distributed_type.name

    def estimate(a):
        return process_plan(config, counts, a, device, bf16, strategy, acc.num_processes, longest)

    plan, (n_params, per_rank) = estimate(args), counts
    rows = longest(args) if longest else (None, None)
    notes = memory_notes(n_params, args, device, per_rank, model_shape(config)["vocab"], *rows, bf16=bf16)
    print_memory_plan(plan, notes, acc.print)
    if torch.cuda.is_available() and not args.skip_memory_check:
        free = torch.cuda.mem_get_info(acc.device)[0] / GIB
        print_memory_plan({"GPU free": free}, {"GPU free": "torch.cuda.mem_get_info (--skip_memory_check: no check)"},
                          acc.print)
        check_gpu_memory(plan, estimate, args, free, lora=strategy != "FSDP")
    return config, plan


def release_freed_memory():
    """On CPU under glibc, have malloc hand every freed block of 128 KiB or more back to the system at once. By
    default glibc raises its mmap threshold after the first large free and then serves activations from a heap it
    seldom shrinks: on the embedded model (LoRA r=8, 4 x 256 tokens, 2 steps) the peak RSS was 4.9 GiB by default and
    3.4 GiB with this (plan: 3.6 GiB), for the same CPU time (110 s vs 108 s user + system)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, musl): their allocators are left as they are
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; setting it also stops glibc's dynamic raising of it


def base_dtype(config):
    """The dtype the base model is stored in (config.json "dtype", formerly "torch_dtype"); fp32 when it says none,
    as transformers then loads it."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def cast_state_dict(state_dict, dtype):
    """Floating tensors cast to dtype; tensors that share storage (tied embeddings) stay shared."""
    cast, out = {}, {}
    for name, t in state_dict.items():
        if t.is_floating_point() and t.dtype != dtype:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in cast:
                cast[key] = t.to(dtype)
            t = cast[key]
        out[name] = t
    return out


def base_reference(name):
    """How an adapter folder names its base model: a local folder by its absolute path, else the hub id or alias."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def write_weights(model, state_dict, folder, args, dtype):
    """The merged model in `dtype`, the base model's own (full fine-tuning trains fp32 master weights; LoRA merges into
    them); with --save_adapter the adapter alone (peft's files, naming the base), which common.load_weights merges."""
    if args.lora_r and args.save_adapter:
        model.peft_config["default"].base_model_name_or_path = base_reference(args.base_model)
        model.save_pretrained(folder)
        return
    if args.lora_r:
        model = model.merge_and_unload()  # a plain checkpoint: the next stage needs no extra flags
        state_dict = model.state_dict()
    # FSDP gathers tied weights (lm_head = embed_tokens) as two tensors: keep one, as a plain save does
    state_dict = {k: v for k, v in state_dict.items() if k not in getattr(model, "all_tied_weights_keys", {})}
    model.save_pretrained(folder, state_dict=cast_state_dict(state_dict, dtype))  # FSDP: the gathered full weights
    model.config.dtype = str(dtype).split(".")[1]  # save_pretrained wrote the in-memory dtype: say the saved one
    model.config.save_pretrained(folder)


def save_checkpoint(model, state_dict, tok, out, args, log, stats, dtype):
    """Write to <out>.tmp, then rename: a killed run never leaves a folder that looks finished."""
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_weights(model, state_dict, tmp, args, dtype)
    tok.save_pretrained(tmp)
    write_json(os.path.join(tmp, "args.json"), run_info(vars(args)))
    write_json(os.path.join(tmp, "train_stats.json"), stats)
    write_jsonl(os.path.join(tmp, "log.jsonl"), log)
    move_into_place(tmp, out)


def training_steps(args, steps_per_epoch):
    """Optimizer steps: --epochs over the data, or the STaR paper's schedule, a fixed count at iteration 1
    that grows by --steps_growth per iteration (Zelikman et al. 2022: 40 steps at batch 8, then +20% per iteration)."""
    if args.steps:
        return max(1, round(args.steps * (1 + args.steps_growth) ** (args.iteration - 1)))
    return max(1, math.ceil(steps_per_epoch * args.epochs))


def schedule(args, n_examples, processes):
    """(optimizer steps per epoch, optimizer steps of the run); a process takes --batch_size examples per micro-step."""
    steps_per_epoch = math.ceil(math.ceil(n_examples / args.batch_size) / processes / args.grad_accum)
    return steps_per_epoch, training_steps(args, steps_per_epoch)


def epoch_order(n, args, epoch):
    """The order of one epoch's examples, fixed by (seed, epoch), so a resumed run sees the same batches."""
    order = list(range(n))
    random.Random(args.seed * 1000 + epoch).shuffle(order)
    return order


def epoch_loader(examples, args, epoch):
    """One epoch's micro-batches, each packed into one row (acc.prepare deals them to the processes)."""
    order = epoch_order(len(examples), args, epoch)
    return torch.utils.data.DataLoader([examples[i] for i in order], batch_size=args.batch_size,
                                       collate_fn=pack_pairs if args.objective == "rpo" else pack)


def longest_micro_batch(examples, args, processes):
    """(tokens, learned tokens) of the largest packed micro-batches the run will build: those of every epoch it trains,
    dealt to the processes as acc.prepare deals them (accelerate's BatchSamplerShard, which completes a short last
    batch with the epoch's first examples). Each is at most the sum of the --batch_size longest examples, and GSM8K
    rows are far shorter than --max_length: this, not --batch_size x --max_length, is what the memory plan counts."""
    from accelerate.data_loader import BatchSamplerShard

    sizes = [(sum(len(x) for x, _ in sequences(e)), sum(t != -100 for _, y in sequences(e) for t in y))
             for e in examples]  # a pair counts both its sequences
    steps_per_epoch, total = schedule(args, len(examples), processes)
    tokens = learned = 0
    for epoch in range(math.ceil(total / steps_per_epoch)):
        order = epoch_order(len(sizes), args, epoch)
        batches = torch.utils.data.BatchSampler(range(len(order)), args.batch_size, drop_last=False)
        shards = [BatchSamplerShard(batches, processes, rank) for rank in range(processes)] if processes > 1 \
            else [batches]
        for batch in (b for shard in shards for b in shard):
            tokens = max(tokens, sum(sizes[order[i]][0] for i in batch))
            learned = max(learned, sum(sizes[order[i]][1] for i in batch))
    return tokens, learned


def load_resume_state(acc, state_dir, args):
    """(step, log) of a run stopped after a state save; (0, []) for a fresh start."""
    info_path = os.path.join(state_dir, "trainer.json")
    if args.overwrite and acc.is_main_process:
        shutil.rmtree(state_dir, ignore_errors=True)
    if args.overwrite or not os.path.isfile(info_path):
        return 0, []
    with open(info_path) as f:
        info = json.load(f)
    if info["settings"] != resume_settings(vars(args), processes=acc.num_processes):
        raise StarError(f"{state_dir} holds an interrupted run with other settings; rerun it as it was, "
                        "or pass --overwrite to start over")
    acc.load_state(state_dir)
    acc.print(f"resuming from step {info['step']} saved in {state_dir}")
    return info["step"], info["log"]


def save_resume_state(acc, state_dir, args, step, log):
    """accelerate's save_state (model, optimizer, scheduler, RNG) to a temporary folder, then rename."""
    tmp = state_dir + ".tmp"
    acc.save_state(tmp)
    acc.wait_for_everyone()  # every process has written its part (its RNG state) before the rename
    if acc.is_main_process:
        settings = resume_settings(vars(args), processes=acc.num_processes)
        write_json(os.path.join(tmp, "trainer.json"), {"step": step, "log": log, "settings": settings})
        move_into_place(tmp, state_dir)  # the old state stays whole until the new one is in place
    acc.wait_for_everyone()


def save_due(acc, args, step, last_save):
    """Is a state save due after this step? Every --save_steps steps, or --save_minutes after the last one by the main
    process's clock, broadcast so that every process saves at the same step (a save is a collective call)."""
    if args.save_steps and step % args.save_steps == 0:
        return True
    if not args.save_minutes:
        return False
    from accelerate.utils import broadcast

    due = torch.tensor([int(time.time() - last_save >= 60 * args.save_minutes)], device=acc.device)
    return bool(broadcast(due).item())


def train_loop(acc, model, opt, sched, examples, args, start, log, total, steps_per_epoch):
    """Optimizer steps from `start` (0, or a resume point) to `total`; returns (log, real tokens seen by all
    processes, seconds)."""
    step, state_dir = start, args.output_dir + ".state"
    params = [p for p in model.parameters() if p.requires_grad]
    tokens, losses, t0 = 0, [], time.time()
    last_save = t0
    bar = tqdm(total=total, initial=step, desc="training", disable=not acc.is_main_process, dynamic_ncols=True)
    model.train()
    while step < total:
        epoch = step // steps_per_epoch
        loader = acc.prepare(epoch_loader(examples, args, epoch))
        trained = (step - epoch * steps_per_epoch) * args.grad_accum  # micro-batches of this epoch already trained
        for batch in acc.skip_first_batches(loader, trained) if trained else loader:
            with acc.accumulate(model):
                loss = training_loss(model, batch, args)
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
                log.append(log_step(acc, step, total, steps_per_epoch, losses, sched, tokens, t0))
                losses = []
            if step < total and save_due(acc, args, step, last_save):
                save_resume_state(acc, state_dir, args, step, log)
                last_save = time.time()
            if step >= total:
                break
    bar.close()
    return log, int(acc.reduce(torch.tensor(tokens, device=acc.device), "sum")), time.time() - t0


def log_step(acc, step, total, steps_per_epoch, losses, sched, tokens, t0):
    """One fixed-format line per logged optimizer step: the loss of every process's micro-batches since the last line
    (their mean), the learning rate, all processes' tokens/s; the same numbers go to log.jsonl and --report_to."""
    summed = acc.reduce(torch.tensor([sum(losses), len(losses), tokens], dtype=torch.float64, device=acc.device), "sum")
    row = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": round(float(summed[0] / summed[1]), 4),
           "lr": sched.get_last_lr()[0], "tokens_per_s": round(float(summed[2]) / (time.time() - t0), 1)}
    if torch.cuda.is_available():
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    acc.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)  # the main process's trackers
    if acc.is_main_process:
        tqdm.write(f"step {step:5d}/{total} | epoch {row['epoch']:6.3f} | loss {row['loss']:.4f} | "
                   f"lr {row['lr']:.2e} | tok/s {row['tokens_per_s']:8.1f}", file=sys.stdout)
        sys.stdout.flush()  # a log line is out as soon as its step is done, also into a pipe
    return row


# ============================================================================= the run
def check_args(args):
    """Refuse bad flags before anything loads and fill the defaults that depend on others; returns the records."""
    check_positive(vars(args), "epochs", "batch_size", "grad_accum", "lr", "max_length", "logging_steps", "iteration")
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
    if args.beta <= 0 or args.rpo_alpha < 0:
        raise StarError(f"--beta must be > 0 and --rpo_alpha >= 0 (got {args.beta}, {args.rpo_alpha})")
    args.lr = args.lr or (LORA_LR if args.lora_r else FULL_LR)
    args.train_file = args.train_file or f"data/star_iter{args.iteration}_train.jsonl"
    args.pairs_file = args.pairs_file or f"data/star_iter{args.iteration}_pairs.jsonl"
    args.output_dir = (args.output_dir or f"results/model_star_iter{args.iteration}").rstrip("/")
    check_output(args.output_dir, args.overwrite)
    if args.objective == "sft":
        records = read_jsonl(args.train_file, required=("question", "rationale", "answer"))
    else:
        reference_model(args)  # a missing --rpo_reference previous model stops the run here, before anything loads
        pairs = read_jsonl(args.pairs_file, required=("question", "chosen", "rejected"))
        records = pairs + unpaired_rationales(args, pairs)
    if not records:
        raise StarError(f"{training_file(args)} holds no records: nothing to train on")
    return records


def unpaired_rationales(args, pairs):
    """--objective rpo: the kept rationales of --train_file that are no pair's winner (create_data pairs a loser only
    where one was generated), trained on by their NLL term alone, as STaR would; none with --pairs_only or
    --rpo_alpha 0 (the paper's set: the pairs alone)."""
    if args.pairs_only or not args.rpo_alpha:
        return []
    winners = {(p.get("id"), p["chosen"]) for p in pairs}
    return [r for r in read_jsonl(args.train_file, required=("question", "rationale"))
            if (r.get("id"), r["rationale"]) not in winners]


def training_file(args):
    """What --objective trains on: --train_file (sft), or --pairs_file (rpo) and, unless --pairs_only, --train_file."""
    if args.objective == "sft":
        return args.train_file
    return args.pairs_file if args.pairs_only or not args.rpo_alpha else f"{args.pairs_file} + {args.train_file}"


def reference_model(args):
    """--rpo_reference previous: the model that generated iteration N's pairs, results/model_star_iter{N-1} (beside
    --output_dir); at iteration 1 the base model, unless run_star.sh --human_seed left an iteration-0 model."""
    previous = os.path.join(os.path.dirname(args.output_dir), f"model_star_iter{args.iteration - 1}")
    if args.rpo_reference == "base" or (args.iteration == 1 and not os.path.isdir(previous)):
        return args.base_model
    if not os.path.isdir(previous):
        raise StarError(f"--rpo_reference previous needs {previous}, which does not exist")
    return previous


def runs_dir(args):
    """Where --report_to tensorboard writes: <output_dir's folder>/runs/<output name> (results/runs/model_star_iter1),
    outside the checkpoint folder that is renamed into place, so that one `tensorboard --logdir` shows every run."""
    return os.path.join(os.path.dirname(args.output_dir) or ".", "runs")


def shard_on_cpu(acc):
    """A CPU run launched with an FSDP config (ACCELERATE_USE_FSDP, e.g. `accelerate launch --config_file
    configs/accelerate_fsdp.yaml`, as the tests launch it) is switched to FSDP as accelerate switches a GPU run:
    accelerate 1.15 does it for accelerators only (AcceleratorState.__init__) and would run CPU processes as DDP,
    while FSDP2 (torch's fully_shard) itself runs on CPU over gloo."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if acc.distributed_type != DistributedType.MULTI_CPU or os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as on a GPU
    if plugin.fsdp_version != 2:
        raise StarError("FSDP on CPU runs as FSDP2 only: set fsdp_version: 2 in the accelerate config "
                        "(configs/accelerate_fsdp.yaml does)")
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.fsdp_plugin = plugin
    # where AcceleratorState.__init__ records it too: every later AcceleratorState() copies PartialState's type
    acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def make_accelerator(args, device, bf16):
    """accelerate's Accelerator for --dtype and --report_to; sharded on CPU too under an FSDP launch."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # One process may run main() more than once (the tests do): accelerate keeps its state in a process-wide
    # singleton that refuses another mixed precision, so it starts afresh (the launch itself, PartialState, stays).
    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision="bf16" if bf16 else "no", gradient_accumulation_steps=args.grad_accum,
                      cpu=device == "cpu", log_with=None if args.report_to == "none" else args.report_to,
                      project_dir=runs_dir(args))
    shard_on_cpu(acc)
    return acc


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
    """Tokenized examples (needs the tokenizer only: the memory plan is made from them before any weight loads)."""
    tokenize = tokenize_pairs if args.objective == "rpo" else tokenize_examples
    examples, too_long = tokenize(tok, records, args.max_length)
    if too_long:
        acc.print(f"warning: {len(too_long)} examples longer than --max_length {args.max_length} tokens were "
                  f"dropped (ids {too_long[:10]}{'...' if len(too_long) > 10 else ''})")
    if not examples:
        raise StarError(f"no example of {training_file(args)} fits in --max_length {args.max_length}")
    return examples, too_long


def with_references(acc, model, examples, args, dtype):
    """The pairs with their reference log-probs appended: from the model being trained, before its first step (M_0,
    --rpo_reference base), or from the model that generated the pairs (previous), loaded for this and freed."""
    name, pairs = reference_model(args), [e for e in examples if e[1] is not None]
    if not pairs:
        return examples
    if name == args.base_model:
        refs = reference_logps(acc, model, pairs, args)
    else:
        other = use_packed_attention(load_weights(name, dtype)).to(acc.device)
        refs = reference_logps(acc, other, pairs, args)
        del other
    acc.print(f"reference log-probs of {len(pairs)} pairs from {name}")
    refs = iter(refs)
    return [(c, r, next(refs) if r is not None else None) for c, r, _ in examples]


def make_optimizer(acc, model, args, total, device):
    """AdamW (fused on CUDA) and the --lr_scheduler schedule over `total` optimizer steps."""
    from transformers import get_scheduler

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay, fused=device == "cuda")
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
        records = check_args(args)
        device, dtype = device_and_dtype(args.dtype)
        bf16 = dtype == torch.bfloat16  # auto on an older GPU gives fp16 for generation; training stays fp32 there
        if device == "cpu":
            release_freed_memory()  # the host's peak then follows the plan
        acc = make_accelerator(args, device, bf16)
        from accelerate.utils import set_seed

        set_seed(args.seed)
        tok = load_tokenizer(args.base_model)
        examples, too_long = training_examples(acc, tok, records, args)
        # before any weight is loaded, from the rows this run builds: stops in seconds if it cannot fit
        config, plan = plan_memory(acc, args, bf16, lambda a: longest_micro_batch(examples, a, acc.num_processes))
        # LoRA under bf16 keeps the frozen base in bf16 (what makes 3B fit in 24 GB); full FT keeps fp32 master weights.
        model = load_base(args, torch.bfloat16 if bf16 and args.lora_r else torch.float32)
        init_fingerprint = weight_fingerprint(model) if acc.is_main_process else None
        steps_per_epoch, total = schedule(args, len(examples), acc.num_processes)
        model, opt, sched = acc.prepare(model, *make_optimizer(acc, model, args, total, device))
        pairs = sum(1 for e in examples if args.objective == "rpo" and e[1] is not None)
        what = f"{pairs} pairs (DPO + NLL, beta {args.beta:g}, alpha {args.rpo_alpha:g}) and " \
               f"{len(examples) - pairs} rationales with no loser (NLL)" if args.objective == "rpo" \
            else f"{len(examples)} examples"
        acc.print(f"training {args.base_model} on {what} of {training_file(args)}: {total} steps, "
                  f"effective batch {args.batch_size} x {acc.num_processes} processes x {args.grad_accum} accum "
                  f"= {args.batch_size * acc.num_processes * args.grad_accum}, lr {args.lr:g}, "
                  f"{'bf16 autocast' if bf16 else 'fp32'}, distributed: {acc.distributed_type.name}")
        if args.objective == "rpo":  # with the weights training starts from: before a resume loads later ones
            examples = with_references(acc, model, examples, args, dtype)
        step, log = load_resume_state(acc, args.output_dir + ".state", args)
        start_tracking(acc, args, fresh=step == 0)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        log, tokens, seconds = train_loop(acc, model, opt, sched, examples, args, step, log, total, steps_per_epoch)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        stats = {"examples": len(examples), "dropped_too_long": too_long, "steps": total, "seconds": round(seconds, 1),
                 "tokens_per_s": round(tokens / seconds, 1), "peak_memory_gib": peak,
                 "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),  # host memory
                 "memory_plan_gib": {name: round(gib, 2) for name, gib in plan.items()},
                 "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
                 "init_fingerprint": init_fingerprint, "processes": acc.num_processes,
                 "dtype": "bf16" if bf16 else "fp32", "distributed": acc.distributed_type.name,
                 "objective": args.objective, "pairs": pairs if args.objective == "rpo" else None}
        finish(acc, model, tok, args, log, stats, config)


if __name__ == "__main__":
    main()
