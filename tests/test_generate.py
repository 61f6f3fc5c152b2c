"""engines.generate against plain model.generate on the same full prompts (embedded model in fp32, real GSM8K)."""
import copy
import re

import pytest
import torch

import attention
import common
import engines
from common import StarError, build_prompts, load_split, pick_exemplars
from models import load_model
from engines import generate, stop_token_ids
from conftest import GSM8K_DIR


@pytest.fixture(scope="module")
def setup():
    model, tok = load_model("smollm2-135m", dtype="fp32")  # exact greedy equality: both sides at one fixed dtype
    train = load_split("gsm8k", "train", GSM8K_DIR)
    exemplars = pick_exemplars(train, 2, 0)
    rows = train[20:26]
    prefix, parts = build_prompts(tok, [r["question"] for r in rows], exemplars)
    return model, tok, prefix, parts


def reference_generate(model, tok, prompts, max_new_tokens, stops):
    """The reference: HF generate on the full prompts, left padding, stopping by HF's own criteria
    (end-of-turn ids and stop strings), not by any code of ours."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=stop_token_ids(model, tok), stop_strings=stops, tokenizer=tok)
    rows = [out[i, enc.input_ids.shape[1]:].tolist() for i in range(len(prompts))]
    return [r[: next((i for i, t in enumerate(r) if t in (tok.pad_token_id, *stop_token_ids(model, tok))), len(r))]
            for r in rows]  # up to the row's own stop (finished rows are padded)


# Written here, not taken from common.py: an answer sentence ("The final answer is N", "The answer is N.") followed
# by a period and a space, or by a newline.
ANSWER_DONE = re.compile(r"answer is:? ?\$?-?[\d,]*\d(?:\.\d+)?\s*(?:\.\s|\n)")


def check_against_reference(model, tok, prefix, parts, stops, max_new_tokens=64):
    """Our greedy output equals the reference's text up to the reference's own stop; we may stop
    earlier only right after the first finished answer sentence."""
    ours = generate(model, tok, prefix, parts, max_new_tokens, batch_size=4)  # 2 batches, rows of several lengths
    ref = reference_generate(model, tok, [prefix + p for p in parts], max_new_tokens, stops)
    early = 0
    for (text, n), r in zip(ours, ref):
        if n < len(r):  # we stopped before the reference did: only allowed right after a finished answer sentence
            early += 1
            assert ANSWER_DONE.search(tok.decode(r[:n])) and not ANSWER_DONE.search(tok.decode(r[:n - 1]))
            r = r[:n]
        assert n == len(r)
        ref_text = tok.decode(r, skip_special_tokens=True)
        for s in stops:
            ref_text = ref_text.split(s)[0]
        assert text == ref_text.strip()
    return early


def test_greedy_output_equals_reference_up_to_its_own_stop(setup):
    model, tok, prefix, parts = setup
    early = check_against_reference(model, tok, prefix, parts, ["Question:"])
    assert early < len(parts), "at least one row ran to the reference's own stop"


def test_shared_prefix_equals_the_whole_prompt_path(setup, monkeypatch):
    """Shared-prefix attention against the same loop with every row holding its whole prompt (the model's own
    attention, as before the prefix was shared): 8 real GSM8K questions, K = 4, fp32, greedy."""
    model, tok, _, _ = setup
    train = load_split("gsm8k", "train", GSM8K_DIR)
    prefix, parts = build_prompts(tok, [r["question"] for r in train[100:108]], pick_exemplars(train, 4, 0))
    shared = generate(model, tok, prefix, parts, 96, batch_size=8)
    monkeypatch.setattr(engines, "shares_prefix", lambda model: False)
    whole = generate(model, tok, prefix, parts, 96, batch_size=8)
    assert sum(a == b for a, b in zip(shared, whole)) >= 7  # texts and token counts; float rounding may move one
    answers = [[common.extract_stated_answer(common.cut_after_answer(text)) for text, _ in out] for out in (shared, whole)]
    print(f"shared-prefix rows equal to whole-prompt rows: {sum(a == b for a, b in zip(shared, whole))}/8, "
          f"final answers equal: {sum(a == b for a, b in zip(*answers))}/8, stated: "
          f"{sum(a is not None for a in answers[0])}")
    assert answers[0] == answers[1] and sum(a is not None for a in answers[0]) >= 4


def test_plain_prompt_path_for_base_models(setup):
    """A tokenizer without a chat template gets "Question: ...\nAnswer: ..." paragraphs and stops at a blank line."""
    model, tok, _, _ = setup
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    train = load_split("gsm8k", "train", GSM8K_DIR)
    exemplars = pick_exemplars(train, 2, 0)
    prefix, parts = build_prompts(plain, [r["question"] for r in train[20:26]], exemplars)
    assert prefix.startswith("Question: " + exemplars[0]["question"] + "\nAnswer: ") and "<|im_start|>" not in prefix
    assert parts[0] == "\n\nQuestion: " + train[20]["question"] + "\nAnswer:"
    for part in parts:  # prefix and question part tokenize as the whole prompt does
        assert (plain(prefix, add_special_tokens=False).input_ids + plain(part, add_special_tokens=False).input_ids
                == plain(prefix + part, add_special_tokens=False).input_ids)
    check_against_reference(model, plain, prefix, parts[:4], ["Question:", "\n\n"], max_new_tokens=32)


def test_results_come_back_in_input_order(setup):
    model, tok, prefix, parts = setup
    one_by_one = [generate(model, tok, prefix, [p], 24, batch_size=1)[0] for p in parts[:3]]
    assert generate(model, tok, prefix, parts[:3], 24, batch_size=3) == one_by_one


def test_out_of_memory_halves_the_batch(setup, monkeypatch, capsys):
    """A CUDA OOM cannot happen on CPU: this raises one for batches over 2 rows, as a GPU would."""
    model, tok, prefix, parts = setup
    real = engines.generate_batch
    sizes = []

    def small_memory(model, tok, kv, plen, rows, *a):
        sizes.append(len(rows))
        if len(rows) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(model, tok, kv, plen, rows, *a)

    monkeypatch.setattr(engines, "generate_batch", small_memory)
    out = generate(model, tok, prefix, parts[:4], 16, batch_size=8)
    monkeypatch.undo()
    assert sizes == [4, 4, 2, 2] and all(o is not None for o in out)
    assert "batch size halved to 2" in capsys.readouterr().err
    assert out == generate(model, tok, prefix, parts[:4], 16, batch_size=2)


def tiny_model(family, vocab_size):
    """A random 2-layer model of another family (seeded), in the layout each family's forward expects."""
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=2048)
    elif family == "gpt_neox":
        config = transformers.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128, max_position_embeddings=2048)
    elif family == "gemma2":  # a 16-token sliding window and soft-capped scores: decoded without a shared prefix
        config = transformers.Gemma2Config(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=16, intermediate_size=128, sliding_window=16,
                                           attn_logit_softcapping=50.0, max_position_embeddings=2048)
    else:
        config = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gpt_neox", "gemma2"])
def test_other_families_equal_reference(setup, family, monkeypatch):
    """Every model call is by keyword and caches are built from the model's config, so any causal LM works
    (Llama is the embedded model above); a model whose attention is not plain softmax over all positions
    (Gemma 2: sliding window, soft-capping) decodes without the shared prefix."""
    _, tok, prefix, parts = setup
    model = tiny_model(family, len(tok))
    assert attention.shares_prefix(model) == (family != "gemma2")
    if family == "gemma2":  # training refuses it rather than train it with the wrong attention
        with pytest.raises(StarError, match="gemma2: its attention has sliding windows"):
            attention.use_packed_attention(model)
    if family == "gemma2":  # the control: forced through the shared prefix, its windowed, capped attention is lost
        monkeypatch.setattr(engines, "shares_prefix", lambda model: True)
        with pytest.raises(AssertionError):
            check_against_reference(model, tok, prefix, parts, ["Question:"], max_new_tokens=12)
        monkeypatch.undo()
    check_against_reference(model, tok, prefix, parts, ["Question:"], max_new_tokens=12)
