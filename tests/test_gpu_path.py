"""The GPU path: what can be checked without a GPU is checked here on the CPU (placement,
the shared-GPU transport's staging, bf16 autocast, NVML sampling); what needs CUDA is marked
`gpu` and skipped without one (launch/gpu_check.sh runs those on a lent GPU)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from splitgraph.config import Workload, load_config
from splitgraph.model import compute_dtype, torch_dtype
from splitgraph.observe.memory import draw_memory_over_time
from splitgraph.observe.nvml import NvmlSampler
from splitgraph.runtime.dist import place
from splitgraph.spawn import run_ranks
from splitgraph.train import run as train
from tests.reference import worst
from tests.workers import precision_worker

cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (and -m gpu: conftest hides it)"
)


def _runtime(**kw: str) -> object:
    cfg = load_config([f"runtime.{k}={v}" for k, v in kw.items()])
    return cfg.runtime


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_placement_cpu() -> None:
    p = place(_runtime(device="cpu"), 0, 4)
    assert (str(p.device), p.backend, p.transport, p.shared_gpu) == ("cpu", "gloo", "direct", False)


def test_placement_one_gpu_per_rank_is_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpus(monkeypatch, 4)
    p = place(_runtime(), 3, 4)
    assert (str(p.device), p.backend, p.transport) == ("cuda:3", "nccl", "direct")


def test_placement_ranks_sharing_a_gpu_are_staged_over_gloo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_gpus(monkeypatch, 1)
    p = place(_runtime(), 2, 4)
    assert (str(p.device), p.backend, p.transport, p.shared_gpu) == (
        "cuda:0",
        "gloo",
        "staged",
        True,
    )
    with pytest.raises(RuntimeError, match="NCCL refuses two ranks on one GPU"):
        place(_runtime(transport="direct"), 2, 4)


def test_precision_table() -> None:
    assert torch_dtype("bfloat16") == torch.float32  # master weights
    assert compute_dtype("bfloat16") == torch.bfloat16
    assert compute_dtype("float64") == torch.float64


@pytest.mark.timeout(180)
def test_staged_transport_and_bf16_autocast_on_two_ranks() -> None:
    """Staging through host buffers changes nothing numerically (float64 to rounding); bf16
    autocast keeps float32 weights and gradients, sends bf16 between stages, and lands within
    bf16's precision of the float32 gradients; zb1 under autocast is 1f1b's backward, cut."""
    cases = [
        [
            "runtime.transport=staged",
            "runtime.dtype=float64",
            "schedule.name=1f1b",
            "pipeline.microbatches=3",
        ],
        [
            "runtime.transport=staged",
            "runtime.dtype=float64",
            "schedule.name=zb1",
            "pipeline.microbatches=4",
            "schedule.recompute=true",
        ],
        ["runtime.dtype=bfloat16", "schedule.name=1f1b", "pipeline.microbatches=3"],
        ["runtime.dtype=bfloat16", "schedule.name=zb1", "pipeline.microbatches=4"],
        ["runtime.dtype=bfloat16", "schedule.name=1f1b", "pipeline.microbatches=4"],
        [
            "runtime.dtype=bfloat16",
            "schedule.name=gpipe",
            "pipeline.microbatches=2",
            "schedule.recompute=true",
        ],
    ]
    per_rank = run_ranks(precision_worker, 2, cases, timeout=150)
    for i, case in enumerate(cases):
        results = [r[i] for r in per_rank]
        err = worst(r["err"] for r in results)  # inf if any is NaN
        if "runtime.dtype=float64" in case:
            assert err < 1e-10, (case, err)
            assert {r["p2p"] for r in results} == {"StagedP2P"}
        else:
            assert err < 3e-2, (case, err)
            for r in results:
                assert r["param_dtypes"] == ["torch.float32"] == r["grad_dtypes"]
                assert r["transfer_dtypes"] == ["torch.bfloat16"]
    # zb1's I and W are 1f1b's B cut in two, under autocast too: the same bf16 products,
    # summed in float32 in the same order. Against each other, not against float32's 3e-2.
    zb1, ofb = cases.index(cases[3]), cases.index(cases[4])
    for r in per_rank:
        assert r[zb1]["grads"], "no gradients on this rank"
        torch.testing.assert_close(r[zb1]["grads"], r[ofb]["grads"], rtol=1e-6, atol=0)


class _FakeNvml:
    """Enough of pynvml to drive the sampler."""

    def __init__(self) -> None:
        self.used = 1 << 30

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        self.used += 1 << 20
        return SimpleNamespace(used=self.used)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        import os

        return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=512 << 20)]

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=87)


def test_nvml_sampler_records_and_plots(tmp_path: Path) -> None:
    import time

    s = NvmlSampler(0, interval=0.01, nvml=_FakeNvml()).start()
    deadline = time.monotonic() + 10
    while len(s.samples) < 3 and time.monotonic() < deadline:  # the thread samples
        time.sleep(0.01)
    out = s.stop()
    assert out["samples"] >= 3 and out["process_peak_bytes"] == 512 << 20
    assert out["utilization_mean_pct"] == 87 and out["device_used_peak_bytes"] > 1 << 30
    path = draw_memory_over_time([{"rank": 0, "nvml": out}], tmp_path / "memory.png")
    assert path is not None and Path(path).stat().st_size > 5_000


def test_nvml_sampler_without_a_driver_records_nothing_and_says_why() -> None:
    class Broken:
        def nvmlInit(self) -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    s = NvmlSampler(0, interval=0.01, nvml=Broken()).start()
    out = s.stop()
    assert out["samples"] == 0 and "NVML unavailable" in out["note"]
    assert draw_memory_over_time([{"rank": 0, "nvml": out}], "unused.png") is None
    off = NvmlSampler(0, interval=0).start().stop()
    assert off["samples"] == 0 and "off" in off["note"]


# -- on a GPU -------------------------------------------------------------------------------


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_single_device_gradients(dtype: str) -> None:
    from splitgraph.runtime.engine import PipelineEngine
    from tests.reference import max_rel_err, reference_grads
    from tests.workers import GRID, _batch

    cfg = load_config(
        [
            *GRID,
            f"runtime.dtype={dtype}",
            "schedule.name=1f1b",
            "pipeline.microbatches=3",
            "runtime.device=cuda",
        ]
    )
    engine = PipelineEngine(Workload.of(cfg), device="cuda")
    x, y = _batch(cfg, torch.float32)
    engine.forward_backward(x.cuda(), y.cuda())
    got = {k: p.grad.cpu() for k, p in engine.named_parameters().items()}
    ref_cfg = load_config([*GRID, "runtime.dtype=float32"])
    err = max_rel_err(got, reference_grads(ref_cfg, x, y, torch.float32))
    assert err < (1e-5 if dtype == "float32" else 3e-2), err


@cuda
@pytest.mark.gpu
def test_cuda_tracer_times_actions() -> None:
    from splitgraph.observe.trace import CudaTracer

    tr = CudaTracer(torch.device("cuda", 0))
    tr.set_reference()
    tok = tr.begin()
    a = torch.randn(2048, 2048, device="cuda")
    (a @ a).sum().item()
    tr.end(tok, "0F0", "F")
    tr.flush()
    ((_, label, _kind, start, end),) = tr.events
    assert label == "0F0" and end > start >= 0


def test_stage_throughput_check_runs_on_cpu(tmp_path: Path) -> None:
    from splitgraph.bench.stage import main

    out = tmp_path / "stage.json"
    assert (
        main(
            [
                "--repeats",
                "2",
                "--warmup",
                "1",
                "--out",
                str(out),
                "model.hidden=[16,16]",
                "data.features=16",
                "train.batch_size=32",
            ]
        )
        == 0
    )
    import json

    result = json.loads(out.read_text())
    assert set(result["ratio"]) == {"splitgraph", "splitgraph, meter off"}
    assert all(v > 0 for v in result["median_s"].values())


def test_gpu_check_script_is_valid_bash() -> None:
    import subprocess

    for script in ("launch/gpu_check.sh", "launch/gpu_wheels.sh"):
        assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    """The GPU check on the CPU with tiny sizes: its plumbing up to the device boundary.
    Every step runs within the script's deadline; what comes back is what the device tool
    returns (at most 8 files of 16 MiB, no folders), without weights or checkpoints."""
    import json
    import os
    import subprocess
    import sys
    import tarfile

    out, scratch = tmp_path / "out", tmp_path / "scratch"
    env = dict(
        os.environ,
        GPU_CHECK_DRY="1",
        OUT=str(out),
        GPU_CHECK_SCRATCH=str(scratch),
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
    )
    res = subprocess.run(
        ["bash", "launch/gpu_check.sh"], env=env, capture_output=True, text=True, timeout=580
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    # the dry run's pipelines: each size and schedule once (the GPU runs all four)
    assert len(steps) == 6 and all(s["outcome"] == "ok" for s in steps), steps
    assert {"stage_bf16", "stage_fp32", "pp2_1f1b", "pp4_zb1"} <= set(results)
    assert results["pp2_1f1b"]["transport"] == "staged"
    assert "staged over gloo" in results["pp4_zb1"]["link"]["source"]
    assert {r["variant"]: r["status"] for r in results["compare"]["rows"]} == {
        "full": "oom",
        "pipeline-1f1b-p2-m4": "ok",
    }
    # what comes back: files only, few and small; no weights, no checkpoints
    back = list(out.iterdir())
    assert sorted(p.name for p in back) == ["log.txt", "results.json", "runs.tar.gz"]
    assert all(p.is_file() and p.stat().st_size <= 16 * 2**20 for p in back)
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/pp4_zb1/summary.json" in names and "runs/compare/report.md" in names
    assert not [n for n in names if n.endswith(".pt") or "checkpoints" in n], names
    for run in scratch.glob("runs/pp*"):  # the pipeline runs wrote none either
        assert not (run / "model.pt").exists() and not (run / "checkpoints").exists()


def test_gpu_collect_keeps_the_tarball_under_what_comes_back(tmp_path: Path) -> None:
    """A run whose trace is too large to come back: the tarball drops the traces (and says
    so), keeps the summaries, and never holds weights or checkpoints."""
    import importlib.util
    import json
    import os
    import tarfile

    spec = importlib.util.spec_from_file_location("gpu_collect", "launch/gpu_collect.py")
    assert spec is not None and spec.loader is not None
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    run = scratch / "runs" / "pp2_1f1b"
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    out.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "ok", "step_time_median_s": 0.5}))
    (run / "trace.json").write_bytes(os.urandom(17 * 2**20))  # incompressible, over 16 MiB
    (run / "model.pt").write_bytes(b"weights")
    (run / "checkpoints" / "step_2" / "meta.json").write_text("{}")
    (scratch / "steps.tsv").write_text("pipeline\tok\t12\n")
    res = collect.collect(out, scratch, "test-card")
    assert res["tarball"]["left_out_to_fit_16MiB"] == ["traces (trace.json)"]
    assert (out / "runs.tar.gz").stat().st_size <= 16 * 2**20
    with tarfile.open(out / "runs.tar.gz") as tar:
        assert tar.getnames() == ["runs/pp2_1f1b/summary.json"]
    assert res["pp2_1f1b"]["step_time_median_s"] == 0.5
    assert res["steps"] == [{"step": "pipeline", "outcome": "ok", "seconds": 12.0}]


def test_gpu_check_without_the_hydra_wheels_stops_at_once_with_one_line(tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess
    import sys

    root = tmp_path / "checkout"  # a checkout without .whl/
    (root / "launch").mkdir(parents=True)
    shutil.copy("launch/gpu_check.sh", root / "launch")
    hidden = tmp_path / "hide" / "hydra"  # an interpreter with torch but no hydra
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('not in the GPU image')\n")
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PYTHONPATH=str(tmp_path / "hide"),
        OUT=str(tmp_path / "out"),
        GPU_CHECK_SCRATCH=str(tmp_path / "scratch"),
    )
    res = subprocess.run(
        ["bash", str(root / "launch" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert len(lines) == 1 and "launch/gpu_wheels.sh" in lines[0], lines


# -- issue 19: the GPU path's findings, checked up to the device boundary ---------------------


@pytest.mark.timeout(180)
def test_a_gloo_group_on_a_gpu_machine_stays_unbound_so_the_mesh_builds(tmp_path: Path) -> None:
    """Ranks sharing a GPU talk gloo. Bound to a device (`device_id`), the default group makes
    torch split every mesh dimension from it, deep-copying gloo's options, which fails
    ("cannot pickle '_Options'"); train.py's set-up binds only an NCCL group."""
    from tests.gpu_workers import bound_mesh_worker

    coords = run_ranks(bound_mesh_worker, 2, str(tmp_path / "store"), timeout=150)
    assert coords == [(0, 0), (0, 1)]


