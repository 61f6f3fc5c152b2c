"""The memory plan: train.py's peak memory per process, term by term, from the base model's config and the longest
packed micro-batch the run will build, printed before any weight is loaded; on a GPU a plan larger than the free
memory stops the run with one line naming a configuration that fits.

    estimate_memory      the terms of one process: weights, their bf16 copies, gradients, AdamW states, activations
                         (what autograd keeps per decoder layer), logits/loss, and on CPU the runtime
    process_plan         the same split as a distributed launch splits it (FSDP shards, DDP's gradient buckets)
    plan_memory          print it, and check it against the GPU's free memory less headroom (usable_gib)
"""
import argparse
import ctypes
import os

import torch

from common import StarError
from models import from_pretrained
from objectives import LOGIT_TRANSFORMS, NLL_CHUNK

# Peak training memory from the config and the run's own rows, printed before the weights are loaded. Units are bytes
# unless a name says GiB. What lives where: full fine-tuning keeps fp32 master weights (under bf16 autocast each
# matmul also makes a bf16 copy of its weight); LoRA under bf16 keeps the frozen base in bf16 and the adapters in
# fp32 (peft's default); in fp32 everything is fp32. Gradients and AdamW states exist for trainable weights only.
GIB = 2**30
ADAMW_BYTES = 8  # exp_avg + exp_avg_sq, fp32 each, per trainable parameter (torch.optim.AdamW)
# Per learned position x vocabulary entry: the fp32 log-probabilities cross_entropy saves (4 B), and at the start of
# backward their fp32 gradient and the logits' gradient (4 + 4 B); the bf16 logits of a GPU forward (2 B) are gone
# by then. Only rationale positions get logits (packed_loss: logits_to_keep). With a plain linear head
# (objectives.TokenNLL) at most NLL_CHUNK positions' logits exist at once: the fp32 softmax, the bf16 logits it came
# from and the bf16 gradient it goes to (4 + 2 + 2 B), counted at the same 12 B.
LOGIT_BYTES = 12
# On CPU, train.py's peak RSS before it loads any weight (Python, torch, transformers, accelerate, the tokenizer),
# measured (docs/training.md): a line of the plan there. On a GPU the CUDA context is already outside
# torch.cuda.mem_get_info's free memory when the plan is checked.
CPU_RUNTIME_GIB = 0.45
# A plan may fill the GPU's free memory less this headroom (usable_gib): 10% for the caching allocator's
# fragmentation, which grows with what is allocated, and 2 GiB for what the plan does not count at all (NCCL's
# communication buffers, cuBLAS/cuDNN workspaces, kernels' scratch memory).
HEADROOM_SHARE, HEADROOM_GIB = 0.10, 2.0
# On CPU the heap is trimmed only when the RSS passes this share of the plan (bound_heap): the plan's promise is 30%
HEAP_BOUND = 1.2
# On CPU, the fragments of the kept heap (keep_heap) where micro-batches differ in size, as a multiple of the
# activations of the longest one: they grow with the steps, and were measured at 1.35-1.92x over the five trainings
# of a `make demo` (36-72 steps; peak RSS less the plan's other lines) and 1.55x over 36 steps on GSM8K rows
# (bench_malloc.py: docs/training.md, "Memory on CPU"). 1.5 keeps those runs' peaks within 13% of the plan, and on
# the GSM8K rows a shorter run's from its 8th step within 30%; 2 would leave its first 16 steps more than 30% under.
HEAP_FRAGMENTS = 1.5
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)
try:  # glibc, whose heap train.py keeps on CPU (keep_heap); None elsewhere (macOS, musl): its allocator as it is
    LIBC = ctypes.CDLL("libc.so.6")
    LIBC.malloc_trim
except (OSError, AttributeError):
    LIBC = None


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
    dropout keeps a 4 B noise tensor there, a 1 B mask on a GPU, and k, v are kept at every head's width."""
    h, i, a = shape["hidden"], shape["intermediate"], shape["heads"] * shape["head_dim"]  # a: attention width
    # k and v: on a GPU SDPA shares them between their query heads (enable_gqa); on CPU they are repeated to every head
    kv = a if cpu else shape["kv_heads"] * shape["head_dim"]
    c = 2 if bf16 else 4
    attention = (2 * a + 2 * kv) * c + 4 * shape["heads"]  # SDPA: q, k, v, output; fp32 logsumexp
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


