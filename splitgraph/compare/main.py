"""`splitgraph-compare`: run every option under one memory cap and write the report.

    splitgraph-compare experiment=too_large
    splitgraph-compare experiment=too_large --out results/too_large     # the committed reference
    splitgraph-compare experiment=too_large pipeline.stages=2 compare.memory_cap=64MiB data=digits
    splitgraph-compare -m experiment=too_large compare.variants=[pipeline] \
        pipeline.stages=2,4 pipeline.microbatches=2,4,8 schedule=gpipe,1f1b

A single run writes into its Hydra run dir: `--out DIR` (compare.out) if given, else
`outputs/compare/<compare.name>/` (with overrides, `.../<overrides>/`), so nothing but an
explicit `--out results/...` writes into results/. A multirun (`-m`) makes each sweep point its
own comparison in `<sweep dir>/<job>/` (`--out` names the sweep dir), each launching its own
processes (torchrun for pipelines; no Hydra launcher plugin involved), and after every point
rewrites `<sweep dir>/sweep.md` and `sweep.csv`, one table of every point's variants.
`--help` prints the usage; `--hydra-help` Hydra's own page.
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

from splitgraph.compare import analysis, conclusion, predict, report, runner, sweep, variants
from splitgraph.compare.analysis import Result
from splitgraph.compare.config import register, validate_compare
from splitgraph.config import Workload, validate
from splitgraph.errors import ConfigError, OutOfMemory, SplitgraphError
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


def check_variant(
    v: variants.Variant, base: dict[str, Any], run_dir: str
) -> tuple[DictConfig | None, str | None]:
    """The variant's training config if it composes and validates (else None), and the reason
    it was refused (else None)."""
    from hydra.errors import HydraException

    try:
        cfg = compose_train(variants.overrides(base | v.settings | {"run_dir": run_dir}))
        validate(cfg, v.nproc)
    except (SplitgraphError, HydraException) as e:
        cause = f"\n{e.__cause__}" if e.__cause__ else ""
        return None, f"configuration refused before launch: {e}{cause}"
    return cfg, None


def predict_variant(work: Workload, nproc: int) -> list[dict[str, Any]] | None:
    """The memory model's accounting per global rank (None if the plan cannot be made: the
    variant's own launch then says why)."""
    try:
        return predict.per_rank(work, nproc)
    except SplitgraphError:
        return None


def refusal(predicted: list[dict[str, Any]] | None, cap: int | None) -> OutOfMemory | None:
    """The runtime's own verdict on the predicted figures (memcap.check): the error it would
    raise before the first step, or None if the variant fits."""
    from splitgraph.reliability import memcap

    if predicted is None or cap is None:
        return None
    records = [r | {"saved_peak_source": "predicted"} for r in predicted]
    try:
        memcap.check(records, cap, "before launch (predicted by the harness)")
    except OutOfMemory as e:
        return e
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
    cap: int | None = None,
    confirm_refusals: bool = True,
) -> list[Result]:
    """Each variant in its own process, one after another; a failure stops only itself.
    `reuse`: read each variant's recorded run instead of running it (compare.report_only).
    A variant predicted over `cap` is launched anyway if `confirm_refusals` (the runtime then
    refuses it itself), else refused here."""
    out: list[Result] = []
    outer = _bar(len(todo), "compare", 0, progress)
    try:
        for v in todo:
            run_dir = runs_dir / v.name
            cmd = variants.command(v, base, str(run_dir))
            cfg, refused = check_variant(v, base, str(run_dir))
            predicted = predict_variant(Workload.of(cfg), v.nproc) if cfg is not None else None
            over = refusal(predicted, cap if v.capped else None)
            outer.set_postfix_str(v.name)
            if reuse:
                outcome = runner.load_outcome(run_dir)
            elif refused is not None:
                outcome = runner.Outcome("failed", error=refused)
            elif over is not None and not confirm_refusals and _on_cpu(cfg.runtime):
                runner.clear(run_dir)
                outcome = runner.Outcome(
                    "oom", error=str(over), needed_bytes=over.needed, launched=False
                )
                outcome.summary = {"status": "oom", "accounted_per_rank": predicted or []}
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
                outcome.predicted = predicted
                runner.save_outcome(run_dir, outcome)
            out.append(Result(v, outcome, run_dir))
            outer.update(1)
            _say(f"{v.name}: {outcome.status}" + _short(outcome), progress)
    finally:
        outer.close()
    return out


def _on_cpu(runtime: Any) -> bool:
    """Whether the variant runs on the CPU, where the cap is the accounting the prediction
    reproduces (on a GPU the allocator decides, with its own rounding)."""
    from splitgraph.config import Device

    device = Device(runtime.device)
    if device == Device.auto:
        import torch

        return not torch.cuda.is_available()
    return device == Device.cpu


