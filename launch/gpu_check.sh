#!/usr/bin/env bash
# The ONE prepared GPU check (issues 6, 19), for a lent machine with one H100/H200 and nothing
# installed beyond its image's PyTorch. It must fit the lend: one global deadline
# (GPU_CHECK_DEADLINE, default 500 s), leaving the machine's start-up inside a session's 15
# minutes of device time.
#
#   launch/gpu_wheels.sh            # first, here: hydra-core, omegaconf, antlr4 wheels in .whl/
#   bash launch/gpu_check.sh        # there, through the device tool (docs/gpus.md):
#                                   #   carry [".whl"], timeout_s 570
#
# Steps, most telling first. Each runs under `timeout -k` for at most its own limit (times
# GPU_CHECK_SLACK: 1, or 3 in the dry run) or what is left of the deadline (less 30 s kept for
# collecting); one that would get less than its minimum is skipped with a line saying so, and
# the script goes on after a failed step:
#   1. the gpu-marked tests (CUDA gradients fp32 and bf16, CUDA-event tracing)
#   2. bf16 throughput of one stage against plain PyTorch on the same layers (accept <= 1.10)
#   3. a 2- and a 4-rank 1F1B pipeline sharing the GPU (staged transport)
#   4. the comparison harness at GPU scale (experiment=too_large_gpu: a 512 MiB cap)
#   5. the same pipelines under zb1; fp32 throughput
# The runs live in a scratch folder (GPU_CHECK_SCRATCH, default a new /tmp folder): pipeline
# runs write no checkpoint and no model.pt. What comes back lands in $OUT (default ./gpu_out),
# three files: log.txt, results.json (every step's outcome and time, and the numbers) and
# runs.tar.gz (summaries, metrics, traces, timelines, pictures, the comparison's report; no
# weights), under the 16 MiB a file the device tool returns (launch/gpu_collect.py).
#
# GPU_CHECK_DRY=1 runs the same steps on the CPU with tiny sizes, within the same deadline:
# the plumbing, tested up to the device boundary (tests/test_gpu_path.py runs it). Of the four
# pipelines it runs two, each size and each schedule once (2 ranks 1f1b, 4 ranks zb1): the
# others are the same function with other arguments, and on 2 CPU cores a launch costs 10-20 s.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
DEADLINE=${GPU_CHECK_DEADLINE:-500}
RESERVE=30  # seconds kept for collecting the results

# The interpreter that holds torch (on the lent machines a plain python3 does).
PY=
for cand in ${PYTHON:-} python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
    PY=$(command -v "$cand")
    break
  fi
done
if [ -z "$PY" ]; then
  echo "gpu_check: no python here imports torch (tried: ${PYTHON:-} python3 python)"
  exit 2
