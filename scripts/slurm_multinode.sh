#!/usr/bin/env bash
# polopt training on several nodes under SLURM: one `polopt train` (torchrun) per node, all meeting
# at a c10d rendezvous on the allocation's first node. Submit from the checkout's root:
#
#   sbatch --nodes 2 scripts/slurm_multinode.sh --config qwen2_5_math_1_5b loss=nft
#   sbatch --nodes 8 scripts/slurm_multinode.sh --config qwen2_5_math_7b
#   sbatch --nodes 16 scripts/slurm_multinode.sh --config qwen2_5_32b
#
# The arguments are `polopt train`'s: --config and key=value overrides (the launcher flags are
# made here). The checkout, and with it output_dir, must be on a filesystem every node sees: the
# run checks this at setup and refuses a per-node folder. model_dir must exist at the same path on
# every node (a shared folder, or `tune download` on each).
#
# Environment: GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else 8), RDZV_PORT (default 29500),
# POLOPT (the command; default .venv/bin/polopt when there, else polopt on PATH), DRY_RUN=1 (print
# the srun command instead of running it). NCCL picks the network itself; on clusters that need it,
# export NCCL_SOCKET_IFNAME / NCCL_IB_HCA before sbatch (srun passes the environment on).
#
# Not run on a real cluster: the same torchrun launch was tested with two "nodes" on one machine
# over loopback (docs/recipe.md, "Multi-node").
#SBATCH --job-name=polopt
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=polopt-%j.out
set -euo pipefail
: "${SLURM_JOB_NUM_NODES:?run this with sbatch (or inside an salloc allocation): SLURM_JOB_NUM_NODES is not set}"
cd "${SLURM_SUBMIT_DIR:-$PWD}"
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=${RDZV_PORT:-29500}
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
if [ -z "${POLOPT:-}" ]; then
  if [ -x .venv/bin/polopt ]; then POLOPT=.venv/bin/polopt; else POLOPT=polopt; fi
fi
cmd=(srun --nodes "$SLURM_JOB_NUM_NODES" --ntasks-per-node 1 --kill-on-bad-exit=1
     "$POLOPT" train --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$gpus"
     --rdzv_backend c10d --rdzv_endpoint "$head_node:$port" --rdzv_id "${SLURM_JOB_ID:-polopt}" "$@")
echo "polopt: ${SLURM_JOB_NUM_NODES} nodes x ${gpus} GPUs, rendezvous at ${head_node}:${port}" >&2
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
