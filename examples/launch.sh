#!/bin/bash
# One task per node: starts torchrun for this node with the node list of the current attempt.
#
#   srun --auto-resume=1 -N 2 --ntasks-per-node=1 examples/launch.sh [ddp_train.py options]
#
# The auto-resume runner recomputes, for every attempt, HPR_NNODES, HPR_NODELIST, MASTER_ADDR
# (the first healthy node's address from Slurm), MASTER_PORT (a new one per attempt) and
# HPR_ATTEMPT; SLURM_NODEID is this node's index in the step, and the runner puts the master
# node first in job order, so node 0 is the one at MASTER_ADDR. Without auto-resume (plain srun)
# the same values come from `hpresilience nodes`. Static rendezvous: node 0's torchrun hosts
# the store, no name resolution is needed (the workers get MASTER_ADDR as given).
#
# Environment: TRAIN_PYTHON (python with torch and hpresilience; default python3),
# TRAIN_NPROC_PER_NODE (processes per node, default 1), GLOO_SOCKET_IFNAME (set by the site,
# e.g. lo on the one-machine test cluster).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${TRAIN_PYTHON:-python3}

if [ -z "${HPR_NNODES:-}" ] || [ -z "${MASTER_ADDR:-}" ]; then   # not under srun --auto-resume
    HPR_NNODES=${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}
    MASTER_ADDR=$(hpresilience nodes --master-addr)
fi
export PYTHONWARNINGS=${PYTHONWARNINGS:-"ignore:Failed to initialize NumPy"}   # the CPU wheel without numpy
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # torchrun would set it too, with a warning per node

echo "launch: $(hostname) node_rank=${SLURM_NODEID:-0} nnodes=$HPR_NNODES master=$MASTER_ADDR:${MASTER_PORT:-29500}" \
     "attempt=${HPR_ATTEMPT:-} nodes=${HPR_NODELIST:-${SLURM_STEP_NODELIST:-}}" >&2
# exec: srun's SIGTERM (the runner stopping the step) reaches torchrun, which stops the workers.
exec "$python" -m torch.distributed.run \
    --nnodes="$HPR_NNODES" --nproc-per-node="${TRAIN_NPROC_PER_NODE:-1}" \
    --node-rank="${SLURM_NODEID:-0}" --master-addr="$MASTER_ADDR" --master-port="${MASTER_PORT:-29500}" \
    --max-restarts=0 \
    "$here/ddp_train.py" "$@"
