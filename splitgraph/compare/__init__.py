"""The comparison harness: the same model and data trained every way that fits a memory cap.

When a network's graph does not fit one device, should you split it across devices or train on
a smaller minibatch? `splitgraph-compare` runs each option as a real process (pipelines through
`torchrun`, exactly what users run) under the same per-device cap and reports what each costs
and buys:

    config.py     the harness's schema (`compare:` node) and its cross-field rules
    variants.py   full / small / accumulate / recompute / pipeline -> training overrides
    runner.py     one subprocess per variant, with a deadline and a progress bar
    analysis.py   run dirs -> one row of metrics per variant (targets, distances from full)
    conclusion.py the conclusion and the notes, sentences computed from the rows
    report.py     report.md, summary.csv, results.json and the figures
    sweep.py      one table of every point of a multirun
    main.py       the Hydra entry point (`splitgraph-compare`)
"""
