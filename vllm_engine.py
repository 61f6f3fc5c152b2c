"""vLLM's offline engine (paged attention, prefix caching; https://docs.vllm.ai) for engines.py: whether it is
installed and knows an architecture, starting it on a checkpoint or a LoRA adapter folder (offline, in the dtype hf
would use, one engine per process under a launcher), and shutting it down. Its decoding loop (vllm_decoder) sits
beside hf's in engines.py, under the same stop rule.
"""
import importlib.util
import json
import os

import torch

from common import StarError
from models import ADAPTER_CONFIG, adapter_base, device_and_dtype, dist_state, from_pretrained, load_tokenizer, resolve_model

# vLLM on CPU reserves a fraction of all host memory unless told a KV-cache size: this many GiB
# (VLLM_CPU_KVCACHE_SPACE, vLLM's own variable, overrides it); K = 10 rows of the embedded model need far less.
VLLM_CPU_KV_GIB = 2
# vLLM on CPU runs eagerly (enforce_eager: no torch.compile) below this many rows: on 2 cores its compiled start took
# about 80 s of a 96 s evaluate.py run of 150 questions (the demo's), the eager one 47 s in all, with decoding 1.2x
# slower (14.2 s against 11.9 s): compiling pays back only after about 3,000 questions (docs/engines.md).
VLLM_EAGER_MAX_ROWS_CPU = 2048
VLLM_MAX_LEN = 8192  # longest prompt + new tokens vLLM accepts: K = 10 GSM8K prompts are about 2,100 tokens
# vLLM gets each process's whole share of the questions in one call (its continuous batching keeps its own
# max_num_seqs in flight), in chunks of at most this many questions: the partial file saves each finished chunk,
# so a killed run loses at most one.
VLLM_CHUNK_QUESTIONS = 4096
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def vllm_installed():
    return importlib.util.find_spec("vllm") is not None


def is_vllm(model):
    return type(model).__module__.startswith("vllm")


