#!/usr/bin/env bash
# Single node: validate, then launch one process per stage with torchrun.
#
#   launch/train.sh 4 schedule=gpipe pipeline.microbatches=8
#   = SPLITGRAPH_RUN_DIR=outputs/<date>/<time>-np4 OMP_NUM_THREADS=1 \
#     python -m splitgraph.train.torchrun --check --standalone --nproc-per-node 4 \
#       -m splitgraph.train schedule=gpipe ...
#     (splitgraph-check --nproc 4 schedule=gpipe ... in the launcher's process, then torchrun,
#     with a quiet, resumable stop on Ctrl-C or SIGTERM)
#
# Pins one run directory for all ranks (override with SPLITGRAPH_RUN_DIR=...), sets
# OMP_NUM_THREADS=1 unless you set it (several ranks share the cores), and checks the
# configuration before any process is spawned. PYTHON picks the interpreter.
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NPROC [hydra overrides...]" >&2
  exit 2
fi
nproc=$1; shift
py=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export SPLITGRAPH_RUN_DIR=${SPLITGRAPH_RUN_DIR:-outputs/$(date +%Y-%m-%d)/$(date +%H-%M-%S)-np${nproc}}
# splitgraph.train.torchrun is torchrun whose stop on Ctrl-C/SIGTERM is one line and exit code
# 75; --check runs splitgraph-check in its process first (no second interpreter to start)
exec "$py" -m splitgraph.train.torchrun --check --standalone --nproc-per-node "$nproc" \
  -m splitgraph.train "$@"