_INJECT = """
import sys, torch
where = sys.argv.pop(1)
def refuse(*a, **k):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (injected)")
if where == "step":  # in an action of step 1, inside the executor (which wraps other errors)
    import splitgraph.model as model
    forward, calls = model.StageModule.forward, []
    def counting(self, x):
        calls.append(1)
        if len(calls) > 1:
            refuse()
        return forward(self, x)
    model.StageModule.forward = counting
elif where == "engine":  # building the stages
    import splitgraph.runtime.engine as engine
    engine.build_mlp = refuse
elif where == "data":  # moving the dataset to the device (the loader's own .to passes)
    import splitgraph.data as data
    to, moves = data.Dataset.to, []
    def moving(self, *args, **kwargs):
        moves.append(1)
        if len(moves) > 1:
            refuse()
        return to(self, *args, **kwargs)
    data.Dataset.to = moving
from splitgraph.train.run import main
main()
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("where", "phase"),
    [
        ("step", "at step 1"),
        ("engine", train.OUTSIDE_STEPS),
        ("data", train.OUTSIDE_STEPS),
    ],
)
def test_an_allocator_out_of_memory_anywhere_stops_the_run_as_oom(
    tmp_path: Path, where: str, phase: str
) -> None:
    """A torch.OutOfMemoryError raised in a step (through the executor), while building the
    engine or while moving the data becomes the run's OutOfMemory: exit code 3, the rank's
    oom_rank<r>.json, a summary with status "oom", and the harness records "oom"."""
    import json
    import os
    import subprocess
    import sys

    from splitgraph.compare import runner

    run_dir = tmp_path / "run"
    overrides = [
        "runtime.device=cpu",
        "model.hidden=[16,16]",
        "data.samples=256",
        "train.batch_size=32",
        "pipeline.microbatches=1",
        "train.steps=3",
        "train.progress=false",
        "checkpoint.save=false",
        "checkpoint.every=null",
        "costs.report=false",
        f"run_dir={run_dir}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-c", _INJECT, where, *overrides],
        capture_output=True,
        text=True,
        timeout=200,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert res.returncode == 3, res.stderr[-3000:]
    rec = json.loads((run_dir / "oom_rank0.json").read_text())
    assert rec["status"] == "oom" and rec["phase"] == phase, rec
    assert rec["needed_bytes"] == 20 * 2**20  # nothing allocated on the CPU + the request
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "oom"
    assert "out of memory" in res.stderr
    assert runner.read(run_dir, res.returncode).status == "oom"


def test_validate_refuses_gpu_caps_below_what_the_caching_allocator_can_honour(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from splitgraph.config import validate
    from splitgraph.errors import ConfigError
    from splitgraph.runtime.allocator import min_cap, segment_bytes

    MiB = 2**20
    assert [segment_bytes(n) for n in (1, MiB, MiB + 1, 10 * MiB - 1, 10 * MiB, 11 * MiB)] == [
        2 * MiB,
        2 * MiB,
        20 * MiB,
        20 * MiB,
        10 * MiB,
        12 * MiB,
    ]
    # too_large's model on a GPU: its largest tensor is the 7.2 MiB of training inputs kept
    # on the device: a 20 MiB segment, plus a 2 MiB one for the small tensors
    too_large = [
        "model.hidden=[256,256,256,256]",
        "data.samples=32768",
        "train.batch_size=1024",
        "pipeline.microbatches=4",
    ]
    cfg = load_config([*too_large, "runtime.device=cuda", "pipeline.memory_cap=4.5MiB"])
    assert min_cap(Workload.of(cfg), cfg.data)[0] == 22 * MiB
    with pytest.raises(ConfigError) as info:
        validate(cfg, 1)
    text = str(info.value)
    assert "pipeline.memory_cap=4.5MiB" in text and "23,068,672 bytes" in text
    assert "20 MiB segment" in text and "training inputs on the device" in text
    validate(load_config([*too_large, "runtime.device=cuda", "pipeline.memory_cap=22MiB"]), 1)
    # the same cap on the CPU is an accounting, not an allocator: allowed
    validate(load_config([*too_large, "runtime.device=cpu", "pipeline.memory_cap=4.5MiB"]), 1)
    # device=auto on a machine with a GPU is a GPU run
    _fake_gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match="caching allocator"):
        validate(load_config([*too_large, "pipeline.memory_cap=4.5MiB"]), 1)
    # the data kept on the host: the largest tensor is now a weight, in the small pool
    host = load_config([*too_large, "data.on_device=false", "pipeline.memory_cap=4.5MiB"])
    assert min_cap(Workload.of(host), host.data)[0] == 2 * MiB
    validate(host, 1)


def test_the_gpu_experiment_fits_the_allocator() -> None:
    """conf/experiment/too_large_gpu.yaml (gpu_check's comparison) passes the GPU check."""
    from splitgraph.compare import config as compare_config
    from splitgraph.config import validate
    from splitgraph.units import parse_bytes

    cfg = compare_config.load(["experiment=too_large_gpu", "runtime.device=cuda"])
    validate(cfg, 2)  # its pipeline variant; the one-device ones hold the same tensors
    assert parse_bytes(cfg.compare.memory_cap) >= 256 * 2**20  # hundreds of MiB


@pytest.mark.timeout(180)
def test_the_link_is_measured_through_the_engines_own_transport() -> None:
    """After a run the link is measured between pipeline ranks 0 and 1 through `engine.p2p`
    (its device, its backend and channel groups, its staging), and the run's traffic
    counters stay the training's. A plain `dist.send` of a CPU tensor fails on NCCL."""
    from tests.gpu_workers import link_worker

    cases = [("direct", "P2P"), ("staged", "StagedP2P")]
    per_rank = run_ranks(link_worker, 2, [t for t, _ in cases], timeout=150)
    for rank, results in enumerate(per_rank):
        peer = 1 - rank
        for (transport, cls), got in zip(cases, results):
            kinds = {("cpu", "act", peer), ("cpu", "grad", peer)}  # 0 -> 1 act, 1 -> 0 grad
            assert set(got["through_p2p"]) == kinds, got
            assert got["p2p_class"] == cls and got["counters_kept"]
            assert got["bandwidth"] > 0 and f"{transport} over gloo on cpu" in got["source"]


@pytest.mark.timeout(120)
def test_cuda_tracer_reference_is_shared_across_ranks() -> None:
    """Rank 1's device still holds 1 s of queued work when the trace window opens. Its events
    must still land on the clock rank 0's do: an instant both ranks share is at the same
    trace time on both (CUDA events and synchronize stood in for by host clocks)."""
    from tests.gpu_workers import tracer_worker

    t0, t1 = run_ranks(tracer_worker, 2, 1.0, timeout=100)
    assert abs(t0 - t1) < 0.3, (t0, t1)


def test_nvml_reads_the_gpu_torch_uses_not_the_one_at_its_index() -> None:
    class Nvml(_FakeNvml):
        def __init__(self) -> None:
            super().__init__()
            self.asked: list[object] = []

        def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
            self.asked.append(i)
            return i

        def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
            self.asked.append(uuid)
            if not uuid.startswith("GPU-"):
                raise RuntimeError("not found")
            return uuid

    from splitgraph.observe.nvml import physical_index

    visible = {"CUDA_VISIBLE_DEVICES": "3,1"}
    assert [physical_index(i, visible) for i in (0, 1)] == [3, 1]
    assert physical_index(2, {}) == 2
    with pytest.raises(ValueError, match="not visible"):
        physical_index(2, visible)
    nv = Nvml()
    NvmlSampler(0, interval=0.01, nvml=nv, environ=visible).start().stop()
    assert nv.asked == [3]  # torch's cuda:0 is the machine's GPU 3
    nv = Nvml()
    uuid = "8b0e5f3c-1234-5678-9abc-def012345678"
    NvmlSampler(0, interval=0.01, nvml=nv, uuid=uuid, environ=visible).start().stop()
    assert nv.asked == [f"GPU-{uuid}"]  # the UUID names the device whatever the order


def test_cpu_tests_are_pinned_to_the_cpu() -> None:
    """conftest hides CUDA from every test not marked gpu, so `runtime.device=auto` means
    the CPU here and in every process a test starts, also on a machine with a GPU."""
    import os

    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert not torch.cuda.is_available()
    assert str(place(_runtime(), 0, 2).device) == "cpu"
