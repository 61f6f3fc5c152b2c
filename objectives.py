"""Training objectives: what train.py turns records into and what it minimizes.

    tokenize_examples / tokenize_pairs   records -> token sequences (ids, labels: -100 on the prompt)
    Example, pack_examples               a training example, and a micro-batch of them packed into one row
    epoch_loader, schedule               each epoch's micro-batches (--batch_size examples, or packed up to
                                         --max_tokens_per_batch tokens) and the optimizer steps they make
    packed_loss                          STaR's SFT loss: the mean over examples of each one's mean token NLL
    rpo_loss, reference_logps            Iterative RPO (Pang et al. 2024, https://arxiv.org/abs/2404.19733): DPO on
                                         (chosen, rejected) pairs + the chosen rationale's NLL, and the reference
                                         model's log-probs of every pair, computed once before training
"""
import itertools
import math
import os
import random
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import StarError, build_completion, build_prompt, read_jsonl

# --objective: STaR's fine-tuning on the kept rationales; DPO + NLL on whole pairs (rpo) or on step pairs cut at the
# first false step (step_rpo), both with the kept rationales' NLL beside them
OBJECTIVES = ("sft", "rpo", "step_rpo")
# TokenNLL's chunk: at most this many logits (64 MiB in fp32) exist at once, 341 positions of a 49,152 vocabulary
NLL_CHUNK = 2**24
# config attributes of heads that are not a plain linear projection (Gemma 2's soft-capping, Cohere's and Granite's
# scales): those models' logits come from their own forward (example_nll)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class Example:
    """One training example: a rationale as (token ids, labels), and for a pair of --objective rpo the rejected one
    and, once computed, the reference model's log-probs of both (with_references)."""
    chosen: tuple               # (ids, labels)
    rejected: tuple = None      # (ids, labels), a pair only
    reference: tuple = None     # (log ref(chosen), log ref(rejected)), a pair only

    @property
    def sequences(self):
        """Its token sequences in row order: the chosen one, then the rejected one of a pair."""
        return [self.chosen] + ([self.rejected] if self.rejected is not None else [])


# ============================================================================= records -> token sequences
def tokenize_examples(tok, records, max_length):
    """([(input_ids, labels)], ids of the records over max_length): labels are -100 on the prompt, so only rationale
    tokens are learned (a step pair's: the step's, after the question and its prefix); a record longer than max_length
    is dropped and reported, never cut."""
    examples, too_long = [], []
    for r in records:
        prompt, completion = "".join(build_prompt(tok, r["question"])), build_completion(tok, r["rationale"])
        if "prefix" in r:  # a step pair's step: the prefix's true lines are read as prompt; a step does not end the turn
            prompt, completion = prompt + build_completion(tok, r["prefix"], end=False), r["rationale"]
        p = tok(prompt, add_special_tokens=False).input_ids
        c = tok(completion, add_special_tokens=False).input_ids
        if len(p) + len(c) > max_length:
            too_long.append(r.get("id"))
            continue
        examples.append((p + c, [-100] * len(p) + c))
    return examples, too_long


def tokenize_pairs(tok, records, max_length):
    """([Example], ids dropped): a pair record (chosen, rejected), or a kept rationale with no loser (its NLL term
    alone), each sequence as tokenize_examples makes it. A record with a sequence over max_length is dropped."""
    examples, too_long = [], []
    for r in records:
        texts = [r["chosen"], r["rejected"]] if "rejected" in r else [r["rationale"]]
        seqs, _ = tokenize_examples(tok, [{**r, "rationale": t} for t in texts], 10**9)
        if max(len(x) for x, _ in seqs) > max_length:
            too_long.append(r.get("id"))
        else:
            examples.append(Example(*seqs))
    return examples, too_long


def unpaired_rationales(args, pairs):
    """--objective rpo, step_rpo: the kept rationales of --train_file that are no pair's winner (create_data pairs a loser only
    where one was generated), trained on by their NLL term alone, as STaR would; none with --pairs_only or
    --rpo_alpha 0 (the paper's set: the pairs alone)."""
    if args.pairs_only or not args.rpo_alpha:
        return []
    # a step pair's chosen is one step, not a kept rationale: under step_rpo every kept rationale keeps its NLL
    winners = {(p.get("id"), p["chosen"]) for p in pairs if "prefix" not in p}
    return [r for r in read_jsonl(args.train_file, required=("question", "rationale"))
            if (r.get("id"), r["rationale"]) not in winners]


