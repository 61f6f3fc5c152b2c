"""Several processes on CPU (torchrun, gloo): the same outputs as one process; DDP training finishes."""
import json
import os
import subprocess
import sys

from conftest import ROOT

ARITH = ["--dataset", "arithmetic", "--max_samples", "8", "--batch_size", "2", "--max_new_tokens", "80"]


def launch(script, args, processes, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
           str(29500 + os.getpid() % 1000), str(ROOT / script)] if processes > 1 else [sys.executable, str(ROOT / script)]
    r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_evaluate_two_processes_equal_one(tmp_path):
    base = ["--iteration", "0", "--base_model", "smollm2-135m", "--save_results", *ARITH]
    launch("evaluate.py", base + ["--output", "one.json"], 1, tmp_path)
    launch("evaluate.py", base + ["--output", "two.json"], 2, tmp_path)
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert (one["n"], one["correct"]) == (two["n"], two["correct"]) and two["processes"] == 2


def test_create_data_two_processes_equal_one(tmp_path):
    base = ["--model_name", "smollm2-135m", "--k", "4", *ARITH[:-2]]  # full-length answers: some are kept
    launch("create_data.py", base + ["--output", "one.jsonl"], 1, tmp_path)
    launch("create_data.py", base + ["--output", "two.jsonl"], 2, tmp_path)
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
    one, two = (json.loads((tmp_path / f"{n}.jsonl.stats.json").read_text()) for n in ("one", "two"))
    assert {k: one[k] for k in ("questions_seen", "stage1_correct", "stage2_correct", "tokens_generated")} == \
        {k: two[k] for k in ("questions_seen", "stage1_correct", "stage2_correct", "tokens_generated")}


def test_ddp_training_two_processes(tmp_path):
    data = tmp_path / "t.jsonl"
    rows = [{"question": f"What is {i} + 2?", "rationale": f"Ones: {i} + 2 = {i + 2}, write {i + 2}, carry 0.\n"
             f"The answer is {i + 2}.", "answer": str(i + 2)} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = launch("train.py", ["--train_file", str(data), "--output_dir", "m", "--base_model", "smollm2-135m",
                            "--batch_size", "1", "--epochs", "1"], 2, tmp_path)
    assert "x 2 processes" in r.stdout
    stats = json.loads((tmp_path / "m" / "train_stats.json").read_text())
    assert stats["processes"] == 2 and stats["steps"] == 2  # 4 examples / (1 per device x 2 processes)
    launch("evaluate.py", ["--model", "m", "--output", "e.json", *ARITH[:4]], 1, tmp_path)
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 8
