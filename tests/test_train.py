"""train.py pieces on the embedded model: loss mask, packing equivalence, prompt agreement, LoRA, adapters, tracking."""
import json
import os

import pytest
import torch

import attention
import objectives
import engines
import evaluate
import train
from common import build_prompt, load_split, solution_to_rationale
from models import load_model, load_tokenizer, model_identity, resolve_model
from conftest import GSM8K_DIR, ROOT


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def records():
    rows = load_split("gsm8k", "train", GSM8K_DIR, 5)
    return [{"id": r["id"], "question": r["question"], "rationale": solution_to_rationale(r["solution"]),
             "answer": r["answer"]} for r in rows]


def test_loss_mask_covers_rationale_only(tok, records):
    examples, too_long = objectives.tokenize_examples(tok, records, 1024)
    assert not too_long and len(examples) == 5
    for (ids, labels), r in zip(examples, records):
        prompt = tok("".join(build_prompt(tok, r["question"])), add_special_tokens=False).input_ids
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
        assert labels[len(prompt):] == ids[len(prompt):]  # every rationale token (and end of turn) is learned
        assert ids[-1] == tok.eos_token_id
    batch = objectives.pack(examples)
    # no padding at all, and the prompt's opening that every example shares (system turn, instruction) stored once
    shared = len(os.path.commonprefix([x for x, _ in examples]))
    assert batch["prefix"] == shared > 20 and batch["tokens"] == sum(len(x) for x, _ in examples)
    assert batch["input_ids"].shape == (1, sum(len(x) for x, _ in examples) - 4 * shared)
    row, bounds = batch["input_ids"][0].tolist(), batch["bounds"]
    assert [row[:shared] * (i > 0) + row[a:b] for i, (a, b) in enumerate(zip(bounds, bounds[1:]))] == \
        [x for x, _ in examples]
    assert (batch["labels"] != -100).sum() == sum(sum(t != -100 for t in y) for _, y in examples)
    assert objectives.pack(examples, share_prefix=False)["input_ids"][0].tolist() == [t for x, _ in examples for t in x]


def test_too_long_examples_are_reported_not_cut(tok, records):
    examples, too_long = objectives.tokenize_examples(tok, records, 120)
    lengths = [len(x) for x, _ in objectives.tokenize_examples(tok, records, 10**6)[0]]
    assert too_long == [r["id"] for r, n in zip(records, lengths) if n > 120] and too_long
    assert all(len(x) <= 120 for x, _ in examples)


def test_prompt_is_the_one_evaluate_asks(tok, records):
    """train.py's prompt tokens = evaluate.py's zero-shot prompt tokens (prefix + question part)."""
    examples, _ = objectives.tokenize_examples(tok, records, 1024)
    for (ids, labels), r in zip(examples, records):
        prefix, part = build_prompt(tok, r["question"], [])  # what evaluate.py builds with --k 0
        asked = tok(prefix + part, add_special_tokens=False).input_ids
        assert ids[: labels.index(next(t for t in labels if t != -100))] == asked


def test_packed_loss_equals_mean_of_single_losses(tok, records):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32)
    examples, _ = objectives.tokenize_examples(tok, records[:4], 1024)
    with torch.no_grad():
        # independent reference: HF's own attention and loss on each example alone, no packing involved
        single = [model(input_ids=torch.tensor([x]), labels=torch.tensor([y])).loss.item() for x, y in examples]
        attention.use_packed_attention(model)  # what train.py trains with
        packed = objectives.packed_loss(model, objectives.pack(examples)).item()
    assert packed == pytest.approx(sum(single) / len(single), rel=1e-4)
    # and packing really isolates examples: attending across the whole row changes the loss
    batch = objectives.pack(examples)
    batch["bounds"] = (0, batch["input_ids"].shape[1])
    with torch.no_grad():
        assert abs(objectives.packed_loss(model, batch).item() - packed) > 1e-3