# ============================================================================= packing
def shared_prefix(sequences):
    """How many leading tokens all sequences of a micro-batch have in common, up to the last prompt token before any
    of them learns (the chat template's system turn and the instruction's first line: 45 of the demo's 87 prompt
    tokens); 0 for a single sequence. pack computes these once for the row, not once per sequence."""
    if len(sequences) < 2:
        return 0
    # position t predicts token t+1: the prefix ends before the position that predicts a sequence's first learned token
    limit = min(next((i for i, t in enumerate(y) if t != -100), len(y)) for _, y in sequences) - 1
    first, n = sequences[0][0], 0
    while n < limit and all(x[n] == first[n] for x, _ in sequences[1:]):
        n += 1
    return n


def pack(sequences, share_prefix=True):
    """(ids, labels) sequences -> one row [1, T] and what the loss and the attention need of it, computed here on the
    host once per micro-batch so that nothing inside the model waits on the device: the row holds the sequences'
    shared prefix once (share_prefix; `prefix` tokens, inside the first sequence) and the rest of each sequence after
    it; positions [1, T] count from 0 in each sequence (from `prefix` after the first); `bounds`, a tuple of where each
    sequence's part starts and the row's end (attention.packed_attention attends within each sequence, the prefix
    included: block-diagonal, no [T, T] mask); `learned` [L], the positions t whose token t+1 is learned; `example`
    [L], which sequence each of them belongs to; `sequences`, their number; `tokens`, the sequences' tokens in all
    (what tokens/s counts). The prefix's hidden states are the same in every sequence (causal attention), so sharing
    it changes nothing but the work: the tokens of the prefix pass the layers once per row instead of once per
    sequence."""
    p = shared_prefix(sequences) if share_prefix else 0
    parts = [(x[p * (i > 0):], y[p * (i > 0):], p * (i > 0)) for i, (x, y) in enumerate(sequences)]
    ids = torch.tensor([[t for x, _, _ in parts for t in x]])
    labels = torch.tensor([[t for _, y, _ in parts for t in y]])
    pos = torch.tensor([[q for x, _, start in parts for q in range(start, start + len(x))]])
    owner = [i for i, (x, _, _) in enumerate(parts) for _ in x]
    # never a part's last position: every part starts on a prompt token (shared_prefix stops before any learned one)
    learned = [t for t, y in enumerate(labels[0, 1:].tolist()) if y != -100]
    bounds = tuple(itertools.accumulate((len(x) for x, _, _ in parts), initial=0))
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "bounds": bounds, "prefix": p,
            "learned": torch.tensor(learned, dtype=torch.long),
            "example": torch.tensor([owner[t + 1] for t in learned], dtype=torch.long), "sequences": len(sequences),
            "tokens": sum(len(x) for x, _ in sequences)}


def pack_examples(batch):
    """A micro-batch of Examples -> one packed row of chosen_0 (rejected_0), chosen_1, ..., with the index in the row
    of each example's chosen sequence [examples] and of each pair's rejected one [pairs], which examples are pairs
    [pairs] and, once computed, the pairs' reference log-probs [pairs, 2]. SFT's examples are single sequences."""
    chosen, rejected, paired = [], [], []
    for j, e in enumerate(batch):
        chosen.append(len(chosen) + len(rejected))
        if e.rejected is not None:
            rejected.append(chosen[-1] + 1)
            paired.append(j)
    row = pack([seq for e in batch for seq in e.sequences])
    row.update(chosen=torch.tensor(chosen), rejected=torch.tensor(rejected),
               paired=torch.tensor(paired, dtype=torch.long))
    if paired and batch[paired[0]].reference is not None:
        row["reference"] = torch.tensor([batch[j].reference for j in paired], dtype=torch.float32)
    return row


# ============================================================================= micro-batches and the schedule
def training_steps(args, steps_per_epoch):
    """Optimizer steps: --epochs over the data, or the STaR paper's schedule, a fixed count at iteration 1
    that grows by --steps_growth per iteration (Zelikman et al. 2022: 40 steps at batch 8, then +20% per iteration)."""
    if args.steps:
        return max(1, round(args.steps * (1 + args.steps_growth) ** (args.iteration - 1)))
    return max(1, math.ceil(steps_per_epoch * args.epochs))


