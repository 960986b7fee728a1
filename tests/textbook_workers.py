"""Rank functions for the textbook tests (importable, so spawn can find them).

They drive the real `PipelineEngine` and only *observe* it: `engine.p2p.post` is wrapped to
copy the tensor of every SEND_B transfer, i.e. the gradient this rank sends back across the
cut. Nothing in the runtime changes.
"""

from __future__ import annotations

from typing import Any

from splitgraph.config import Workload, load_config
from splitgraph.model import torch_dtype
from splitgraph.runtime.comm import Transfer
from splitgraph.runtime.engine import PipelineEngine
from splitgraph.schedule.ir import SEND_B, Action
from tests.workers import _batch, make_cfg


def cut_gradients_worker(
    rank: int, world: int, base: list[str], cases: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per case: the SEND_B tensors by (boundary, microbatch), this rank's `.grad`s, the sizes."""
    out: dict[str, dict[str, Any]] = {}
    base_cfg = load_config(base)
    for case in cases:
        cfg = make_cfg(base_cfg, case["overrides"])
        engine = PipelineEngine(Workload.of(cfg), rank, world)
        sent: dict[tuple[int, int], Any] = {}
        post = engine.p2p.post

        def recording(transfers: list[Transfer], post: Any = post, sent: dict = sent) -> list:
            for t in transfers:
                a = Action.parse(t.label)
                if a.op == SEND_B:
                    sent[(a.stage - 1, a.mb)] = t.tensor.detach().clone()
            return post(transfers)

        engine.p2p.post = recording  # type: ignore[method-assign]
        x, y = _batch(cfg, torch_dtype(cfg.runtime.dtype))
        engine.forward_backward(x, y)
        out[case["id"]] = {
            "sent": sent,
            "grads": {k: p.grad.detach().clone() for k, p in engine.named_parameters().items()},
            "sizes": list(engine.sizes),
            "stages": sorted(engine.stages),
        }
    return out
