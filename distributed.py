"""train.py's accelerate set-up: one Accelerator per run, FSDP2 on CPU under an FSDP launch as on a GPU, and
gradients reduce-scattered in fp32 under bf16 (docs/training.md, "Beyond one GPU")."""
import os

import torch

from common import StarError


def shard_on_cpu(acc):
    """A CPU run launched with an FSDP config (ACCELERATE_USE_FSDP, e.g. `accelerate launch --config_file
    configs/accelerate_fsdp.yaml`, as the tests launch it) is switched to FSDP as accelerate switches a GPU run:
    accelerate 1.15 does it for accelerators only (AcceleratorState.__init__) and would run CPU processes as DDP,
    while FSDP2 (torch's fully_shard) itself runs on CPU over gloo."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if acc.distributed_type != DistributedType.MULTI_CPU or os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as on a GPU
    if plugin.fsdp_version != 2:
        raise StarError("FSDP on CPU runs as FSDP2 only: set fsdp_version: 2 in the accelerate config "
                        "(configs/accelerate_fsdp.yaml does)")
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.fsdp_plugin = plugin
    # where AcceleratorState.__init__ records it too: every later AcceleratorState() copies PartialState's type
    acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def make_accelerator(device, bf16, grad_accum, report_to, project_dir):
    """accelerate's Accelerator for train.py's --dtype, --grad_accum and --report_to; sharded on CPU too under an FSDP
    launch."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # One process may run main() more than once (the tests do): accelerate keeps its state in a process-wide
    # singleton that refuses another mixed precision, so it starts afresh (the launch itself, PartialState, stays).
    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision="bf16" if bf16 else "no", gradient_accumulation_steps=grad_accum,
                      cpu=device == "cpu", log_with=None if report_to == "none" else report_to,
                      project_dir=project_dir)
    shard_on_cpu(acc)
    reduce_in_fp32(acc)
    return acc


def reduction(acc):
    """', gradients reduced in <dtype>' under FSDP (what its mixed-precision policy says), else ''."""
    if acc.distributed_type.name != "FSDP":
        return ""
    policy = getattr(getattr(acc.state, "fsdp_plugin", None), "mixed_precision_policy", None)
    dtype = getattr(policy, "reduce_dtype", None) or torch.float32
    return f", gradients reduced in {str(dtype).split('.')[1]}"


def reduce_in_fp32(acc):
    """FSDP2 under bf16: compute in bf16, reduce-scatter the gradients in fp32. accelerate's policy reduces them in
    the compute dtype, and a sum of bf16 gradients over many processes keeps 8 bits of mantissa."""
    plugin = getattr(acc.state, "fsdp_plugin", None)
    if acc.distributed_type.name != "FSDP" or plugin is None or acc.mixed_precision != "bf16":
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
