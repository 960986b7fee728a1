#!/usr/bin/env bash
# One node, data x pipeline parallel: DP replicas of a PP-stage pipeline, DP*PP processes.
#
#   launch/train2d.sh 2 2 schedule=1f1b pipeline.microbatches=8
#   = launch/train.sh 4 parallel.dp=2 pipeline.stages=2 schedule=1f1b pipeline.microbatches=8
#   = SPLITGRAPH_RUN_DIR=outputs/<date>/<time>-np4 OMP_NUM_THREADS=1 \
#     python -m splitgraph.train --nproc 4 parallel.dp=2 pipeline.stages=2 schedule=1f1b \
#       pipeline.microbatches=8   (checked, then 4 ranks forked; launch/train.sh says more)
#
# Replica d is the pipeline of ranks d*PP .. d*PP+PP-1 and runs rows [d*B/DP, (d+1)*B/DP) of
# every minibatch (B = train.batch_size, the global batch); each stage's gradients are summed
# over its DP peers every step. Several nodes: launch/multinode.sh or launch/slurm.sbatch
# with parallel.dp=DP pipeline.stages=PP among the overrides.
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[0-9]+$ || ! $2 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 DP PP [hydra overrides...]" >&2
  exit 2
fi
dp=$1 pp=$2; shift 2
exec "$(dirname "$0")/train.sh" "$((dp * pp))" "parallel.dp=$dp" "pipeline.stages=$pp" "$@"
