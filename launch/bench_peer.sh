#!/usr/bin/env bash
# splitgraph against torch.distributed.pipelining on identical work (gloo, CPU).
#
#   launch/bench_peer.sh                                  # p=2 and p=4, m=1,2,4,8 -> stdout
#   launch/bench_peer.sh --out results/peer/peer          # also write peer.md and peer.json
#   launch/bench_peer.sh --nproc 2 --microbatches 4,8 model.hidden=[512,512,512,512]
#   = OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \
#     python -m splitgraph.bench.peer ARGS
#
# One thread per rank, and glibc told to keep its multi-MiB buffers (both systems run under
# the same allocator settings; unset them with --glibc-defaults). PYTHON picks the interpreter.
set -euo pipefail
py=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-33554432}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
for arg in "$@"; do
  if [[ $arg == --glibc-defaults ]]; then unset MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_; fi
done
exec "$py" -m splitgraph.bench.peer "$@"