def schedule(args, examples, processes):
    """(optimizer steps per epoch, optimizer steps of the run); a process takes one micro-batch per micro-step."""
    batches = len(token_batches(example_sizes(examples), args, 0)) if args.max_tokens_per_batch \
        else math.ceil(len(examples) / args.batch_size)
    steps_per_epoch = math.ceil(batches / processes / args.grad_accum)
    return steps_per_epoch, training_steps(args, steps_per_epoch)


def epoch_order(n, args, epoch):
    """The order of one epoch's examples, fixed by (seed, epoch), so a resumed run sees the same batches."""
    order = list(range(n))
    random.Random(args.seed * 1000 + epoch).shuffle(order)
    return order


def example_sizes(examples):
    """(tokens, learned tokens) of each example: a pair counts both its sequences."""
    return [(sum(len(x) for x, _ in e.sequences), sum(t != -100 for _, y in e.sequences for t in y)) for e in examples]


def token_batches(sizes, args, epoch):
    """--max_tokens_per_batch: one epoch's micro-batches as lists of example indices, each at most that many tokens
    and --batch_size examples, filled first-fit from the longest example down (equal lengths in the epoch's shuffled
    order: first-fit decreasing packs within a few percent of the fewest rows), then taken in a shuffled order. Only
    examples of equal length swap between epochs, so every epoch has the same number of micro-batches (what the
    schedule counts); examples of distinct lengths stay grouped, their micro-batches in a new order each epoch."""
    bins, room = [], []  # room: [tokens left, examples left] of each bin
    for i in sorted(epoch_order(len(sizes), args, epoch), key=lambda i: -sizes[i][0]):
        j = next((j for j, (left, count) in enumerate(room) if left >= sizes[i][0] and count), None)
        if j is None:
            bins.append([])
            room.append([args.max_tokens_per_batch, args.batch_size])
            j = len(bins) - 1
        bins[j].append(i)
        room[j][0] -= sizes[i][0]
        room[j][1] -= 1
    return [bins[i] for i in epoch_order(len(bins), args, epoch)]


def epoch_loader(examples, args, epoch):
    """One epoch's micro-batches, each packed into one row (acc.prepare deals them to the processes)."""
    if args.max_tokens_per_batch:
        return torch.utils.data.DataLoader(examples, batch_sampler=token_batches(example_sizes(examples), args, epoch),
                                           collate_fn=pack_examples)
    order = epoch_order(len(examples), args, epoch)
    return torch.utils.data.DataLoader([examples[i] for i in order], batch_size=args.batch_size,
                                       collate_fn=pack_examples)


def longest_micro_batch(examples, args, processes):
    """(tokens, learned tokens, same) of the largest packed micro-batches the run will build: those of every epoch it
    trains, dealt to the processes as acc.prepare deals them (accelerate's BatchSamplerShard, which completes a short
    last batch with the epoch's first examples), each row holding its sequences' shared prefix once (pack). Each is at
    most the sum of the --batch_size longest examples, and GSM8K rows are far shorter than --max_length: this, not
    --batch_size x --max_length, is what the memory plan counts. same: every micro-batch has those very sizes (each
    step then allocates what the step before freed: the plan's CPU heap holds no fragments)."""
    from accelerate.data_loader import BatchSamplerShard

    sizes = example_sizes(examples)
    steps_per_epoch, total = schedule(args, examples, processes)
    batches = []  # every micro-batch of the run, as lists of example indices
    for epoch in range(math.ceil(total / steps_per_epoch)):
        if args.max_tokens_per_batch:  # a shard's extra batches repeat whole ones: the largest is among these
            batches += token_batches(sizes, args, epoch)
            continue
        order = epoch_order(len(sizes), args, epoch)
        sampler = torch.utils.data.BatchSampler(order, args.batch_size, drop_last=False)
        shards = [BatchSamplerShard(sampler, processes, rank) for rank in range(processes)] if processes > 1 \
            else [sampler]
        batches += [b for shard in shards for b in shard]
    rows = [[seq for i in b for seq in examples[i].sequences] for b in batches]
    row_tokens = [sum(sizes[i][0] for i in b) - (len(r) - 1) * shared_prefix(r) for b, r in zip(batches, rows)]
    row_learned = [sum(sizes[i][1] for i in b) for b in batches]
    return max(row_tokens, default=0), max(row_learned, default=0), len(set(zip(row_tokens, row_learned))) <= 1


