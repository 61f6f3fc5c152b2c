"""Tests run against the real GSM8K beside the checkout (../shared/gsm8k) and the embedded model."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GSM8K_DIR = os.environ.get("GSM8K_DIR", str(ROOT.parent / "shared" / "gsm8k"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A random 2-layer Llama (3.2M parameters, seeded) with the embedded model's tokenizer, saved as a checkpoint
    folder: training runs through the real scripts in seconds (FSDP, adapters, resume)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from models import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=len(tok), tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def gsm8k_records():
    """16 training records in create_data.py's format: GSM8K questions and their human rationales."""
    from common import load_split, solution_to_rationale

    return [{"id": r["id"], "question": r["question"], "rationale": solution_to_rationale(r["solution"]),
             "answer": r["answer"]} for r in load_split("gsm8k", "train", GSM8K_DIR, 16)]
