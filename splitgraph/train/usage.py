"""What the console commands print for `--help`: one place for the usage lines, the overrides
people reach for first and an example each, so the commands tell the same story.

`splitgraph-train` is a Hydra app: its page is Hydra's app help with our template (conf/config.yaml
reads it through the `splitgraph_help` resolver). The other commands parse their own flags with
argparse (`parser`) and hand the remaining `key=value` words to Hydra's compose.
"""

from __future__ import annotations

import argparse

from splitgraph.partition import STRATEGIES  # imports no torch: --help stays quick
from splitgraph.schedule import SCHEDULES  # nor does this

_PARTITIONS = "|".join(STRATEGIES)
_SCHEDULES = "|".join(SCHEDULES)

#: The overrides a newcomer needs first; every key of the config is listed by `--cfg job`.
OVERRIDES = f"""\
common overrides (key=value, Hydra syntax; every key: python -m splitgraph.train --cfg job):
  model.hidden=[512,512,256]     hidden widths: len(hidden)+1 layers
  data=synthetic|digits|file     data.path=X.npz (or .pt) with data=file
  partition={_PARTITIONS}
                                 how layers are cut into stages (partition.boundaries=[2,5])
  schedule={_SCHEDULES}
                                 the order of forwards and backwards (splitgraph-schedule NAME)
  pipeline.microbatches=8        microbatches per minibatch
  pipeline.memory_cap=64MiB      per-device cap: over it the run stops out of memory
  parallel.dp=2                  data-parallel replicas (world size = stages x dp)
  train.steps=200  train.batch_size=256  optim=sgd|adam  optim.lr=0.05
  runtime.dtype=float32|float64|bfloat16"""

TRAIN_USAGE = """\
usage: splitgraph-train --nproc N [key=value ...]   (N ranks on this machine, forked)
       splitgraph-train [key=value ...]      (one process: plain single-device training)
       launch/train.sh N [key=value ...]     (--nproc N, and pins the run dir)
       torchrun --standalone --nproc-per-node N -m splitgraph.train [key=value ...]"""

TRAIN_ABOUT = """\
Trains the MLP split by layer into pipeline stages, one stage per rank (CPU: gloo, GPU: NCCL).
With --nproc N it checks the launch, then forks N ranks from its own process (torch imported
and the config composed once: about half torchrun's start-up); torchrun (several nodes) starts
N copies of this command and gives each its rank. The world size N is pipeline.stages x
parallel.dp. Run alone, it is plain single-device training of the same model.
Rank 0 writes metrics.jsonl, summary.json, trace.json, timeline.png and model.pt to the run
dir: SPLITGRAPH_RUN_DIR, else outputs/torchrun/<id> under torchrun, else outputs/<date>/<time>."""

TRAIN_FLAGS = """\
flags:
  -h, --help        this page
  --nproc N         fork N ranks on this machine after checking the launch as
                    splitgraph-check --nproc N does; OMP_NUM_THREADS=1 unless set
  --cfg job         print the composed config and exit (--resolve: with values resolved)
  --info            where each config file came from
  --hydra-help      Hydra's own flags (multirun, shell completion, ...)"""

TRAIN_EXAMPLE = """\
example:
  splitgraph-train --nproc 2 schedule=zb1 pipeline.microbatches=8 train.steps=50
  splitgraph-check --nproc 2 schedule=zb1 pipeline.microbatches=8   # check it without running"""


def train_template() -> str:
    """Hydra's help template for `splitgraph-train` ($APP_CONFIG_GROUPS: Hydra fills it in)."""
    return "\n\n".join(
        [
            TRAIN_USAGE,
            TRAIN_ABOUT,
            TRAIN_FLAGS,
            "config groups (group=option):\n$APP_CONFIG_GROUPS",
            OVERRIDES,
            TRAIN_EXAMPLE,
        ]
    )


def parser(prog: str, about: str, example: str) -> argparse.ArgumentParser:
    """An argparse parser whose page ends with the common overrides and `example`; its
    positional `overrides` collects the key=value words for Hydra."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=about,
        epilog=f"{OVERRIDES}\n\nexample:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides")
    return p
