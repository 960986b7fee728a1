"""Every command in the README and docs/ runs as written, or says why the suite does not run it.

Each line of a ```bash block (continuations joined, comments dropped) is one command, and each
is handled by the first rule that matches its start:

    run        cheap, run in this process as the console script would run it (exit 0), in a
               scratch directory so nothing lands in the checkout
    checked    a launch (torchrun, launch/*.sh, python -m splitgraph.train): the overrides and
               the rank count it would start go through splitgraph-check, which composes the
               config, validates it for those ranks, builds the plan and the schedule and
               prices the memory; the launch itself is the end-to-end tests' business
    composed   splitgraph-compare: its config composes and validates (minutes of training
               otherwise; tests/test_compare.py runs experiment=tiny end to end)
    exempt     not run here, with the reason

A command no rule covers fails the test, so a new one in the docs is either run or excused.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def _commands() -> list[tuple[str, str]]:
    """(page, command) for every command line of every ```bash block."""
    out = []
    for page in PAGES:
        for block in BLOCK.findall(page.read_text()):
            text = re.sub(r"\\\n\s*", " ", block)  # join continuations
            for line in text.splitlines():
                cmd = re.split(r"\s+#", " " + line, maxsplit=1)[0].strip()
                if cmd and not cmd.startswith("#"):
                    out.append((str(page.relative_to(ROOT)), cmd))
    return out


COMMANDS = _commands()

#: command prefix -> why the suite does not run it
EXEMPT: dict[str, str] = {
    "make demo": "the Quickstart; tests/test_readme.py checks the target, tests/test_e2e.py "
    "runs the same launch",
    "make test": "the Quickstart; CI runs it (.ci/run)",
    "splitgraph-train --help": "tests/test_help.py runs every console script's --help",
    "python -m splitgraph.train --cfg job": "Hydra's own flag; tests/test_help.py runs the entry",
    "splitgraph-exercise": "tests/test_exercises.py runs exercises 1-5 (5 live) and compares "
    "their committed outputs",
    "splitgraph-schedule schedule=zb1 pipeline.stages=2 pipeline.microbatches=4 --from-run": (
        "needs a finished run (`make demo` makes outputs/demo); tests/test_trace.py covers "
        "--from-run"
    ),
    "splitgraph-compare -m": "a Hydra multirun sweep; tests/test_compare.py runs a small sweep",
    "sbatch": "needs SLURM and GPUs",
    "launch/gpu_wheels.sh": "downloads wheels (the GPU machines have no index); docs/gpus.md",
    "launch/bench_peer.sh": "a benchmark of minutes; tests/test_peer.py runs one step each",
}


def _check(argv: list[str]) -> None:
    from splitgraph.train.cli import check_main

    assert check_main(argv) == 0, f"splitgraph-check {' '.join(argv)} refused the launch"


def _launch(tokens: list[str]) -> None:
    """torchrun ... -m splitgraph.train OVERRIDES: check it for the ranks it would start."""
    nproc, nnodes = 1, 1
    if tokens[0] == "torchrun":
        i = 1
        while tokens[i] != "-m":
            if tokens[i] == "--nproc-per-node":
                nproc = int(tokens[i + 1])
            if tokens[i] == "--nnodes":
                nnodes = int(tokens[i + 1])
            i += 1
        assert tokens[i + 1] == "splitgraph.train", tokens
        overrides = [t for t in tokens[i + 2 :] if not t.startswith("--")]
    else:  # python -m splitgraph.train
        assert tokens[1:3] == ["-m", "splitgraph.train"], tokens
        overrides = tokens[3:]
    _check(["--nproc", str(nproc * nnodes), "--nproc-per-node", str(nproc), *overrides])


def _splitgraph_train(tokens: list[str]) -> None:
    """splitgraph-train --nproc N OVERRIDES: the launch it checks before forking."""
    _check(tokens[1:])


def _train_sh(tokens: list[str]) -> None:
    _check(["--nproc", tokens[1], *tokens[2:]])


def _train2d_sh(tokens: list[str]) -> None:
    dp, pp = int(tokens[1]), int(tokens[2])
    _check(["--nproc", str(dp * pp), f"parallel.dp={dp}", f"pipeline.stages={pp}", *tokens[3:]])


def _multinode_sh(tokens: list[str]) -> None:
    nnodes, nproc = int(tokens[1]), int(tokens[2])
    _check(["--nproc", str(nnodes * nproc), "--nproc-per-node", str(nproc), *tokens[5:]])


def _splitgraph_check(tokens: list[str]) -> None:
    _check(tokens[1:])


def _splitgraph_schedule(tokens: list[str]) -> None:
    from splitgraph.schedule.cli import main

    assert main(tokens[1:]) == 0


def _splitgraph_plan(tokens: list[str]) -> None:
    from splitgraph.planner.cli import main

    assert main(tokens[1:]) == 0


def _splitgraph_compare(tokens: list[str]) -> None:
    from splitgraph.compare.config import load, validate_compare

    overrides = [t for t in tokens[1:] if "=" in t]  # --out DIR is the harness's own flag
    validate_compare(load(overrides))


#: command start -> (kind, handler)
RULES: list[tuple[str, str, Callable[[list[str]], None]]] = [
    ("torchrun ", "checked", _launch),
    ("python -m splitgraph.train", "checked", _launch),
    ("splitgraph-train --nproc ", "checked", _splitgraph_train),
    ("launch/train.sh ", "checked", _train_sh),
    ("launch/train2d.sh ", "checked", _train2d_sh),
    ("launch/multinode.sh ", "checked", _multinode_sh),
    ("splitgraph-check ", "run", _splitgraph_check),
    ("splitgraph-schedule ", "run", _splitgraph_schedule),
    ("splitgraph-plan ", "run", _splitgraph_plan),
    ("splitgraph-compare ", "composed", _splitgraph_compare),
]


def _rule(cmd: str) -> tuple[str, Callable[[list[str]], None] | None, str]:
    for prefix, why in EXEMPT.items():
        if cmd.startswith(prefix):
            return "exempt", None, why
    for prefix, kind, handler in RULES:
        if cmd.startswith(prefix):
            return kind, handler, ""
    return "uncovered", None, ""


def test_every_command_is_run_checked_or_exempt_with_a_reason() -> None:
    assert len(COMMANDS) > 30, "the parser lost the docs' commands"
    uncovered = [f"{page}: {cmd}" for page, cmd in COMMANDS if _rule(cmd)[0] == "uncovered"]
    assert not uncovered, "commands in the docs that no rule runs or excuses:\n" + "\n".join(
        uncovered
    )
    used = {prefix for prefix in EXEMPT if any(cmd.startswith(prefix) for _, cmd in COMMANDS)}
    assert used == set(EXEMPT), f"exemptions no command needs any more: {set(EXEMPT) - used}"


RUNNABLE = [(page, cmd) for page, cmd in COMMANDS if _rule(cmd)[1] is not None]


#: commands that ran as written: one quoted on several pages runs once (the planner's search
#: is seconds)
_PASSED: set[str] = set()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("page", "cmd"), RUNNABLE, ids=[f"{p}:{c[:60]}" for p, c in RUNNABLE])
def test_the_command_runs_as_written(
    page: str, cmd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if cmd in _PASSED:  # the same command on another page: the same run, in the same way
        return
    monkeypatch.chdir(tmp_path)  # pictures and plan.json land here, not in the checkout
    monkeypatch.delenv("SPLITGRAPH_RUN_DIR", raising=False)
    _, handler, _ = _rule(cmd)
    assert handler is not None
    handler(shlex.split(cmd))
    _PASSED.add(cmd)