def test_packed_loss_gradients_equal_single_example_gradients(tok, records):
    """The gradient of the packed loss is the gradient of the mean of HF's own per-example losses."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32)
    examples, _ = objectives.tokenize_examples(tok, records[:3], 1024)
    (sum(model(input_ids=torch.tensor([x]), labels=torch.tensor([y])).loss for x, y in examples) / 3).backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    attention.use_packed_attention(model)
    objectives.packed_loss(model, objectives.pack(examples)).backward()
    for name, p in model.named_parameters():
        assert (p.grad - reference[name]).norm() <= 1e-3 * reference[name].norm() + 1e-7, name
    # and the check can fail: attending across the whole row, the gradients differ
    model.zero_grad(set_to_none=True)
    batch = objectives.pack(examples)
    batch["bounds"] = (0, batch["input_ids"].shape[1])
    objectives.packed_loss(model, batch).backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert (grad - reference["model.layers.0.self_attn.q_proj.weight"]).norm() > 1e-2 * grad.norm()


def test_packed_logits_and_gradients_equal_the_models_own_per_example(tiny_llama, gsm8k_records):
    """8 GSM8K examples packed in one row through attention.packed_attention, their shared prompt opening stored once,
    against the model's own attention on each example alone (fp32): the logits of every position of every example
    within 1e-5, and the gradients of the summed per-example losses within 1e-5 of their size."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_llama)
    examples, _ = objectives.tokenize_examples(tok, gsm8k_records[:8], 1024)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    single = [model(input_ids=torch.tensor([x])) for x, _ in examples]
    loss = sum(torch.nn.functional.cross_entropy(o.logits[0, :-1], torch.tensor(y[1:]), ignore_index=-100)
               for o, (_, y) in zip(single, examples))
    loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    attention.use_packed_attention(model)
    batch = objectives.pack(examples)
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], packed_bounds=batch["bounds"],
                   packed_prefix=batch["prefix"])
    shared, bounds = batch["prefix"], list(zip(batch["bounds"], batch["bounds"][1:]))
    positions = [[*range(shared * (i > 0)), *range(a, b)] for i, (a, b) in enumerate(bounds)]  # each one's, in the row
    assert len(bounds) == 8 and shared > 20 and max((packed.logits[0, at] - o.logits[0]).abs().max().item()
                                               for at, o in zip(positions, single)) < 1e-5
    nll, count = objectives.example_nll(model, batch)
    (nll / count).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad - reference[name]).norm() <= 1e-5 * reference[name].norm() + 1e-8, name


@pytest.mark.parametrize("block", [None, 7])
def test_attention_backward_equals_autograd_and_the_flash_kernels(monkeypatch, block):
    """attention.attention_backward (the packed kernel's backward: explicit matmuls from the flash forward's log-sum-exp)
    on one 61-token sequence of 3 heads: in fp32 the gradients of autograd through SDPA's math kernel within 1e-5,
    in one block of queries and in blocks of 7 (what a long sequence takes); in bf16 as close to fp32's as the flash
    kernel's own backward is."""
    if block:
        monkeypatch.setattr(attention, "BACKWARD_SCORES", 3 * 61 * block)
    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(1, 3, 61, 16) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True, scale=0.25)
    expected = torch.autograd.grad(out, leaves, grad)

    def gradients(backward, dtype):
        qd, kd, vd, gd = (t.to(dtype) for t in (q, k, v, grad))
        o, lse = attention.FLASH_CPU(qd, kd, vd, 0.0, True, scale=0.25)[:2]
        return [t.float() for t in backward(gd, qd, kd, vd, o, lse, 0.25)]

    got = gradients(attention.attention_backward, torch.float32)
    assert all((a - b).abs().max().item() < 1e-5 for a, b in zip(got, expected))
    ours, flash = (gradients(f, torch.bfloat16) for f in (attention.attention_backward, attention.flash_backward))
    for a, b, e in zip(ours, flash, expected):
        assert (a - e).abs().max().item() <= 2 * (b - e).abs().max().item() + 1e-2
    # and the check can fail: the same backward at another scale is more than 1e-2 off
    wrong = attention.attention_backward(grad, q, k, v, *attention.FLASH_CPU(q, k, v, 0.0, True, scale=0.25)[:2], 0.3)
    assert all((a - b).abs().max().item() > 1e-2 for a, b in zip(wrong, expected))


