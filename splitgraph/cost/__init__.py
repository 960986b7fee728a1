"""The cost model: what each layer, stage and message costs in time and bytes.

    costs.py         ModelCosts: per-layer bytes, FLOPs and times, devices, the link
    memory_model.py  the saved-activation peak of each rank, walked from its action list
    profiler.py      measured layer times and the measured link, cached on disk

It sits under `partition/` (the costed strategies read it) and over `schedule/` (a split's
price is a simulated step).
"""
