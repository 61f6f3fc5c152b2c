"""Nothing lost: killed runs resume to the same bytes; bad input is one stderr line, exit 2, outputs untouched."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

import generation
import models
import common
import create_data
import evaluate
import train
from conftest import ROOT

GOOD = {"question": "What is 2 + 3?", "rationale": "Ones: 2 + 3 = 5, write 5, carry 0.\nThe answer is 5.", "answer": "5"}


def run_script(script, args, env=None):
    return subprocess.run([sys.executable, str(ROOT / script)] + args, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def kill_after_batches(script, args, partial, batches):
    """Start a run, SIGKILL it once its partial file holds `batches` finished batches."""
    proc = subprocess.Popen([sys.executable, str(ROOT / script)] + args, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(partial) and sum(1 for _ in open(partial)) > batches:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run was killed mid-way"


def test_create_data_resumes_to_identical_output(tmp_path):
    args = ["--model_name", "smollm2-135m", "--dataset", "arithmetic", "--max_samples", "12", "--k", "2",
            "--batch_size", "4", "--max_new_tokens", "90"]
    whole, cut = str(tmp_path / "whole.jsonl"), str(tmp_path / "cut.jsonl")
    assert run_script("create_data.py", args + ["--output", whole]).returncode == 0
    kill_after_batches("create_data.py", args + ["--output", cut], cut + ".partial", 2)
    assert not os.path.exists(cut), "no final output from a killed run"
    # a rerun with other settings refuses to mix records with the interrupted run
    other = run_script("create_data.py", args + ["--output", cut, "--k", "3"])
    assert other.returncode == 2 and "other settings" in other.stderr
    done = run_script("create_data.py", args + ["--output", cut])
    assert done.returncode == 0 and "resuming" in done.stderr
    assert open(cut, "rb").read() == open(whole, "rb").read()
    assert not os.path.exists(cut + ".partial")


def test_evaluate_resumes_to_identical_output(tmp_path, tiny_llama):
    """A random 2-layer model (every row runs to --max_new_tokens): the resume bookkeeping, not the answers."""
    args = ["--iteration", "0", "--base_model", tiny_llama, "--dataset", "arithmetic", "--max_samples", "16",
            "--batch_size", "2", "--max_new_tokens", "60", "--save_results"]
    whole, cut = str(tmp_path / "whole.json"), str(tmp_path / "cut.json")
    assert run_script("evaluate.py", args + ["--output", whole]).returncode == 0
    kill_after_batches("evaluate.py", args + ["--output", cut], cut + ".partial", 2)
    assert run_script("evaluate.py", args + ["--output", cut]).returncode == 0
    assert open(cut[:-5] + ".jsonl", "rb").read() == open(whole[:-5] + ".jsonl", "rb").read()
    a, b = json.load(open(whole)), json.load(open(cut))
    assert (a["correct"], a["n"]) == (b["correct"], b["n"])


def test_killed_training_leaves_no_checkpoint(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(GOOD) + "\n" for _ in range(64)))
    out = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "train.py"), "--train_file", str(data), "--output_dir", str(out),
                             "--base_model", "smollm2-135m", "--batch_size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # kill once the first optimizer step has been logged
        if line.startswith("step"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "killed mid-training"
    assert not out.exists()


def expect_error(capsys, main, argv, words):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err, err
    assert words in err, err


@pytest.fixture
def existing(tmp_path):
    """A pre-existing output that no failing command may change."""
    path = tmp_path / "old.jsonl"
    path.write_text('{"keep": "me"}\n')
    return path


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("content, words", [
    (None, "no such file"),
    ("", "no records"),
    ('{"question": "q", "rationale": "r", "answer": "1"}\n{not json\n', ":2: not valid JSON"),
    ('{"question": "q", "answer": "1"}\n', ":1: record has no rationale"),
])
def test_train_rejects_bad_train_file(tmp_path, capsys, existing, content, words):
    path = str(tmp_path / "missing.jsonl") if content is None else write(tmp_path, "t.jsonl", content)
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    expect_error(capsys, train.main, ["--train_file", path, "--output_dir", str(out), "--overwrite"], words)
    assert (out / "config.json").read_text() == "{}"


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--lr", "0"), ("--batch_size", "0"), ("--lr", "-1"),
                                        ("--max_tokens_per_batch", "0")])
def test_train_rejects_out_of_range(tmp_path, capsys, flag, value):
    path = write(tmp_path, "t.jsonl", json.dumps(GOOD) + "\n")
    expect_error(capsys, train.main, ["--train_file", path, "--output_dir", str(tmp_path / "m"), flag, value], flag)


@pytest.mark.parametrize("argv, env, words", [
    (["--save_adapter"], {}, "--save_adapter saves a LoRA adapter: it needs --lora_r"),
    (["--lora_r", "8"], {"ACCELERATE_USE_FSDP": "true"}, "--lora_r under FSDP"),  # what an FSDP config's launch sets
    (["--save_minutes", "-1"], {}, "--save_minutes must be >= 0"),
    (["--report_to", "wandb"], {}, "--report_to wandb needs the package wandb"),
    (["--base_model", "smollm2-135m", "--max_tokens_per_batch", "10"], {},
     "--max_tokens_per_batch 10 is below the longest example"),  # before any weight loads
])
def test_train_rejects_bad_combinations(tmp_path, capsys, monkeypatch, argv, env, words):
    if "wandb" in argv and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = write(tmp_path, "t.jsonl", json.dumps(GOOD) + "\n")
    expect_error(capsys, train.main, ["--train_file", path, "--output_dir", str(tmp_path / "m"), *argv], words)


def test_train_rejects_unknown_model(tmp_path, capsys):
    path = write(tmp_path, "t.jsonl", json.dumps(GOOD) + "\n")
    expect_error(capsys, train.main, ["--train_file", path, "--output_dir", str(tmp_path / "m"),
                                      "--base_model", "no-such-model"], "unknown model")


@pytest.mark.parametrize("argv, words", [
    (["--k", "9999", "--dataset", "arithmetic"], "--k 9999 is larger"),
    (["--max_samples", "0"], "--max_samples must be > 0"),
    (["--batch_size", "-1"], "--batch_size must be > 0"),
    (["--dataset", "mnist"], "unknown --dataset"),
    (["--model_name", "no-such-model", "--dataset", "arithmetic"], "unknown model"),
    (["--iteration", "7", "--dataset", "arithmetic"], "results/model_star_iter6, which does not exist"),
])
def test_create_data_rejects_bad_flags(tmp_path, capsys, existing, argv, words):
    expect_error(capsys, create_data.main, argv + ["--output", str(existing), "--overwrite"], words)
    assert existing.read_text() == '{"keep": "me"}\n'


def test_create_data_refuses_existing_output(capsys, existing):
    expect_error(capsys, create_data.main, ["--output", str(existing), "--dataset", "arithmetic"], "--overwrite")
    assert existing.read_text() == '{"keep": "me"}\n'


def test_model_folder_that_is_not_a_checkpoint(tmp_path, capsys, existing):
    expect_error(capsys, create_data.main, ["--model_name", str(tmp_path), "--dataset", "arithmetic",
                                            "--output", str(existing), "--overwrite"], "not a model checkpoint")


def test_data_dir_without_files(tmp_path, capsys, existing):
    expect_error(capsys, create_data.main, ["--data_dir", str(tmp_path), "--model_name", "smollm2-135m",
                                            "--output", str(existing), "--overwrite"], "has no train.jsonl")


def test_gold_answer_not_a_number(tmp_path, capsys, existing):
    for split in ("train", "test"):
        write(tmp_path, f"{split}.jsonl", json.dumps({"question": "q?", "answer": "so\n#### twelve"}) + "\n")
    expect_error(capsys, create_data.main, ["--data_dir", str(tmp_path), "--output", str(existing), "--overwrite",
                                            "--dev_samples", "0"], "is not a number")
    expect_error(capsys, create_data.main, ["--data_dir", str(tmp_path), "--output", str(existing), "--overwrite"],
                 "--dev_samples 200 leaves no train question")  # a one-question file cannot hold out 200


def test_malformed_gsm8k_line(tmp_path, capsys, existing):
    write(tmp_path, "train.jsonl", '{"question": "q", "answer": "#### 1"}\n{"question": oops}\n')
    expect_error(capsys, create_data.main, ["--data_dir", str(tmp_path), "--output", str(existing), "--overwrite"],
                 "train.jsonl:2: not valid JSON")


@pytest.mark.parametrize("argv, words", [
    (["--split", "valid", "--iteration", "0"], "unknown --split"),
    (["--dev_samples", "-1", "--iteration", "0"], "--dev_samples must be >= 0"),
    (["--iteration", "5"], "results/model_star_iter5 does not exist"),
    (["--k", "-1", "--iteration", "0"], "must be >= 0"),
    (["--max_samples", "0", "--iteration", "0"], "--max_samples must be > 0"),
    (["--split", "dev", "--dev_eval_samples", "4", "--iteration", "0"], "--dev_eval_samples 4: a count >= 0, with --split test"),
    (["--dev_eval_samples", "-2", "--iteration", "0"], "--dev_eval_samples -2"),
])
def test_evaluate_rejects_bad_flags(tmp_path, capsys, argv, words):
    expect_error(capsys, evaluate.main, argv + ["--base_model", "smollm2-135m", "--dataset", "arithmetic",
                                                "--output", str(tmp_path / "e.json")], words)


def test_no_hub_and_no_local_data(tmp_path, existing):
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GSM8K_DIR": "", "HF_HOME": str(tmp_path / "hf")}
    r = run_script("create_data.py", ["--model_name", "smollm2-135m", "--output", str(existing), "--overwrite"], env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "GSM8K_DIR" in r.stderr, r.stderr
    assert existing.read_text() == '{"keep": "me"}\n'


def test_debug_shows_traceback(tmp_path):
    r = run_script("train.py", ["--train_file", str(tmp_path / "none.jsonl"), "--output_dir", str(tmp_path / "m"),
                                "--debug"])
    assert r.returncode == 2 and "Traceback" in r.stderr


def check_resume(tmp_path, args, kill_at, launcher=(), inspect=None):
    """A run SIGKILLed after step `kill_at` leaves no checkpoint, only its saved state; rerunning the same command
    resumes from that state and logs the same losses as an uninterrupted run. Returns the step it resumed from.
    launcher: the command that starts train.py (default: python); inspect(state folder) looks at the saved state."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    cmd = [*(launcher or [sys.executable, "-u"]), str(ROOT / "train.py")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if launcher else {})}
    run = lambda out: subprocess.run(cmd + args + ["--output_dir", str(out)], capture_output=True,  # noqa: E731
                                     text=True, timeout=900, env=env)
    r = run(whole)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(cmd + args + ["--output_dir", str(cut)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:  # kill after step `kill_at`, past a saved state: every process of the launch at once
        if f"step {kill_at:5d}/" in line:  # a launcher's progress bars may share the line
            for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
                p.kill()  # every process of the launch (torchrun starts its workers in their own sessions)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "killed mid-training"
    assert not cut.exists() and (tmp_path / "cut.state" / "trainer.json").exists()
    if inspect:
        inspect(tmp_path / "cut.state")
    r = run(cut)
    assert r.returncode == 0 and "resuming from step " in r.stdout + r.stderr, r.stderr[-3000:]
    log = lambda p: [json.loads(x) for x in (p / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert [x["step"] for x in log(cut)] == [x["step"] for x in log(whole)]
    assert [x["loss"] for x in log(cut)] == pytest.approx([x["loss"] for x in log(whole)], abs=1e-3)
    assert not (tmp_path / "cut.state").exists()
    return int((r.stdout + r.stderr).split("resuming from step ")[1].split()[0])


@pytest.mark.parametrize("save, resumed_from", [
    (["--save_steps", "2"], (2,)),
    # --save_minutes (default 30: the tests and the demo never reach it) saves by the clock; here after every step,
    # and the save after step 3 may or may not have been renamed into place when the kill lands
    (["--save_minutes", "1e-9"], (2, 3)),
])
def test_training_resumes_from_saved_state(tmp_path, tiny_llama, gsm8k_records, save, resumed_from):
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_records[:8]))
    args = ["--train_file", str(data), "--base_model", tiny_llama, "--batch_size", "1", "--epochs", "1",
            "--lr", "1e-3", "--dtype", "fp32", *save]
    assert check_resume(tmp_path, args, 3) in resumed_from


def test_fsdp_resumes_from_sharded_state(tmp_path, tiny_llama, gsm8k_records):
    """Under the shipped FSDP config (2 CPU processes, gloo) the resume state is sharded, one part per process
    (torch's distributed checkpoint), with no full copy of the weights or optimizer in it; a run killed after
    step 3 resumes from step 2 and logs the losses of an uninterrupted run."""
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_records))  # 16: 8 steps of 2 x 1
    args = ["--train_file", str(data), "--base_model", tiny_llama, "--batch_size", "1", "--epochs", "1",
            "--lr", "1e-3", "--dtype", "fp32", "--save_steps", "2", "--max_length", "512"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs" / "accelerate_fsdp.yaml"), "--num_processes", "2", "--main_process_port", "0"]
    def sharded(state):
        parts = {p.relative_to(state).as_posix() for p in state.rglob("*") if p.is_file()}
        assert {"pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"} <= parts, parts
        assert not any(p.endswith((".bin", ".safetensors")) and "optimizer" not in p and "model" in p for p in parts)

    assert check_resume(tmp_path, args, 3, launcher, inspect=sharded) == 2


def test_create_data_that_keeps_nothing_says_so_and_writes_stats(tmp_path, capsys):
    out = str(tmp_path / "none.jsonl")
    with pytest.raises(SystemExit) as e:
        create_data.main(["--model_name", "smollm2-135m", "--dataset", "arithmetic", "--max_samples", "2", "--k", "1",
                          "--max_new_tokens", "1", "--output", out])
    err = capsys.readouterr().err  # progress bars ran first; the error is the last line
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: no rationale was kept out of 2 questions")
    assert not os.path.exists(out)
    assert json.load(open(out + ".stats.json"))["total_kept"] == 0


def test_unwritable_output_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(generation, "load_generator", no_loading)  # the job both scripts open
    data = write(tmp_path, "t.jsonl", json.dumps(GOOD) + "\n")
    expect_error(capsys, create_data.main, ["--model_name", "smollm2-135m", "--dataset", "arithmetic",
                                            "--output", "/proc/x.jsonl"], "cannot write /proc/x.jsonl")
    expect_error(capsys, evaluate.main, ["--iteration", "0", "--base_model", "smollm2-135m", "--dataset", "arithmetic",
                                         "--output", "/proc/x.json"], "cannot write /proc/x.json")
    expect_error(capsys, train.main, ["--train_file", data, "--base_model", "smollm2-135m", "--output_dir", "/proc/x"],
                 "cannot write /proc/x")


def test_evaluate_names_outputs_after_the_model(tmp_path, monkeypatch):
    assert evaluate.model_label("results/model_star_iter2/") == ("iter2", 2)
    assert evaluate.model_label("meta-llama/Llama-3.2-3B-Instruct") == ("Llama-3.2-3B-Instruct", None)
    monkeypatch.chdir(tmp_path)
    evaluate.main(["--model", "smollm2-135m", "--dataset", "arithmetic", "--max_samples", "2", "--max_new_tokens", "8"])
    result = json.load(open("results/eval_smollm2-135m.json"))
    assert result["iteration"] is None and result["model"] == "smollm2-135m" and result["n"] == 2
    assert not os.path.exists("results/eval_iter1.json")


def test_resume_refuses_a_partial_from_other_weights(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(3 * 2**20))
    before = models.model_identity(str(folder))
    shutil.copytree(folder, tmp_path / "copy")
    assert models.model_identity(str(tmp_path / "copy")) == before  # a copy holds the same weights
    weights = bytearray((folder / "model.safetensors").read_bytes())
    weights[-10] ^= 1  # retrained: other weights under the same name
    (folder / "model.safetensors").write_bytes(bytes(weights))
    after = models.model_identity(str(folder))
    assert after != before
    partial = str(tmp_path / "o.jsonl.partial")
    assert generation.load_partial(partial, {"k": 4, "model_weights": before}, False) == {}
    with pytest.raises(common.StarError, match=r"other settings \(model_weights\)"):
        generation.load_partial(partial, {"k": 4, "model_weights": after}, False)


def test_failed_output_write_keeps_the_generations(tmp_path, monkeypatch):
    """A full disk when the output is written: the partial file (every generation) is still there to resume."""
    out = str(tmp_path / "o.jsonl")
    argv = ["--model_name", "smollm2-135m", "--dataset", "arithmetic", "--max_samples", "10", "--k", "4",
            "--batch_size", "10", "--no_rationalization", "--seed", "2", "--dtype", "fp32", "--output", out]
    # as test_sampling's greedy run: exemplars and dtype under which some rationales are kept (2 of 10 measured)

    def disk_full(path, records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(create_data, "write_jsonl", disk_full)
    with pytest.raises(OSError):
        create_data.main(argv)
    assert os.path.exists(out + ".partial") and not os.path.exists(out)
    monkeypatch.undo()
    create_data.main(argv)  # resumes from the partial file: nothing is generated again
    assert os.path.exists(out) and not os.path.exists(out + ".partial") and open(out).read().strip()