# ============================================================================= losses
class TokenNLL(torch.autograd.Function):
    """The NLL of each target token under a linear vocabulary projection, without keeping its logits: hidden [L, d] and
    the head's weight [V, d] -> nll [L] (fp32), NLL_CHUNK logits at a time in the forward and again in the backward (a
    fused linear cross-entropy, as Liger Kernel's, Hsu et al. 2024, https://arxiv.org/abs/2410.10989). The [L, V]
    logits, their fp32 copy, log-probabilities and gradients were among a CPU step's costliest ops (log-softmax and its
    backward 7%, beside their casts and zero fills: bench_train --profile) and on a GPU 11.7 GiB of the 3B's plan on
    8 x 1024-token rows; the price is the head's matmul run again in the backward. The matmuls run in
    `dtype` (autocast's), the softmax in fp32, as cross_entropy on autocast's logits does."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        h, w = hidden.to(dtype), weight.to(dtype)
        rows = max(1, NLL_CHUNK // w.shape[0])
        lse, picked = [], []
        for i in range(0, len(h), rows):
            logits = (h[i:i + rows] @ w.T).float()  # [rows, V]
            lse.append(torch.logsumexp(logits, -1))
            picked.append(logits.gather(1, targets[i:i + rows, None])[:, 0])
        lse = torch.cat(lse) if lse else h.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(h, w, targets, lse)
        ctx.dtypes = hidden.dtype, weight.dtype
        return lse - (torch.cat(picked) if picked else lse)

    @staticmethod
    def backward(ctx, grad):
        h, w, targets, lse = ctx.saved_tensors
        rows = max(1, NLL_CHUNK // w.shape[0])
        dh, dw = torch.empty_like(h), None
        for i in range(0, len(h), rows):
            p = (h[i:i + rows] @ w.T).float().sub_(lse[i:i + rows, None]).exp_()  # softmax [rows, V], in place
            p[torch.arange(len(p), device=p.device), targets[i:i + rows]] -= 1  # d nll / d logits = softmax - onehot
            g = p.mul_(grad[i:i + rows, None]).to(h.dtype)
            dh[i:i + rows] = g @ w
            if ctx.needs_input_grad[1]:  # summed in the matmuls' dtype, as one matmul over all rows would return it
                dw = g.T @ h[i:i + rows] if dw is None else dw.addmm_(g.T, h[i:i + rows])
        return dh.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1]) if dw is not None else None, None, None


def plain_head(model):
    """The model's output projection when its logits are that linear map alone and its weight is a whole tensor
    (not an FSDP shard), else None (example_nll then takes the model's own logits)."""
    inner = getattr(model, "module", model)  # DDP's wrapper
    head = inner.get_output_embeddings()
    config = inner.config.get_text_config()
    if type(head) is not torch.nn.Linear or head.bias is not None or any(
            getattr(config, a, None) not in (None, 1, 1.0) for a in LOGIT_TRANSFORMS):
        return None
    return None if type(head.weight.data) is not torch.Tensor else head  # FSDP2's DTensor


def example_nll(model, batch):
    """(summed token NLL [sequences], learned tokens [sequences]) of each sequence of a packed row.

    Only positions whose next token is learned reach the vocabulary projection (logits_to_keep): prompt tokens get no
    logits. With a plain linear head, its input comes back from the model's forward (the head is skipped there) and
    TokenNLL computes the NLL chunk by chunk. A sequence's last token would predict the next one's first token, but
    that is a prompt token (-100), never learned."""
    keep, head = batch["learned"], plain_head(model)
    targets = batch["labels"][0, 1:][keep]
    if head is not None:
        head.forward = torch.nn.Identity.forward.__get__(head)  # the model returns the head's input as its logits
    try:
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                    logits_to_keep=keep, packed_bounds=batch["bounds"], packed_prefix=batch["prefix"])
    finally:
        if head is not None:
            del head.forward
    if head is None:
        tok_loss = torch.nn.functional.cross_entropy(out.logits[0].float(), targets, reduction="none")
    else:
        device = out.logits.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else out.logits.dtype
        with torch.autocast(device, enabled=False):
            tok_loss = TokenNLL.apply(out.logits[0], head.weight, targets, dtype)
    n = batch["sequences"]
    per_seq = torch.zeros(n, device=tok_loss.device).index_add(0, batch["example"], tok_loss)
    return per_seq, torch.bincount(batch["example"], minlength=n).clamp(min=1)


