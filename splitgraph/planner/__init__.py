"""The planner: a prediction before the run, a search over layouts, and the check after it.

predict.py  one layout's predicted step time and memory per rank (the cost model + simulator)
search.py   every strategy x schedule x microbatch count, ranked by predicted time
check.py    the run's measurements against the prediction (summary.json's `prediction`)
cli.py      `splitgraph-plan`: the table, plan.json and plan.png before anything runs
"""
