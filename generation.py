"""The generation job that create_data.py and evaluate.py share: their common flags, the generator they load, and the
partial file that lets a killed run continue where it stopped. The engines and the stop rule are engines.py's.

    add_generation_args(parser, ...)     the flags both scripts take, defined once
    check_generation_args(args)          their range checks
    open_job(args, model_name, rows)     load the generator; read back what an interrupted run of the same command
                                         finished (<output>.partial)
    generate_part(job, part, ...)        generate one part of the run (a STaR stage, greedy or sampled answers):
                                         each finished batch is appended to the partial file as soon as it is done
    close_engine(job)                    once the job has generated: shut a vLLM engine down (every process)
    close_job(job)                       after the outputs are written: remove the partial file

Only the main process writes (the partial file, the outputs); under a launcher every process holds every result.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass

from common import DEV_SAMPLES, StarError, check_positive, resume_settings, write_text
from engines import ENGINES, MAX_NEW_TOKENS, generate, load_generator
from vllm_engine import VLLM_CHUNK_QUESTIONS, engine_name, quiet_vllm, shutdown, vllm_installed
from models import DEFAULT_BASE_MODEL, DTYPES, dist_state, model_identity


@dataclass
class Job:
    """One run of create_data.py or evaluate.py: its generator and its partial file."""
    model: object        # a Hugging Face model (engine hf) or a vLLM engine
    tok: object
    partial: str         # <output>.partial: the finished batches, until the outputs are written
    finished: dict       # {(part, batch number): [[index, result], ...]} read back from it
    max_new_tokens: int
    batch_size: int

    @property
    def engine(self):
        return engine_name(self.model)


# ============================================================================= the flags
def add_generation_args(parser, k, batch_size):
    """The flags create_data.py and evaluate.py share; k and batch_size are each script's defaults."""
    parser.add_argument("--base_model", default=DEFAULT_BASE_MODEL, help="M_0: hub id, local folder or smollm2-135m")
    parser.add_argument("--k", type=int, default=k, help="few-shot exemplars from the train split (0: zero-shot)")
    parser.add_argument("--batch_size", type=int, default=batch_size, help="questions per generation batch")
    parser.add_argument("--max_samples", type=int, default=None, help="first N questions (default: all)")
    parser.add_argument("--dataset", default="gsm8k", help="gsm8k | arithmetic")
    parser.add_argument("--data_dir", default=None,
                        help="folder with train.jsonl/test.jsonl (else $GSM8K_DIR, else the hub)")
    parser.add_argument("--dev_samples", type=int, default=DEV_SAMPLES,
                        help="the train split's last N questions are the dev slice (evaluate.py --split dev): never "
                             "trained on nor used as exemplars; 0 = none")
    parser.add_argument("--seed", type=int, default=0, help="picks the exemplars; seeds sampled draws")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="default: 320 gsm8k, 192 arithmetic (evaluate.py --protocol lm_eval_llama: the task's)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (--num_samples > 1)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (--num_samples > 1)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights: auto = bf16 on a GPU and on a CPU with AVX-512 BF16 or AMX, else fp32")
    parser.add_argument("--engine", default="auto", choices=ENGINES,
                        help="decoding: hf (shared-prefix loop, any Hugging Face causal LM; 'ours' is its former "
                             "name), vllm (vLLM's engine, where installed), auto = vllm where installed and worth its "
                             "start, else hf (docs/engines.md)")
    parser.add_argument("--vllm_args", default=None, type=json_object,
                        help="more of vLLM's engine arguments, as a JSON object: '{\"gpu_memory_utilization\": 0.85, "
                             "\"tensor_parallel_size\": 2}' (any field of vllm's EngineArgs; they override this "
                             "project's choices)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output / start a new run")
    parser.add_argument("--debug", action="store_true", help="full tracebacks")


def check_generation_args(args, fill_max_new_tokens=True):
    """Refuse the shared flags out of range; fill --max_new_tokens from the dataset (unless the caller sets it)."""
    check_positive(vars(args), "max_samples", "batch_size", "max_new_tokens", "num_samples", "temperature", "top_p")
    for name in ("k", "dev_samples"):
        if getattr(args, name) < 0:
            raise StarError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.top_p > 1:
        raise StarError(f"--top_p must be in (0, 1], got {args.top_p}")
    if fill_max_new_tokens:
        args.max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS.get(args.dataset, 320)
    if args.vllm_args:
        check_vllm_args(args.vllm_args)


def json_object(text):
    """--vllm_args: a JSON object, else argparse's one-line error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"gpu_memory_utilization\": 0.85}'")
    return value


def check_vllm_args(vllm_args):
    """Refuse, before any model loads, --vllm_args keys that vLLM's engine does not take (its EngineArgs fields)."""
    if not vllm_installed():
        raise StarError("--vllm_args: vLLM is not installed (README \"Install\")")
    quiet_vllm()
    from vllm.engine.arg_utils import EngineArgs

    unknown = sorted(set(vllm_args) - {f.name for f in dataclasses.fields(EngineArgs)})
    if unknown:
        raise StarError(f"--vllm_args: vLLM's engine takes no argument {', '.join(map(repr, unknown))}")


