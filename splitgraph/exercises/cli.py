"""`splitgraph-exercise N [options] [overrides...]`: the chapter's exercise N, answered.

Overrides are Hydra overrides, composed exactly as for training (`model.hidden=[32]`,
`model.activation=tanh`, `optim=adam`, ...); exercise 2 starts from `model.bias=true`;
exercise 5's go to the comparison harness (`compare.epochs=2`, ...). Options:

    --nproc P      exercise 3: pipeline stages (one rank each), default 2
    --repeats R    exercise 4: timed repeats (median), default 20
    --size S       exercise 5: small (default, a minute or two) or tiny (seconds)
    --out DIR      exercise 5: where its two comparisons go, default outputs/exercise5
    --json FILE    also write the result as JSON

Exit status 0, or 2 with the reason for bad input (a config error, an unknown exercise).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from splitgraph.errors import SplitgraphError

TITLES = {
    1: "the gradient of a scalar function of an n x m matrix",
    2: "add a bias: forward and backward",
    3: "memory of training versus prediction",
    4: "second derivatives: Hessian-vector products",
    5: "too large for one device: split the graph or shrink the minibatch?",
}

EPILOG = """\
exercises:
  1  the gradient of a scalar function of an n x m matrix has the matrix's shape
  2  add a bias: forward and backward by hand, checked against autograd (no decay on b)
  3  memory of training versus prediction, predicted and measured, per stage and schedule
  4  second derivatives: Hessian-vector products by double backward, checked and timed
  5  the graph too large for one device, in both regimes (activations / parameter state):
     small versions of experiment=too_large and experiment=too_large_weights run now,
     the committed results/too_large*/report.md named as the full-size evidence

useful overrides (composed as for training; exercise 5's go to splitgraph-compare):
  model.hidden=[32]  model.activation=tanh  model.bias=true  optim=adam
  train.batch_size=64  runtime.dtype=float64  compare.epochs=2 (exercise 5)

examples:
  splitgraph-exercise 1
  splitgraph-exercise 3 --nproc 2 schedule=gpipe
  splitgraph-exercise 4 model.activation=tanh --repeats 5
  splitgraph-exercise 5                 # both regimes, live: a minute or two on 2 cores
  splitgraph-exercise 5 --size tiny     # seconds: only the variants that decide each regime
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="splitgraph-exercise",
        description="Answer one of the chapter's exercises by running splitgraph.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("exercise", type=int, choices=sorted(TITLES), help="exercise number (1-5)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.hidden=[32]")
    p.add_argument("--nproc", type=int, default=2, help="exercise 3: stages/ranks (default 2)")
    p.add_argument("--repeats", type=int, default=20, help="exercise 4: timed repeats (default 20)")
    p.add_argument(
        "--size",
        choices=("small", "tiny"),
        default="small",
        help="exercise 5: small (default, a minute or two) or tiny (seconds)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/exercise5"),
        help="exercise 5: where its two comparisons go (default outputs/exercise5)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    return p


def answer(
    exercise: int,
    overrides: list[str],
    nproc: int = 2,
    repeats: int = 20,
    size: str = "small",
    out: Path = Path("outputs/exercise5"),
) -> Any:
    """Run exercise 1-5; returns its result object (with `to_dict`)."""
    from splitgraph.config import load_config, validate

    if exercise == 1:
        from splitgraph.exercises import shapes

        cfg = load_config(overrides)
        validate(cfg, 1)
        return shapes.run(cfg)
    if exercise == 2:
        from splitgraph.exercises import bias

        cfg = load_config(["model.bias=true", *overrides])
        validate(cfg, 1)
        return bias.run(cfg)
    if exercise == 3:
        from splitgraph.exercises import memory

        if nproc < 1:
            raise ValueError(f"--nproc {nproc}: need at least one rank")
        return memory.run(overrides, nproc, predict_saved=memory.predict_saved)
    if exercise == 4:
        from splitgraph.exercises import hessian

        cfg = load_config(overrides)
        validate(cfg, 1)
        return hessian.run(cfg, repeats=repeats)
    if exercise == 5:
        from splitgraph.exercises import too_large

        return too_large.run(overrides, size=size, out=out)
    raise ValueError(f"exercise {exercise} has no runner here")


def _render(exercise: int, result: Any) -> str:
    from splitgraph.exercises import bias, hessian, memory, shapes, too_large

    renderers = {
        1: shapes.render,
        2: bias.render,
        3: memory.render,
        4: hessian.render,
        5: too_large.render,
    }
    return renderers[exercise](result)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    from hydra.errors import HydraException

    print(f"Exercise {args.exercise}: {TITLES[args.exercise]}\n", flush=True)
    try:
        result = answer(
            args.exercise, list(args.overrides), args.nproc, args.repeats, args.size, args.out
        )
    except (SplitgraphError, HydraException, ValueError) as e:
        cause = f"\n  ({e.__cause__})" if e.__cause__ else ""
        print(f"splitgraph-exercise: {e}{cause}", file=sys.stderr)
        return 2
    print(_render(args.exercise, result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
