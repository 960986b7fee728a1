"""Resources checked before they are committed: data file headers before arrays, the model's
memory before any parameter, and `splitgraph-check` / `launch/train.sh` before torchrun."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from splitgraph.config import Workload, load_config
from splitgraph.data import load_dataset
from splitgraph.datafile import read_header
from splitgraph.errors import DataError, OutOfMemory
from splitgraph.partition import make_plan
from splitgraph.reliability import memcap, preflight
from splitgraph.runtime.engine import PipelineEngine
from splitgraph.runtime.mesh import layout_of
from splitgraph.train import run as train
from splitgraph.train.cli import check_main
from tests.test_e2e import REPO, launch_script

GiB = 2**30


def zip_bomb(path: Path, rows: int, cols: int = 20) -> Path:
    """A real .npz bomb: X [rows, cols] float32 zeros and y [rows] int64 zeros, deflated
    (about 200:1 at zlib level 1), written in pieces so making it allocates nothing big."""
    zero = memoryview(bytes(1 << 22))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, shape, descr in (("X", (rows, cols), "<f4"), ("y", (rows,), "<i8")):
            header = io.BytesIO()
            fields = {"descr": descr, "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(header, fields)
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                f.write(header.getvalue())
                left = int(np.prod(shape)) * int(descr[-1])
                while left:
                    n = min(left, len(zero))
                    f.write(zero[:n])
                    left -= n
    return path


# -- data file headers -------------------------------------------------------------------


def test_headers_are_read_without_loading_the_arrays(tmp_path: Path) -> None:
    X = np.ones((50_000, 100), dtype=np.float64)  # 40 MB, stored uncompressed
    np.savez(tmp_path / "d.npz", X=X, y=np.arange(50_000) % 3, extra=np.zeros(2))
    tracemalloc.start()
    try:
        h = read_header(tmp_path / "d.npz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"reading the header allocated {peak} bytes"
    x, y = h.arrays["X"], h.arrays["y"]
    assert (x.shape, x.dtype, x.kind, x.nbytes) == ((50_000, 100), "float64", "float", X.nbytes)
    assert (y.shape, y.kind) == ((50_000,), "int") and set(h.names) == {"X", "y", "extra"}

    torch.save({"X": torch.ones(10, 3), "y": torch.arange(10)}, tmp_path / "d.pt")
    pt = read_header(tmp_path / "d.pt")
    assert pt.mapped and pt.arrays["X"].shape == (10, 3) and pt.arrays["X"].dtype == "float32"
    # a .pt whose records were compressed (torch never does this) cannot be mapped: bounded
    with (
        zipfile.ZipFile(tmp_path / "d.pt") as src,
        zipfile.ZipFile(tmp_path / "c.pt", "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert not read_header(tmp_path / "c.pt").mapped
    with pytest.raises(DataError, match="compressed tensor records that expand to"):
        read_header(tmp_path / "c.pt", limit=64)


@pytest.mark.timeout(120)
def test_a_zip_bomb_is_refused_before_it_is_decompressed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """X [2M x 20] float32 (160 MB) and y in a ~1 MB file; on a machine of 512 MiB the data
    bound is 256 MiB and loading it (the arrays + the run's copy) takes 352 MB: refused from
    its header, with nothing decompressed. The bound scales with the machine's memory."""
    bomb = zip_bomb(tmp_path / "bomb.npz", 2_000_000)
    assert bomb.stat().st_size < 2 << 20
    over = ["data=file", f"data.path={bomb}"]
    monkeypatch.setattr(preflight, "machine_memory", lambda: 512 * 2**20)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(DataError) as info:
            cfg = load_config(over)
            load_dataset(cfg.data, Workload.of(cfg))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    text = str(info.value)
    assert "declares X [2,000,000 x 20] float32 (152.6 MiB)" in text, text
    assert ":1 compressed" in text and "over the data bound of 256.0 MiB" in text
    assert "half of this machine's 512.0 MiB" in text and "data.max_memory" in text
    assert peak < 8 << 20, f"{peak} bytes allocated before the refusal"
    assert time.perf_counter() - t0 < 10

    cfg = load_config([*over, "model.hidden=[8]", "data.features=20", "data.outputs=2"])
    layout, plan = layout_of(cfg.pipeline, cfg.parallel, 2), make_plan(Workload.of(cfg), 2)
    # two ranks on one node each load it (first and last stage): 2 x 320 MB
    for machine, fits in ((1 * GiB, False), (2 * GiB, True)):
        monkeypatch.setattr(preflight, "machine_memory", lambda m=machine: m)
        if fits:
            preflight.check_launch(cfg.data, Workload.of(cfg), layout, plan, range(2))
        else:
            with pytest.raises(DataError, match="each of the 2 ranks on this node"):
                preflight.check_launch(cfg.data, Workload.of(cfg), layout, plan, range(2))
    # the launch script refuses it before torchrun (an explicit bound: any machine)
    res = launch_script(tmp_path / "run", "train.sh", "2", *over, "data.max_memory=256MiB")
    assert res.returncode == 2 and "over the data bound of 256.0 MiB" in res.stderr
    assert "torch.distributed" not in res.stderr and not (tmp_path / "run").exists()


# -- the model's memory ------------------------------------------------------------------

PRICED = [
    ["schedule=1f1b"],
    ["schedule=gpipe", "optim=adam", "model.bias=true"],
    ["schedule=zb1", "model.activation=gelu", "model.task=regression"],
    ["schedule=interleaved", "model.hidden=[16,16,16]", "runtime.dtype=float64"],
    ["schedule=1f1b", "schedule.recompute=true", "partition=params", "optim.momentum=0"],
]


@pytest.mark.parametrize("over", PRICED, ids=lambda o: o[0].split("=")[1] + str(len(o)))
def test_the_model_is_priced_exactly_before_it_exists(over: list[str]) -> None:
    base = ["model.hidden=[24,12,20]", "data.features=10", "train.batch_size=24"]
    cfg = load_config([*base, *over])
    layout, plan = layout_of(cfg.pipeline, cfg.parallel, 2), make_plan(Workload.of(cfg), 2)
    priced = preflight.price_ranks(Workload.of(cfg), layout, plan)
    for rank in range(2):
        engine = PipelineEngine(Workload.of(cfg), rank, 2, plan=plan)  # now the parameters exist
        built = memcap.accounting(engine, None, measured=False)
        assert priced[rank] == {**built, "rank": rank}
        assert priced[rank]["saved_peak"] and priced[rank]["optimizer"] >= 0
    # data parallel: each replica prices the same stages at B/dp rows, plus the all-reduce
    # buckets (a second copy of the gradients), as memcap accounts a GradSync engine
    dp = load_config([*base, *over, "parallel.dp=2"])
    dp_priced = preflight.price_ranks(
        Workload.of(dp), layout_of(dp.pipeline, dp.parallel, 4), make_plan(Workload.of(dp), 2)
    )
    half = load_config([*base, *over, "train.batch_size=12"])
    half_priced = preflight.price_ranks(Workload.of(half), layout, plan)
    for rank in range(4):
        one = half_priced[rank % 2]
        assert one["allreduce_buckets"] == 0
        buckets = one["grads"]
        assert dp_priced[rank] == {
            **one,
            "rank": rank,
            "allreduce_buckets": buckets,
            "total": one["total"] + buckets,
        }


_MAXRSS = (
    "import atexit, resource, sys\n"
    "atexit.register(lambda: print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF)"
    ".ru_maxrss, file=sys.stderr))\n"
    "from splitgraph.train.run import main\n"
    "main()\n"
)


@pytest.mark.timeout(180)
def test_an_oversize_model_is_refused_before_any_parameter_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # 960M + 150M parameters: 4.1 GiB of weights over a 1 GiB cap. The process exits 3 with
    # the numbers and the fix, and never holds more than the interpreter.
    run_dir = tmp_path / "cap"
    res = subprocess.run(
        [sys.executable, "-c", _MAXRSS, "model.hidden=[15000000]", "pipeline.memory_cap=1GiB"]
        + [f"run_dir={run_dir}", "train.progress=false"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert res.returncode == memcap.EXIT_OOM, res.stderr[-2000:]
    assert "out of memory before any parameter is allocated: rank 0 needs" in res.stderr
    assert "Layer 0 alone (15,000,000 x 64 = 960,000,000 parameters)" in res.stderr
    assert "Traceback" not in res.stderr
    maxrss_kb = int(re.findall(r"MAXRSS_KB (\d+)", res.stderr)[-1])
    assert maxrss_kb < 1_500_000, f"peak RSS {maxrss_kb} KB: the model was allocated"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "oom" and summary["needed_bytes"] > summary["cap_bytes"] == GiB

    # Over the machine (no cap): on a 24 GiB machine, 7.4e9 parameters cannot fit.
    monkeypatch.setattr(preflight, "machine_memory", lambda: 24 * GiB)
    assert check_main(["model.hidden=[100000000]"]) == 3
    err = capsys.readouterr().err
    assert "rank 0 needs at least" in err and "this machine has 25,769,803,776 bytes" in err
    assert "a smaller model (model.hidden)" in err
    # the launch: two ranks, a cap; splitgraph-check used to say "valid"
    assert (
        check_main(["--nproc", "2", "model.hidden=[100000000,10]", "pipeline.memory_cap=1GiB"]) == 3
    )
    assert "pipeline.memory_cap is 1,073,741,824 bytes" in capsys.readouterr().err

    # In a run: a model of 29.6M parameters (237 MB with gradients) on a machine of 128 MiB
    # is refused by every rank before it is built.
    monkeypatch.setattr(preflight, "machine_memory", lambda: 128 * 2**20)
    cfg = load_config(["model.hidden=[400000]", "train.steps=1", f"run_dir={tmp_path / 'm'}"])
    with pytest.raises(OutOfMemory, match="but this machine has 134,217,728 bytes"):
        train.run(cfg)


def test_every_rank_leaves_the_oom_record_the_harness_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank refuses alone, before any process group; torchrun may stop rank 0 before it
    writes summary.json (a flaky 'failed' in the compare harness), so rank 1 leaves the record
    too, and the harness reads the run as "oom" from it alone."""
    from splitgraph.compare import runner
    from splitgraph.runtime.dist import DistEnv

    monkeypatch.setattr(preflight, "machine_memory", lambda: 24 * 2**30)
    run_dir = tmp_path / "r1"
    over = ["model.hidden=[64,64]", "pipeline.memory_cap=64KiB", f"run_dir={run_dir}"]
    cfg = load_config([*over, "train.steps=1"])
    with pytest.raises(OutOfMemory, match=r"pipeline\.memory_cap is 65,536 bytes"):
        train.run(cfg, DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2))
    assert not (run_dir / "summary.json").exists()  # rank 1 never writes it
    assert [p.name for p in run_dir.iterdir() if p.name.startswith("oom_")] == ["oom_rank0.json"]
    outcome = runner.read(run_dir, 3)
    assert outcome.status == "oom" and (outcome.needed_bytes or 0) > 65536


# -- splitgraph-check and launch/train.sh --------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--nproc", "0"], "--nproc 0: a launch needs at least 1 rank"),
        (["--nproc", "-3"], "--nproc -3: a launch needs at least 1 rank"),
        (["--nproc", "2", "--nproc-per-node", "0"], "--nproc-per-node 0"),
    ],
)
def test_check_refuses_a_launch_of_no_ranks(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check_main(args) == 2
    assert needle in capsys.readouterr().err


def test_train_sh_0_is_a_clear_error(tmp_path: Path) -> None:
    res = launch_script(tmp_path / "run", "train.sh", "0")
    assert res.returncode == 2 and "a launch needs at least 1 rank" in res.stderr
    assert "Traceback" not in res.stderr and "AssertionError" not in res.stderr


def test_a_bad_data_file_is_refused_before_torchrun_with_every_problem_once(
    tmp_path: Path,
) -> None:
    X = np.zeros((30, 4))
    X[3, 2] = np.nan
    y = np.arange(30) % 3
    y[5] = -1
    path = tmp_path / "bad.npz"
    np.savez(path, X=X, y=y)
    over = ["data=file", f"data.path={path}", "data.features=3"]
    res = launch_script(tmp_path / "run", "train.sh", "2", *over)
    assert res.returncode == 2, res.stderr
    assert "(3 problems)" in res.stderr
    for needle in ("X has 4 features", "found -1 (in 1 rows)", "NaN or infinite values in 1 rows"):
        assert res.stderr.count(needle) == 1, (needle, res.stderr)
    assert "torch.distributed" not in res.stderr and "ChildFailedError" not in res.stderr
    assert not (tmp_path / "run").exists()


def test_check_says_what_it_read_from_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", X=rng.normal(size=(300, 9)), y=rng.integers(0, 4, 300))
    assert check_main(["--nproc", "2", "data=file", f"data.path={tmp_path / 'c.npz'}"]) == 0
    out = capsys.readouterr().out
    assert "data.features=9, data.outputs=4 read from the file" in out
    assert "memory per rank, priced before anything is allocated" in out
    assert re.search(r"rank 1: .* \+ data ", out), out


def test_on_gpus_each_rank_is_held_against_its_own_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU here: the devices are named and their memory given, as place() and
    torch.cuda would on a node of two GPUs; the host then holds only the data."""
    cfg = load_config(["model.hidden=[2000,2000]", "optim=adam"])  # 4.5M params: 72 MB each
    layout, plan = layout_of(cfg.pipeline, cfg.parallel, 3), make_plan(Workload.of(cfg), 3)
    gpus = [torch.device("cuda", r) for r in range(3)]
    records = preflight.price_ranks(Workload.of(cfg), layout, plan)
    biggest = max(r["total"] for r in records)
    monkeypatch.setattr(preflight, "_device_memory", lambda dev: biggest)
    monkeypatch.setattr(preflight, "machine_memory", lambda: 64 * 2**20)  # host: data only
    checked = preflight.check_launch(cfg.data, Workload.of(cfg), layout, plan, range(3), gpus)
    assert set(checked.capacity) == {"host", "cuda:0", "cuda:1", "cuda:2"}
    monkeypatch.setattr(preflight, "_device_memory", lambda dev: biggest - 1)
    with pytest.raises(OutOfMemory, match=r"rank \d needs at least .* but cuda:\d has"):
        preflight.check_launch(cfg.data, Workload.of(cfg), layout, plan, range(3), gpus)
    # two ranks sharing one GPU (staged transport) are summed on it
    shared = [torch.device("cuda", 0)] * 3
    monkeypatch.setattr(preflight, "_device_memory", lambda dev: biggest)
    with pytest.raises(OutOfMemory, match="the 3 ranks on cuda:0 need at least"):
        preflight.check_launch(cfg.data, Workload.of(cfg), layout, plan, range(3), shared)
