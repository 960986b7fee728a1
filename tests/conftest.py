"""Test-wide set-up.

- The tests run on the CPU, also on a machine with a GPU (`runtime.device=auto` would take
  CUDA there): CUDA is hidden from the test process and every process it starts, unless the
  run selects the gpu-marked tests (`-m gpu`, as launch/gpu_check.sh does).
- Profiles and link measurements go to a temporary cache, never ~/.cache (the planner's).
- Shared launches for the reliability tests (test_resume.py, test_guard.py). Starting
  processes costs seconds on two cores, a training run here milliseconds, so the faults that
  need several ranks run as cases of two launches, made once per session:
  - 2 ranks: uninterrupted and interrupted runs for SGD-momentum and Adam, a resume on another
    partition, a NaN in the data, a NaN in a gradient, a signal on one rank, a resume past
    a damaged shard, and last (it ends the launch) a rank SIGKILLed while writing a
    checkpoint;
  - 4 ranks: the 2-rank checkpoints loaded and trained on 4 stages.
  One-device runs (the references, a resume on one device) happen in the test process.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splitgraph.config import load_config
from splitgraph.errors import RankFailure
from splitgraph.reliability import checkpoint
from splitgraph.runtime.dist import DistEnv
from splitgraph.spawn import preload, run_ranks
from splitgraph.train import run as train
from tests.fault_workers import TINY, cases

OPTIMS = {"sgd": ["optim.momentum=0.9"], "adam": ["optim=adam", "optim.lr=0.01"]}

# The suite's ranks start from one fork server per worker; many import DCP (they save
# checkpoints) or torch._dynamo (torch.optim in the plain-PyTorch references): once there.
preload("torch._dynamo", "torch.distributed.checkpoint")


#: Files whose tests read one session launch: under pytest-xdist (`make test`: -n 2 --dist
#: loadgroup) each group runs on one worker, so the launch runs once, not once per worker.
SHARED_LAUNCH = {
    **dict.fromkeys(
        ("test_guard.py", "test_integrity.py", "test_resume.py", "test_signals.py"),
        "fault_launches",
    ),
    "test_timeouts.py": "fault_launches",
    "test_e2e.py": "one_process_small",
    "test_dataparallel.py": "one_process_small",
}


def worker_group(nodeid: str) -> str:
    """The xdist group of a test, from its id: its file (the file's module-level launches and
    caches stay on one worker), the launch its file shares (SHARED_LAUNCH), or for
    test_equivalence.py's cases their world size (one launch each, run where its cases run)."""
    path, _, rest = nodeid.partition("::")
    name = Path(path).name
    if name == "test_equivalence.py":
        p = re.match(r"test_matches_single_device\[p(\d+)-", rest)
        if p:
            return f"{name}[p{p.group(1)}]"
    return SHARED_LAUNCH.get(name, name)


@pytest.hookimpl(optionalhook=True)  # runs without pytest-xdist (compat venvs) ignore it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup` by worker_group. pytest-xdist's own loadgroup reads an `@group`
    suffix that it writes into each test's id, and under pytest 9 (whose ids are no longer
    that attribute) the suffix never appears: each file's tests were spread over both
    workers, and each worker ran every launch its tests read (the equivalence grid's, the
    fault launches) once more. The groups are computed here, from the ids, as the scheduler
    sees them."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return FileGroups(config, log)


def pytest_configure(config: pytest.Config) -> None:
    expr = str(config.getoption("markexpr") or "")
    if "gpu" in expr and "not gpu" not in expr:
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def single_run(overrides: list[str]) -> None:
    train.run(load_config(TINY + overrides), DistEnv())


def assert_resumed(run_dir: Path, from_step: int, steps: int) -> None:
    """The last launch in `run_dir` resumed from its step-`from_step` checkpoint and trained
    only steps from_step..steps-1: the steps before were not recomputed. (Training is
    deterministic, so equal final weights alone cannot tell a resume from a restart.)"""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == (from_step or None), (
        f"{run_dir}: resumed from {summary['resumed_from_step']}, expected {from_step}"
    )
    assert summary["steps_run"] == steps - from_step, (
        f"{run_dir}: this launch trained {summary['steps_run']} steps, expected "
        f"{steps - from_step} (steps {from_step}..{steps - 1})"
    )
    assert summary["steps"] == steps


