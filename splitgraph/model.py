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
from torch.autograd.graph import get_gradient_edge

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

#: relu, tanh and sigmoid in place, for a forward by hand: z is not needed after phi
_ACTIVATIONS_INPLACE = {
    Activation.relu: torch.relu_,
    Activation.tanh: torch.tanh_,
    Activation.sigmoid: torch.sigmoid_,
}

#: phi' times the incoming gradient, from what phi saved: the kernels autograd runs
#: (derivatives.yaml: relu, tanh and sigmoid from their output, gelu from its input)
_PHI_BACKWARD = {
    Activation.relu: lambda g, h: torch.ops.aten.threshold_backward(g, h, 0),
    Activation.tanh: torch.ops.aten.tanh_backward,
    Activation.sigmoid: torch.ops.aten.sigmoid_backward,
    Activation.gelu: torch.ops.aten.gelu_backward,
}


def _model_cfg(given: Any) -> ModelConfig:
    """The model section; callers may hand a whole config (tests, notebooks) for brevity."""
    return given.model if hasattr(given, "model") else given


def layer_dims(model: ModelConfig) -> list[int]:
    """Widths of every variable in the chain: [in_features, *hidden, out_features]."""
    m = _model_cfg(model)
    return [int(m.in_features), *(int(h) for h in m.hidden), int(m.out_features)]


