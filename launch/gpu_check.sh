#!/usr/bin/env bash
# The ONE prepared GPU check (issue 6), for a machine with one H100/H200 and nothing installed
# beyond the image's PyTorch. Under 6 minutes. Everything lands in $OUT (default ./gpu_out):
# log.txt, the results as JSON, and a tarball of the run directories.
#
#   launch/gpu_wheels.sh                      # first, here: the wheels it carries in .whl/
#   bash launch/gpu_check.sh                  # there (the device tool: carry [".whl"])
#
# Steps: the gpu-marked tests (CUDA gradients fp32 and bf16, CUDA-event tracing); a bf16
# single-device throughput check of a large MLP, splitgraph's stage vs plain PyTorch on the
# same layers (acceptance: ratio <= 1.10); a 2- and a 4-rank pipeline on the one GPU through
# the shared-GPU (staged) transport; the comparison harness's GPU variant at a memory cap
# (if splitgraph-compare is present). Each step has its own timeout and the script goes on
# after a failed step, so one run says everything it can.
#
# GPU_CHECK_DRY=1 runs the same steps on the CPU with tiny sizes: the plumbing, tested
# up to the device boundary (tests/test_gpu_path.py runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT/runs"
exec > >(tee "$OUT/log.txt") 2>&1
status=0
step() { echo; echo "=== $1 ($(date +%T))"; }
run() { local t=$1; shift; timeout "$t" "$@" || { echo "!!! failed ($?): $*"; status=1; }; }

step "setup"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
[ -e splitgraph/conf ] || ln -s ../conf splitgraph/conf  # what the package mapping installs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  dev=cpu; card=dry-run-cpu; W=64; B=64; S=3; R=3; staged=runtime.transport=staged
  pipes="2:1f1b 4:zb1"  # the rehearsal: each rank count and each kind of backward once
  compare=(experiment=tiny "compare.variants=[full,accumulate,pipeline]" "compare.schedules=[1f1b]")
else
  dev=cuda; W=8192; B=8192; S=60; R=20; staged=
  pipes="2:1f1b 2:zb1 4:1f1b 4:zb1"
  compare=(experiment=too_large compare.time_budget=null)  # ~10 processes, no timed reruns
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
fi
$PY -c "import torch, hydra; print('torch', torch.__version__, 'hydra', hydra.__version__)"
echo "card: $card"

step "gpu-marked tests"
run 150 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_path.py

step "throughput: one stage vs plain PyTorch (bf16, 5 x $W layers, batch $B)"
run 120 $PY -m splitgraph.bench.stage --device $dev --dtype bfloat16 --repeats $R \
  --out "$OUT/stage_bf16.json" model.hidden=[$W,$W,$W,$W] data.features=$W \
  train.batch_size=$B optim.momentum=0 optim.weight_decay=0
run 60 $PY -m splitgraph.bench.stage --device $dev --dtype float32 --repeats $R \
  --out "$OUT/stage_fp32.json" model.hidden=[$((W / 2)),$((W / 2)),$((W / 2)),$((W / 2))] \
  data.features=$((W / 2)) train.batch_size=$((B / 2)) optim.momentum=0 optim.weight_decay=0

for pipe in $pipes; do
  n=${pipe%%:*} s=${pipe#*:}
  step "pipeline: $n ranks sharing the GPU (staged transport), $s"
  run 120 $PY -m torch.distributed.run --standalone --nproc-per-node $n -m splitgraph.train \
    runtime.device=$dev $staged schedule=$s pipeline.microbatches=8 \
    model.hidden=[$((W / 4)),$((W / 4)),$((W / 4)),$((W / 4))] \
    train.batch_size=$((B / 8 > 8 ? B / 8 : 8)) train.steps=$S train.progress=false \
    data.samples=16384 checkpoint.resume=never run_dir="$OUT/runs/pp${n}_$s"
done

if $PY -c "import splitgraph.compare" 2>/dev/null; then
  step "comparison harness, GPU variant at a memory cap"
  run 150 $PY -m splitgraph.compare "${compare[@]}" compare.progress=false runtime.device=$dev \
    hydra.run.dir="$OUT/runs/compare"
fi

step "collect"
$PY - "$OUT" "$card" <<'PY'
import json, pathlib, sys
out, card = pathlib.Path(sys.argv[1]), sys.argv[2]
res = {"card": card}
for f in ("stage_bf16.json", "stage_fp32.json"):
    if (out / f).exists():
        res[f[:-5]] = json.loads((out / f).read_text())
for s in sorted((out / "runs").glob("pp*/summary.json")):
    d = json.loads(s.read_text())
    res[s.parent.name] = {k: d.get(k) for k in ("step_time_median_s", "samples_per_s_median",
                          "transport", "shared_gpu", "note", "memory_per_rank", "timeline")}
(out / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
print(json.dumps({k: (v.get("ratio") if isinstance(v, dict) and "ratio" in v else
                      v.get("step_time_median_s") if isinstance(v, dict) else v)
                  for k, v in res.items()}, indent=2))
PY
tar czf "$OUT/runs.tar.gz" -C "$OUT" runs && rm -rf "$OUT/runs"
echo "exit status: $status"
exit $status
