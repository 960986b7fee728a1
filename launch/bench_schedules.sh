#!/usr/bin/env bash
# Issue 18's measured schedule tables, in three sweeps of python -m splitgraph.bench.schedules
# (each writes OUT/<name>.md and .json; each table ends with the criteria it shows, yes/NO):
#
#   launch/bench_schedules.sh                      # -> results/schedules/issue18_*.{md,json}
#   launch/bench_schedules.sh /tmp/out             # elsewhere
#
#   issue18_p2       default model (64-256-256-256-10), 2 ranks: 1f1b, zb1, zb2, auto (v=1, 2);
#                    zb1's I+W over 1f1b's B; 2 launches per row (the spread column)
#   issue18_p2_wide  compute-bound model (1024-wide, 5 layers), 2 ranks: 1f1b, zb1, zbv, auto
#                    capped at 1F1B's bytes (auto-cap1f1b v=2); 1 launch per row
#   issue18_p4_wide  the same at 4 ranks (1024-wide, 9 layers; 4 ranks on 2 cores are
#                    oversubscribed: rows marked p=4*); 1 launch per row
#
# m = 4, 8, 16 everywhere; 5 untraced + 20 traced steps per launch. 54 launches, about 14
# minutes on an idle 2-core machine (estimate; 25+ under load). Run it with nothing else on
# the machine: the header of each table records the load average.
set -euo pipefail
out=${1:-results/schedules}
py=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(--microbatches 4,8,16 --steps 20 --warmup 5)
wide=(data.features=1024 partition=params)
"$py" -m splitgraph.bench.schedules --nproc 2 --repeats 2 "${common[@]}" \
  --schedules 1f1b,zb1,zb2,auto --out "$out/issue18_p2"
"$py" -m splitgraph.bench.schedules --nproc 2 --repeats 1 "${common[@]}" \
  --schedules 1f1b,zb1,zbv,auto-cap1f1b --out "$out/issue18_p2_wide" \
  "${wide[@]}" 'model.hidden=[1024,1024,1024,1024]'
"$py" -m splitgraph.bench.schedules --nproc 4 --repeats 1 "${common[@]}" \
  --schedules 1f1b,zb1,zbv,auto-cap1f1b --out "$out/issue18_p4_wide" \
  "${wide[@]}" 'model.hidden=[1024,1024,1024,1024,1024,1024,1024,1024]'