class WeightGradStore:
    """The weight-gradient halves of one backward cut in two (zero-bubble's I and W).

    Two ways to record a stage's F for them, one result (`forward` picks):

    *By hand* (the MLP's own layers, 2-D input, no autocast): F runs each layer under
    `no_grad` and keeps exactly what autograd would save (each linear's input; relu, tanh
    and sigmoid's output, gelu's input), counted by the meter as autograd's hooks would
    count them. I walks the layers back itself, with the kernels autograd would call:
    `dz = phi'(dh)` (aten's threshold/tanh/sigmoid/gelu backward), `dh_prev = dz W`. On
    the last stage the loss alone has a graph: F's output is a leaf, and I starts from
    autograd's dJ/do. No graph nodes, no gradient edges, no saved-tensor hooks per layer:
    on microbatches of 16-64 rows that per-node work was what made I + W dearer than B.

    *With autograd* (the general fallback: bf16 autocast, other inputs): while the store
    records (`recording`), each split layer's forward notes its weight, bias, input `x`
    and the autograd edge of its output `z = W x (+ b)` (an edge names the node, it keeps
    no tensor alive). `input_grad` (I) then runs autograd towards those edges and the
    stage input only: every node forms its input gradient, none forms `dJ/dW` (autograd
    skips what no requested input needs), and the `dz` reaching each edge is kept.

    Either way `run` (W) does the rest of the chapter's formula, `dJ/dW = dz^T x` (and
    `dJ/db = sum dz`). Together they are exactly one full backward: nothing is computed
    twice.

        F:  x -> [z0 = W0 x] -> h1 -> [z1 = W1 h1] -> ...     keeps x, h1, ...
        I:  grad -> ... dz1 -> dh1 -> dz0 -> dx              keeps dz1, dz0; no dJ/dW
        W:  dJ/dW1 = dz1^T h1,  dJ/dW0 = dz0^T x

    `meter`, if given, counts the kept tensors (each linear's input and output gradient).
    """

    def __init__(self, meter: Any = None) -> None:
        self.layers: list[tuple[nn.Parameter, nn.Parameter | None, Tensor, Any]] = []
        #: by hand: per layer (the layer, its input, what its phi' needs or None)
        self.hand: list[tuple[Layer, Tensor, Tensor | None]] = []
        #: by hand, last stage: the output leaf the loss's graph starts from
        self.output: Tensor | None = None
        self.jobs: list[tuple[nn.Parameter, nn.Parameter | None, Tensor, Tensor]] = []
        self.meter = meter

    def linear(self, x: Tensor, weight: nn.Parameter, bias: nn.Parameter | None) -> Tensor:
        """`F.linear`, noted for I and W (the autograd path). Under autocast the input is
        cast first, as autocast would, so the tensor kept for W is the one autograd keeps."""
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))
        z = F.linear(x, weight, bias)
        self.layers.append((weight, bias, x, get_gradient_edge(z)))
        return z

    def forward(self, stage: StageModule, x: Tensor) -> Tensor:
        """The stage's F, recorded for I and W: by hand where it can be, else by autograd."""
        if x.dim() != 2 or torch.is_autocast_enabled(x.device.type):
            with recording(self):
                return stage(x)
        meter = self.meter
        with torch.no_grad():
            for layer in stage.layers.values():
                z = F.linear(x, layer.weight, layer.bias)
                act = layer.activation
                if act is None:
                    saved, h = None, z
                elif act == Activation.gelu:  # gelu' needs its input
                    saved = z
                    h = F.gelu(z)
                else:  # relu, tanh, sigmoid: phi' from the output; z is not needed again
                    saved = h = _ACTIVATIONS_INPLACE[act](z)
                if meter is not None:
                    meter.hold(x)
                    if saved is not None:
                        meter.hold(saved)
                self.hand.append((layer, x, saved))
                x = h
        if stage.is_last:  # the loss (outside) builds its graph from here
            self.output = x.requires_grad_(True)
        return x

    def input_grad(self, target: Tensor, grad: Tensor | None, x: Tensor | None) -> Tensor | None:
        """I: backpropagate `grad` from `target` to the stage input `x` (None: the first
        stage, whose input needs no gradient); keep each layer's `dz` for W. Returns dx."""
        if self.hand:
            if grad is None:  # the last stage: dJ/do from the loss's own graph
                assert self.output is not None, "a last stage recorded by hand keeps its output"
                (grad,) = torch.autograd.grad(target, self.output)
                self.output = None
            return self._input_grad_by_hand(grad, x is not None)
        if self.meter is not None:  # autograd releases them as it goes; W still needs them
            for _, _, a, _ in self.layers:
                self.meter.hold(a)
        edges = [edge for *_, edge in self.layers]
        wanted = [x, *edges] if x is not None else edges
        grads = torch.autograd.grad(target, wanted, grad)
        dzs = grads[1:] if x is not None else grads
        for (weight, bias, a, _), dz in zip(self.layers, dzs, strict=True):
            if self.meter is not None:
                self.meter.hold(dz)
            self.jobs.append((weight, bias, a, dz))
        self.layers.clear()
        return grads[0] if x is not None else None

    @torch.no_grad()
    def _input_grad_by_hand(self, dh: Tensor, want_dx: bool) -> Tensor | None:
        """I by hand, last layer first, in the order autograd would run (and the memory
        model walks): phi's saved tensor is let go, then dz is kept for W."""
        meter = self.meter
        for k in range(len(self.hand) - 1, -1, -1):
            layer, a, saved = self.hand[k]
            if saved is None:
                dz = dh
            else:
                dz = _PHI_BACKWARD[layer.activation](dh, saved)  # type: ignore[index]
                if meter is not None:
                    meter.drop(saved)
            if meter is not None:
                meter.hold(dz)
            self.jobs.append((layer.weight, layer.bias, a, dz))
            if k > 0 or want_dx:
                dh = dz.mm(layer.weight)
        self.hand.clear()
        return dh if want_dx else None

    @torch.no_grad()
    def run(self) -> None:
        """W: form and accumulate every deferred weight (and bias) gradient."""
        for weight, bias, x, dz in self.jobs:
            g = weight.grad
            if g is not None and g.dtype == dz.dtype == x.dtype:
                g.addmm_(dz.t(), x)  # in place: no product tensor, no second pass to add it
            else:
                _accumulate(weight, _as(dz.t().mm(x), weight.dtype))
            if bias is not None:
                _accumulate(bias, _as(dz.sum(0), bias.dtype))
            if self.meter is not None:
                self.meter.drop(x)
                self.meter.drop(dz)
        self.jobs.clear()


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _accumulate(p: nn.Parameter, g: Tensor) -> None:
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


#: The store that split layers record into, set by `recording`. A plain global, not a
#: thread-local: only the executor's thread runs forwards.
_RECORDING: WeightGradStore | None = None


class recording:
    """Within this block, split layers note what I and W need in `store` (see WeightGradStore)."""

    def __init__(self, store: WeightGradStore) -> None:
        self.store = store

    def __enter__(self) -> WeightGradStore:
        global _RECORDING
        _RECORDING = self.store
        return self.store

    def __exit__(self, *exc: object) -> None:
        global _RECORDING
        _RECORDING = None


class Layer(nn.Module):
    """One layer of the chapter's graph: `z = W x (+ b)`, then `h = phi(z)` unless it is last.

    The linear map is `F.linear`; while a WeightGradStore records (zero-bubble's I and W),
    it is noted there too, so the backward can leave its weight gradient for a later W.
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

    def forward(self, x: Tensor) -> Tensor:
        store = _RECORDING
        if store is not None:
            z = store.linear(x, self.weight, self.bias)
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
