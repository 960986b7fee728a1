"""`splitgraph-plan`: predict a plan's time and memory, draw its graph, search alternatives.

    splitgraph-plan --nproc 3 model.hidden=[4096,256,256,256,2048] partition=optimal \
        pipeline.memory_cap=64MiB
    splitgraph-plan --nproc 4 search=true pipeline.memory_cap=2GiB --out outputs/plan

Takes the same Hydra overrides as training and needs no process group. Prints the table per
stage and the predicted step, writes `plan.json` and `plan.png` (the partitioned graph) to
`--out` (default outputs/plan). `search=true` also ranks schedule x microbatches x
recomputation x strategy under the memory cap and prints the best `--top` (default 5).

Layer times are measured here (cached; see splitgraph/cost/profiler.py) with the thread count
training uses: runtime.threads, else OMP_NUM_THREADS, else 1 (as launch/train.sh).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from splitgraph.errors import SplitgraphError


def _calibrated(work: Any, nproc: int, prediction: Any, result: dict[str, Any]) -> Any:
    """The step in the run's conditions when this machine has a calibration (docs/prediction.md):
    printed and put in `result`; returns the pricer for the search (None: none cached)."""
    from splitgraph.cost.calibrate import has_calibration, pricer

    if not has_calibration(work.costs, nproc):
        return None
    price = pricer(work, nproc)
    result["calibrated_step_s"] = price(prediction)
    print(
        "in the run's conditions (this machine's calibration, docs/prediction.md): "
        f"step {result['calibrated_step_s'] * 1e3:.3f} ms"
    )
    return price


def main(argv: list[str] | None = None) -> int:
    from splitgraph.train.usage import parser

    p = parser(
        "splitgraph-plan",
        "Predict a plan's step time and memory per stage before running it (no process group),\n"
        "draw its partitioned graph, and optionally rank the alternatives under the memory cap.\n"
        "Writes plan.json and plan.png to --out. Layer times are measured here and cached.",
        "splitgraph-plan --nproc 3 model.hidden=[4096,256,256,256,2048] partition=optimal "
        "pipeline.memory_cap=64MiB",
    )
    p.add_argument("--nproc", type=int, metavar="N", help="stages (default: pipeline.stages)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/plan"),
        help="where plan.json and plan.png go (outputs/plan)",
    )
    p.add_argument(
        "--search",
        action="store_true",
        help="rank schedule x microbatches x recomputation x strategy (also: search=true)",
    )
    p.add_argument("--top", type=int, default=5, help="candidates --search prints (5)")
    ns = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    out, top = ns.out, ns.top
    nproc_text = None if ns.nproc is None else str(ns.nproc)
    do_search = ns.search or "search=true" in ns.overrides
    args = [a for a in ns.overrides if a not in ("search=true", "search=false")]

    import torch
    from hydra.errors import HydraException

    from splitgraph.config import Workload, load_config, validate
    from splitgraph.cost.costs import link_from_config, model_costs
    from splitgraph.observe.draw import draw_graph
    from splitgraph.partition import make_plan
    from splitgraph.planner.predict import predict

    try:
        cfg = load_config(args)
        if nproc_text is None and cfg.pipeline.stages is None:
            raise SplitgraphError(
                "say how many stages to plan for: --nproc N (or pipeline.stages=N)"
            )
        nproc = int(nproc_text) if nproc_text is not None else cfg.pipeline.stages
        validate(cfg, nproc)
        threads = cfg.runtime.threads or int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
        torch.set_num_threads(int(threads))
        work = Workload.of(cfg)
        link = link_from_config(work.pipeline, work.costs)
        # one cost-model stage per pipeline stage: nproc x schedule.virtual_stages (the
        # interleaved and V schedules hold several stages per rank)
        stages = nproc * int(work.schedule.virtual_stages)
        costs = model_costs(work, stages, link=link)
        plan = make_plan(work, nproc, costs)
        prediction = predict(plan, costs)
        result = prediction.to_dict()
        print(prediction.table())
        price = _calibrated(work, nproc, prediction, result)
        if do_search:
            from splitgraph.planner import search

            ranked = search.search(work, nproc, link, price=price)
            print(f"\nsearch: {len(ranked)} candidates, best first")
            print(search.table(ranked, top))
            result["search"] = [c.to_dict() for c in ranked]
    except (SplitgraphError, HydraException) as e:
        cause = f"\n  ({e.__cause__})" if e.__cause__ else ""
        print(f"splitgraph-plan: {e}{cause}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    result["threads"] = int(threads)
    (out / "plan.json").write_text(json.dumps(result, indent=2) + "\n")
    m = cfg.model
    draw_graph(plan, out / "plan.png", m.activation.value, m.task.value, bool(m.bias))
    print(f"wrote {out / 'plan.json'} and {out / 'plan.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