def packed_loss(model, batch):
    """Mean over examples of each example's mean token loss (each rationale weighs the same)."""
    nll, count = example_nll(model, batch)
    return (nll / count).mean()


def rpo_loss(model, batch, beta, alpha, dpop_lambda=0.0):
    """(loss, pair metrics) of Iterative RPO (Pang et al. 2024, eq. 1), mean over the examples of a packed row: alpha
    x the chosen rationale's NLL per token, plus for a pair DPO on the log-probability ratios to the reference,
    -log sigmoid(beta x [(log pi(w) - ref(w)) - (log pi(l) - ref(l)) - lambda x max(0, ref(w) - log pi(w))]), the
    last term DPO-Positive's (Pal et al. 2024, https://arxiv.org/abs/2402.13228: it stops the chosen rationale's
    likelihood from falling below the reference's while the margin grows). Log-probabilities are sums over rationale
    tokens; a kept rationale with no loser has the NLL term alone, as in STaR. The metrics: pair_metrics."""
    nll, count = example_nll(model, batch)
    w, l, paired = batch["chosen"], batch["rejected"], batch["paired"]
    loss = alpha * nll[w] / count[w]  # [examples]
    metrics = torch.zeros(len(PAIR_METRICS), dtype=torch.float64)
    if len(paired):
        logp = -torch.stack([nll[w[paired]], nll[l]], 1)  # [pairs, (chosen, rejected)]
        ratio = logp - batch["reference"].to(nll.device)  # log pi - log ref: [pairs, 2]
        margin = beta * (ratio[:, 0] - ratio[:, 1] - dpop_lambda * torch.clamp(-ratio[:, 0], min=0))
        loss = loss.index_add(0, paired, -torch.nn.functional.logsigmoid(margin))
        metrics = pair_metrics(logp.detach(), beta * ratio.detach())
    return loss.mean(), metrics


# What log.jsonl and the tracker show of the pairs (TRL's DPOTrainer logs the same): sums over a micro-batch's pairs,
# averaged over every pair of the logged steps. rewards are beta x (log pi - log ref) of each rationale, log-probs
# summed over its tokens; accuracy: the share of pairs whose chosen reward is above the rejected one.
PAIR_METRICS = ("pairs", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logp_chosen",
                "logp_rejected")


def pair_metrics(logp, rewards):
    """Sums over the pairs (logp, rewards: [pairs, (chosen, rejected)]) in PAIR_METRICS' order, the count first."""
    margin = rewards[:, 0] - rewards[:, 1]
    return torch.stack([torch.tensor(float(len(logp)), device=logp.device), rewards[:, 0].sum(), rewards[:, 1].sum(),
                        margin.sum(), (margin > 0).sum().to(logp.dtype), logp[:, 0].sum(), logp[:, 1].sum()]
                       ).double().cpu()


def training_loss(model, batch, args):
    """(the loss --objective trains on, its pair metrics: PAIR_METRICS' sums, zeros for sft)."""
    if args.objective != "sft":
        return rpo_loss(model, batch, args.beta, args.rpo_alpha, args.dpop_lambda)
    return packed_loss(model, batch), torch.zeros(len(PAIR_METRICS), dtype=torch.float64)


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
            batch = {k: v.to(acc.device) if torch.is_tensor(v) else v
                     for k, v in pack_examples([examples[i] for i in chunk]).items()}
            nll, _ = example_nll(model, batch)
            if r < len(mine):
                out[chunk] = -nll.view(-1, 2).float()
    model.train(was_training)
    return acc.reduce(out, "sum").cpu().tolist() if acc.num_processes > 1 else out.cpu().tolist()


def reference_model(args):
    """--rpo_reference previous: the model that generated iteration N's pairs, results/model_star_iter{N-1} (beside
    --output_dir); at iteration 1 the base model, unless run_star.sh --human_seed left an iteration-0 model."""
    previous = os.path.join(os.path.dirname(args.output_dir), f"model_star_iter{args.iteration - 1}")
    if args.rpo_reference == "base" or (args.iteration == 1 and not os.path.isdir(previous)):
        return args.base_model
    if not os.path.isdir(previous):
        raise StarError(f"--rpo_reference previous needs {previous}, which does not exist")
    return previous