# ============================================================================= the job
def open_job(args, model_name, rows):
    """Load the generator of `model_name` for `rows` questions (x --num_samples), on the engine --engine picks, then
    the partial file of args.output: a rerun of the same command reads back the batches it finished."""
    model, tok = load_generator(model_name, args.engine, rows * args.num_samples, args.seed, args.dtype,
                                args.vllm_args or {})
    partial = args.output + ".partial"
    settings = resume_settings(vars(args), model_weights=model_identity(model_name))
    batch = args.batch_size
    if engine_name(model) == "vllm":  # each process's whole share in one call (VLLM_CHUNK_QUESTIONS at most)
        batch = max(1, min(VLLM_CHUNK_QUESTIONS, math.ceil(rows / dist_state().num_processes)))
    return Job(model, tok, partial, load_partial(partial, {**settings, "batch": batch}, args.overwrite),
               args.max_new_tokens, batch)


def generate_part(job, part, prefix, questions, desc, on_batch=None, sampling=None, until=None):
    """engines.generate on the job's generator: the completions of prefix + each question part, in input order. Each
    finished batch is appended to the partial file at once, and on a rerun the batches found there are not run again.
    part: which pass of the run this is ("stage1", "greedy"...); on_batch(indices, results) may return a dict for
    the progress bar; until: lm-eval's stop strings in place of this project's stop rule (engines.stop_rule)."""
    earlier = {number: items for (p, number), items in job.finished.items() if p == part}

    def save(number, indices, results):
        append_partial(job.partial, part, number, indices, results)
        return on_batch(indices, results) if on_batch else None

    results = generate(job.model, job.tok, prefix, questions, job.max_new_tokens, job.batch_size, desc, save,
                       set(earlier), sampling, until)
    for items in earlier.values():
        for i, r in items:  # JSON gave lists back: make them the tuples generate returns
            results[i] = [tuple(x) for x in r] if sampling else tuple(r)
    return results


def close_engine(job):
    """Shut the job's vLLM engine down once its generation is done, before the outputs are written and the next
    stage starts (vllm_engine.shutdown)."""
    shutdown(job.model)


def close_job(job):
    """Remove the partial file: only once the outputs are written, so that a failed write loses no generation."""
    os.remove(job.partial)


# ============================================================================= the partial file
def load_partial(path, settings, overwrite):
    """Finished batches of an interrupted run: {(part, batch number): [[index, result], ...]}.

    The first line records the settings; a rerun with other settings refuses to mix its records
    with these (or starts over under --overwrite). A last line cut short by a kill is dropped.
    Only the main process writes the file; every process reads it.
    """
    state = dist_state()
    if state.is_main_process:
        prepare_partial(path, settings, overwrite)
    state.wait_for_everyone()
    with open(path) as f:
        lines = f.read().split("\n")
    saved = json.loads(lines[0]).get("settings", {})
    differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if differ:
        raise StarError(f"{path} holds an interrupted run with other settings ({', '.join(differ)}); rerun it as "
                        "it was, or pass --overwrite to start over")
    finished = {}
    for line in filter(None, lines[1:]):
        r = json.loads(line)
        finished[(r["part"], r["batch"])] = r["results"]
    if finished and state.is_main_process:
        print(f"resuming: {len(finished)} finished batches in {path}", file=sys.stderr)
    return finished


def prepare_partial(path, settings, overwrite):
    """Start a partial file (header line), or clean one up: drop a torn last line so appends start clean."""
    if os.path.exists(path) and overwrite:
        os.remove(path)
    if not os.path.exists(path):
        return write_text(path, json.dumps({"settings": settings}) + "\n")
    with open(path) as f:
        lines = f.read().split("\n")
    try:
        json.loads(lines[0])
    except json.JSONDecodeError:  # killed while writing the header: nothing was saved yet
        os.remove(path)
        return prepare_partial(path, settings, overwrite)
    good = [lines[0]]
    for line in filter(None, lines[1:]):
        try:
            json.loads(line)
            good.append(line)
        except json.JSONDecodeError:
            pass  # the line being written when the run was killed
    write_text(path, "\n".join(good) + "\n")


def append_partial(path, part, number, indices, results):
    """Save one finished batch now: a crash or Ctrl-C loses at most the batch in flight."""
    with open(path, "a") as f:
        f.write(json.dumps({"part": part, "batch": number, "results": [[i, r] for i, r in zip(indices, results)]}) + "\n")
        f.flush()
        os.fsync(f.fileno())