def shutdown(model):
    """Shut a vLLM engine down now: its worker processes and their memory go at once, not at the interpreter's exit.
    A Hugging Face model needs nothing."""
    core = getattr(getattr(model, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


def engine_name(model):
    """The engine a loaded generator runs on, as outputs record it."""
    return "vllm" if is_vllm(model) else "hf"


def lora_rank(adapter):
    """The max_lora_rank vLLM needs for an adapter folder: the smallest of vLLM's allowed ranks that holds its r."""
    with open(os.path.join(adapter, ADAPTER_CONFIG)) as f:
        r = json.load(f)["r"]
    rank = next((rank for rank in VLLM_LORA_RANKS if rank >= r), None)
    if rank is None:
        raise StarError(f"{adapter}: LoRA rank {r} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}); use --engine hf")
    return rank


def vllm_architecture(name):
    """(whether vLLM implements the model's architecture, the architectures its config.json names)."""
    from transformers import AutoConfig

    quiet_vllm()
    from vllm import ModelRegistry

    archs = from_pretrained(AutoConfig, name).architectures or []
    return any(a in ModelRegistry.get_supported_archs() for a in archs), archs


def quiet_vllm():
    """vLLM logs every engine step at INFO and, loading fp32 weights in bf16, one WARNING per weight: keep its errors
    only, unless the user set a level (VLLM_LOGGING_LEVEL=INFO shows everything)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def local_checkpoint(name):
    """A folder vLLM can read without the network: the checkpoint folder, or a hub id's cached snapshot (vLLM
    would otherwise ask the hub first); a hub id that is not cached stays an id, downloaded by vLLM."""
    path = resolve_model(name)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, local_files_only=True)
    except Exception:  # not cached: vLLM downloads it (from_pretrained above already said whether the hub is reachable)
        return path


def load_vllm(name, rows_at_once, seed=0, dtype="auto", **engine_args):
    """vLLM's offline engine for a hub id, checkpoint folder or alias, with prefix caching (the few-shot prefix is
    computed once and its KV blocks reused by every row), at most rows_at_once sequences in flight (None: vLLM's
    default), in the dtype hf would use for --dtype `dtype` (models.device_and_dtype). The checkpoint's generation
    config rides along as on a Hugging Face model, so stop_token_ids reads both alike. Under a launcher each process runs
    its own engine on its own device, as vLLM's data parallelism (data_parallel_args).
    engine_args: more of vllm.LLM's arguments, which override these (--vllm_args; benchmarks: load_format="dummy")."""
    from transformers import AutoConfig, GenerationConfig

    quiet_vllm()
    # On CPU the engine core runs in this process: the process vLLM otherwise spawns for it imports torch and vLLM again
    # and passes every step's rows through a pipe (the demo's evaluation of 150 questions: 42 s in all against 76 s, the
    # same texts). On a GPU vLLM's own default: that process schedules the next step while the GPU runs this one.
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    path, (_, dtype) = local_checkpoint(name), device_and_dtype(dtype)
    config = from_pretrained(AutoConfig, name).get_text_config()
    kwargs = dict(model=path, tokenizer=path, dtype=dtype, seed=seed, enable_prefix_caching=True,
                  max_model_len=min(VLLM_MAX_LEN, config.max_position_embeddings))
    if rows_at_once:  # else vLLM's own default (the scripts: whole shares in flight, continuous batching)
        kwargs["max_num_seqs"] = rows_at_once
    if not torch.cuda.is_available() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kwargs["kv_cache_memory_bytes"] = VLLM_CPU_KV_GIB * 2**30
    state = dist_state()
    if state.num_processes > 1:  # under a launcher: vLLM's own data parallelism, one engine per process (per GPU)
        kwargs.update(data_parallel_args(state.num_processes, engine_args))
    kwargs.update(engine_args)  # the caller's (--vllm_args) win
    try:
        llm = LLM(**kwargs)
    except Exception as e:  # vLLM reports a failed start from its engine process; its log above holds the cause
        raise StarError(f"vLLM could not start on {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    try:
        llm.generation_config = from_pretrained(GenerationConfig, name)
    except StarError:  # no generation_config.json: EOS from the tokenizer alone
        llm.generation_config = GenerationConfig()
    return llm


def data_parallel_args(processes, engine_args):
    """vLLM's arguments for a launch of `processes` processes (torchrun, accelerate launch): its external launcher,
    each process one engine on its local rank's device, fed its own share of the questions (data_parallel_size =
    processes). Tensor or pipeline parallelism runs in one process instead (vLLM starts its own workers): under a
    launcher the processes of one model copy would need the same questions, which the scheduler does not deal."""
    if engine_args.get("tensor_parallel_size", 1) * engine_args.get("pipeline_parallel_size", 1) > 1:
        raise StarError("--vllm_args tensor_parallel_size / pipeline_parallel_size: run one process (python, not a "
                        "launcher); vLLM starts the workers of one model copy itself")
    return {"distributed_executor_backend": "external_launcher", "data_parallel_size": processes}


def load_vllm_generator(name, rows, seed=0, dtype="auto", vllm_args=None):
    """(engine, tokenizer) for `rows` generations of `name` (engines.load_generator): a checkpoint as it is, a LoRA
    adapter folder served on its base with a LoRARequest; eager below VLLM_EAGER_MAX_ROWS_CPU rows on CPU."""
    if not torch.cuda.is_available() and rows < VLLM_EAGER_MAX_ROWS_CPU:
        vllm_args = {"enforce_eager": True, **(vllm_args or {})}  # --vllm_args '{"enforce_eager": false}' compiles
    base = adapter_base(name)
    if base is None:
        return load_vllm(name, None, seed, dtype, **(vllm_args or {})), load_tokenizer(name)
    llm = load_vllm(base, None, seed, dtype, **{"enable_lora": True, "max_lora_rank": lora_rank(name),
                                                 **(vllm_args or {})})
    from vllm.lora.request import LoRARequest

    llm.lora_request = LoRARequest("adapter", 1, os.path.abspath(name))  # vllm_decoder passes it to generate
    return llm, load_tokenizer(name)
