"""Attention kernels registered with transformers' AttentionInterface: the shared-prefix attention that generation
decodes with (engines.py) and the packed attention that training runs (train.py).

    prefix_attention   each row of a batch attends to one shared few-shot prefix (stored once) and to its own tokens,
                       merged exactly by log-sum-exp (cascade / Hydragen attention, Juravsky et al. 2024)
    packed_attention   causal attention within each sequence of a packed row (bounds from objectives.pack)

A model whose attention is not a plain softmax over every position (sliding windows, soft-capped scores, sinks) is
computed by neither: shares_prefix tells; generation then decodes with the model's own attention, and training
refuses it with one line rather than train it with the wrong attention.
"""
import functools

import torch

from common import StarError

PREFIX_ATTENTION = "star_prefix"  # the registered names
PACKED_ATTENTION = "star_packed"
BACKWARD_SCORES = 2**22  # attention_backward's largest block of scores (heads x queries x keys)


# ============================================================================= shared-prefix attention (generation)
def attend(q, k, v, scale, mask=None):
    """fp32 softmax attention returning (out, lse); a query that sees no key gets out 0 and lse -inf."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    return torch.exp(s - lse.clamp(min=torch.finfo(s.dtype).min)) @ v.float(), lse


def prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, prefix_kv=None, **kw):
    """Each row attends to the shared prefix (stored once: [1, kv_heads, P, dim], no mask) and to its own
    cached tokens (causal + padding mask), merged exactly by log-sum-exp (Hydragen, Juravsky et al. 2024).

    query [B, heads, T, dim] in, [B, T, heads, dim] out. The query heads of one kv head are adjacent
    (repeat_kv order), so all B rows' queries of a kv head form one matmul against the prefix: the
    prefix is never copied per row.
    """
    B, H, T, D = query.shape
    kvh, L = key.shape[1], key.shape[2]
    g, scale = H // kvh, scaling if scaling is not None else D ** -0.5
    q = query.reshape(B, kvh, g * T, D)  # [B, kv head, (group, t), dim]
    mask = attention_mask if attention_mask is not None else torch.ones(T, L, dtype=torch.bool,
                                                                        device=q.device).tril(L - T)[None, None]
    out, lse = attend(q, key, value, scale, mask.expand(B, 1, T, L).repeat(1, 1, g, 1))
    if prefix_kv is not None:
        pk, pv = prefix_kv[module.layer_idx]
        qp = q.transpose(0, 1).reshape(kvh, B * g * T, D)  # every row's queries of a kv head together
        chunk = max(1, 2**26 // pk.shape[2])  # at most 2^26 scores (256 MiB in fp32) at once: a big batch's prefill
        parts = [attend(qp[:, i:i + chunk], pk[0], pv[0], scale) for i in range(0, qp.shape[1], chunk)]
        out_p, lse_p = (torch.cat(t, 1) for t in zip(*parts))
        out_p, lse_p = (t.view(kvh, B, g * T, -1).transpose(0, 1) for t in (out_p, lse_p))
        m = torch.maximum(lse, lse_p)  # finite: the prefix is never masked
        wa, wb = torch.exp(lse_p - m), torch.exp(lse - m)
        out = (wa * out_p + wb * out) / (wa + wb)
    return out.reshape(B, H, T, D).transpose(1, 2).to(query.dtype), None


def prefix_mask(**kwargs):
    """transformers' sdpa mask, always materialized (never None): [B, 1, T, row cache length] bool."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(**{**kwargs, "allow_is_causal_skip": False})


def shares_prefix(model):
    """Whether prefix_attention computes this model's attention: plain softmax over every cached position.
    Sliding windows (Mistral, Gemma 2/3...), soft-capped scores (Gemma 2) and attention sinks (gpt-oss) are
    not that: those models decode whole prompts with their own attention (the prefix computed per row)."""
    config = model.config.get_text_config()
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return not (windowed or "sliding_attention" in (getattr(config, "layer_types", None) or ())
                or getattr(config, "attn_logit_softcapping", None) or any(hasattr(m, "sinks") for m in model.modules()))


