"""Checkpoints and resume: the trained model written in the base model's dtype (or a LoRA adapter alone), and the
training state saved every --save_minutes, from which a rerun of the same command resumes.

Every output appears whole: it is written under a temporary name, then renamed into place.
"""
import json
import os
import shutil
import time

import torch

from common import StarError, move_into_place, resume_settings, run_info, write_json, write_jsonl
from models import load_weights

# The training state (weights, AdamW states, RNG) is saved every SAVE_MINUTES of training, not every N steps: the cost
# of a save grows with the model like the time of a step does, so a fixed interval keeps it a small share of any run
# (the 3B model's state is 16 B x 3.21e9 = 51 GB: about a minute every 30 at 1 GB/s), and short runs (the tests, the
# demo's 8-10 minute trainings) never save at all.
SAVE_MINUTES = 30


def base_dtype(config):
    """The dtype the base model is stored in (config.json "dtype", formerly "torch_dtype"); fp32 when it says none,
    as transformers then loads it."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def cast_state_dict(state_dict, dtype):
    """Floating tensors cast to dtype; tensors that share storage (tied embeddings) stay shared."""
    cast, out = {}, {}
    for name, t in state_dict.items():
        if t.is_floating_point() and t.dtype != dtype:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in cast:
                cast[key] = t.to(dtype)
            t = cast[key]
        out[name] = t
    return out


def base_reference(name):
    """How an adapter folder names its base model: a local folder by its absolute path, else the hub id or alias."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def merge_adapter(model, base_model, dtype):
    """The LoRA adapter merged into the base weights as the base stores them. Under bf16 the frozen base of an fp32
    base model is a bf16 copy; merging into it would carry bf16's rounding into every weight of the checkpoint,
    adapted or not. The base is then read again in its own dtype and the trained adapter set on it."""
    frozen = next(p.dtype for name, p in model.named_parameters() if "lora_" not in name)
    if frozen != dtype:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        fresh = get_peft_model(load_weights(base_model, dtype), model.peft_config["default"])
        set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
        model = fresh
    return model.merge_and_unload()


def write_weights(model, state_dict, folder, args, dtype):
    """The merged model in `dtype`, the base model's own (full fine-tuning trains fp32 master weights; LoRA merges into
    them); with --save_adapter the adapter alone (peft's files, naming the base), which common.load_weights merges."""
    if args.lora_r and args.save_adapter:
        model.peft_config["default"].base_model_name_or_path = base_reference(args.base_model)
        model.save_pretrained(folder)
        return
    if args.lora_r:
        model = merge_adapter(model, args.base_model, dtype)  # a plain checkpoint: the next stage needs no extra flags
        state_dict = model.state_dict()
    # FSDP gathers tied weights (lm_head = embed_tokens) as two tensors: keep one, as a plain save does
    state_dict = {k: v for k, v in state_dict.items() if k not in getattr(model, "all_tied_weights_keys", {})}
    model.save_pretrained(folder, state_dict=cast_state_dict(state_dict, dtype))  # FSDP: the gathered full weights
    model.config.dtype = str(dtype).split(".")[1]  # save_pretrained wrote the in-memory dtype: say the saved one
    model.config.save_pretrained(folder)


def save_checkpoint(model, state_dict, tok, out, args, log, stats, dtype):
    """Write to <out>.tmp, then rename: a killed run never leaves a folder that looks finished."""
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_weights(model, state_dict, tmp, args, dtype)
    tok.save_pretrained(tmp)
    write_json(os.path.join(tmp, "args.json"), run_info(vars(args)))
    write_json(os.path.join(tmp, "train_stats.json"), stats)
    write_jsonl(os.path.join(tmp, "log.jsonl"), log)
    move_into_place(tmp, out)


# ============================================================================= resume
def load_resume_state(acc, state_dir, args):
    """(step, log) of a run stopped after a state save; (0, []) for a fresh start."""
    info_path = os.path.join(state_dir, "trainer.json")
    if args.overwrite and acc.is_main_process:
        shutil.rmtree(state_dir, ignore_errors=True)
    if args.overwrite or not os.path.isfile(info_path):
        return 0, []
    with open(info_path) as f:
        info = json.load(f)
    if info["settings"] != resume_settings(vars(args), processes=acc.num_processes):
        raise StarError(f"{state_dir} holds an interrupted run with other settings; rerun it as it was, "
                        "or pass --overwrite to start over")
    acc.load_state(state_dir)
    acc.print(f"resuming from step {info['step']} saved in {state_dir}")
    return info["step"], info["log"]


def save_resume_state(acc, state_dir, args, step, log):
    """accelerate's save_state (model, optimizer, scheduler, RNG) to a temporary folder, then rename."""
    tmp = state_dir + ".tmp"
    acc.save_state(tmp)
    acc.wait_for_everyone()  # every process has written its part (its RNG state) before the rename
    if acc.is_main_process:
        settings = resume_settings(vars(args), processes=acc.num_processes)
        write_json(os.path.join(tmp, "trainer.json"), {"step": step, "log": log, "settings": settings})
        move_into_place(tmp, state_dir)  # the old state stays whole until the new one is in place
    acc.wait_for_everyone()


def save_due(acc, args, step, last_save):
    """Is a state save due after this step? Every --save_steps steps, or --save_minutes after the last one by the main
    process's clock, broadcast so that every process saves at the same step (a save is a collective call)."""
    if args.save_steps and step % args.save_steps == 0:
        return True
    if not args.save_minutes:
        return False
    from accelerate.utils import broadcast

    due = torch.tensor([int(time.time() - last_save >= 60 * args.save_minutes)], device=acc.device)
    return bool(broadcast(due).item())
