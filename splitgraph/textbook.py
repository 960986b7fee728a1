"""The chapter's backward pass, derived by hand and written as plain tensor algebra: no autograd.

The chapter's network has one hidden layer and no bias; it writes one example as a column vector:

    z = W1 x,   h = phi(z),   o = W2 h,   J = L + s,   s = lambda/2 (||W1||_F^2 + ||W2||_F^2)

and walks the graph backwards:

    dJ/do  = dL/do
    dJ/dW2 = dJ/do h^T + lambda W2
    dJ/dh  = W2^T dJ/do
    dJ/dz  = dJ/dh * phi'(z)                 (elementwise)
    dJ/dW1 = dJ/dz x^T + lambda W1

splitgraph stores a minibatch *batch-major*: row i of X [B, d] is sample i's x^T, so the same
equations read, with capital letters for the stacked rows,

    chapter (one column)        splitgraph (B rows)          shape
    z = W1 x                    Z = X W1^T                   [B, h]
    o = W2 h                    O = H W2^T                   [B, q]
    dJ/do                       G_O = dL/dO                  [B, q]  row i: sample i's dJ/do, /B
    dJ/dW2 = dJ/do h^T + l W2   G_O^T H + l W2               [q, h]  sum_i of the outer products
    dJ/dh = W2^T dJ/do          G_H = G_O W2                 [B, h]
    dJ/dz = dJ/dh * phi'(z)     G_Z = G_H * phi'(Z)          [B, h]
    dJ/dW1 = dJ/dz x^T + l W1   G_Z^T X + l W1               [h, d]

`L` is the mean over the B samples, so the 1/B sits in G_O and the weight gradients are sums of
per-sample outer products. `s` does not depend on h, so dJ/dh = dL/dh: that is exactly the tensor
a pipeline sends back across a cut between the hidden and the output layer, one microbatch's rows
at a time (the rows of G_H belonging to that microbatch).

`one_hidden_layer` is the chapter verbatim. `backprop` is the same walk for any depth, with
biases (exercise 2: `z = W x + b`, `dJ/db = sum_i dJ/dz_i`, and no `lambda b`: the bias is not
weight-decayed), every activation the model supports and both tasks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from splitgraph.config import Activation, Task

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# -- the activation and its derivative ------------------------------------------------------


def phi(activation: Activation | str, z: Tensor) -> Tensor:
    """h = phi(z), written out (GELU is the exact one, z * Phi(z), as `F.gelu` computes)."""
    a = Activation(activation)
    if a == Activation.relu:
        return z.clamp_min(0.0)
    if a == Activation.tanh:
        return torch.tanh(z)
    if a == Activation.sigmoid:
        return 1.0 / (1.0 + torch.exp(-z))
    return z * 0.5 * (1.0 + torch.erf(z / _SQRT_2))


def phi_prime(activation: Activation | str, z: Tensor) -> Tensor:
    """phi'(z), elementwise:

    relu     1[z > 0]                 (0 at the kink, as PyTorch's ReLU backward)
    tanh     1 - tanh(z)^2
    sigmoid  sigma(z) (1 - sigma(z))
    gelu     Phi(z) + z phi_N(z)      Phi, phi_N: the standard normal CDF and density
    """
    a = Activation(activation)
    if a == Activation.relu:
        return (z > 0).to(z.dtype)
    if a == Activation.tanh:
        return 1.0 - torch.tanh(z) ** 2
    if a == Activation.sigmoid:
        sig = 1.0 / (1.0 + torch.exp(-z))
        return sig * (1.0 - sig)
    cdf = 0.5 * (1.0 + torch.erf(z / _SQRT_2))
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return cdf + z * pdf


# -- the loss and dL/do ---------------------------------------------------------------------


def loss_and_grad(o: Tensor, y: Tensor, task: Task | str) -> tuple[Tensor, Tensor]:
    """(L, dL/do) for the minibatch, L being the mean over its B samples.

    classification: L = mean_i (logsumexp(o_i) - o_i[y_i])      dL/do = (softmax(o) - onehot(y)) / B
    regression:     L = mean_i mean_j (o_ij - y_ij)^2            dL/do = 2 (o - y) / (B q)
    (splitgraph's MSE is the mean over samples of the per-sample mean over the q outputs.)
    """
    batch, q = o.shape
    if Task(task) == Task.classification:
        shift = o - o.max(dim=1, keepdim=True).values
        log_norm = torch.log(torch.exp(shift).sum(dim=1, keepdim=True))
        log_p = shift - log_norm
        onehot = torch.zeros_like(o)
        onehot[torch.arange(batch), y] = 1.0
        loss = -(log_p * onehot).sum() / batch
        return loss, (torch.exp(log_p) - onehot) / batch
    diff = o - y
    return (diff * diff).sum() / (batch * q), 2.0 * diff / (batch * q)


# -- the chapter's network, verbatim --------------------------------------------------------


@dataclass(frozen=True)
class OneHiddenLayer:
    """Every variable of the chapter's graph and its gradient, batch-major (see the module doc)."""

    z: Tensor
    h: Tensor
    o: Tensor
    L: Tensor
    s: Tensor
    J: Tensor
    dJ_do: Tensor
    dJ_dW2: Tensor
    dJ_dh: Tensor
    dJ_dz: Tensor
    dJ_dW1: Tensor


def one_hidden_layer(
    W1: Tensor,
    W2: Tensor,
    x: Tensor,
    y: Tensor,
    weight_decay: float,
    activation: Activation | str = Activation.relu,
    task: Task | str = Task.classification,
) -> OneHiddenLayer:
    """Forward and backward of `z = W1 x, h = phi(z), o = W2 h, J = L + s` by the chapter's
    five equations, each line the batch-major form of the one in the comment."""
    lam = weight_decay
    z = x @ W1.T  # z = W1 x
    h = phi(activation, z)  # h = phi(z)
    o = h @ W2.T  # o = W2 h
    L, dJ_do = loss_and_grad(o, y, task)  # dJ/do = dL/do  (s does not depend on o)
    s = 0.5 * lam * (W1.pow(2).sum() + W2.pow(2).sum())
    dJ_dW2 = dJ_do.T @ h + lam * W2  # dJ/dW2 = dJ/do h^T + lambda W2
    dJ_dh = dJ_do @ W2  # dJ/dh  = W2^T dJ/do
    dJ_dz = dJ_dh * phi_prime(activation, z)  # dJ/dz  = dJ/dh * phi'(z)
    dJ_dW1 = dJ_dz.T @ x + lam * W1  # dJ/dW1 = dJ/dz x^T + lambda W1
    return OneHiddenLayer(z, h, o, L, s, L + s, dJ_do, dJ_dW2, dJ_dh, dJ_dz, dJ_dW1)


# -- any depth, with biases -----------------------------------------------------------------


@dataclass(frozen=True)
class Backprop:
    """The hand-derived gradients of J for a whole MLP.

    `grads` uses the model's global names (`layers.<i>.weight|bias`). `input_grads[i]` is
    dJ/d(input of layer i): `input_grads[0]` is dJ/dx, and for i >= 1 it is dJ/dh_{i-1}, the
    gradient a pipeline sends back over a cut placed before layer i.
    """

    L: Tensor
    s: Tensor
    J: Tensor
    grads: dict[str, Tensor]
    input_grads: list[Tensor]
    pre_activations: list[Tensor]  # z_i for every layer (the last one is o)


def num_layers_of(params: Mapping[str, Tensor]) -> int:
    return 1 + max(int(k.split(".")[1]) for k in params if k.endswith(".weight"))


def backprop(
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    weight_decay: float,
    activation: Activation | str = Activation.relu,
    task: Task | str = Task.classification,
) -> Backprop:
    """The chapter's walk, layer by layer, for `layers.<i>.weight` (and `.bias` if present):

    forward   z_i = h_{i-1} W_i^T (+ b_i),  h_i = phi(z_i),  o = z_{n-1}  (h_{-1} = x)
    backward  G_{z_{n-1}} = dL/do
              dJ/dW_i   = G_{z_i}^T h_{i-1} + lambda W_i
              dJ/db_i   = sum over the batch of G_{z_i}          (no lambda: s has no biases)
              G_{h_{i-1}} = G_{z_i} W_i
              G_{z_{i-1}} = G_{h_{i-1}} * phi'(z_{i-1})
    """
    lam = weight_decay
    n = num_layers_of(params)
    W = [params[f"layers.{i}.weight"] for i in range(n)]
    b = [params.get(f"layers.{i}.bias") for i in range(n)]
    inputs, zs = [], []
    h = x
    for i in range(n):
        inputs.append(h)
        z = h @ W[i].T
        if b[i] is not None:
            z = z + b[i]
        zs.append(z)
        h = phi(activation, z) if i < n - 1 else z
    L, g = loss_and_grad(zs[-1], y, task)  # g = dJ/dz_i, starting at dJ/do
    s = 0.5 * lam * sum(w.pow(2).sum() for w in W)
    grads: dict[str, Tensor] = {}
    input_grads: list[Tensor] = [torch.empty(0)] * n
    for i in reversed(range(n)):
        grads[f"layers.{i}.weight"] = g.T @ inputs[i] + lam * W[i]
        if b[i] is not None:
            grads[f"layers.{i}.bias"] = g.sum(dim=0)
        g_in = g @ W[i]
        input_grads[i] = g_in
        if i > 0:
            g = g_in * phi_prime(activation, zs[i - 1])
    names = [f"layers.{i}.{kind}" for i in range(n) for kind in ("weight", "bias")]
    ordered = {k: grads[k] for k in names if k in grads}
    return Backprop(L, s, L + s, ordered, input_grads, zs)


def params_of(module: torch.nn.Module) -> dict[str, Tensor]:
    """A module's parameters as plain detached tensors under their (global) names."""
    return {k: v.detach() for k, v in module.named_parameters()}
