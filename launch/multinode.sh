#!/usr/bin/env bash
# Several nodes: run the SAME command on every node (c10d rendezvous, elastic agent).
#
#   launch/multinode.sh NNODES NPROC_PER_NODE HOST:PORT JOB_ID [hydra overrides...]
#   e.g. on each of 2 nodes:  launch/multinode.sh 2 4 node0.cluster:29500 exp42 schedule=1f1b
#   = torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \
#       --rdzv-endpoint node0.cluster:29500 --rdzv-id exp42 -m splitgraph.train schedule=1f1b
#
# Data x pipeline parallel across nodes: the same line with parallel.dp and pipeline.stages,
# e.g. 2 nodes x 8 GPUs as 4 replicas of a 4-stage pipeline (each pipeline inside a node,
# each stage's gradient all-reduce across the nodes; see runtime/mesh.py):
#   launch/multinode.sh 2 8 node0.cluster:29500 exp43 parallel.dp=4 pipeline.stages=4
#   = torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \
#       --rdzv-endpoint node0.cluster:29500 --rdzv-id exp43 -m splitgraph.train \
#       parallel.dp=4 pipeline.stages=4
#
# The run directory is outputs/torchrun/JOB_ID (the rendezvous id, the same on every node);
# only global rank 0 writes, so put the checkout on a shared filesystem or collect that node's.
# The endpoint host must be reachable from every node: this is the one case where the
# rendezvous listens beyond localhost.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 NNODES NPROC_PER_NODE HOST:PORT JOB_ID [hydra overrides...]" >&2
  exit 2
fi
nnodes=$1 nproc=$2 endpoint=$3 job=$4; shift 4
py=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A fresh rendezvous store per restart: torch 2.13's shared one keeps the failed attempt's keys
# (pytorch/pytorch#135712), so --max-restarts could reconnect to dead ranks.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# splitgraph.train.torchrun: torchrun whose stop on Ctrl-C/SIGTERM is one line and exit code 75;
# --check: splitgraph-check --nproc NNODES*NPROC --nproc-per-node NPROC in its process, first
exec "$py" -m splitgraph.train.torchrun --check --nnodes "$nnodes" --nproc-per-node "$nproc" \
  --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$job" -m splitgraph.train "$@"