def test_shared_prefix_kernels_agree():
    """A row whose 4 sequences share a 7-token prefix, fp32, 4 query heads on 2 kv heads: CPU's kernel (prefix held
    once, the key and value gradients summed over the sequences) and the GPU's path (packed_sdpa: the prefix copied
    before each sequence) give the same output and gradients as SDPA on each sequence written out whole."""
    torch.manual_seed(0)
    prefix, lengths = 7, [20, 15, 25, 12]
    bounds = (0, 20, 28, 46, 51)  # the first sequence whole, then each one's tokens after the prefix
    q, k, v = torch.randn(1, 4, 51, 16), torch.randn(1, 2, 51, 16), torch.randn(1, 2, 51, 16)
    grad = torch.randn(1, 51, 4, 16)
    spans = [[*range(prefix * (i > 0)), *range(a, b)] for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    assert [len(s) for s in spans] == lengths

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad)]

    def written_out(q, k, v):  # each sequence alone, its output rows back where the row holds them
        outs = [torch.nn.functional.scaled_dot_product_attention(q[:, :, s], k[:, :, s], v[:, :, s], is_causal=True,
                                                                 enable_gqa=True)[:, :, prefix * (i > 0):]
                for i, s in enumerate(spans)]
        return torch.cat(outs, 2).transpose(1, 2)

    expected = run(written_out)
    for fn in (lambda *t: attention.packed_attention(None, *t, None, packed_bounds=bounds, packed_prefix=prefix)[0],
               lambda *t: attention.packed_sdpa(*t, bounds, prefix)):
        assert all((a - b).abs().max().item() < 1e-5 for a, b in zip(run(fn), expected))
    # and the check can fail: without the prefix each later sequence attends to its own part alone
    unshared = run(lambda *t: attention.packed_attention(None, *t, None, packed_bounds=bounds, packed_prefix=0)[0])
    assert (unshared[0] - expected[0]).abs().max().item() > 1e-2


def test_bench_attention_layouts_equal_the_packed_kernel():
    """bench/bench_attention.py's two batched layouts (padded flash, padded matmuls recomputing the probabilities in
    the backward) against train.py's per-sequence kernel, fp32, sequences of 5-30 tokens: the output and the three
    gradients within 1e-5, so its timings compare the same function."""
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_attention

    torch.manual_seed(0)
    bounds = (0, 5, 22, 31, 61)
    q, k, v, grad = (torch.randn(1, 3, 61, 16) for _ in range(4))
    expected = bench_attention.run(attention.PackedFlashCPU.apply, q, k, v, grad, bounds, 0.25)
    for name in ("padded_flash", "padded_math"):
        got = bench_attention.run(bench_attention.VARIANTS[name], q, k, v, grad, bounds, 0.25)
        assert all((a - b).abs().max().item() < 1e-5 for a, b in zip(got, expected)), name


def logits_nll(model, batch):
    """The per-sequence NLL as example_nll computed it before TokenNLL: the model's own head, cross_entropy on its
    logits at the learned positions."""
    keep = batch["learned"]
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], logits_to_keep=keep,
                   packed_bounds=batch["bounds"], packed_prefix=batch["prefix"]).logits[0]
    tok_loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"][0, 1:][keep], reduction="none")
    return torch.zeros(batch["sequences"]).index_add(0, batch["example"], tok_loss)


