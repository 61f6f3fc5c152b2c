"""Several processes on CPU (torchrun, gloo): the same outputs as one process, for generation, DDP training and FSDP
training launched with the shipped configs/accelerate_fsdp.yaml."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

ARITH = ["--dataset", "arithmetic", "--max_samples", "8", "--batch_size", "2", "--max_new_tokens", "80"]


def launch(script, args, processes, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
           str(29500 + os.getpid() % 1000), str(ROOT / script)] if processes > 1 else [sys.executable, str(ROOT / script)]
    r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_evaluate_two_processes_equal_one(tmp_path, tiny_llama):
    base = ["--iteration", "0", "--base_model", tiny_llama, "--save_results", *ARITH]
    launch("evaluate.py", base + ["--output", "one.json"], 1, tmp_path)
    launch("evaluate.py", base + ["--output", "two.json"], 2, tmp_path)
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert (one["n"], one["correct"]) == (two["n"], two["correct"]) and two["processes"] == 2


def test_create_data_two_processes_equal_one(tmp_path):
    base = ["--model_name", "smollm2-135m", "--k", "4", *ARITH[:-4], "--batch_size", "4"]  # full-length answers
    launch("create_data.py", base + ["--output", "one.jsonl"], 1, tmp_path)
    launch("create_data.py", base + ["--output", "two.jsonl"], 2, tmp_path)
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
    one, two = (json.loads((tmp_path / f"{n}.jsonl.stats.json").read_text()) for n in ("one", "two"))
    assert {k: one[k] for k in ("questions_seen", "stage1_correct", "stage2_correct", "tokens_generated")} == \
        {k: two[k] for k in ("questions_seen", "stage1_correct", "stage2_correct", "tokens_generated")}
    assert one["stage1_correct"] + one["stage2_correct"] > 0, "some are kept: the files compare records"


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def logged_losses(folder):
    return [json.loads(x)["loss"] for x in (folder / "log.jsonl").read_text().splitlines()]


def largest_difference(folder_a, folder_b):
    from safetensors.torch import load_file

    a, b = (load_file(str(Path(f) / "model.safetensors")) for f in (folder_a, folder_b))
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_ddp_training_two_processes_equals_one(tmp_path, tiny_llama, gsm8k_records):
    """torchrun with 2 processes (DDP on gloo, 2 examples each per step) against one process taking 4 per step, on the
    same 16 GSM8K examples in fp32: the same batches, so the logged losses (averaged over the processes) agree within
    1e-3 at every step and the saved weights within 1e-4 (training moves them by ~2.5e-3)."""
    data = write_records(tmp_path / "t.jsonl", gsm8k_records)
    flags = ["--train_file", data, "--base_model", tiny_llama, "--epochs", "1", "--lr", "1e-3", "--dtype", "fp32"]
    launch("train.py", flags + ["--output_dir", "one", "--batch_size", "4"], 1, tmp_path)
    r = launch("train.py", flags + ["--output_dir", "ddp", "--batch_size", "2"], 2, tmp_path)
    assert "x 2 processes" in r.stdout
    stats = json.loads((tmp_path / "ddp" / "train_stats.json").read_text())
    assert (stats["distributed"], stats["processes"], stats["steps"]) == ("MULTI_CPU", 2, 4)
    one, ddp = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "ddp")
    print(f"\nlosses: one process {one}, DDP x 2 {ddp}")
    assert len(ddp) == 4 and ddp == pytest.approx(one, abs=1e-3)
    differ, moved = largest_difference(tmp_path / "one", tmp_path / "ddp"), largest_difference(tmp_path / "one", tiny_llama)
    print(f"weights: one process against DDP x 2 {differ:.1e}, moved by training {moved:.1e}")
    assert differ < 1e-4 and moved > 1e-3


def test_fsdp_with_the_shipped_config_equals_one_process(tmp_path, tiny_llama, gsm8k_records):
    """`accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes 2` (FSDP2 on gloo, the main
    process reading the weights, the other its shard) against one process on the same 16 GSM8K examples: 2 x 2
    examples per step against 4, so the same batches. fp32, so that only summation order differs: the logged losses
    (averaged over the processes) agree within 1e-3 at every step and the saved weights within 1e-4 (training moves
    them by ~2.5e-3); the checkpoint is a whole model (tied embedding saved once) that evaluate.py scores."""
    data = write_records(tmp_path / "t.jsonl", gsm8k_records)
    flags = ["--train_file", data, "--base_model", tiny_llama, "--epochs", "1", "--lr", "1e-3", "--dtype", "fp32",
             "--max_length", "512"]
    launch("train.py", flags + ["--output_dir", "one", "--batch_size", "4"], 1, tmp_path)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" /
           "accelerate_fsdp.yaml"), "--num_processes", "2", "--main_process_port", "0", str(ROOT / "train.py")]
    r = subprocess.run(cmd + flags + ["--output_dir", "fsdp", "--batch_size", "2"], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "memory gathered" in r.stdout and "x 2 processes" in r.stdout  # the plan per FSDP process
    stats = json.loads((tmp_path / "fsdp" / "train_stats.json").read_text())
    assert (stats["distributed"], stats["processes"], stats["steps"]) == ("FSDP", 2, 4)
    log = {name: logged_losses(tmp_path / name) for name in ("one", "fsdp")}
    print(f"\nlosses: one process {log['one']}, FSDP x 2 {log['fsdp']}")
    assert len(log["fsdp"]) == 4 and log["fsdp"] == pytest.approx(log["one"], abs=1e-3)
    from safetensors.torch import load_file

    base, one, fsdp = (load_file(str(p / "model.safetensors")) for p in (Path(tiny_llama), tmp_path / "one",
                                                                            tmp_path / "fsdp"))
    assert set(fsdp) == set(one) == set(base) and "lm_head.weight" not in fsdp
    differ, moved = (max((one[k] - other[k]).abs().max().item() for k in one) for other in (fsdp, base))
    print(f"weights: one process against FSDP x 2 {differ:.1e}, moved by training {moved:.1e}")
    assert differ < 1e-4 and moved > 1e-3
    launch("evaluate.py", ["--model", "fsdp", "--output", "e.json", *ARITH[:4], "--max_new_tokens", "8"], 1, tmp_path)
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 8
    # under bf16 the shards compute in bf16 and reduce their gradients in fp32 (accelerate's policy would use bf16)
    bf16 = [x if x != "fp32" else "bf16" for x in flags]
    r = subprocess.run(cmd + bf16 + ["--output_dir", "fsdp_bf16", "--batch_size", "2"], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bf16 autocast, distributed: FSDP, gradients reduced in float32" in r.stdout


def test_two_nodes_on_one_machine_equal_one_process(tmp_path, tiny_llama, gsm8k_records):
    """configs/slurm_node.sh started twice, as srun starts it on two nodes (SLURM_NNODES=2, SLURM_NODEID=0|1, the
    rendezvous on 127.0.0.1), one process per "node" under configs/accelerate_fsdp.yaml (FSDP2 on gloo): 2 x 2
    examples per step against one process at 4 on the same 16 GSM8K examples in fp32. The logged losses agree
    within 1e-3 at every step and the saved weights within 1e-4; the main process of node 0 alone writes them."""
    data = write_records(tmp_path / "t.jsonl", gsm8k_records)
    flags = ["--train_file", data, "--base_model", tiny_llama, "--epochs", "1", "--lr", "1e-3", "--dtype", "fp32",
             "--max_length", "512"]
    launch("train.py", flags + ["--output_dir", "one", "--batch_size", "4"], 1, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_NNODES": "2", "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29600 + os.getpid() % 300), "PYTHON": sys.executable}
    nodes = [subprocess.Popen(["bash", str(ROOT / "configs" / "slurm_node.sh"), str(ROOT / "train.py"), *flags,
                               "--output_dir", "nodes", "--batch_size", "2"], cwd=tmp_path, text=True,
                              env={**env, "SLURM_NODEID": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in (0, 1)]
    outs = [node.communicate(timeout=900) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    stats = json.loads((tmp_path / "nodes" / "train_stats.json").read_text())
    assert (stats["distributed"], stats["processes"], stats["steps"]) == ("FSDP", 2, 4)
    assert "wrote nodes" in outs[0][0] and "wrote nodes" not in outs[1][0]  # node 0's main process writes
    one, nodes_log = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "nodes")
    print(f"\nlosses: one process {one}, two nodes {nodes_log}")
    assert len(nodes_log) == 4 and nodes_log == pytest.approx(one, abs=1e-3)
    differ = largest_difference(tmp_path / "one", tmp_path / "nodes")
    print(f"weights: one process against two nodes {differ:.1e}")
    assert differ < 1e-4 and largest_difference(tmp_path / "one", tiny_llama) > 1e-3
