"""The textbook MLP, built so that any contiguous slice of it is a pipeline stage.

The chapter's network, generalised to any depth::

    x -> [W0] -> z0 -> phi -> h0 -> [W1] -> z1 -> phi -> ... -> [W_{L-1}] -> o -> loss -> L
                                                                                    |
    s = lambda/2 * sum_l ||W_l||_F^2  (weights only, never biases) ----------------> J = L + s

Layer `i` is `z = W_i x (+ b_i)` followed by `phi` unless it is the output layer. Parameters are
named `layers.<i>.weight` / `layers.<i>.bias` with the *global* index `i`, whichever stage holds
them, so a state dict from any partition loads into the single-device model.

Initialisation is seeded per layer (`model.init_seed`, layer index), so every partition, every
rank and the single-device reference start from the same weights without building the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitgraph.config import Activation, DType, ModelConfig, Task

#: runtime.dtype -> (parameter dtype, compute dtype). bfloat16 is autocast: the weights and
#: their gradients stay float32 (the master copy the optimizer updates), matmuls run in bf16
#: and the activations and gradients between stages travel in bf16.
PRECISION = {
    DType.float32: (torch.float32, torch.float32),
    DType.float64: (torch.float64, torch.float64),
    DType.bfloat16: (torch.float32, torch.bfloat16),
}


def torch_dtype(name: DType | str) -> torch.dtype:
    """The parameter (and data) dtype for `runtime.dtype`."""
    return PRECISION[DType(name)][0]


def compute_dtype(name: DType | str) -> torch.dtype:
    """The dtype of activations between stages (bf16 under autocast)."""
    return PRECISION[DType(name)][1]


_ACTIVATIONS = {
    Activation.relu: torch.relu,
    Activation.tanh: torch.tanh,
    Activation.sigmoid: torch.sigmoid,
    Activation.gelu: F.gelu,
}


def _model_cfg(given: Any) -> ModelConfig:
    """The model section; callers may hand a whole config (tests, notebooks) for brevity."""
    return given.model if hasattr(given, "model") else given


def layer_dims(model: ModelConfig) -> list[int]:
    """Widths of every variable in the chain: [in_features, *hidden, out_features]."""
    m = _model_cfg(model)
    return [int(m.in_features), *(int(h) for h in m.hidden), int(m.out_features)]


class WeightGradStore:
    """The weight-gradient halves of one deferred backward (zero-bubble's W).

    While a store is active (`deferring`), a layer's backward computes only the gradient
    w.r.t. its input, `dJ/dx = dz W`, and keeps `(x, dz)`; `run()` later does the rest of the
    chapter's formula, `dJ/dW = dz^T x` (and `dJ/db = sum dz`). Together they are exactly one
    full backward: nothing is computed twice. `meter`, if given, counts the kept tensors.
    """

    def __init__(self, meter: Any = None) -> None:
        self.jobs: list[tuple[nn.Parameter, nn.Parameter | None, Tensor, Tensor]] = []
        self.meter = meter

    def defer(self, weight: nn.Parameter, bias: nn.Parameter | None, x: Tensor, dz: Tensor) -> None:
        if self.meter is not None:
            self.meter.hold(x)
            self.meter.hold(dz)
        self.jobs.append((weight, bias, x, dz))

    @torch.no_grad()
    def run(self) -> None:
        for weight, bias, x, dz in self.jobs:
            _accumulate(weight, dz.t().mm(x).to(weight.dtype))
            if bias is not None:
                _accumulate(bias, dz.sum(0).to(bias.dtype))
            if self.meter is not None:
                self.meter.drop(x)
                self.meter.drop(dz)
        self.jobs.clear()


def _accumulate(p: nn.Parameter, g: Tensor) -> None:
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


#: The store that layer backwards defer into, set by `deferring`. A plain global, not a
#: thread-local: autograd runs CUDA backwards on its own threads.
_ACTIVE_STORE: WeightGradStore | None = None


class deferring:
    """Within this block, split-backward layers defer their weight gradients into `store`."""

    def __init__(self, store: WeightGradStore) -> None:
        self.store = store

    def __enter__(self) -> WeightGradStore:
        global _ACTIVE_STORE
        _ACTIVE_STORE = self.store
        return self.store

    def __exit__(self, *exc: object) -> None:
        global _ACTIVE_STORE
        _ACTIVE_STORE = None


class _SplitLinear(torch.autograd.Function):
    """`F.linear` whose backward can leave the weight gradient for later (see WeightGradStore).

    Under autocast it casts as autocast would (inputs and weight to the autocast dtype) and
    keeps the cast input for W; gradients come back in each input's own dtype, so float32
    master weights get float32 gradients.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: nn.Parameter, bias: nn.Parameter | None) -> Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        xc, wc = x.to(dtype), weight.to(dtype)
        bc = bias.to(dtype) if bias is not None else None
        ctx.save_for_backward(xc)
        ctx.weight, ctx.bias, ctx.x_dtype = weight, bias, x.dtype
        with torch.autocast(dev, enabled=False):
            return F.linear(xc, wc, bc)

    @staticmethod
    def backward(ctx: Any, dz: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        dx = dz.mm(weight.to(dz.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        store = _ACTIVE_STORE
        if store is not None:
            store.defer(weight, bias, x, dz)
            return dx, None, None
        db = dz.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dz.t().mm(x).to(weight.dtype), db


class Layer(nn.Module):
    """One layer of the chapter's graph: `z = W x (+ b)`, then `h = phi(z)` unless it is last.

    With `split_backward` set (zero-bubble schedules), the linear map keeps its weight gradient
    for a later W action when a WeightGradStore is active; otherwise it is plain `F.linear`.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, activation: Activation | None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)
        self.activation = activation
        self._phi = _ACTIVATIONS[activation] if activation is not None else None
        self.split_backward = False

    def forward(self, x: Tensor) -> Tensor:
        if self.split_backward:
            z = _SplitLinear.apply(x, self.weight, self.bias)
        else:
            z = F.linear(x, self.weight, self.bias)
        return self._phi(z) if self._phi is not None else z

    def extra_repr(self) -> str:
        out, inp = self.weight.shape
        act = self.activation.value if self.activation else "none (output layer)"
        return f"{inp} -> {out}, bias={self.bias is not None}, phi={act}"


class StageModule(nn.Module):
    """Layers `[start, stop)` of the MLP under their global names (`layers.<i>.*`)."""

    def __init__(self, model: ModelConfig, start: int = 0, stop: int | None = None) -> None:
        super().__init__()
        m = _model_cfg(model)
        dims = layer_dims(m)
        n = len(dims) - 1
        stop = n if stop is None else stop
        if not 0 <= start < stop <= n:
            raise ValueError(f"layer range [{start}, {stop}) is not inside the {n} layers")
        self.start, self.stop, self.num_layers = start, stop, n
        act = Activation(m.activation) if not isinstance(m.activation, Activation) else m.activation
        self.layers = nn.ModuleDict(
            {
                str(i): Layer(dims[i], dims[i + 1], bool(m.bias), act if i < n - 1 else None)
                for i in range(start, stop)
            }
        )

    @property
    def in_features(self) -> int:
        return self.layers[str(self.start)].weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.layers[str(self.stop - 1)].weight.shape[0]

    @property
    def is_last(self) -> bool:
        return self.stop == self.num_layers

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers.values():
            x = layer(x)
        return x

    def weights(self) -> Iterable[Tensor]:
        """The weight matrices: the only parameters the L2 term `s` touches."""
        return (layer.weight for layer in self.layers.values())


def init_layer_(layer: Layer, index: int, seed: int) -> None:
    """nn.Linear's default init (U(-1/sqrt(fan_in), +)), drawn from a generator seeded by
    (seed, layer index) in float32 on the CPU, so it is the same on every rank and device."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    out_f, in_f = layer.weight.shape
    bound = 1.0 / math.sqrt(in_f)
    with torch.no_grad():
        w = torch.empty(out_f, in_f).uniform_(-bound, bound, generator=g)
        layer.weight.copy_(w)
        if layer.bias is not None:
            layer.bias.copy_(torch.empty(out_f).uniform_(-bound, bound, generator=g))


def build_mlp(
    model: ModelConfig,
    start: int = 0,
    stop: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> StageModule:
    """Build layers `[start, stop)` (default: the whole model) with the seeded initial weights."""
    module = StageModule(model, start, stop)
    seed = _model_cfg(model).init_seed
    for name, layer in module.layers.items():
        init_layer_(layer, int(name), seed)
    return module.to(dtype=dtype, device=device)


def l2_term(module: StageModule, weight_decay: float) -> Tensor:
    """`s` restricted to this module: lambda/2 * sum ||W||_F^2 over its weight matrices.

    One fused dot product per matrix in its own dtype (no float64 copy of the weights);
    the sum over matrices is float64. Nothing at all when lambda is 0.
    """
    weights = list(module.weights())
    if weight_decay == 0.0 or not weights:
        return torch.zeros((), dtype=torch.float64)
    with torch.no_grad():  # on the weights' device: one sync when the caller reads it
        squares = [torch.dot(w.reshape(-1), w.reshape(-1)).double() for w in weights]
        return 0.5 * weight_decay * torch.stack(squares).sum()


def add_l2_grad_(module: StageModule, weight_decay: float) -> None:
    """Add ds/dW = lambda W to each weight's gradient: local to the stage, no communication."""
    if weight_decay == 0.0:
        return
    with torch.no_grad():
        for w in module.weights():
            if w.grad is None:
                w.grad = weight_decay * w.detach().clone()
            else:
                w.grad.add_(w, alpha=weight_decay)


def loss_sum(output: Tensor, target: Tensor, task: Task) -> Tensor:
    """Sum over the samples of the per-sample loss (cross-entropy, or MSE averaged over outputs).

    A microbatch contributes `loss_sum / batch_size` to L, so L is the mean over the whole
    minibatch however it is cut into microbatches, even unevenly.
    """
    if Task(task) == Task.classification:
        return F.cross_entropy(output, target, reduction="sum")
    return F.mse_loss(output, target, reduction="sum") / output.shape[-1]


def objective(
    module: StageModule, x: Tensor, y: Tensor, task: Task, weight_decay: float
) -> tuple[Tensor, Tensor]:
    """(L, J) of the whole model on a full minibatch: the single-device reference, with autograd
    through both terms."""
    out = module(x)
    loss = loss_sum(out, y, task) / x.shape[0]
    s = sum(w.pow(2).sum() for w in module.weights()) * (0.5 * weight_decay)
    return loss, loss + s