@pytest.mark.parametrize("bf16", [False, True])
def test_token_nll_equals_cross_entropy_on_the_heads_logits(tiny_llama, gsm8k_records, monkeypatch, bf16):
    """example_nll's fused head + NLL (objectives.TokenNLL, in chunks of 100 positions here: 7 chunks for 8 GSM8K
    rationales) gives the NLL and the gradients of cross_entropy on the head's logits: within 1e-5 in fp32, and under
    bf16 autocast within what bf16's rounding allows (the logits are bf16 on both paths)."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_llama)
    examples, _ = objectives.tokenize_examples(tok, gsm8k_records[:8], 1024)
    batch = objectives.pack(examples)
    monkeypatch.setattr(objectives, "NLL_CHUNK", 100 * len(tok))
    assert len(batch["learned"]) > 600
    results = []
    for nll in (logits_nll, lambda m, b: objectives.example_nll(m, b)[0]):
        model = attention.use_packed_attention(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            per_seq = nll(model, batch)
        (per_seq * torch.linspace(0.5, 2, len(per_seq))).sum().backward()  # unequal weights: not only the mean's
        results.append((per_seq.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (reference, reference_grads), (fused, fused_grads) = results
    tol = 1e-2 if bf16 else 1e-5
    assert (fused - reference).abs().max() <= tol * reference.abs().max()
    for name, grad in reference_grads.items():
        assert (fused_grads[name] - grad).norm() <= tol * grad.norm() + 1e-8, name
    assert objectives.plain_head(model) is model.lm_head


def test_token_nll_leaves_transformed_logits_to_the_model(tiny_llama):
    """A head whose logits the model transforms after the projection (Gemma 2's soft-capping) keeps its own forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert objectives.plain_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0
    assert objectives.plain_head(model) is None


def changed_weights(base_dir, out_dir):
    """{tensor name: largest absolute change} between two checkpoint folders' model.safetensors, in fp32."""
    from safetensors.torch import load_file

    base, out = (load_file(os.path.join(str(d), "model.safetensors")) for d in (base_dir, out_dir))
    assert base.keys() == out.keys()
    return {k: (out[k].float() - base[k].float()).abs().max().item() for k in base}


def test_lora_trains_saves_and_loads_without_flags(tmp_path, records):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    out = tmp_path / "lora"
    train.main(["--train_file", str(path), "--output_dir", str(out), "--base_model", "smollm2-135m", "--lora_r", "8",
                "--epochs", "1", "--batch_size", "2", "--lr", "1e-3", "--gradient_checkpointing"])
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()  # merged, plain checkpoint
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["steps"] == 2 and stats["tokens_per_s"] > 0
    changed = changed_weights(resolve_model("smollm2-135m"), out)  # the merge moved the adapted matrices, only them
    targets = tuple(train.parser.get_default("lora_target_modules").split(","))
    adapted = [k for k in changed if k.rsplit(".", 2)[-2] in targets]
    assert len(adapted) == 30 * len(targets) and all(changed[k] > 0 for k in adapted)  # 7 matrices x 30 layers
    assert all(changed[k] == 0 for k in changed if k not in adapted)
    evaluate.main(["--model", str(out), "--dataset", "arithmetic", "--max_samples", "2", "--max_new_tokens", "16",
                   "--output", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 2


def test_grad_accum_2_equals_the_doubled_batch(tmp_path, tiny_llama, gsm8k_records):
    """--batch_size 2 --grad_accum 2 takes the same examples per optimizer step as --batch_size 4 (the epoch's order
    does not depend on the batch size) and averages the same per-example losses: in fp32 the logged losses agree
    within 1e-5 and the saved weights within 1e-5, while training moves them by far more."""
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_records))
    flags = ["--train_file", str(path), "--base_model", tiny_llama, "--epochs", "1", "--lr", "1e-3", "--dtype", "fp32"]
    train.main(flags + ["--output_dir", str(tmp_path / "b4"), "--batch_size", "4"])
    train.main(flags + ["--output_dir", str(tmp_path / "b2a2"), "--batch_size", "2", "--grad_accum", "2"])
    logs = {name: [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("b4", "b2a2")}
    assert [r["step"] for r in logs["b2a2"]] == [r["step"] for r in logs["b4"]] == [1, 2, 3, 4]
    assert [r["loss"] for r in logs["b2a2"]] == pytest.approx([r["loss"] for r in logs["b4"]], abs=1e-5)
    assert max(changed_weights(tmp_path / "b4", tmp_path / "b2a2").values()) < 1e-5
    assert max(changed_weights(tiny_llama, tmp_path / "b4").values()) > 1e-3


def test_token_budget_trains_as_the_packer_says(tmp_path, tiny_llama, gsm8k_records, capsys):
    """--max_tokens_per_batch: a budget that binds nothing (all 16 examples in one row, as --batch_size 16 alone)
    trains the same losses and weights within 1e-5 (fp32); a budget that binds trains one optimizer step per packed
    micro-batch, as many every epoch, and the memory plan names it."""
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_records))
    flags = ["--train_file", str(path), "--base_model", tiny_llama, "--epochs", "2", "--lr", "1e-3", "--dtype", "fp32",
             "--batch_size", "16"]
    train.main(flags + ["--output_dir", str(tmp_path / "rows")])
    train.main(flags + ["--output_dir", str(tmp_path / "loose"), "--max_tokens_per_batch", "100000"])
    logs = {name: [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("rows", "loose")}
    assert [r["loss"] for r in logs["loose"]] == pytest.approx([r["loss"] for r in logs["rows"]], abs=1e-5)
    assert max(changed_weights(tmp_path / "rows", tmp_path / "loose").values()) < 1e-5
    capsys.readouterr()
    train.main(flags + ["--output_dir", str(tmp_path / "tight"), "--max_tokens_per_batch", "1200"])
    args = train.parser.parse_args(flags + ["--max_tokens_per_batch", "1200"])
    tok = load_tokenizer(tiny_llama)
    sizes = objectives.example_sizes([objectives.Example(e) for e in objectives.tokenize_examples(tok, gsm8k_records,
                                                                                                  args.max_length)[0]])
    batches = len(objectives.token_batches(sizes, args, 0))
    stats = json.loads((tmp_path / "tight" / "train_stats.json").read_text())
    assert batches > 1 and stats["steps"] == 2 * batches
    assert "and 1200 tokens)" in capsys.readouterr().out


def test_steps_grow_by_iteration(tmp_path, records):
    """--steps S --steps_growth g trains round(S (1 + g)^(N-1)) optimizer steps at iteration N, whatever the data size."""
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    out = tmp_path / "grown"
    train.main(["--train_file", str(path), "--output_dir", str(out), "--base_model", "smollm2-135m", "--iteration", "3",
                "--steps", "4", "--steps_growth", "0.2", "--batch_size", "2", "--lora_r", "4", "--max_length", "256"])
    stats = json.loads((out / "train_stats.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert stats["steps"] == 6 == len(log) and log[-1]["epoch"] == 6.0  # 4 x 1.2^2 = 5.76: 6 passes over 1 batch
    with pytest.raises(SystemExit) as e:
        train.main(["--train_file", str(path), "--output_dir", str(tmp_path / "x"), "--steps_growth", "0.2"])
    assert e.value.code == 2


def test_save_adapter_loads_as_the_merged_model(tmp_path, tiny_llama, gsm8k_records):
    """--save_adapter writes the LoRA adapter alone (naming its base); models.load_model turns the folder into the
    same weights as the merged checkpoint of the same run, and evaluate.py takes it with no extra flag. Without --lr,
    LoRA trains at LORA_LR (10x full fine-tuning's). --report_to tensorboard (the default) logs the loss of log.jsonl."""
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_records[:8]))
    flags = ["--train_file", str(path), "--base_model", tiny_llama, "--lora_r", "4", "--epochs", "1", "--batch_size",
             "4", "--dtype", "fp32"]
    train.main(flags + ["--output_dir", str(tmp_path / "merged")])
    train.main(flags + ["--output_dir", str(tmp_path / "adapter"), "--save_adapter"])
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_llama
    assert json.loads((adapter / "args.json").read_text())["args"]["lr"] == train.LORA_LR == 10 * train.FULL_LR
    merged, _ = load_model(str(tmp_path / "merged"), dtype="fp32")
    loaded, _ = load_model(str(adapter), dtype="fp32")
    assert type(loaded) is type(merged)  # a plain model, adapter merged
    a, b = merged.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max(changed_weights(tiny_llama, tmp_path / "merged").values()) > 1e-4  # and the merge was no no-op
    identity = model_identity(str(adapter))
    assert identity[0] == ["base", model_identity(tiny_llama)] and identity[1][0] == "adapter_model.safetensors"
    evaluate.main(["--model", str(adapter), "--dataset", "arithmetic", "--max_samples", "2", "--max_new_tokens", "8",
                   "--output", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 2
    # the engine: an adapter folder runs where its base would (vLLM serves it with a LoRARequest: tests/test_vllm.py)
    for rows in (1, 10_000):
        assert engines.pick_engine("auto", str(adapter), rows) == engines.pick_engine("auto", tiny_llama, rows)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "adapter"))
    events.Reload()
    logged = [json.loads(line) for line in (adapter / "log.jsonl").read_text().splitlines()]
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [(r["step"], r["loss"]) for r in logged]
    assert {"train/lr", "train/tokens_per_s"} <= set(events.Tags()["scalars"])