fi
OUT=${OUT:-$PWD/gpu_out}
SCRATCH=${GPU_CHECK_SCRATCH:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT" "$SCRATCH/runs"
# Hydra, omegaconf and antlr4 are not in the GPU image: carried as wheels, installed for $PY.
if ! "$PY" -c "import hydra, omegaconf, antlr4" >/dev/null 2>&1; then
  if ls .whl/hydra_core-*.whl .whl/omegaconf-*.whl .whl/antlr4_python3_runtime-*.whl \
    >/dev/null 2>&1; then
    timeout -k 5 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$SCRATCH/site" .whl/*.whl >/dev/null 2>&1
    export PYTHONPATH=$SCRATCH/site
  fi
  if ! "$PY" -c "import hydra, omegaconf, antlr4" >/dev/null 2>&1; then
    echo "gpu_check: $PY cannot import hydra, omegaconf and antlr4 and .whl/ lacks their" \
      "wheels: run launch/gpu_wheels.sh here, then call the device tool with carry [\".whl\"]"
    exit 2
  fi
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
[ -e splitgraph/conf ] || ln -s ../conf splitgraph/conf  # what the package mapping installs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
TEE=$!
STEPS=$SCRATCH/steps.tsv
: >"$STEPS"
status=0

left() { echo $((DEADLINE - RESERVE - (SECONDS - T0))); }

# step NAME LIMIT MINIMUM COMMAND...: COMMAND (a program or one of the functions below) under
# `timeout -k 15` for LIMIT seconds or what is left, whichever is less (the 15 s of grace
# included); skipped, with a line, when less than MINIMUM is left.
step() {
  local name=$1 limit=$2 minimum=$3
  shift 3
  local rest t start rc outcome
  rest=$(left)
  echo
  echo "=== $name ($(date +%T), $((SECONDS - T0)) s in, $rest s left)"
  if ((rest < minimum)); then
    echo "--- skipped: $name needs $minimum s and $rest s are left before the deadline"
    printf '%s\tskipped\t0\n' "$name" >>"$STEPS"
    status=1
    return
  fi
  limit=$((limit * SLACK))
  t=$((limit < rest - 15 ? limit : rest - 15))
  start=$SECONDS
  timeout -k 15 "$t" bash -c '"$@"' "$name" "$@"
  rc=$?
  if ((rc == 0)); then
    outcome=ok
  elif ((rc == 124 || rc == 137)); then
    outcome="timed out after $t s"
    status=1
  else
    outcome="failed ($rc)"
    status=1
  fi
  echo "--- $name: $outcome in $((SECONDS - start)) s"
  printf '%s\t%s\t%s\n' "$name" "$outcome" "$((SECONDS - start))" >>"$STEPS"
}

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  # On 2 CPU cores a 4-rank launch alone takes tens of seconds: the steps' own limits are the
  # GPU's, scaled by SLACK; the deadline is the same
  SLACK=${GPU_CHECK_SLACK:-3}
  dev=cpu card=dry-run-cpu W=64 B=64 S=2 R=3 staged=runtime.transport=staged
  compare=(experiment=tiny "compare.variants=[full,pipeline]" "compare.schedules=[1f1b]"
    compare.reference=false compare.timeout=120)  # one run out of memory, one that fits
else
  SLACK=${GPU_CHECK_SLACK:-1}
  dev=cuda W=8192 B=8192 S=60 R=20 staged=
  compare=(experiment=too_large_gpu compare.time_budget=null compare.timeout=120)
  timeout -k 5 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  card=$(timeout -k 5 60 "$PY" -c \
    "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null)
  card=${card:-unknown-gpu}
fi
timeout -k 5 60 "$PY" - "$SCRATCH/env.json" "$card" <<'PY'
import json, platform, sys
import hydra, torch
env = {"card": sys.argv[2], "python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "hydra": hydra.__version__}
print(" ".join(f"{k} {v}" for k, v in env.items()))
open(sys.argv[1], "w").write(json.dumps(env) + "\n")
PY
echo "interpreter: $PY; scratch: $SCRATCH; deadline: $DEADLINE s"

pipeline() {  # ranks schedule: one run of train.py, the ranks sharing the device
  local n=$1 s=$2
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" -m splitgraph.train \
    runtime.device=$dev $staged schedule="$s" pipeline.microbatches=8 \
    model.hidden="[$((W / 4)),$((W / 4)),$((W / 4)),$((W / 4))]" \
    train.batch_size=$((B / 8 > 8 ? B / 8 : 8)) train.steps=$S train.progress=false \
    data.samples=16384 checkpoint.resume=never checkpoint.every=null checkpoint.save=false \
    run_dir="$SCRATCH/runs/pp${n}_$s"
}

stage() {  # dtype name width batch: one stage against plain PyTorch
  "$PY" -m splitgraph.bench.stage --device $dev --dtype "$1" --repeats $R \
    --out "$SCRATCH/stage_$2.json" model.hidden="[$3,$3,$3,$3]" data.features="$3" \
    train.batch_size="$4" optim.momentum=0 optim.weight_decay=0
}
export -f pipeline stage
export PY dev staged W B S R SCRATCH

step "gpu-marked tests" 120 40 \
  "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_path.py
step "throughput: one stage vs plain PyTorch (bf16, 5 x $W layers, batch $B)" 90 30 \
  stage bfloat16 bf16 $W $B
step "pipeline: 2 ranks sharing the GPU, 1f1b" 90 40 pipeline 2 1f1b
[ "${GPU_CHECK_DRY:-0}" = 1 ] || step "pipeline: 4 ranks sharing the GPU, 1f1b" 90 40 pipeline 4 1f1b
step "comparison harness at a GPU memory cap (${compare[0]})" 200 100 \
  "$PY" -m splitgraph.compare "${compare[@]}" compare.progress=false runtime.device=$dev \
  hydra.run.dir="$SCRATCH/runs/compare" compare.runs_dir="$SCRATCH/runs/compare/runs"
[ "${GPU_CHECK_DRY:-0}" = 1 ] || step "pipeline: 2 ranks sharing the GPU, zb1" 75 40 pipeline 2 zb1
step "pipeline: 4 ranks sharing the GPU, zb1" 75 40 pipeline 4 zb1
step "throughput: one stage vs plain PyTorch (fp32, 5 x $((W / 2)) layers, batch $((B / 2)))" \
  60 25 stage float32 fp32 $((W / 2)) $((B / 2))

echo
echo "=== collect ($(date +%T), $((SECONDS - T0)) s in)"
timeout -k 5 $((RESERVE - 5)) "$PY" launch/gpu_collect.py "$OUT" "$SCRATCH" "$card" || status=1
echo "results: $OUT (runs kept in $SCRATCH); $((SECONDS - T0)) s of the $DEADLINE s deadline"
echo "exit status: $status"
exec >&- 2>&-
wait "$TEE" 2>/dev/null  # log.txt is whole before the device tool reads it
exit $status