def step3(tmp: Path, opt: str) -> Path:
    """The 2-rank SGD/Adam checkpoint after 3 of 6 steps."""
    return tmp / opt / "part" / "checkpoints" / checkpoint.step_dir_name(3)


@pytest.fixture(scope="session")
def fault_launches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("faults")
    two: list[tuple[str, list[str], str | None]] = []
    for opt, over in OPTIMS.items():
        d = tmp / opt
        two += [
            ("train", [*over, "train.steps=6", f"run_dir={d / 'full'}"], None),  # never stopped
            ("train", [*over, "train.steps=3", f"run_dir={d / 'part'}"], None),  # stops at 3 ...
            ("train", [*over, "train.steps=6", f"run_dir={d / 'part'}"], None),  # ... resumes
            (  # the step-3 checkpoint, resumed on another partition of the 2 ranks
                "train",
                [
                    *over,
                    "train.steps=6",
                    "partition=params",
                    f"checkpoint.resume={step3(tmp, opt)}",
                    f"run_dir={d / 'params'}",
                ],
                None,
            ),
        ]
    nan = ["train.steps=6", "checkpoint.every=2", "debug.fail_at_step=3", "debug.fail_mode=nan"]
    two += [
        ("train", [*nan, f"run_dir={tmp / 'nan'}"], str(tmp / "nan" / "outcome")),
        (
            "train",
            [*nan, "runtime.nan_check=microbatch", f"run_dir={tmp / 'nan-full'}"],
            str(tmp / "nan-full" / "outcome"),
        ),
        ("nan_grad", [], str(tmp / "nan-grad" / "outcome")),
        # a signal reaching one rank only (SIGTERM on rank 1 as step 1 starts; SIGINT on rank
        # 0 as step 3 starts): both ranks stop after the same step with one checkpoint; then
        # the same command resumes
        *[
            (
                "train",
                [
                    "train.steps=6",
                    f"debug.fail_at_step={at}",
                    f"debug.fail_rank={rank}",
                    f"debug.fail_mode={mode}",
                    "trace.enabled=false",
                    f"run_dir={tmp / mode}",
                ],
                str(tmp / mode / "outcome"),
            )
            for mode, rank, at in (("sigterm", 1, 1), ("sigint", 0, 3))
        ],
        ("train", ["train.steps=6", "trace.enabled=false", f"run_dir={tmp / 'sigterm'}"], None),
        # rank 1's shard of the newest checkpoint damaged: both ranks must skip it, rank 0
        # alone sets it aside, and both resume from the one before
        (
            "train",
            [
                "train.steps=4",
                "checkpoint.every=2",
                "trace.enabled=false",
                f"run_dir={tmp / 'dmg'}",
            ],
            None,
        ),
        ("corrupt", [str(tmp / "dmg" / "checkpoints" / "step_00000004" / "__1_0.distcp")], None),
        (
            "train",
            [
                "train.steps=6",
                "checkpoint.every=2",
                "trace.enabled=false",
                f"run_dir={tmp / 'dmg'}",
            ],
            str(tmp / "dmg" / "outcome"),
        ),
        # the V placement (stage s and 2p-1-s on rank s): a round-robin checkpoint resumed
        # into it, and a V run stopped at step 3 and resumed on the same V
        (
            "train",
            [
                *OPTIMS["sgd"],
                "train.steps=6",
                "schedule=zbv",
                f"checkpoint.resume={step3(tmp, 'sgd')}",
                f"run_dir={tmp / 'sgd' / 'zbv-from-1f1b'}",
            ],
            None,
        ),
        *[
            (
                "train",
                [*OPTIMS["sgd"], f"train.steps={n}", "schedule=vhalf", f"run_dir={tmp / 'v'}"],
                None,
            )
            for n in (3, 6)
        ],
        (  # last, it ends the launch: rank 1 is SIGKILLed while writing the step-4 checkpoint
            "train",
            [
                "train.steps=6",
                "checkpoint.every=2",
                "debug.fail_at_step=4",
                "debug.fail_rank=1",
                "debug.fail_mode=kill_in_save",
                f"run_dir={tmp / 'kill'}",
            ],
            None,
        ),
    ]
    with pytest.raises(RankFailure) as failure:
        run_ranks(cases, 2, two, timeout=150, pg_timeout=60, stop_on_failure=False)

    four: list[tuple[str, list[str], str | None]] = []
    for opt, over in OPTIMS.items():
        resume = f"checkpoint.resume={step3(tmp, opt)}"
        four.append(("load", [*over, resume], None))
        four.append(
            ("train", [*over, "train.steps=6", resume, f"run_dir={tmp / opt / 'four'}"], None)
        )
    # Data x pipeline parallel: saved at dp=2 x pp=2, resumed at dp=1 x pp=4 (and, below, on
    # one device): checkpoints do not depend on the layout.
    sgd, dp_ck = OPTIMS["sgd"], tmp / "sgd" / "dp2" / "checkpoints" / checkpoint.step_dir_name(3)
    four += [
        ("train", [*sgd, "train.steps=3", "parallel.dp=2", f"run_dir={tmp / 'sgd' / 'dp2'}"], None),
        (
            "train",
            [
                *sgd,
                "train.steps=6",
                f"checkpoint.resume={dp_ck}",
                f"run_dir={tmp / 'sgd' / 'dp2-pp4'}",
            ],
            None,
        ),
    ]
    # the V run's step-3 checkpoint, resumed at dp=2 x pp=2 with the V placement
    v_ck = tmp / "v" / "checkpoints" / checkpoint.step_dir_name(3)
    four.append(
        (
            "train",
            [
                *sgd,
                "train.steps=6",
                "parallel.dp=2",
                "schedule=zbv",
                f"checkpoint.resume={v_ck}",
                f"run_dir={tmp / 'v-dp2'}",
            ],
            None,
        )
    )
    # every group a rank waits on gets runtime.timeout (77 s here, unlike any default)
    four.append(("groups", ["parallel.dp=2", "runtime.timeout=77"], None))
    out = run_ranks(cases, 4, four, timeout=180)
    assert all(r[i] is None for r in out for i, c in enumerate(four) if c[0] == "train"), out

    for opt, over in OPTIMS.items():  # one device: the reference, and a resume of step 3
        single_run([*over, "train.steps=6", f"run_dir={tmp / opt / 'ref'}"])
        single_run(
            [
                *over,
                "train.steps=6",
                f"checkpoint.resume={step3(tmp, opt)}",
                f"run_dir={tmp / opt / 'one'}",
            ]
        )
    single_run(
        [*sgd, "train.steps=6", f"checkpoint.resume={dp_ck}", f"run_dir={tmp / 'sgd' / 'dp2-one'}"]
    )
    single_run([*sgd, "train.steps=6", f"checkpoint.resume={v_ck}", f"run_dir={tmp / 'v-one'}"])
    return {
        "tmp": tmp,
        "killed": str(failure.value),
        "four": {opt: [out[r][2 * i] for r in range(4)] for i, opt in enumerate(OPTIMS)},
        "timeouts": [r[-1] for r in out],
    }