def estimate_memory(config, n_params, args, device, lora_per_rank=0, tokens=None, learned=None, bf16=None,
                    chunked=True, same=False):
    """Peak training memory per process in GiB, term by term, and their sum ("total": an upper bound, the terms need
    not peak together). device: "cuda" or "cpu" (where the runtime is a line); bf16: bf16 autocast (default: on
    "cuda"), else fp32 throughout. tokens: tokens of the longest packed micro-batch (longest_micro_batch), by default
    --batch_size x --max_length (an upper bound: a row holds at most that many); learned: the most rationale tokens
    of a micro-batch (the logits' positions), by default all of them; chunked: the loss takes the logits in chunks
    (objectives.plain_head: a plain linear head, not sharded by FSDP); same: every micro-batch has those sizes
    (longest_micro_batch), so on CPU the heap holds no fragments."""
    shape, lora = model_shape(config), args.lora_r > 0
    bf16 = device == "cuda" if bf16 is None else bf16
    tokens = tokens or args.batch_size * args.max_length
    logit_rows = learned or tokens
    if chunked and not any(getattr(config.get_text_config(), a, None) not in (None, 1, 1.0) for a in LOGIT_TRANSFORMS):
        logit_rows = min(logit_rows, max(1, NLL_CHUNK // shape["vocab"]))
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
             "logits/loss": logit_rows * shape["vocab"] * LOGIT_BYTES,
             # --rpo_reference previous: that model, whole on every process, for the reference pass before step 1
             "reference model": (2 if bf16 else 4) * n_params if uses_previous_reference(args) else 0}
    plan = {name: value / GIB for name, value in terms.items() if value or name not in ("weight copies",
                                                                                          "reference model")}
    if device == "cpu":
        plan["runtime"] = CPU_RUNTIME_GIB
        # keep_heap: freed blocks stay in a heap that fragments where micro-batches differ in size (its RSS grows
        # step by step); where every micro-batch is the same size, each step's blocks fit the holes of the step
        # before (RSS flat from step 3: docs/training.md, "Memory on CPU")
        plan["heap"] = 0.0 if same else HEAP_FRAGMENTS * terms["activations"] / GIB
    plan["total"] = sum(plan.values())
    return plan


def uses_previous_reference(args):
    """Whether train.py loads a second model for the reference log-probs (--objective rpo|step_rpo --rpo_reference
    previous)."""
    return getattr(args, "objective", "sft") != "sft" and getattr(args, "rpo_reference", "base") == "previous"


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


def memory_notes(n_params, args, device, lora_per_rank, vocab, tokens=None, learned=None, same=False, bf16=None):
    """One short explanation per line of the plan: what is counted, in which dtype (estimate_memory's arguments)."""
    bf16 = device == "cuda" if bf16 is None else bf16
    trainable = args.lora_r * lora_per_rank if args.lora_r else n_params
    weights = f"fp32 master weights, {n_params / 1e9:.3g}B"
    if args.lora_r:
        weights = (f"{'bf16' if bf16 else 'fp32'} frozen base, {n_params / 1e9:.3g}B + fp32 LoRA r={args.lora_r}, "
                   f"{trainable / 1e6:.3g}M")
    cap = f"at most {args.batch_size} examples" + (f" and {args.max_tokens_per_batch} tokens"
                                                    if getattr(args, "max_tokens_per_batch", None) else "")
    rows = (f"{tokens} tokens (the longest packed micro-batch of {cap})" if tokens else
            f"{args.batch_size} x {args.max_length} tokens")
    learned = learned or tokens or args.batch_size * args.max_length
    return {"weights": weights, "weight copies": "bf16 casts autocast makes for the matmuls, kept for backward",
            "gradients": f"fp32, {trainable / 1e6:.4g}M trainable",
            "optimizer states": "AdamW exp_avg + exp_avg_sq, fp32",
            "activations": f"{rows}, {'bf16 autocast' if bf16 else 'fp32'}"
                           + (", gradient checkpointing" if args.gradient_checkpointing else ""),
            "logits/loss": f"<= {learned} rationale tokens x {vocab} vocabulary, at most {max(1, NLL_CHUNK // vocab)} "
                           "at once unless FSDP shards the head (TokenNLL)",
            "runtime": "Python, torch, transformers, tokenizer (measured)",
            "heap": "glibc's heap keeps what is freed (keep_heap): " + (
                "every micro-batch the same size, each step reuses the blocks of the one before" if same
                else f"its fragments, {HEAP_FRAGMENTS:g}x the activations (measured over dozens of steps)"),
            "gathered": "FSDP: embedding unit + 2 layers + 1 layer's gradients, unsharded",
            "reference model": f"--rpo_reference previous: {'bf16' if bf16 else 'fp32'} weights, whole on every "
                               "process, freed before step 1",
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


def usable_gib(free_gib):
    """What of the GPU's free memory a plan may fill: the rest is headroom for what the plan does not count, which
    grows with the memory in use (the caching allocator's fragmentation: HEADROOM_SHARE) or does not (NCCL's
    buffers, cuBLAS and cuDNN workspaces, the kernels' own scratch: HEADROOM_GIB)."""
    return max(free_gib * (1 - HEADROOM_SHARE) - HEADROOM_GIB, 0.0)


def check_gpu_memory(plan, estimate, args, free_gib, lora=True):
    """Raise StarError, before any weight is loaded, when the plan's total exceeds the usable share of the free GPU
    memory, naming the first smaller configuration that fits (lora=False: none with LoRA). estimate(args) -> plan
    of another configuration."""
    usable = usable_gib(free_gib)
    if plan["total"] <= usable:
        return
    head = f"training needs about {plan['total']:.1f} GiB (memory plan above) but the GPU has {free_gib:.1f} GiB " \
           f"free, {usable:.1f} GiB of it usable with headroom"
    for flags, other in smaller_configurations(args, lora):
        total = estimate(other)["total"]
        if total <= usable:
            raise StarError(f"{head}: add {flags} (about {total:.1f} GiB), or pass --skip_memory_check to try anyway")
    raise StarError(f"{head}, and neither LoRA nor gradient checkpointing nor --batch_size 1 fits: use a smaller "
                    "--max_length, a GPU with more memory, or FSDP over several (or pass --skip_memory_check)")


def process_plan(config, counts, args, device, bf16, strategy="NO", processes=1, longest=None):
    """One process's plan for these flags: estimate_memory at the longest packed micro-batch longest(args) builds (by
    default the bound --batch_size x --max_length), split as `strategy` (accelerate's name) splits it over `processes`.
    counts: count_parameters(config, the LoRA targets)."""
    n_params, per_rank = counts
    tokens, learned, same = longest(args) if longest else (None, None, False)
    gathered = fsdp_gathered_bytes(config, n_params, bf16) if strategy == "FSDP" else 0
    plan = estimate_memory(config, n_params, args, device, per_rank, tokens, learned, bf16, strategy != "FSDP", same)
    return per_process(plan, strategy, processes, gathered)


def plan_memory(acc, args, bf16, longest=None):
    """Load the base model's config (no weights), print the memory plan and, on a GPU, stop when it does not fit.
    longest(args) -> (tokens, learned tokens, same sizes throughout) of the longest packed micro-batch a run with
    those flags builds (longest_micro_batch). Returns (config, plan): save_checkpoint writes the checkpoint in the
    config's dtype; train_stats.json keeps the plan beside the measured peak."""
    from transformers import AutoConfig

    config = from_pretrained(AutoConfig, args.base_model)
    counts = count_parameters(config, args.lora_target_modules.split(","))
    device, strategy = "cuda" if torch.cuda.is_available() else "cpu", acc.distributed_type.name

    def estimate(a):
        return process_plan(config, counts, a, device, bf16, strategy, acc.num_processes, longest)

    plan, (n_params, per_rank) = estimate(args), counts
    rows = longest(args) if longest else (None, None, False)
    notes = memory_notes(n_params, args, device, per_rank, model_shape(config)["vocab"], *rows, bf16=bf16)
    print_memory_plan(plan, notes, acc.print)
    if torch.cuda.is_available() and not args.skip_memory_check:
        free = torch.cuda.mem_get_info(acc.device)[0] / GIB
        print_memory_plan({"GPU free": free, "GPU usable": usable_gib(free)},
                          {"GPU free": "torch.cuda.mem_get_info (--skip_memory_check: no check)",
                           "GPU usable": f"free less {HEADROOM_SHARE:.0%} and {HEADROOM_GIB:g} GiB of headroom "
                                         "(fragmentation, NCCL, cuBLAS workspaces)"}, acc.print)
        check_gpu_memory(plan, estimate, args, free, lora=strategy != "FSDP")
    return config, plan


def keep_heap():
    """On CPU under glibc, called once before training: every block comes from the heap (M_MMAP_MAX 0) and what is
    freed stays there (M_TRIM_THRESHOLD 2 GiB), so each step reuses the pages of the step before. By default glibc maps
    each block of 32 MiB or more (logits, the embedding's gradient, AdamW's temporaries) afresh and unmaps it at free,
    and train.py's earlier malloc_trim after each step handed every free page back: each step then faulted its pages
    in again (30.7M minor faults in 36 of the demo's steps against 1.7M, 1.36x the time: bench/bench_malloc.py,
    docs/training.md "Memory on CPU"). The price, fragmentation of a heap that does not shrink, is the plan's `heap`
    line, and bound_heap trims it where a long run's fragments pass the plan's bound. Elsewhere (macOS, musl) nothing."""
    if LIBC is not None:
        LIBC.mallopt(M_MMAP_MAX, 0)
        LIBC.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def rss_gib():
    """The process's resident memory now (Linux's /proc/self/statm), in GiB; 0.0 where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB
    except OSError:
        return 0.0


def bound_heap(plan_gib):
    """keep_heap's bound, after each optimizer step on CPU: once the process's RSS passes HEAP_BOUND x the plan, hand
    the heap's free pages back (malloc_trim), so that a long run's fragments never carry its peak far past the plan.
    Below it (every model of `make demo` stayed there) nothing happens."""
    if LIBC is not None and rss_gib() > HEAP_BOUND * plan_gib:
        LIBC.malloc_trim(0)


def set_mmap_threshold(nbytes):
    """glibc's M_MMAP_THRESHOLD (bench/bench_malloc.py's variants): blocks of `nbytes` or more are mapped and handed back
    at free (setting it also stops glibc's dynamic raising of it); elsewhere (macOS, musl) nothing."""
    if LIBC is not None:
        LIBC.mallopt(M_MMAP_THRESHOLD, nbytes)
