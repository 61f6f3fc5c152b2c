"""common.generate against plain model.generate on the same full prompts (embedded model, real GSM8K)."""
import pytest
import torch

import common
from common import build_prompt, generate, load_model, load_split, pick_exemplars, stop_strings, stop_token_ids
from conftest import GSM8K_DIR


@pytest.fixture(scope="module")
def setup():
    model, tok = load_model("smollm2-135m")
    train = load_split("gsm8k", "train", GSM8K_DIR)
    exemplars = pick_exemplars(train, 2, 0)
    rows = train[20:26]
    prefix = build_prompt(tok, "", exemplars)[0]
    parts = [build_prompt(tok, r["question"], exemplars)[1] for r in rows]
    return model, tok, prefix, parts


def plain_generate(model, tok, prompts, max_new_tokens):
    """The reference: HF generate on the full prompts, left padding, stopping on end-of-turn ids."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=stop_token_ids(model, tok))
    return [out[i, enc.input_ids.shape[1]:].tolist() for i in range(len(prompts))]


def test_greedy_tokens_identical_to_plain_generate(setup):
    model, tok, prefix, parts = setup
    ours = generate(model, tok, prefix, parts, 48, batch_size=4)  # 2 batches, rows of several lengths
    ref = plain_generate(model, tok, [prefix + p for p in parts], 48)
    stops, ids = stop_strings(tok), stop_token_ids(model, tok)
    for (text, n), r in zip(ours, ref):
        r = r[: next((i for i, t in enumerate(r) if t in ids), len(r))]  # up to the first end-of-turn
        # ours stops early at the end of the answer: its tokens are a prefix of the reference's
        ref_text = common.truncate_at_stop(tok.decode(r[:n], skip_special_tokens=True), stops).strip()
        assert text == ref_text
        assert n <= len(r)


def test_results_come_back_in_input_order(setup):
    model, tok, prefix, parts = setup
    one_by_one = [generate(model, tok, prefix, [p], 24, batch_size=1)[0] for p in parts[:3]]
    assert generate(model, tok, prefix, parts[:3], 24, batch_size=3) == one_by_one


def test_out_of_memory_halves_the_batch(setup, monkeypatch, capsys):
    """A CUDA OOM cannot happen on CPU: this raises one for batches over 2 rows, as a GPU would."""
    model, tok, prefix, parts = setup
    real = common.generate_batch
    sizes = []

    def small_memory(model, tok, kv, plen, rows, *a):
        sizes.append(len(rows))
        if len(rows) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(model, tok, kv, plen, rows, *a)

    monkeypatch.setattr(common, "generate_batch", small_memory)
    out = generate(model, tok, prefix, parts[:4], 16, batch_size=8)
    monkeypatch.undo()
    assert sizes == [4, 4, 2, 2] and all(o is not None for o in out)
    assert "batch size halved to 2" in capsys.readouterr().err
    assert out == generate(model, tok, prefix, parts[:4], 16, batch_size=2)