def _short(o: runner.Outcome) -> str:
    if o.status == "oom":
        how = "" if o.launched else " (predicted; not launched)"
        return f", needed {format_bytes(o.needed_bytes or 0)}{how}"
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
    # a bad data file stops the harness before anything runs
    data = load_dataset(cfg.data, Workload.of(cfg))
    num_train = data.num_train
    base = variants.base_settings(cfg, compose_train([]))
    todo = variants.build(cfg, num_train)
    runs_dir = Path(c.runs_dir) if c.runs_dir else out_dir / "runs"
    load_start = os.getloadavg()[0]

    reuse = bool(c.report_only)
    cap = parse_bytes(c.memory_cap) if c.memory_cap is not None else None
    args = (base, runs_dir, float(c.timeout), num_train, bool(c.progress), reuse, cap)
    args += (bool(c.confirm_refusals),)
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

    lr = cfg.optim.lr
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
        "batch": cfg.train.batch_size,
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

HELP = """\
usage: splitgraph-compare [-h] [--out DIR] [-m] [--hydra-help] [key=value ...]

Trains the same model on the same data every way there is under one per-device memory cap
(full minibatch, smaller minibatch, accumulation, recomputation, data parallelism, pipelines),
each as a real process (torchrun for several ranks), and writes report.md, summary.csv,
results.json and figures with a conclusion computed from the measurements.

options:
  -h, --help         show this help and exit
  --out DIR          where the report and the runs go (compare.out); default
                     outputs/compare/<experiment>/ (with overrides: .../<overrides>/);
                     regenerate a committed reference with --out results/<experiment>
  -m, --multirun     a sweep: each combination of comma-separated values is a comparison of
                     its own; one table of all of them in <sweep dir>/sweep.md
  --hydra-help       Hydra's own help (config groups; --cfg job prints the whole config)

experiments (experiment=NAME): {experiments}

useful overrides (plus every training key: model.hidden=[...], data=digits, optim=adam, ...):
  compare.variants=[full,small,accumulate,recompute,data,pipeline]   which options to run
  compare.memory_cap=4.5MiB            the per-device cap (null: none)
  compare.stages=[2,4] compare.schedules=[gpipe,1f1b] compare.microbatches=[4,8]
  compare.pipeline_recompute=[false,true] compare.dp=[1,2]          the pipeline grid
  compare.epochs=6 compare.target_loss=0.8 compare.time_budget=5    the budgets and the target
  compare.confirm_refusals=false       refuse what the memory model puts over the cap
                                       without launching it (default: launch it, so the
                                       runtime refuses it itself)
  compare.report_only=true             rebuild the report from the recorded runs

examples:
  splitgraph-compare experiment=tiny                          # every variant, under a minute
  splitgraph-compare experiment=too_large_weights             # the model itself is too large
  splitgraph-compare experiment=too_large --out results/too_large   # regenerate a reference
  splitgraph-compare experiment=too_large data=digits compare.memory_cap=64MiB
"""


def _experiments() -> str:
    """The experiment files Hydra can compose (conf/experiment/, installed as splitgraph.conf)."""
    from importlib import resources

    folder = resources.files("splitgraph.conf").joinpath("experiment")
    return ", ".join(sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml")))


def parse_args(argv: list[str]) -> list[str] | None:
    """The harness's own flags out of `argv`, the rest left for Hydra: None for --help (printed
    here), else the arguments Hydra gets (`--out DIR` becomes compare.out=DIR, and the sweep
    dir with -m). A flag without its value exits 2."""
    if any(a in ("-h", "--help") for a in argv):
        print(HELP.format(experiments=_experiments()), end="")
        return None
    rest, out = [], None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--out" or a.startswith("--out="):
            if a == "--out":
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    print("splitgraph-compare: --out needs a directory", file=sys.stderr)
                    sys.exit(2)
                out, i = argv[i + 1], i + 2
            else:
                out, i = a.split("=", 1)[1], i + 1
            continue
        rest.append(a)
        i += 1
    if out is not None:
        rest.append(f"compare.out={variants.hydra_value(out)}")
        if any(a in ("-m", "--multirun") for a in rest):
            rest.append(f"hydra.sweep.dir={variants.hydra_value(out)}")
    return rest


def command_line(task_overrides: list[str]) -> str:
    """The command that regenerates this report, `--out` written as the flag it was given as."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = [o for o in task_overrides if o.startswith("compare.out=")]
    rest = [o for o in task_overrides if not o.startswith("compare.out=")]
    value = OverridesParser.create().parse_override(out[-1]).value() if out else None
    flags = ["--out", str(value)] if value is not None else []
    return shlex.join(["splitgraph-compare", *rest, *flags])


def main() -> None:
    """Console script `splitgraph-compare` and `python -m splitgraph.compare`."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    args = parse_args(sys.argv[1:])
    if args is None:
        return
    sys.argv = [sys.argv[0], *args]
    register()
    # SIGTERM unwinds like Ctrl-C, so the running variant's process group is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    @hydra.main(version_base="1.3", config_path="pkg://splitgraph.conf", config_name="compare")
    def _main(cfg: DictConfig) -> None:
        hc = HydraConfig.get()
        out_dir = _from_cwd(Path(hc.runtime.output_dir))
        command = command_line(list(hc.overrides.task))
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
