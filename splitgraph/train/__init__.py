"""One training run, and the doors into it.

    run.py       the Hydra entry (`splitgraph-train`, `python -m splitgraph.train`) and the loop:
                 plan, engine, steps, evaluation, checkpoints, summary.json
    compose.py   Hydra composes the config once per process, not twice
    evaluate.py  held-out metrics of the consolidated weights
    cli.py       `splitgraph-check`: the config and plan checked before torchrun starts
    torchrun.py  torchrun with a quiet, resumable stop (launch/*.sh use it)
    usage.py     every command's --help page

This file imports nothing: `splitgraph-check`, the launcher and --help stay light.
"""