def use_prefix_attention(model):
    """Switch the model to prefix_attention; returns the implementation to restore afterwards."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIX_ATTENTION, prefix_mask)
    old = model.config._attn_implementation
    model.set_attn_implementation(PREFIX_ATTENTION)
    return old


# ============================================================================= packed attention (training)
FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class PackedFlashCPU(torch.autograd.Function):
    """Causal attention per sequence of a packed row on CPU: SDPA's flash kernel and its backward called directly on
    each sequence's slice of q, k, v [1, heads, T, dim]. Autograd through the slices would give every sequence a
    zero-filled gradient the size of the whole row and then sum them (7% of a training step, bench_train --profile);
    here each sequence's gradients are computed once and concatenated. With a shared prefix (the row's first `prefix`
    tokens, held by the first sequence) each later sequence is the prefix and its own part, concatenated; the
    prefix's key and value gradients are summed over the sequences. The backward is attention_backward (explicit
    matmuls: about 1.9x faster than the flash kernel's own backward on the demo's rows, bench/bench_attention.py);
    `backward` (a function with its arguments, such as flash_backward) replaces it."""

    @staticmethod
    def forward(ctx, q, k, v, bounds, scale, prefix=0, backward=None):
        spans = list(zip(bounds, bounds[1:]))
        outs = [FLASH_CPU(*(whole(t, i, a, b, prefix) for t in (q, k, v)), 0.0, True, scale=scale)[:2]
                for i, (a, b) in enumerate(spans)]
        ctx.save_for_backward(q, k, v, *(t for pair in outs for t in pair))  # each sequence's (out, logsumexp)
        ctx.spans, ctx.scale, ctx.prefix, ctx.kernel = spans, scale, prefix, backward or attention_backward
        return torch.cat([out[:, :, prefix * (i > 0):] for i, (out, _) in enumerate(outs)], 2)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *saved = ctx.saved_tensors
        p, grads = ctx.prefix, []
        for i, (a, b) in enumerate(ctx.spans):
            g = grad[:, :, a:b]
            if i and p:  # the prefix's outputs are the first sequence's: none flows back from this copy of them
                g = torch.cat([g.new_zeros(*g.shape[:2], p, g.shape[3]), g], 2)
            # each sequence's q, k, v are concatenated again rather than kept from the forward: a copy of the row less
            grads.append(ctx.kernel(g, *(whole(t, i, a, b, p) for t in (q, k, v)), saved[2 * i], saved[2 * i + 1],
                                    ctx.scale))
        dq, dk, dv = ([g[:, :, p * (i > 0):] for i, g in enumerate(each)] for each in zip(*grads))
        for i in range(1, len(grads) if p else 0):  # every sequence's share of the prefix's key and value gradients
            dk[0][:, :, :p] += grads[i][1][:, :, :p]
            dv[0][:, :, :p] += grads[i][2][:, :, :p]
        return torch.cat(dq, 2), torch.cat(dk, 2), torch.cat(dv, 2), None, None, None, None


def attention_backward(grad, q, k, v, out, lse, scale):
    """The gradients (dq, dk, dv) of causal softmax attention on one sequence [1, heads, T, dim], from its output and
    its rows' log-sum-exp [1, heads, T] (fp32, as the flash kernel returns them): the probabilities are recomputed
    by one matmul (FlashAttention-2's backward, Dao 2023, as products over whole blocks of queries). Products run in
    q's dtype, the softmax and the key and value sums in fp32. Queries go in blocks of at most BACKWARD_SCORES scores
    (16 MiB in fp32 each), a block's keys ending at its last query (causal), so a long sequence never holds [T, T]."""
    T = q.shape[2]
    rows = max(1, BACKWARD_SCORES // (q.shape[1] * T))
    delta = (grad.float() * out.float()).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP), [1, heads, T, 1]
    dq = torch.empty_like(q)
    dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v))
    for a in range(0, T, rows):
        b = min(T, a + rows)
        qa, ga, kb, vb = q[:, :, a:b], grad[:, :, a:b], k[:, :, :b], v[:, :, :b]
        # exp(s - lse) <= 1 where a query sees the key; the future's scores are clamped before exp (no overflow, and
        # exp of -inf is slow on CPU) and zeroed after it
        p = torch.matmul(qa, kb.transpose(-1, -2)).float().mul_(scale).sub_(lse[:, :, a:b, None]).clamp_max_(0)
        p = p.exp_().mul_(torch.ones(b - a, b, device=q.device).tril_(a))
        dv[:, :, :b] += torch.matmul(p.to(q.dtype).transpose(-1, -2), ga)
        ds = p.mul_(torch.matmul(ga, vb.transpose(-1, -2)).float().sub_(delta[:, :, a:b])).mul_(scale).to(q.dtype)
        dq[:, :, a:b] = torch.matmul(ds, kb)
        dk[:, :, :b] += torch.matmul(ds.transpose(-1, -2), qa)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def flash_backward(grad, q, k, v, out, lse, scale):
    """The flash kernel's own backward, with attention_backward's arguments (bench/bench_attention.py compares them)."""
    return FLASH_CPU_BACKWARD(grad, q, k, v, out, lse, 0.0, True, scale=scale)


