"""Seeing into a run: what the runtime records, and the pictures drawn from it.

    trace.py     per-action records on one clock, and what they say against the prediction
    memory.py    the bytes autograd saves for backward, counted exactly (saved-tensor hooks)
    nvml.py      GPU memory and utilisation over time (NVML, a background thread)
    timeline.py  timelines as pictures: ranks as rows, one box per action
    draw.py      the partitioned computational graph, in the textbook's style

It sits under `runtime/`: the executor records into the tracer and the memory meter.
"""
