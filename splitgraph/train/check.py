"""`splitgraph-check`'s checks of a launch, on a composed config: the command (train/cli.py)
composes it from its arguments, the fork launcher (train/fork.py) checks the one it composed
for its run, so both refuse with the same messages and exit codes."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from splitgraph.errors import SplitgraphError


def check_launch(cfg: DictConfig, nproc: int, per_node: int) -> int:
    """Check `cfg` for a launch of `nproc` ranks, `per_node` of them on this machine.

    Completes the data shape from a data file that leaves it null, runs `validate` for N
    ranks, builds the plan and the schedule (which validates it), prices every rank's memory
    and the data against the cap and this machine (reliability/preflight.py), reads the data
    file and checks every value, and prints what it found. 0 if the launch would start, 2
    with the reasons (on stderr) if not, 3 if it cannot fit in memory.
    """
    from hydra.errors import HydraException

    from splitgraph.config import Workload, validate
    from splitgraph.data import load_dataset, microbatch_sizes
    from splitgraph.errors import OutOfMemory
    from splitgraph.partition import make_plan
    from splitgraph.reliability import preflight
    from splitgraph.runtime.engine import schedule_for_run
    from splitgraph.runtime.mesh import layout_of

    try:
        work = Workload.of(cfg)  # what the planner, pre-flight and the engine read
        found = preflight.resolve_data(cfg.data, work, nproc, range(per_node))
        validate(cfg, nproc)
        layout = layout_of(cfg.pipeline, cfg.parallel, nproc)
        plan = make_plan(work, layout.pp)
        rows = cfg.train.batch_size // layout.dp
        sizes = microbatch_sizes(rows, cfg.pipeline.microbatches)
        sched, plan = schedule_for_run(work, layout.pp, plan)  # auto: from the costs
        try:
            devices = preflight.node_devices(cfg.runtime, per_node)
        except RuntimeError as e:  # no CUDA for runtime.device=cuda, too few GPUs
            raise SplitgraphError(str(e)) from None
        checked = preflight.check_launch(
            cfg.data, work, layout, plan, range(per_node), devices, schedule=sched
        )
        dataset = load_dataset(cfg.data, work)  # every value, as the ranks will read it
    except OutOfMemory as e:
        print(f"splitgraph-check: {e}", file=sys.stderr)
        return 3
    except (SplitgraphError, HydraException) as e:
        return refuse(e)
    if found:
        print(found)
    print(dataset.describe())
    print(plan.table(sizes[0]))
    if layout.dp > 1:
        print(layout.describe() + f"\n  each replica runs {rows} rows of every minibatch")
    print("\n".join(checked.lines()))
    print(f"schedule {sched.name}: {len(sizes)} microbatches {sizes}, valid")
    return 0


def refuse(e: BaseException) -> int:
    """A config the launch cannot run: splitgraph-check's line (with its cause), exit 2."""
    cause = f"\n  ({e.__cause__})" if e.__cause__ else ""
    print(f"splitgraph-check: {e}{cause}", file=sys.stderr)
    return 2