def whole(t, i, a, b, prefix):
    """Sequence i of a packed row [1, heads, T, dim] whose part is t[:, :, a:b]: after the first, with the row's
    shared prefix before it."""
    return t[:, :, a:b] if i == 0 or not prefix else torch.cat([t[:, :, :prefix], t[:, :, a:b]], 2)


@functools.lru_cache(maxsize=64)
def prefix_layout(bounds, prefix, device):
    """(gather [T'], bounds' of the gathered row, keep [T]) for a packed row whose sequences share its first `prefix`
    tokens (objectives.pack): gathering copies the prefix before each sequence's part after the first, so that each
    sequence is whole again in the gathered row, and keep picks the row's positions back out of it (the prefix from the
    first sequence, which holds it). Computed once per row and device, not per layer."""
    gather, keep, ends = list(range(bounds[1])), list(range(bounds[1])), [0, bounds[1]]
    for a, b in zip(bounds[1:], bounds[2:]):
        keep.extend(range(len(gather) + prefix, len(gather) + prefix + b - a))
        gather.extend([*range(prefix), *range(a, b)])
        ends.append(len(gather))
    return torch.tensor(gather, device=device), tuple(ends), torch.tensor(keep, device=device)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed_bounds=None,
                     packed_prefix=None, **kw):
    """Causal attention within each sequence of a packed row ([1, heads, T, dim] in, [1, T, heads, dim] out).

    packed_bounds: where each sequence's part starts and the row ends, a tuple of ints the packer computed on the host
    (objectives.pack), so no layer waits on the device to learn them. packed_prefix: how many tokens at the row's start
    all its sequences share (held once, by the first; each sequence attends to them as its own first tokens, and
    their keys and values get the gradients of every sequence). Attending per sequence costs the sum of the squared
    lengths, not the square of the row's, and builds no [T, T] mask."""
    if packed_bounds is None or packed_prefix is None:
        raise ValueError("packed attention needs the packed row's bounds and shared prefix: call the model as "
                         "objectives.example_nll does")
    if query.device.type != "cpu" or dropout:
        return packed_sdpa(query, key, value, packed_bounds, packed_prefix, scaling, dropout), None
    if query.shape[1] != key.shape[1]:  # CPU's fused SDPA kernel takes no GQA: enable_gqa there falls back to the
        groups = query.shape[1] // key.shape[1]  # slower math kernel, so the kv heads are repeated to every head
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    if torch.is_autocast_enabled("cpu"):  # SDPA runs in autocast's dtype (rotary embeddings leave q, k in fp32)
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    with torch.autocast("cpu", enabled=False):
        out = PackedFlashCPU.apply(query, key, value, packed_bounds, scale, packed_prefix)
    return out.transpose(1, 2).contiguous(), None


def packed_sdpa(query, key, value, bounds, prefix, scaling=None, dropout=0.0):
    """packed_attention on a GPU (or with dropout): SDPA per sequence, the kv heads shared by their query heads inside
    SDPA (enable_gqa) rather than repeated; a shared prefix is copied before each later sequence (prefix_layout)."""
    shared = prefix and len(bounds) > 2
    if shared:
        gather, bounds, keep = prefix_layout(bounds, prefix, query.device)
        query, key, value = query[:, :, gather], key[:, :, gather], value[:, :, gather]
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling, dropout_p=dropout,
        enable_gqa=query.shape[1] != key.shape[1]) for a, b in zip(bounds, bounds[1:])], 2).transpose(1, 2)
    return out[:, keep] if shared else out.contiguous()


def use_packed_attention(model):
    """Register packed_attention with transformers and switch the model to it (no mask is built)."""
    if not shares_prefix(model):
        raise StarError(f"{model.config.model_type}: its attention has sliding windows, soft-capped scores or sinks, "
                        "which train.py's packed attention does not compute; train a model with plain attention")
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, lambda *args, **kwargs: None)
    model.set_attn_implementation(PACKED_ATTENTION)
    return model

