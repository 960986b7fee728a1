"""zb's backward cut in two (model.WeightGradStore): the forward and I by hand give autograd's
gradients and count autograd's saved bytes; under bf16 autocast the store falls back to
autograd. The executor-level proofs are test_equivalence's grid (float64, every schedule)
and test_memory_model's (predicted bytes == measured); these pin the store itself."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from splitgraph.config import Task, load_config
from splitgraph.model import WeightGradStore, build_mlp, loss_sum, recording
from splitgraph.observe.memory import SavedTensorMeter

#: 5-7-6-4: three layers, so a stage has a middle layer and the model an output layer
MODEL = ["model.in_features=5", "model.hidden=[7,6]", "model.out_features=4", "model.bias=true"]
ROWS = 3


def _problem(activation: str, task: str, start: int, stop: int) -> tuple:
    cfg = load_config([*MODEL, f"model.activation={activation}", f"model.task={task}"])
    plain = build_mlp(cfg.model, start, stop, torch.float64)
    split = build_mlp(cfg.model, start, stop, torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, plain.in_features, generator=g, dtype=torch.float64)
    if not plain.is_last:
        y = torch.randn(ROWS, plain.out_features, generator=g, dtype=torch.float64)
    elif Task(task) == Task.classification:
        y = torch.randint(0, plain.out_features, (ROWS,), generator=g)
    else:
        y = torch.randn(ROWS, plain.out_features, generator=g, dtype=torch.float64)
    return plain, split, x, y, Task(task)


def _target(module: torch.nn.Module, out: torch.Tensor, y: torch.Tensor, task: Task) -> tuple:
    """(what I starts from, its incoming gradient): the loss on the last stage, else y."""
    if module.is_last:  # type: ignore[operator]
        return loss_sum(out, y, task) / ROWS, None
    return out, y


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "gelu"])
@pytest.mark.parametrize(
    ("task", "start", "stop"),
    [("classification", 0, 2), ("classification", 1, 3), ("regression", 1, 3)],
    ids=["first", "last-classification", "last-regression"],
)
def test_forward_and_i_by_hand_give_autograds_gradients_and_bytes(
    activation: str, task: str, start: int, stop: int
) -> None:
    plain, split, x, y, tk = _problem(activation, task, start, stop)
    x_plain = x.clone().requires_grad_(start > 0)
    x_split = x.clone().requires_grad_(start > 0)
    with SavedTensorMeter(plain.parameters()) as ref_meter:
        out = plain(x_plain)
        target, grad = _target(plain, out, y, tk)
        after_f = ref_meter.current
        torch.autograd.backward(target, grad)
    with SavedTensorMeter(split.parameters()) as meter:
        store = WeightGradStore(meter)
        out = store.forward(split, x_split)
        assert store.hand and not store.layers, "the MLP's own layers go by hand"
        assert plain.is_last or out.grad_fn is None, "by hand: no graph through the layers"
        target, grad = _target(split, out, y, tk)
        assert meter.current == after_f, "F by hand keeps what autograd saves"
        dx = store.input_grad(target, grad, x_split if start > 0 else None)
        assert all(p.grad is None for p in split.parameters()), "I forms no dJ/dW"
        store.run()
        assert meter.current == 0 and ref_meter.current == 0
    if start > 0:
        assert dx is not None
        assert_close(dx, x_plain.grad, rtol=1e-12, atol=0)
    else:
        assert dx is None
    for (name, p), q in zip(plain.named_parameters(), split.parameters(), strict=True):
        assert q.grad is not None, name
        assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-15, msg=name)


def test_under_bf16_autocast_the_store_records_autograd_edges() -> None:
    """Autocast casts inside each op; the hand path would keep float32 copies it never
    made, so it falls back to autograd, and still matches the plain backward."""
    plain, split, x, y, _ = _problem("relu", "classification", 0, 2)
    plain, split = plain.float(), split.float()
    x, y = x.float(), y.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = plain(x)
    torch.autograd.backward(out, y.to(out.dtype))
    store = WeightGradStore()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = store.forward(split, x)
    assert store.layers and not store.hand, "autocast: the autograd path"
    store.input_grad(out, y.to(out.dtype), None)
    store.run()
    for p, q in zip(plain.parameters(), split.parameters(), strict=True):
        assert_close(q.grad, p.grad, rtol=1e-2, atol=1e-3)


def test_recording_still_drives_the_autograd_path() -> None:
    """`recording` (the fallback under autocast) and the hand path agree to rounding."""
    plain, split, x, y, _ = _problem("tanh", "classification", 0, 2)
    store = WeightGradStore()
    with recording(store):
        out = split(x)
    store.input_grad(out, y, None)
    store.run()
    hand = WeightGradStore()
    hand.input_grad(hand.forward(plain, x), y, None)
    hand.run()
    for p, q in zip(plain.parameters(), split.parameters(), strict=True):
        assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-15)
