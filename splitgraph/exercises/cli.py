"""`splitgraph-exercise N [options] [overrides...]`: the chapter's exercise N, answered.

Overrides are Hydra overrides, composed exactly as for training (`model.hidden=[32]`,
`model.activation=tanh`, `optim=adam`, ...); exercise 2 starts from `model.bias=true`. Options:

    --nproc P      exercise 3: pipeline stages (one rank each), default 2
    --repeats R    exercise 4: timed repeats (median), default 20
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
    5: "the comparison harness",
}

#: Exercise 5 is answered by the comparison harness; its committed report lives here
#: (found from the checkout, whatever the working directory).
COMPARE_COMMAND = "splitgraph-compare experiment=too_large"
COMPARE_REPORT = Path("results/too_large/report.md")
_ROOT = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="splitgraph-exercise",
        description="Answer one of the chapter's exercises by running splitgraph.",
    )
    p.add_argument("exercise", type=int, choices=sorted(TITLES), help="exercise number")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.hidden=[32]")
    p.add_argument("--nproc", type=int, default=2, help="exercise 3: stages/ranks")
    p.add_argument("--repeats", type=int, default=20, help="exercise 4: timed repeats")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    return p


def answer(exercise: int, overrides: list[str], nproc: int = 2, repeats: int = 20) -> Any:
    """Run exercise 1-4; returns its result object (with `to_dict`)."""
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
    raise ValueError(f"exercise {exercise} has no runner here")


def _render(exercise: int, result: Any) -> str:
    from splitgraph.exercises import bias, hessian, memory, shapes

    renderers = {1: shapes.render, 2: bias.render, 3: memory.render, 4: hessian.render}
    return renderers[exercise](result)


def exercise5_text(root: Path = _ROOT) -> str:
    """The command, the committed report's setup lines and its conclusion (not all 200 lines)."""
    lines = [
        "Exercise 5 is answered by the comparison harness, which trains the same model every way",
        "there is (full minibatch, smaller minibatch, accumulation, recomputation, pipelines)",
        "under one per-device memory cap:",
        f"    {COMPARE_COMMAND}",
        f"Its committed report: {COMPARE_REPORT}",
    ]
    report = root / COMPARE_REPORT
    if not report.exists():
        lines.append(f"({COMPARE_REPORT} is not in this checkout; run the command above.)")
        return "\n".join(lines)
    sections = _sections(report.read_text())
    setup = [x for x in sections.get("", []) if x.startswith("- ")]
    lines += ["", *setup, "", "Conclusion (measured):", *sections.get("Conclusion", [])]
    return "\n".join(lines).rstrip() + "\n"


def _sections(markdown: str) -> dict[str, list[str]]:
    """The report's `## ` sections by title ("" for the part before the first one)."""
    out: dict[str, list[str]] = {"": []}
    title = ""
    for line in markdown.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            out[title] = []
        elif line.strip():
            out[title].append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    from hydra.errors import HydraException

    print(f"Exercise {args.exercise}: {TITLES[args.exercise]}\n")
    if args.exercise == 5:
        print(exercise5_text())
        return 0
    try:
        result = answer(args.exercise, list(args.overrides), args.nproc, args.repeats)
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
