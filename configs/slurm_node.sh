#!/usr/bin/env bash
# One node's part of a launch across Slurm nodes: srun starts this once per node (--ntasks-per-node 1), and it starts
# accelerate on the node's GPUs as machine $SLURM_NODEID of $SLURM_NNODES, under configs/accelerate_fsdp.yaml. The
# script and its flags follow, as they follow `accelerate launch`:
#
#   srun --nodes 2 --ntasks-per-node 1 configs/slurm_node.sh train.py --iteration 1        # inside an allocation
#   bash run_star.sh ... --train_launcher "srun --nodes 2 --ntasks-per-node 1 configs/slurm_node.sh"
#
# GPUS_PER_NODE (8), MASTER_ADDR (the allocation's first node), MASTER_PORT (29500), ACCELERATE_CONFIG (the FSDP
# config beside this file) and PYTHON (python3) may be set. tests/test_distributed.py runs it as two "nodes" on one
# machine (SLURM_NNODES=2, SLURM_NODEID=0|1, MASTER_ADDR=127.0.0.1, CPU processes on gloo).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
GPUS=${GPUS_PER_NODE:-8}
MASTER=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
exec "${PYTHON:-python3}" -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-$HERE/accelerate_fsdp.yaml}" \
  --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER" \
  --main_process_port "${MASTER_PORT:-29500}" --num_processes $((SLURM_NNODES * GPUS)) "$@"
