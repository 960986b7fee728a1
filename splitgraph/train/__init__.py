"""One training run, and the doors into it.

    run.py       the Hydra entry (`splitgraph-train`, `python -m splitgraph.train`) and the loop:
                 plan, engine, steps, evaluation, checkpoints, summary.json
    compose.py   Hydra composes the config once per process, not twice
    evaluate.py  held-out metrics of the consolidated weights
    cli.py       `splitgraph-check`, and `splitgraph-train`'s `--nproc N` flag
    check.py     splitgraph-check's checks of a composed config
    fork.py      `splitgraph-train --nproc N`: the ranks forked from one process (launch/train.sh)
    torchrun.py  torchrun with a quiet, resumable stop (launch/multinode.sh, slurm.sbatch)
    usage.py     every command's --help page

This file imports nothing: `splitgraph-check`, the launcher and --help stay light.
"""
