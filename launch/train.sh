#!/usr/bin/env bash
# Single node: validate, then start one process per stage, forked from one interpreter.
#
#   launch/train.sh 4 schedule=gpipe pipeline.microbatches=8
#   = SPLITGRAPH_RUN_DIR=outputs/<date>/<time>-np4 OMP_NUM_THREADS=1 \
#     python -m splitgraph.train --nproc 4 schedule=gpipe pipeline.microbatches=8
#     (splitgraph-train --nproc 4: torch imported and the config composed once, checked as
#     splitgraph-check --nproc 4 would, then 4 ranks forked; Ctrl-C or SIGTERM: the ranks
#     finish the step, commit a checkpoint, one line, exit code 75; splitgraph/train/fork.py)
#   SPLITGRAPH_LAUNCHER=torchrun launch/train.sh 4 ...
#   = ... python -m splitgraph.train.torchrun --check --standalone --nproc-per-node 4 \
#       -m splitgraph.train schedule=gpipe ...   (the same check, then torchrun)
#
# Pins one run directory for all ranks (override with SPLITGRAPH_RUN_DIR=...), sets
# OMP_NUM_THREADS=1 unless you set it (several ranks share the cores), and checks the
# configuration before any rank is started. PYTHON picks the interpreter.
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NPROC [hydra overrides...]" >&2
  exit 2
fi
nproc=$1; shift
py=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export SPLITGRAPH_RUN_DIR=${SPLITGRAPH_RUN_DIR:-outputs/$(date +%Y-%m-%d)/$(date +%H-%M-%S)-np${nproc}}
case ${SPLITGRAPH_LAUNCHER:-fork} in
  fork)  # the ranks forked from the process that imported torch: about half the start-up
    exec "$py" -m splitgraph.train --nproc "$nproc" "$@" ;;
  torchrun)  # torchrun whose stop on Ctrl-C/SIGTERM is one line and exit code 75; --check
    # runs splitgraph-check in its process first (no second interpreter to start)
    exec "$py" -m splitgraph.train.torchrun --check --standalone --nproc-per-node "$nproc" \
      -m splitgraph.train "$@" ;;
  *)
    echo "$0: SPLITGRAPH_LAUNCHER=${SPLITGRAPH_LAUNCHER}: fork (the default) or torchrun" >&2
    exit 2 ;;
esac
