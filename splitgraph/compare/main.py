"""`splitgraph-compare`: run every option under one memory cap and write the report.

    splitgraph-compare experiment=too_large
    splitgraph-compare experiment=too_large pipeline.stages=2 compare.memory_cap=64MiB data=digits
    splitgraph-compare -m experiment=too_large compare.variants=[pipeline] \
        pipeline.stages=2,4 pipeline.microbatches=2,4,8 schedule=gpipe,1f1b

A single run writes into its Hydra run dir (`results/<compare.name>/` by default). A multirun
(`-m`) makes each sweep point its own comparison in `<sweep dir>/<job>/`, each launching its own
processes (torchrun for pipelines; no Hydra launcher plugin involved), and after every point
rewrites `<sweep dir>/sweep.md` and `sweep.csv`, one table of every point's variants.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from splitgraph.compare import analysis, conclusion, report, runner, sweep, variants
from splitgraph.compare.analysis import Result
from splitgraph.compare.config import register, validate_compare
from splitgraph.config import validate
from splitgraph.errors import ConfigError, SplitgraphError
from splitgraph.units import format_bytes, parse_bytes


def compose_train(overrides: list[str]) -> DictConfig:
    """`splitgraph.train`'s config for these overrides. Inside the harness's Hydra app the
    global Hydra is already set up on the same config module, so compose uses it as is."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    from splitgraph.config import load_config

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    return load_config(overrides)


def check_variant(v: variants.Variant, base: dict[str, Any], run_dir: str) -> str | None:
    """None if the variant's training config composes and validates, else the reason."""
    from hydra.errors import HydraException

    try:
        cfg = compose_train(variants.overrides(base | v.settings | {"run_dir": run_dir}))
        validate(cfg, v.nproc)
    except (SplitgraphError, HydraException) as e:
        cause = f"\n{e.__cause__}" if e.__cause__ else ""
        return f"configuration refused before launch: {e}{cause}"
    return None


def _bar(total: int | None, desc: str, position: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        position=position,
        leave=position == 0,
        unit="step" if position else "run",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not enabled,
    )


