"""The simulator's step time as a compiled longest path, fast enough to price many splits.

`simulate(sched, costs)` (async semantics) starts each compute action at the later of its
rank's previous compute and the arrival of the data it reads (its producer's end + the
transfer). For a fixed schedule that is a longest path in a DAG whose shape does not depend
on the costs, so `StepTimer` builds the DAG once and each evaluation is one pass over it.
`tests/test_costs_partition.py` checks it equals `simulate` on random costs for every
schedule.

Why not a closed form: GPipe's step time is exactly
    sum_s (f_s + b_s) + 2 sum_c comm_c + (m - 1) (max_s f_s + max_s b_s)
(the longest path turns once, at the last stage), but 1F1B's is a maximum over many path
shapes (42 maximal ones for 3 stages and 5 microbatches): the common estimate
sum + (m - 1) max_s (f_s + b_s) is off by up to 25% on unbalanced stages. So the planner
evaluates the schedule itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitgraph.schedule.ir import Action, Schedule, message
from splitgraph.schedule.simulate import Costs, _needs


@dataclass(frozen=True)
class _Node:
    action: Action
    prev: int  # index of the previous compute on the same rank, or -1
    producer: int  # index of the compute whose send this one reads, or -1
    boundary: int  # the boundary that message crosses (for its transfer time)


class StepTimer:
    """`StepTimer(schedule)(costs)` == `simulate(schedule, costs).step_time`."""

    def __init__(self, sched: Schedule) -> None:
        self.schedule = sched
        index: dict[Action, int] = {}
        sent_by: dict[tuple[str, int, int], Action] = {}
        actions: list[Action] = []
        prev_of: dict[Action, Action | None] = {}
        for row in sched.actions:
            last: Action | None = None
            for a in row:
                if a.op.is_compute:
                    prev_of[a] = last
                    last = a
                    actions.append(a)
                elif a.op.is_send and last is not None:
                    sent_by[message(a)] = last  # posted when its rank's clock is at `last`'s end
        order = self._topological(actions, prev_of, sent_by)
        index = {a: i for i, a in enumerate(order)}
        nodes = []
        for a in order:
            need = _needs(a.stage, a.op, a.mb, sched)
            p = prev_of[a]
            nodes.append(
                _Node(
                    a,
                    index[p] if p is not None else -1,
                    index[sent_by[need]] if need is not None else -1,
                    need[1] if need is not None else -1,
                )
            )
        self.nodes = tuple(nodes)

    def _topological(
        self,
        actions: list[Action],
        prev_of: dict[Action, Action | None],
        sent_by: dict[tuple[str, int, int], Action],
    ) -> list[Action]:
        order: list[Action] = []
        done: set[Action] = set()
        for root in actions:
            stack = [root]
            while stack:
                a = stack[-1]
                if a in done:
                    stack.pop()
                    continue
                deps = [prev_of[a]]
                need = _needs(a.stage, a.op, a.mb, self.schedule)
                if need is not None:
                    deps.append(sent_by[need])
                todo = [d for d in deps if d is not None and d not in done]
                if todo:
                    stack.extend(todo)
                else:
                    done.add(a)
                    order.append(a)
                    stack.pop()
        return order

    def __call__(self, costs: Costs) -> float:
        end = [0.0] * len(self.nodes)
        comm = costs.comm
        for i, node in enumerate(self.nodes):
            a = node.action
            start = end[node.prev] if node.prev >= 0 else 0.0
            if node.producer >= 0:
                arrive = end[node.producer]
                if comm is not None:
                    arrive += comm[node.boundary] * costs.scale(a.mb)
                start = max(start, arrive)
            end[i] = start + costs.compute(a.op, a.stage, a.mb)
        return max(end, default=0.0)