@pytest.fixture(scope="session")
def one_process_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests.test_e2e.SMALL trained by one process on the full minibatch (one stage, m=1), in
    this process: the run the torchrun launches of test_e2e.py and test_dataparallel.py are
    compared with (its model.pt and metrics.jsonl), trained once per session."""
    from tests.test_e2e import SMALL

    run = tmp_path_factory.mktemp("one-process") / "run"
    over = [*SMALL, "pipeline.microbatches=1", "trace.picture=false", f"run_dir={run}"]
    train.run(load_config(over), DistEnv())
    return run


@pytest.fixture(autouse=True, scope="session")
def _profile_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    old = os.environ.get("SPLITGRAPH_CACHE")
    os.environ["SPLITGRAPH_CACHE"] = str(tmp_path_factory.mktemp("splitgraph-cache"))
    yield
    if old is None:
        os.environ.pop("SPLITGRAPH_CACHE", None)
    else:
        os.environ["SPLITGRAPH_CACHE"] = old


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture(autouse=True, scope="session")
def _results_untouched() -> Iterator[None]:
    """Nothing a test runs writes into results/ (the committed references, regenerated only by
    their documented commands): every file there is the same, by size and modification time,
    after the session; a new or changed file fails the run at teardown, naming it."""
    root = Path(__file__).resolve().parents[1] / "results"
    before = _files(root)
    yield
    after = _files(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"tests wrote into results/ (commit nothing of it): {changed[:10]}"