def run_all(
    todo: list[variants.Variant],
    base: dict[str, Any],
    runs_dir: Path,
    timeout: float,
    num_train: int,
    progress: bool,
    reuse: bool = False,
) -> list[Result]:
    """Each variant in its own process, one after another; a failure stops only itself.
    `reuse`: read each variant's recorded run instead of running it (compare.report_only)."""
    out: list[Result] = []
    outer = _bar(len(todo), "compare", 0, progress)
    try:
        for v in todo:
            run_dir = runs_dir / v.name
            cmd = variants.command(v, base, str(run_dir))
            refused = check_variant(v, base, str(run_dir))
            outer.set_postfix_str(v.name)
            if reuse:
                outcome = runner.load_outcome(run_dir)
            elif refused is not None:
                outcome = runner.Outcome("failed", error=refused)
            else:
                epochs = int(v.settings["train.epochs"])
                total = epochs * (num_train // v.batch) if v.phase == "epochs" else None
                inner = _bar(total, v.name, 1, progress)

                def tick(n: int, bar: Any = inner) -> None:
                    if n > bar.n:
                        bar.update(n - bar.n)

                try:
                    outcome = runner.run(cmd, run_dir, timeout, tick)
                finally:
                    inner.close()
            outcome.command = variants.printable(cmd)
            if not reuse:
                runner.save_outcome(run_dir, outcome)
            out.append(Result(v, outcome, run_dir))
            outer.update(1)
            _say(f"{v.name}: {outcome.status}" + _short(outcome), progress)
    finally:
        outer.close()
    return out


def _short(o: runner.Outcome) -> str:
    if o.status == "oom":
        return f", needed {format_bytes(o.needed_bytes or 0)}"
    if o.status == "failed":
        return f": {(o.error or '').splitlines()[0][:200]}"
    return f" ({o.wall_s:.1f} s)"


def _from_cwd(path: Path) -> Path:
    """`path` relative to the working directory when it lies under it (Hydra hands out an
    absolute one): the variants' commands written into the report then work from any
    checkout, and name no directory of this machine."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def _say(text: str, progress: bool) -> None:
    if progress:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)


def compare(cfg: DictConfig, out_dir: Path, command: str) -> dict[str, Any]:
    """Validate, run every variant (and the wall-clock runs), analyse, write the report."""
    from splitgraph.data import load_dataset

    validate_compare(cfg)
    c = cfg.compare
    data = load_dataset(cfg)  # a bad data file stops the harness before anything runs
    num_train = data.num_train
    base = variants.base_settings(cfg, compose_train([]))
    todo = variants.build(cfg, num_train)
    runs_dir = Path(c.runs_dir) if c.runs_dir else out_dir / "runs"
    load_start = os.getloadavg()[0]

    reuse = bool(c.report_only)
    args = (base, runs_dir, float(c.timeout), num_train, bool(c.progress), reuse)
    results = run_all([v for v in todo if v.kind != "reference"], *args)
    full_ran = any(r.variant.kind == "full" and r.outcome.status == "ok" for r in results)
    # `full` within the cap is its own reference: the uncapped twin would repeat it
    results += run_all([v for v in todo if v.kind == "reference" and not full_ran], *args)
    if all(r.outcome.error and "refused before launch" in r.outcome.error for r in results):
        raise ConfigError([f"{r.variant.name}: {r.outcome.error}" for r in results])
    if c.time_budget is not None:
        timed = [
            variants.for_time_budget(r.variant, float(c.time_budget), int(c.time_budget_max_epochs))
            for r in results
            if r.variant.kind in analysis.CONTENDERS and r.outcome.status == "ok"
        ]
        results += run_all(timed, *args)

    cap = parse_bytes(c.memory_cap) if c.memory_cap is not None else None
    lr = float(cfg.optim.lr)
    rows = [analysis.row(r, num_train, cap, lr) for r in results]
    run_dirs = {r.variant.name: r.run_dir for r in results}
    target = analysis.derive(rows, run_dirs, c.target_loss)
    sentences = conclusion.conclude(rows, cap, target, int(c.k))
    meta = _meta(cfg, command, cap, target, load_start, rows, num_train)
    if reuse:  # the runs, their command and their machine notes are the recorded ones
        meta.update(_recorded_meta(out_dir / "results.json"))
    path = report.write(out_dir, rows, meta, sentences)
    _say(f"report: {path}", bool(c.progress))
    return {"meta": meta, "rows": rows, "conclusion": sentences, "report": path}


def _recorded_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())["meta"]
    except (OSError, ValueError, KeyError):
        return {}
    keep = {k: meta[k] for k in ("command", "machine", "noise", "overrides") if k in meta}
    note = " (Report rebuilt from these runs with compare.report_only=true.)"
    if "noise" in keep and note not in keep["noise"]:
        keep["noise"] += note
    return keep


def _meta(
    cfg: DictConfig,
    command: str,
    cap: int | None,
    target: float | None,
    load_start: float,
    rows: list[dict[str, Any]],
    num_train: int,
) -> dict[str, Any]:
    c = cfg.compare
    o = cfg.optim
    name = _text(o.name)
    optim = f"{name} lr={o.lr}" + (f" momentum={o.momentum}" if name == "sgd" else "")
    dims = [cfg.model.in_features, *cfg.model.hidden, cfg.model.out_features]
    load_end = os.getloadavg()[0]
    return {
        "name": str(c.name),
        "command": command,
        "cap_bytes": cap,
        "target_loss": target,
        "target_source": "compare.target_loss"
        if c.target_loss is not None
        else "the highest final held-out loss among the variants that fit, so every one reaches it",
        "epochs": int(c.epochs),
        "time_budget": c.time_budget,
        "batch": int(cfg.train.batch_size),
        "k": int(c.k),
        "model": f"MLP {'-'.join(map(str, dims))} ({_text(cfg.model.activation)}, "
        f"bias={cfg.model.bias})",
        "data": f"{_text(cfg.data.name)} ({num_train} training samples, "
        f"{cfg.data.test_fraction:g} held out)",
        "optim": optim,
        "dtype": _text(cfg.runtime.dtype),
        "machine": _machine(),
        "noise": (
            f"Load average {load_start:.2f} when the harness started and {load_end:.2f} when "
            f"it finished, on {os.cpu_count()} cores (the 1-minute average counts the "
            "harness's own training processes; well above the core count, other jobs shared "
            "them). Times are noisy: one launch's median step varies by 10-50% between "
            "launches on these machines even when idle; memory figures are exact and do not "
            "vary."
        ),
        "notes": conclusion.notes(int(c.k), rows),
        "overrides": _task_overrides(),
    }


def _text(v: Any) -> str:
    """An enum's value, anything else as text."""
    return str(getattr(v, "value", v))


def _machine() -> str:
    from splitgraph.bench.launch import machine

    return f"{machine()}, OMP_NUM_THREADS=1 per process"


def _task_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


# -- entry point -----------------------------------------------------------------------------


def main() -> None:
    """Console script `splitgraph-compare` and `python -m splitgraph.compare`."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    register()
    # SIGTERM unwinds like Ctrl-C, so the running variant's process group is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    @hydra.main(version_base="1.3", config_path="pkg://splitgraph.conf", config_name="compare")
    def _main(cfg: DictConfig) -> None:
        hc = HydraConfig.get()
        out_dir = _from_cwd(Path(hc.runtime.output_dir))
        command = shlex.join(["splitgraph-compare", *hc.overrides.task])
        try:
            compare(cfg, out_dir, command)
        except SplitgraphError as e:
            print(f"splitgraph-compare: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        if hc.mode == RunMode.MULTIRUN:
            table = sweep.collect(Path(hc.sweep.dir))
            print(f"sweep table: {table}", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    _main()
    print(f"splitgraph-compare: done in {time.monotonic() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
